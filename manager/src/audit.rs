//! The audit trail: one JSON record per decision, in a size-bounded, rotated file.
//! (Minimal stand-in: replaced by the full module.)
#![allow(missing_docs)]
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party { pub name: Option<String>, pub domid: Option<u32> }
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict { Allow, Deny }
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord { pub time: String, pub decision: u64, pub source: Party, pub target: Party, pub requested: String, pub service: String, pub port: u32, pub rule: Option<String>, pub result: Verdict, pub reason: String }
#[derive(Debug, Clone, Copy)]
pub struct AuditLimits { pub max_bytes: u64, pub keep: u32 }
impl Default for AuditLimits { fn default() -> Self { AuditLimits { max_bytes: 8 << 20, keep: 4 } } }
pub struct AuditLog { path: PathBuf, lock: Mutex<()> }
impl AuditLog {
    pub fn open(path: impl Into<PathBuf>, _limits: AuditLimits) -> std::io::Result<AuditLog> { Ok(AuditLog { path: path.into(), lock: Mutex::new(()) }) }
    pub fn append(&self, r: &AuditRecord) -> std::io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut line = serde_json::to_vec(r)?; line.push(b'\n');
        std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?.write_all(&line)
    }
    pub fn tail(&self, n: usize) -> Vec<AuditRecord> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let all: Vec<AuditRecord> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        all[all.len().saturating_sub(n)..].to_vec()
    }
    pub fn find(&self, decision: u64) -> Option<AuditRecord> { self.tail(usize::MAX).into_iter().rev().find(|r| r.decision == decision) }
}
pub fn now_rfc3339() -> String { format!("{:?}", std::time::SystemTime::now()) }
