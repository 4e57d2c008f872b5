//! dombus examples.
