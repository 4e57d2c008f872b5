//! The policy: rules `SERVICE SOURCE TARGET ACTION`, their files and their evaluation.
//! (Minimal stand-in: replaced by the full module.)
#![allow(missing_docs)]

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Service { Any, Port(u32), Name(String) }
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Subject { Any, AnyVm, Backend, Toolstack, Name(String), Tag(String), Type(String) }
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action { Allow, Deny }
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin { pub file: String, pub line: u32 }
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule { pub service: Service, pub source: Subject, pub target: Subject, pub action: Action, pub origin: Origin }
impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = |x: &Subject| match x { Subject::Any => "*".into(), Subject::AnyVm => "@anyvm".into(), Subject::Backend => "@backend".into(), Subject::Toolstack => "@toolstack".into(), Subject::Name(n) => n.clone(), Subject::Tag(t) => format!("@tag:{t}"), Subject::Type(t) => format!("@type:{t}") };
        let svc = match &self.service { Service::Any => "*".into(), Service::Port(p) => p.to_string(), Service::Name(n) => n.clone() };
        write!(f, "{svc} {} {} {}", s(&self.source), s(&self.target), if self.action == Action::Allow { "allow" } else { "deny" })
    }
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct PolicyError { pub file: String, pub line: u32, pub message: String }
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct LoadError(pub Vec<PolicyError>);
pub struct DomainView<'a> { pub name: &'a str, pub type_: Option<&'a str>, pub tags: &'a [String], pub backend: bool, pub toolstack: bool }
#[derive(Clone, Copy)]
pub struct ServiceRef<'a> { pub port: u32, pub name: Option<&'a str> }
pub struct Decision<'a> { pub action: Action, pub rule: Option<&'a Rule> }
#[derive(Debug, Clone, Default)]
pub struct Policy { rules: Vec<Rule> }

fn subject(t: &str) -> Option<Subject> {
    Some(match t { "*" => Subject::Any, "@anyvm" => Subject::AnyVm, "@backend" => Subject::Backend, "@toolstack" => Subject::Toolstack,
        t if t.starts_with("@tag:") => Subject::Tag(t[5..].into()), t if t.starts_with("@type:") => Subject::Type(t[6..].into()),
        t if t.starts_with('@') => return None, t => Subject::Name(t.into()) })
}
fn matches(s: &Subject, d: &DomainView) -> bool {
    match s { Subject::Any => true, Subject::AnyVm => !d.backend && !d.toolstack, Subject::Backend => d.backend, Subject::Toolstack => d.toolstack,
        Subject::Name(n) => n == d.name, Subject::Tag(t) => d.tags.contains(t), Subject::Type(t) => d.type_ == Some(t.as_str()) }
}
impl Policy {
    pub fn parse_file(file: &str, text: &str) -> Result<Vec<Rule>, Vec<PolicyError>> {
        let mut rules = Vec::new(); let mut errors = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i as u32 + 1;
            let l = line.split('#').next().unwrap_or("").trim();
            if l.is_empty() { continue; }
            let f: Vec<&str> = l.split_whitespace().collect();
            let err = |m: &str| PolicyError { file: file.into(), line: line_no, message: m.into() };
            if f.len() != 4 { errors.push(err("expected SERVICE SOURCE TARGET ACTION")); continue; }
            let service = if f[0] == "*" { Service::Any } else if let Ok(p) = f[0].parse() { Service::Port(p) } else { Service::Name(f[0].into()) };
            let (Some(source), Some(target)) = (subject(f[1]), subject(f[2])) else { errors.push(err("bad subject")); continue };
            let action = match f[3] { "allow" => Action::Allow, "deny" => Action::Deny, _ => { errors.push(err("bad action")); continue } };
            rules.push(Rule { service, source, target, action, origin: Origin { file: file.into(), line: line_no } });
        }
        if errors.is_empty() { Ok(rules) } else { Err(errors) }
    }
    pub fn load_dir(dir: &Path) -> Result<Policy, LoadError> {
        let mut names: Vec<String> = std::fs::read_dir(dir).map_err(|e| LoadError(vec![PolicyError { file: dir.display().to_string(), line: 0, message: e.to_string() }]))?
            .filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".policy") && !n.starts_with('.')).collect();
        names.sort();
        let mut rules = Vec::new(); let mut errors = Vec::new();
        for n in names {
            let text = std::fs::read_to_string(dir.join(&n)).unwrap_or_default();
            match Policy::parse_file(&n, &text) { Ok(r) => rules.extend(r), Err(e) => errors.extend(e) }
        }
        if errors.is_empty() { Ok(Policy { rules }) } else { Err(LoadError(errors)) }
    }
    pub fn from_rules(rules: Vec<Rule>) -> Policy { Policy { rules } }
    pub fn rules(&self) -> &[Rule] { &self.rules }
    pub fn decide(&self, service: ServiceRef<'_>, source: &DomainView<'_>, target: &DomainView<'_>) -> Decision<'_> {
        for r in &self.rules {
            let svc = match &r.service { Service::Any => true, Service::Port(p) => *p == service.port, Service::Name(n) => service.name == Some(n.as_str()) };
            if svc && matches(&r.source, source) && matches(&r.target, target) { return Decision { action: r.action, rule: Some(r) }; }
        }
        Decision { action: Action::Deny, rule: None }
    }
}
pub struct PolicyDir { dir: PathBuf }
impl PolicyDir {
    pub fn new(dir: impl Into<PathBuf>) -> PolicyDir { PolicyDir { dir: dir.into() } }
    pub fn add(&self, rule_text: &str, file_name: &str, _position: Option<usize>) -> Result<Rule, LoadError> {
        let p = self.dir.join(file_name);
        let mut text = std::fs::read_to_string(&p).unwrap_or_default();
        let line = text.lines().count() as u32 + 1;
        let rule = Policy::parse_file(file_name, rule_text).map_err(LoadError)?.into_iter().next().ok_or_else(|| LoadError(vec![]))?;
        text.push_str(rule_text); text.push('\n');
        std::fs::write(&p, text).map_err(|e| LoadError(vec![PolicyError { file: file_name.into(), line: 0, message: e.to_string() }]))?;
        Ok(Rule { origin: Origin { file: file_name.into(), line }, ..rule })
    }
    pub fn remove(&self, file_name: &str, line: u32) -> Result<Rule, LoadError> {
        let p = self.dir.join(file_name);
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let rules = Policy::parse_file(file_name, &text).map_err(LoadError)?;
        let rule = rules.into_iter().find(|r| r.origin.line == line).ok_or_else(|| LoadError(vec![PolicyError { file: file_name.into(), line, message: "no rule".into() }]))?;
        let out: Vec<&str> = text.lines().enumerate().filter(|(i, _)| *i as u32 + 1 != line).map(|(_, l)| l).collect();
        std::fs::write(&p, out.join("\n") + "\n").map_err(|e| LoadError(vec![PolicyError { file: file_name.into(), line: 0, message: e.to_string() }]))?;
        Ok(rule)
    }
}
pub struct LintReport { pub errors: Vec<PolicyError>, pub warnings: Vec<PolicyError> }
pub fn lint(dir: &Path) -> LintReport {
    match Policy::load_dir(dir) { Ok(_) => LintReport { errors: vec![], warnings: vec![] }, Err(e) => LintReport { errors: e.0, warnings: vec![] } }
}
