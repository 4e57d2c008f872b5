//! The audit trail: one JSON record per decision, in a size-bounded, rotated file.
