//! dombus benchmarks (see benches/).
