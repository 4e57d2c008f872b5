//! Links: two byte rings and an event channel between a server and a client domain.

pub mod endpoint;
