//! The XSM/FLASK fragment that lets exactly the allowed pairs of domain types share grants and event channels.
//! (Minimal stand-in: replaced by the full module.)
#![allow(missing_docs)]
use std::collections::BTreeSet;
pub struct XsmInput { pub pairs: BTreeSet<(String, String)>, pub types: BTreeSet<String>, pub widened: Vec<String> }
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct XsmError(pub String);
pub fn fragment(input: &XsmInput) -> Result<String, XsmError> { Ok(format!("{:?}", input.pairs)) }
pub fn flask_type(label: &str) -> Result<String, XsmError> { Ok(format!("{label}_t")) }
