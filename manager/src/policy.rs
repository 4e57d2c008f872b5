//! The policy: rules `SERVICE SOURCE TARGET ACTION`, their files and their evaluation.
