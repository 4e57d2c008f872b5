//! The simulated hypervisor (being written).
