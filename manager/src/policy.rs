//! The policy: rules `SERVICE SOURCE TARGET ACTION`, their files and their evaluation.
//!
//! # Rules
//!
//! One rule a line, four fields separated by whitespace; `#` starts a comment that runs to the
//! end of the line; blank lines are ignored; anything else (a missing or fifth field, an unknown
//! token) is an error.
//!
//! ```text
//! # SERVICE   SOURCE       TARGET          ACTION
//! storage     @type:guest  @backend        allow
//! 5000        @tag:web     db              allow
//! *           @anyvm       @anyvm          deny
//! ```
//!
//! * SERVICE: a port (decimal `u32`), a service name, or `*`.
//! * SOURCE, TARGET: a domain name, `@tag:T`, `@type:T`, `@anyvm`, `@backend`, `@toolstack` or
//!   `*`. A bare number is an error: rules name domains by name and label, never by domain id,
//!   since domain ids change on migration.
//! * ACTION: `allow` or `deny`.
//!
//! A [`Name`] (of a domain, tag, type or service) is 1 to 64 bytes of `A-Z a-z 0-9 _ . -`, does
//! not start with `-` or `.`, and is not all digits (an all-digit service is a port, an all-digit
//! domain a domain id).
//!
//! # Matching
//!
//! A connection is a [`ServiceRef`] from a source domain to a target domain, each seen as a
//! [`DomainView`]. A rule matches when all three of its fields match:
//!
//! * SERVICE `*` matches every service; a port matches the connection's port when equal; a name
//!   matches when equal to the name the target registered for that port (a port without a
//!   registered name matches no service name).
//! * SOURCE / TARGET `*` matches every domain; `@anyvm` every domain that is neither the backend
//!   nor the toolstack (as qrexec's `@anyvm` never matches the admin domain); `@backend` and
//!   `@toolstack` the domain with that flag (one domain may have both: dom0); `@tag:T` a domain
//!   with tag `T`; `@type:T` a domain of type `T`; a name the domain with that name.
//!
//! The first matching rule decides; no matching rule denies. [`Policy::decide`] looks at the two
//! domains it is given only, so its cost does not depend on how many domains exist; it tries the
//! rules for any service, for the connection's port and for its name (indexed by SERVICE), in
//! rule order, and is linear in those.
//!
//! # Files
//!
//! A policy directory holds the rules in files named `*.policy`, read in byte order of their
//! names (`30-user.policy` before `90-default.policy`) as one list. Hidden files (a name starting
//! with `.`, such as an editor's swap file or this module's own temporary files) and files whose
//! names do not end in `.policy` (such as `x.policy~` or `x.policy.bak`) are skipped;
//! [`lint`] lists them. The directory is validated as a whole: one error anywhere and
//! [`Policy::load_dir`] returns every error, so the caller keeps its last good policy.
//!
//! [`PolicyDir`] edits a directory for the admin service: every edit is validated against the
//! whole directory as it would be after the edit, then written atomically.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The longest [`Name`], bytes.
pub const MAX_NAME_LEN: usize = 64;
/// The most `*.policy` files a policy directory may hold.
pub const MAX_FILES: usize = 256;
/// The largest policy file, bytes (1 MiB).
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// The most rules a policy may hold, over all its files.
pub const MAX_RULES: usize = 65_536;
/// The most errors reported for one file; the rest are counted in one last error.
pub const MAX_ERRORS_PER_FILE: usize = 100;

/// The longest file name an edit accepts, bytes: its temporary file's name (`.NAME.tmp-PID`)
/// must stay under the 255 bytes of a file name.
const MAX_EDIT_NAME_LEN: usize = 200;
/// The suffix of the files a policy directory's rules are read from.
const POLICY_SUFFIX: &str = ".policy";
/// A token shown in an error message is cut to this many characters.
const SHOWN_TOKEN_CHARS: usize = 80;

/// A name of a domain, tag, domain type or service: 1 to [`MAX_NAME_LEN`] bytes of
/// `A-Z a-z 0-9 _ . -`, not starting with `-` or `.`, not all digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    /// Checks `s` and makes it a name; the error says what is wrong with it.
    pub fn new(s: &str) -> Result<Name, String> {
        if s.is_empty() {
            return Err("empty name".to_string());
        }
        if s.len() > MAX_NAME_LEN {
            return Err(format!("longer than {MAX_NAME_LEN} bytes ({} bytes)", s.len()));
        }
        if let Some(c) = s.chars().find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
            return Err(format!("character {} not allowed (names use A-Z a-z 0-9 _ . -)", shown_char(c)));
        }
        if s.starts_with(['-', '.']) {
            return Err("a name cannot start with `-` or `.`".to_string());
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return Err("a name cannot be all digits".to_string());
        }
        Ok(Name(s.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = String;
    fn try_from(s: String) -> Result<Name, String> {
        Name::new(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A rule's SERVICE field.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Service {
    /// `*`: every service.
    Any,
    /// A port, matched against the connection's port.
    Port(u32),
    /// A service name, matched against the name the target registered for the port.
    Name(Name),
}

impl Service {
    /// Whether this field matches the connection's service.
    pub fn matches(&self, service: ServiceRef<'_>) -> bool {
        match self {
            Service::Any => true,
            Service::Port(p) => *p == service.port,
            Service::Name(n) => service.name == Some(n.as_str()),
        }
    }

    fn parse(token: &str) -> Result<Service, String> {
        if token == "*" {
            return Ok(Service::Any);
        }
        if !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()) {
            return token
                .parse()
                .map(Service::Port)
                .map_err(|_| format!("port out of range (at most {})", u32::MAX));
        }
        Name::new(token).map(Service::Name)
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Service::Any => f.write_str("*"),
            Service::Port(p) => write!(f, "{p}"),
            Service::Name(n) => write!(f, "{n}"),
        }
    }
}

/// A rule's SOURCE or TARGET field: which domains it matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    /// `*`: every domain.
    Any,
    /// `@anyvm`: every domain that is neither the backend nor the toolstack.
    AnyVm,
    /// `@backend`: the backend domain.
    Backend,
    /// `@toolstack`: the toolstack domain.
    Toolstack,
    /// `@tag:T`: the domains with tag `T`.
    Tag(Name),
    /// `@type:T`: the domains of type `T`.
    Type(Name),
    /// A domain name: the domain with that name.
    Name(Name),
}

impl Subject {
    /// Whether this field matches `domain`.
    pub fn matches(&self, domain: &DomainView<'_>) -> bool {
        match self {
            Subject::Any => true,
            Subject::AnyVm => !domain.backend && !domain.toolstack,
            Subject::Backend => domain.backend,
            Subject::Toolstack => domain.toolstack,
            Subject::Tag(t) => domain.tags.iter().any(|d| d == t.as_str()),
            Subject::Type(t) => domain.type_ == Some(t.as_str()),
            Subject::Name(n) => domain.name == n.as_str(),
        }
    }

    fn parse(token: &str) -> Result<Subject, String> {
        match token {
            "*" => return Ok(Subject::Any),
            "@anyvm" => return Ok(Subject::AnyVm),
            "@backend" => return Ok(Subject::Backend),
            "@toolstack" => return Ok(Subject::Toolstack),
            _ => {}
        }
        if let Some(t) = token.strip_prefix("@tag:") {
            return Name::new(t).map(Subject::Tag).map_err(|e| format!("tag: {e}"));
        }
        if let Some(t) = token.strip_prefix("@type:") {
            return Name::new(t).map(Subject::Type).map_err(|e| format!("type: {e}"));
        }
        if token.starts_with('@') {
            return Err("unknown token (expected `@anyvm`, `@backend`, `@toolstack`, `@tag:T` or `@type:T`)"
                .to_string());
        }
        if !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()) {
            return Err("a bare number looks like a domain id; rules name domains by name or label \
                        (`@tag:T`, `@type:T`), since domain ids change on migration"
                .to_string());
        }
        Name::new(token).map(Subject::Name)
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Any => f.write_str("*"),
            Subject::AnyVm => f.write_str("@anyvm"),
            Subject::Backend => f.write_str("@backend"),
            Subject::Toolstack => f.write_str("@toolstack"),
            Subject::Tag(t) => write!(f, "@tag:{t}"),
            Subject::Type(t) => write!(f, "@type:{t}"),
            Subject::Name(n) => write!(f, "{n}"),
        }
    }
}

/// A rule's ACTION, and a decision's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// `allow`: the connection may be made.
    Allow,
    /// `deny`: the connection is refused.
    Deny,
}

impl Action {
    fn parse(token: &str) -> Result<Action, String> {
        match token {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            _ => Err("expected `allow` or `deny`".to_string()),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// Where a rule was written: its file's name (not path) in the policy directory and its line
/// (from 1).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// The file's name, such as `30-user.policy`.
    pub file: String,
    /// The line, counted from 1.
    pub line: u32,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// One rule: `SERVICE SOURCE TARGET ACTION`, and where it was written.
///
/// `Display` renders the four fields (not the origin) as the text that parses back to the same
/// rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    /// Which services the rule is about.
    pub service: Service,
    /// Which domains the rule is about as the connecting side.
    pub source: Subject,
    /// Which domains the rule is about as the side connected to.
    pub target: Subject,
    /// What the rule decides.
    pub action: Action,
    /// Where the rule was written.
    pub origin: Origin,
}

impl Rule {
    /// Parses the text of one rule (an optional trailing comment allowed), giving it `origin`.
    /// Blank text, or text of several lines, is an error.
    pub fn from_text(text: &str, origin: Origin) -> Result<Rule, PolicyError> {
        let error = |message: String| PolicyError { file: origin.file.clone(), line: origin.line, message };
        if text.contains('\n') {
            return Err(error("a rule is one line".to_string()));
        }
        match parse_line(text) {
            Ok(Some((service, source, target, action))) => {
                Ok(Rule { service, source, target, action, origin })
            }
            Ok(None) => Err(error("no rule (the text is blank or a comment)".to_string())),
            Err(messages) => Err(error(messages.into_iter().next().unwrap_or_default())),
        }
    }

    /// Whether the connection `service` from `source` to `target` matches this rule.
    pub fn matches(&self, service: ServiceRef<'_>, source: &DomainView<'_>, target: &DomainView<'_>) -> bool {
        self.service.matches(service) && self.source.matches(source) && self.target.matches(target)
    }

    /// Whether `other` says the same as this rule (the same four fields, wherever either was
    /// written).
    pub fn same_rule(&self, other: &Rule) -> bool {
        self.key() == other.key() && self.action == other.action
    }

    fn key(&self) -> (&Service, &Subject, &Subject) {
        (&self.service, &self.source, &self.target)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {} {}", self.service, self.source, self.target, self.action)
    }
}

/// An error in a policy: where, and what. Displays as `file:line: message`; line 0 is about the
/// file as a whole (unreadable, too large, over a bound).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct PolicyError {
    /// The file's name in the policy directory (the directory's path for an error about the
    /// directory itself).
    pub file: String,
    /// The line, counted from 1; 0 for the file as a whole.
    pub line: u32,
    /// What is wrong.
    pub message: String,
}

/// Why a policy directory did not load: every error found in it, in file and line order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    /// The errors, at least one.
    pub errors: Vec<PolicyError>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_errors(f, &self.errors)
    }
}

impl std::error::Error for LoadError {}

fn write_errors(f: &mut fmt::Formatter<'_>, errors: &[PolicyError]) -> fmt::Result {
    for (i, e) in errors.iter().enumerate() {
        if i > 0 {
            f.write_str("\n")?;
        }
        write!(f, "{e}")?;
    }
    Ok(())
}

/// A domain as the policy sees it: its name and labels, and whether it is the backend or the
/// toolstack (dom0 on Xen is both).
#[derive(Clone, Copy, Debug)]
pub struct DomainView<'a> {
    /// The domain's name.
    pub name: &'a str,
    /// The domain's type, if the toolstack gave it one.
    pub type_: Option<&'a str>,
    /// The domain's tags.
    pub tags: &'a [String],
    /// Whether this is the backend domain.
    pub backend: bool,
    /// Whether this is the toolstack domain.
    pub toolstack: bool,
}

/// A connection's service: its port, and the name the target registered for that port, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceRef<'a> {
    /// The port connected to.
    pub port: u32,
    /// The name the target registered for `port`.
    pub name: Option<&'a str>,
}

/// The outcome of [`Policy::decide`]: the action and the rule that decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision<'p> {
    /// Allow or deny.
    pub action: Action,
    /// The first matching rule; `None` when no rule matched (and the action is deny).
    pub rule: Option<&'p Rule>,
}

/// A validated policy: its rules in order (files in name order, lines in order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
    by_service: ServiceIndex,
}

/// The positions of a policy's rules by SERVICE field, each list in rule order: a decision tries
/// only the rules for any service, for its port and for its name, merged back into rule order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ServiceIndex {
    any: Vec<usize>,
    ports: HashMap<u32, Vec<usize>>,
    names: HashMap<String, Vec<usize>>,
}

impl ServiceIndex {
    fn new(rules: &[Rule]) -> ServiceIndex {
        let mut index = ServiceIndex::default();
        for (i, rule) in rules.iter().enumerate() {
            match &rule.service {
                Service::Any => index.any.push(i),
                Service::Port(p) => index.ports.entry(*p).or_default().push(i),
                Service::Name(n) => index.names.entry(n.as_str().to_string()).or_default().push(i),
            }
        }
        index
    }

    /// The positions of the rules whose SERVICE matches `service`, in rule order.
    fn candidates(&self, service: ServiceRef<'_>) -> Merge<'_> {
        let by_port = self.ports.get(&service.port).map_or(&[][..], Vec::as_slice);
        let by_name = service.name.and_then(|n| self.names.get(n)).map_or(&[][..], Vec::as_slice);
        Merge { lists: [self.any.as_slice(), by_port, by_name] }
    }
}

/// The merge, in increasing order, of sorted lists that share no element.
struct Merge<'a> {
    lists: [&'a [usize]; 3],
}

impl Iterator for Merge<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let mut next: Option<(usize, usize)> = None;
        for (l, list) in self.lists.iter().enumerate() {
            match list.first() {
                Some(&first) if next.is_none_or(|(_, n)| first < n) => next = Some((l, first)),
                _ => {}
            }
        }
        let (l, first) = next?;
        self.lists[l] = self.lists[l].get(1..).unwrap_or_default();
        Some(first)
    }
}

impl Policy {
    /// A policy of these rules, in this order.
    pub fn from_rules(rules: Vec<Rule>) -> Policy {
        let by_service = ServiceIndex::new(&rules);
        Policy { rules, by_service }
    }

    /// The rules, in the order they are tried.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Parses the text of one policy file named `file_name` (the name goes into every rule's
    /// origin and every error). On error, all of the file's errors, in line order, at most
    /// [`MAX_ERRORS_PER_FILE`] of them and then one that counts the rest.
    pub fn parse_file(file_name: &str, text: &str) -> Result<Vec<Rule>, Vec<PolicyError>> {
        let (rules, errors) = parse_text(file_name, text);
        if errors.is_empty() { Ok(rules) } else { Err(errors) }
    }

    /// Loads a policy directory (see the [module docs](self)): every `*.policy` file, validated
    /// as a whole. Any error anywhere (a syntax error, an unreadable file, a bound exceeded)
    /// gives every error found, and no policy.
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<Policy, LoadError> {
        let contents = DirContents::read(dir.as_ref());
        let (rules, errors) = contents.validate();
        if errors.is_empty() { Ok(Policy::from_rules(rules)) } else { Err(LoadError { errors }) }
    }

    /// Decides a connection to `service` from `source` to `target`: the first rule that matches,
    /// or deny when none does. Looks at these two domains only, and at the rules for any
    /// service, this port or this name (linear in those).
    pub fn decide(
        &self,
        service: ServiceRef<'_>,
        source: &DomainView<'_>,
        target: &DomainView<'_>,
    ) -> Decision<'_> {
        let first = self
            .by_service
            .candidates(service)
            .filter_map(|i| self.rules.get(i))
            .find(|r| r.matches(service, source, target));
        match first {
            Some(rule) => Decision { action: rule.action, rule: Some(rule) },
            None => Decision { action: Action::Deny, rule: None },
        }
    }
}

/// What [`lint`] found in a policy directory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LintReport {
    /// The errors [`Policy::load_dir`] reports: any one of them stops the directory loading.
    pub errors: Vec<PolicyError>,
    /// Rules that can never match (an earlier rule decides every connection they cover), and
    /// files skipped.
    pub warnings: Vec<PolicyError>,
}

/// Checks a policy directory: the errors [`Policy::load_dir`] would report, and warnings for
/// files skipped and for rules that can never match because one earlier rule matches every
/// connection they match (an exact duplicate, or a rule with `*` where the later one has the same
/// field or anything else). A warning is only given where that is certain.
pub fn lint(dir: impl AsRef<Path>) -> LintReport {
    let contents = DirContents::read(dir.as_ref());
    let (rules, errors) = contents.validate();
    let mut warnings: Vec<PolicyError> = contents
        .skipped
        .iter()
        .map(|(file, why)| PolicyError { file: file.clone(), line: 0, message: format!("skipped: {why}") })
        .collect();
    warnings.extend(shadowed(&rules));
    LintReport { errors, warnings }
}

/// Warnings for the rules that an earlier rule covers: one whose every field is `*` or equal to
/// the later rule's. Every rule is checked against the first rule of each of the 8 patterns that
/// could cover it, so this is linear in the rules.
fn shadowed(rules: &[Rule]) -> Vec<PolicyError> {
    let mut first: HashMap<(&Service, &Subject, &Subject), usize> = HashMap::new();
    for (i, r) in rules.iter().enumerate() {
        first.entry(r.key()).or_insert(i);
    }
    let mut warnings = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let services = [&r.service, &Service::Any];
        let sources = [&r.source, &Subject::Any];
        let targets = [&r.target, &Subject::Any];
        let mut cover: Option<usize> = None;
        for s in services {
            for so in sources {
                for t in targets {
                    match first.get(&(s, so, t)) {
                        Some(&j) if j < i => cover = Some(cover.map_or(j, |c| c.min(j))),
                        _ => {}
                    }
                }
            }
        }
        if let Some(j) = cover {
            let by = &rules[j];
            let what = if by.same_rule(r) {
                "a duplicate of"
            } else if by.key() == r.key() {
                "contradicted by"
            } else {
                "shadowed by"
            };
            warnings.push(PolicyError {
                file: r.origin.file.clone(),
                line: r.origin.line,
                message: format!("rule `{r}` never matches: {what} `{by}` at {}", by.origin),
            });
        }
    }
    warnings
}

/// A rule's four fields.
type Fields = (Service, Subject, Subject, Action);

/// Parses one line: `Ok(None)` for a blank or comment line, the rule's fields, or every error in
/// the line.
fn parse_line(line: &str) -> Result<Option<Fields>, Vec<String>> {
    let content = line.split_once('#').map_or(line, |(before, _)| before);
    let mut tokens = content.split_ascii_whitespace();
    let (Some(service), Some(source), Some(target), Some(action)) =
        (tokens.next(), tokens.next(), tokens.next(), tokens.next())
    else {
        let found = content.split_ascii_whitespace().count();
        if found == 0 {
            return Ok(None);
        }
        return Err(vec![format!(
            "incomplete rule: expected `SERVICE SOURCE TARGET ACTION`, found {found} field{}",
            if found == 1 { "" } else { "s" }
        )]);
    };
    if let Some(extra) = tokens.next() {
        return Err(vec![format!(
            "unexpected fifth field {}: a rule is `SERVICE SOURCE TARGET ACTION` (`#` starts a comment)",
            shown(extra)
        )]);
    }
    let mut errors = Vec::new();
    let service =
        Service::parse(service).map_err(|e| errors.push(format!("invalid service {}: {e}", shown(service))));
    let source =
        Subject::parse(source).map_err(|e| errors.push(format!("invalid source {}: {e}", shown(source))));
    let target =
        Subject::parse(target).map_err(|e| errors.push(format!("invalid target {}: {e}", shown(target))));
    let action =
        Action::parse(action).map_err(|e| errors.push(format!("invalid action {}: {e}", shown(action))));
    match (service, source, target, action) {
        (Ok(service), Ok(source), Ok(target), Ok(action)) => Ok(Some((service, source, target, action))),
        _ => Err(errors),
    }
}

/// Parses a file's text: its rules and its errors (bounded as [`Policy::parse_file`] says).
fn parse_text(file: &str, text: &str) -> (Vec<Rule>, Vec<PolicyError>) {
    let mut rules = Vec::new();
    let mut errors = Vec::new();
    let mut more = 0usize;
    let mut first_more_line = 0u32;
    for (index, line) in text.split('\n').enumerate() {
        let line_no = u32::try_from(index + 1).unwrap_or(u32::MAX);
        match parse_line(line) {
            Ok(None) => {}
            Ok(Some((service, source, target, action))) => rules.push(Rule {
                service,
                source,
                target,
                action,
                origin: Origin { file: file.to_string(), line: line_no },
            }),
            Err(messages) => {
                for message in messages {
                    if errors.len() < MAX_ERRORS_PER_FILE {
                        errors.push(PolicyError { file: file.to_string(), line: line_no, message });
                    } else {
                        if more == 0 {
                            first_more_line = line_no;
                        }
                        more += 1;
                    }
                }
            }
        }
    }
    if more > 0 {
        errors.push(PolicyError {
            file: file.to_string(),
            line: first_more_line,
            message: format!("… and {more} more error{}", if more == 1 { "" } else { "s" }),
        });
    }
    (rules, errors)
}

/// A token as shown in a message: quoted, escaped, cut to a bounded length.
fn shown(token: &str) -> String {
    let mut s = String::from("`");
    for (i, c) in token.chars().enumerate() {
        if i == SHOWN_TOKEN_CHARS {
            s.push('…');
            break;
        }
        s.extend(c.escape_debug());
    }
    s.push('`');
    s
}

fn shown_char(c: char) -> String {
    format!("`{}`", c.escape_debug())
}

/// One `*.policy` file of a directory, as read (or why it could not be).
#[derive(Clone, Debug)]
struct PolicyFile {
    name: String,
    bytes: Result<Vec<u8>, String>,
}

/// What a policy directory holds: its policy files in name order, the files skipped, and the
/// errors met reading it.
#[derive(Debug, Default)]
struct DirContents {
    files: Vec<PolicyFile>,
    skipped: Vec<(String, &'static str)>,
    errors: Vec<PolicyError>,
}

impl DirContents {
    fn read(dir: &Path) -> DirContents {
        let mut contents = DirContents::default();
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                contents.errors.push(PolicyError {
                    file: dir.display().to_string(),
                    line: 0,
                    message: format!("cannot read the policy directory: {e}"),
                });
                return contents;
            }
        };
        let mut names: Vec<Vec<u8>> = Vec::new();
        for entry in entries {
            match entry {
                Ok(entry) => names.push(entry.file_name().as_bytes().to_vec()),
                Err(e) => contents.errors.push(PolicyError {
                    file: dir.display().to_string(),
                    line: 0,
                    message: format!("cannot list the policy directory: {e}"),
                }),
            }
        }
        names.sort();
        let mut policy_names = Vec::new();
        for raw in names {
            let name = String::from_utf8_lossy(&raw).into_owned();
            if raw.starts_with(b".") {
                contents.skipped.push((name, "hidden file"));
            } else if !raw.ends_with(POLICY_SUFFIX.as_bytes()) {
                contents.skipped.push((name, "not a `*.policy` file"));
            } else if std::str::from_utf8(&raw).is_err() {
                contents.errors.push(PolicyError {
                    file: name,
                    line: 0,
                    message: "the file's name is not UTF-8".to_string(),
                });
            } else {
                policy_names.push(name);
            }
        }
        if policy_names.len() > MAX_FILES {
            contents.errors.push(PolicyError {
                file: policy_names[MAX_FILES].clone(),
                line: 0,
                message: format!(
                    "over the limit of {MAX_FILES} policy files in a directory ({} files): \
                     this file and the later ones are not read",
                    policy_names.len()
                ),
            });
            policy_names.truncate(MAX_FILES);
        }
        for name in policy_names {
            let bytes = read_bounded(&dir.join(&name));
            contents.files.push(PolicyFile { name, bytes });
        }
        contents
    }

    /// The directory's rules and every error in it: reading, bounds, syntax.
    fn validate(&self) -> (Vec<Rule>, Vec<PolicyError>) {
        let mut errors = self.errors.clone();
        let mut rules = Vec::new();
        if let Some(file) = self.files.get(MAX_FILES) {
            errors.push(PolicyError {
                file: file.name.clone(),
                line: 0,
                message: format!(
                    "over the limit of {MAX_FILES} policy files in a directory ({} files)",
                    self.files.len()
                ),
            });
        }
        let mut over_rules = false;
        for file in &self.files {
            let error = |line: u32, message: String| PolicyError { file: file.name.clone(), line, message };
            let bytes = match &file.bytes {
                Ok(bytes) => bytes,
                Err(why) => {
                    errors.push(error(0, why.clone()));
                    continue;
                }
            };
            if bytes.len() > MAX_FILE_BYTES {
                errors.push(error(
                    0,
                    format!("larger than the limit of {MAX_FILE_BYTES} bytes (1 MiB) per policy file"),
                ));
                continue;
            }
            let text = match std::str::from_utf8(bytes) {
                Ok(text) => text,
                Err(e) => {
                    let before = &bytes[..e.valid_up_to()];
                    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
                    errors.push(error(u32::try_from(line).unwrap_or(u32::MAX), "not UTF-8 text".to_string()));
                    continue;
                }
            };
            let (file_rules, file_errors) = parse_text(&file.name, text);
            errors.extend(file_errors);
            for rule in file_rules {
                if rules.len() == MAX_RULES {
                    if !over_rules {
                        errors.push(error(
                            rule.origin.line,
                            format!("over the limit of {MAX_RULES} rules in a policy: this rule and the later ones"),
                        ));
                        over_rules = true;
                    }
                } else {
                    rules.push(rule);
                }
            }
        }
        (rules, errors)
    }

    fn file_mut(&mut self, name: &str) -> Option<&mut PolicyFile> {
        self.files.iter_mut().find(|f| f.name == name)
    }
}

/// Reads a file of at most [`MAX_FILE_BYTES`] (one byte more tells that it is larger).
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".to_string());
    }
    let mut bytes = Vec::new();
    let limit = u64::try_from(MAX_FILE_BYTES).unwrap_or(u64::MAX).saturating_add(1);
    file.take(limit).read_to_end(&mut bytes).map_err(|e| format!("cannot read: {e}"))?;
    Ok(bytes)
}

/// Why an edit of a policy directory was refused. A refused edit writes nothing.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The directory would not be a valid policy after the edit (or is not one already and the
    /// edit does not fix it): every error, as [`Policy::load_dir`] would report them.
    #[error("the policy would be invalid after this edit:\n{}", ErrorList(.0))]
    Invalid(Vec<PolicyError>),
    /// A file name that edits do not accept: names are `[A-Za-z0-9_.-]+.policy`, not starting
    /// with `.`, at most 200 bytes.
    #[error(
        "bad policy file name {0:?}: expected `[A-Za-z0-9_.-]+.policy`, not starting with `.`, at most 200 bytes"
    )]
    BadFileName(String),
    /// The rule text given is not one rule.
    #[error("{0}")]
    BadRule(PolicyError),
    /// The position to insert at is not one of the file's rules, nor one past the last.
    #[error("no rule {position} in {file}: it has {rules} rule(s), so positions 1 to {} are accepted", .rules + 1)]
    BadPosition {
        /// The file.
        file: String,
        /// The position asked for.
        position: usize,
        /// How many rules the file has.
        rules: usize,
    },
    /// The file and line named do not hold a rule.
    #[error("{file}:{line}: no rule on this line")]
    NoRule {
        /// The file.
        file: String,
        /// The line.
        line: u32,
    },
    /// Reading the directory or writing the file failed.
    #[error("{file}: {source}")]
    Io {
        /// The file (or directory).
        file: String,
        /// What failed.
        source: io::Error,
    },
}

struct ErrorList<'a>(&'a [PolicyError]);

impl fmt::Display for ErrorList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_errors(f, self.0)
    }
}

/// A policy directory being edited, for the admin service.
///
/// Every edit reads the directory, applies the change to one file's text in memory (keeping its
/// comments and other lines as they are), validates the whole directory as it would be, and
/// only then writes the changed file atomically: a temporary file `.NAME.tmp-PID` in the same
/// directory (hidden, so never read as policy), fsynced, renamed over the file, then the
/// directory fsynced. A refused edit leaves every file as it was. Edits through one `PolicyDir`
/// are serialised; the directory should have no other writer while it edits.
#[derive(Debug)]
pub struct PolicyDir {
    dir: PathBuf,
    edit: Mutex<()>,
}

impl PolicyDir {
    /// The policy directory at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> PolicyDir {
        PolicyDir { dir: dir.into(), edit: Mutex::new(()) }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Loads the directory's policy, as [`Policy::load_dir`].
    pub fn load(&self) -> Result<Policy, LoadError> {
        Policy::load_dir(&self.dir)
    }

    /// Adds the rule `rule_text` to the file `file_name` (created if missing): before the file's
    /// `position`-th rule (from 1; rules counted, not lines), or after its last line for `None`.
    /// Returns the rule as added, with its origin.
    pub fn add(&self, rule_text: &str, file_name: &str, position: Option<usize>) -> Result<Rule, EditError> {
        check_file_name(file_name)?;
        let rule = Rule::from_text(rule_text, given_rule()).map_err(EditError::BadRule)?;
        let _guard = self.edit.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut contents = self.read()?;
        if contents.file_mut(file_name).is_none() {
            let at = contents.files.partition_point(|f| f.name.as_bytes() < file_name.as_bytes());
            contents.files.insert(at, PolicyFile { name: file_name.to_string(), bytes: Ok(Vec::new()) });
        }
        let Some(file) = contents.file_mut(file_name) else {
            return Err(EditError::NoRule { file: file_name.to_string(), line: 0 });
        };
        let text = file_text(file)?;
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let rule_lines: Vec<usize> =
            lines.iter().enumerate().filter(|(_, l)| is_rule_line(l)).map(|(i, _)| i).collect();
        let insert_at = match position {
            None => lines.len(),
            Some(p) if p >= 1 && p <= rule_lines.len() => rule_lines[p - 1],
            Some(p) if p == rule_lines.len() + 1 => lines.len(),
            Some(p) => {
                return Err(EditError::BadPosition {
                    file: file_name.to_string(),
                    position: p,
                    rules: rule_lines.len(),
                });
            }
        };
        let new_line = format!("{}\n", rule_text.trim());
        let mut new_text = String::with_capacity(text.len() + new_line.len() + 1);
        for (i, line) in lines.iter().enumerate() {
            if i == insert_at {
                new_text.push_str(&new_line);
            }
            new_text.push_str(line);
        }
        if insert_at == lines.len() {
            if !new_text.is_empty() && !new_text.ends_with('\n') {
                new_text.push('\n');
            }
            new_text.push_str(&new_line);
        }
        // Inserted before line `insert_at + 1`, or appended after the `lines.len()` lines.
        let line = insert_at + 1;
        file.bytes = Ok(new_text.into_bytes());
        self.validate_and_write(&contents, &[file_name])?;
        Ok(Rule {
            origin: Origin { file: file_name.to_string(), line: u32::try_from(line).unwrap_or(u32::MAX) },
            ..rule
        })
    }

    /// Removes the rule on line `line` of `file_name`; returns it.
    pub fn remove(&self, file_name: &str, line: u32) -> Result<Rule, EditError> {
        check_file_name(file_name)?;
        let _guard = self.edit.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut contents = self.read()?;
        let no_rule = || EditError::NoRule { file: file_name.to_string(), line };
        let Some(file) = contents.file_mut(file_name) else { return Err(no_rule()) };
        let text = file_text(file)?;
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let index = usize::try_from(line).ok().and_then(|l| l.checked_sub(1)).ok_or_else(no_rule)?;
        let Some(old) = lines.get(index) else { return Err(no_rule()) };
        let origin = Origin { file: file_name.to_string(), line };
        let rule = Rule::from_text(old.trim_end_matches('\n'), origin).map_err(|_| no_rule())?;
        let new_text: String =
            lines.iter().enumerate().filter(|(i, _)| *i != index).map(|(_, l)| *l).collect();
        file.bytes = Ok(new_text.into_bytes());
        self.validate_and_write(&contents, &[file_name])?;
        Ok(rule)
    }

    /// Removes every rule that says the same as `rule_text` (see [`Rule::same_rule`]), in every
    /// file; returns them with their origins before the edit (none when none matched).
    ///
    /// Each changed file is written atomically, one after the other. Removing rules keeps a
    /// valid file valid, so the directory is a valid policy at every step, though a failure
    /// half-way leaves the rule in the files not yet written (the error says which file failed).
    pub fn remove_matching(&self, rule_text: &str) -> Result<Vec<Rule>, EditError> {
        let wanted = Rule::from_text(rule_text, given_rule()).map_err(EditError::BadRule)?;
        let _guard = self.edit.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut contents = self.read()?;
        let mut removed = Vec::new();
        let mut changed = Vec::new();
        for file in &mut contents.files {
            let Ok(bytes) = &file.bytes else { continue };
            let Ok(text) = std::str::from_utf8(bytes) else { continue };
            let mut new_text = String::with_capacity(text.len());
            let mut any = false;
            for (index, line) in text.split_inclusive('\n').enumerate() {
                let origin =
                    Origin { file: file.name.clone(), line: u32::try_from(index + 1).unwrap_or(u32::MAX) };
                match Rule::from_text(line.trim_end_matches('\n'), origin) {
                    Ok(rule) if rule.same_rule(&wanted) => {
                        removed.push(rule);
                        any = true;
                    }
                    _ => new_text.push_str(line),
                }
            }
            if any {
                file.bytes = Ok(new_text.into_bytes());
                changed.push(file.name.clone());
            }
        }
        if changed.is_empty() {
            return Ok(removed);
        }
        let names: Vec<&str> = changed.iter().map(String::as_str).collect();
        self.validate_and_write(&contents, &names)?;
        Ok(removed)
    }

    fn read(&self) -> Result<DirContents, EditError> {
        fs::read_dir(&self.dir)
            .map_err(|source| EditError::Io { file: self.dir.display().to_string(), source })?;
        Ok(DirContents::read(&self.dir))
    }

    /// Validates `contents` as a whole, then writes the files named (each atomically).
    fn validate_and_write(&self, contents: &DirContents, names: &[&str]) -> Result<(), EditError> {
        let (_, errors) = contents.validate();
        if !errors.is_empty() {
            return Err(EditError::Invalid(errors));
        }
        for name in names {
            if let Some(PolicyFile { bytes: Ok(bytes), .. }) = contents.files.iter().find(|f| f.name == *name)
            {
                write_atomically(&self.dir, name, bytes)
                    .map_err(|source| EditError::Io { file: (*name).to_string(), source })?;
            }
        }
        Ok(())
    }
}

/// The text of a file to edit; a file that cannot be read or is not UTF-8 is reported as the
/// validation of the directory would.
fn file_text(file: &PolicyFile) -> Result<String, EditError> {
    let invalid =
        |message: String| EditError::Invalid(vec![PolicyError { file: file.name.clone(), line: 0, message }]);
    let bytes = file.bytes.as_ref().map_err(|why| invalid(why.clone()))?;
    String::from_utf8(bytes.clone()).map_err(|_| invalid("not UTF-8 text".to_string()))
}

/// The origin of a rule given as text to an edit, before it has a place in a file.
fn given_rule() -> Origin {
    Origin { file: "<rule>".to_string(), line: 1 }
}

/// Whether a line holds something other than blanks and a comment.
fn is_rule_line(line: &str) -> bool {
    let content = line.split_once('#').map_or(line, |(before, _)| before);
    content.split_ascii_whitespace().next().is_some()
}

/// Checks a file name given to an edit: `[A-Za-z0-9_.-]+.policy`, not starting with `.`, at
/// most [`MAX_EDIT_NAME_LEN`] bytes.
fn check_file_name(name: &str) -> Result<(), EditError> {
    let ok = name.len() <= MAX_EDIT_NAME_LEN
        && !name.starts_with('.')
        && name.strip_suffix(POLICY_SUFFIX).is_some_and(|stem| {
            !stem.is_empty()
                && stem.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        });
    if ok { Ok(()) } else { Err(EditError::BadFileName(name.to_string())) }
}

/// Replaces `dir/name` with `bytes` atomically: a hidden temporary file in the same directory,
/// fsynced, renamed over the file (keeping its permissions), then the directory fsynced.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let target = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    // A leftover of an edit that crashed half-way: it was never renamed, so it holds nothing.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        if let Ok(meta) = fs::metadata(&target) {
            file.set_permissions(meta.permissions())?;
        }
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, &target)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A scratch directory, removed when dropped.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new() -> TestDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("dombus-policy-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TestDir(path)
        }
        fn write(&self, name: &str, text: &str) {
            fs::write(self.0.join(name), text).unwrap();
        }
        fn read(&self, name: &str) -> String {
            fs::read_to_string(self.0.join(name)).unwrap()
        }
        /// Every file's name and bytes, to check that nothing changed.
        fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
            let mut all: Vec<_> = fs::read_dir(&self.0)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    let bytes = fs::read(e.path()).unwrap_or_default();
                    (e.file_name().to_string_lossy().into_owned(), bytes)
                })
                .collect();
            all.sort();
            all
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn errors_of(text: &str) -> Vec<String> {
        Policy::parse_file("t.policy", text).unwrap_err().iter().map(|e| e.to_string()).collect()
    }

    fn one_error(text: &str) -> String {
        let errors = errors_of(text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors.into_iter().next().unwrap()
    }

    fn rule(text: &str) -> Rule {
        Rule::from_text(text, Origin { file: "t.policy".to_string(), line: 1 }).unwrap()
    }

    const NO_TAGS: &[String] = &[];

    fn domain(name: &str) -> DomainView<'_> {
        DomainView { name, type_: None, tags: NO_TAGS, backend: false, toolstack: false }
    }

    fn port(port: u32) -> ServiceRef<'static> {
        ServiceRef { port, name: None }
    }

    #[test]
    fn parses_rules_comments_and_blank_lines() {
        let text = "# a comment\n\n  storage @type:guest @backend allow # trailing\n5000\t@tag:web  db deny\r\n* * * deny";
        let rules = Policy::parse_file("10-x.policy", text).unwrap();
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].service, Service::Name(Name::new("storage").unwrap()));
        assert_eq!(rules[0].source, Subject::Type(Name::new("guest").unwrap()));
        assert_eq!(rules[0].target, Subject::Backend);
        assert_eq!(rules[0].action, Action::Allow);
        assert_eq!(rules[0].origin, Origin { file: "10-x.policy".to_string(), line: 3 });
        assert_eq!(rules[1].service, Service::Port(5000));
        assert_eq!(rules[1].source, Subject::Tag(Name::new("web").unwrap()));
        assert_eq!(rules[1].target, Subject::Name(Name::new("db").unwrap()));
        assert_eq!(rules[1].origin.line, 4);
        assert_eq!(rules[2].to_string(), "* * * deny");
        assert_eq!(rules[2].origin.line, 5);
    }

    #[test]
    fn displays_rules_as_text_that_parses_back() {
        for text in [
            "* * * deny",
            "0 @anyvm @toolstack allow",
            "4294967295 @backend @anyvm deny",
            "x.y-z_1 @tag:a @type:B allow",
            "svc dom-1 Dom_2.x deny",
        ] {
            let r = rule(text);
            assert_eq!(r.to_string(), text);
            assert_eq!(rule(&r.to_string()), r);
        }
    }

    #[test]
    fn error_for_a_missing_field() {
        assert_eq!(
            one_error("\n* * allow"),
            "t.policy:2: incomplete rule: expected `SERVICE SOURCE TARGET ACTION`, found 3 fields"
        );
        assert_eq!(
            one_error("allow # * * *"),
            "t.policy:1: incomplete rule: expected `SERVICE SOURCE TARGET ACTION`, found 1 field"
        );
    }

    #[test]
    fn error_for_a_fifth_field() {
        assert_eq!(
            one_error("* * * allow log=1"),
            "t.policy:1: unexpected fifth field `log=1`: a rule is `SERVICE SOURCE TARGET ACTION` (`#` starts a comment)"
        );
    }

    #[test]
    fn error_for_a_bad_service() {
        assert_eq!(
            one_error("4294967296 * * allow"),
            "t.policy:1: invalid service `4294967296`: port out of range (at most 4294967295)"
        );
        assert_eq!(
            one_error("a/b * * allow"),
            "t.policy:1: invalid service `a/b`: character `/` not allowed (names use A-Z a-z 0-9 _ . -)"
        );
        assert_eq!(
            one_error("-x * * allow"),
            "t.policy:1: invalid service `-x`: a name cannot start with `-` or `.`"
        );
        assert_eq!(
            one_error(".x * * allow"),
            "t.policy:1: invalid service `.x`: a name cannot start with `-` or `.`"
        );
        let long = "s".repeat(65);
        assert_eq!(
            one_error(&format!("{long} * * allow")),
            format!("t.policy:1: invalid service `{long}`: longer than 64 bytes (65 bytes)")
        );
        assert!(Policy::parse_file("t.policy", &format!("{} * * allow", "s".repeat(64))).is_ok());
        assert_eq!(
            one_error("@tag:x * * allow"),
            "t.policy:1: invalid service `@tag:x`: character `@` not allowed (names use A-Z a-z 0-9 _ . -)"
        );
    }

    #[test]
    fn error_for_a_domain_id() {
        let why = "a bare number looks like a domain id; rules name domains by name or label (`@tag:T`, `@type:T`), since domain ids change on migration";
        assert_eq!(one_error("* 0 * allow"), format!("t.policy:1: invalid source `0`: {why}"));
        assert_eq!(one_error("* * 17 allow"), format!("t.policy:1: invalid target `17`: {why}"));
    }

    #[test]
    fn error_for_an_unknown_token() {
        assert_eq!(
            one_error("* @adminvm * allow"),
            "t.policy:1: invalid source `@adminvm`: unknown token (expected `@anyvm`, `@backend`, `@toolstack`, `@tag:T` or `@type:T`)"
        );
        assert_eq!(one_error("* * @tag: allow"), "t.policy:1: invalid target `@tag:`: tag: empty name");
        assert_eq!(
            one_error("* * @type:42 allow"),
            "t.policy:1: invalid target `@type:42`: type: a name cannot be all digits"
        );
        assert_eq!(
            one_error("* * @tag:a@b allow"),
            "t.policy:1: invalid target `@tag:a@b`: tag: character `@` not allowed (names use A-Z a-z 0-9 _ . -)"
        );
        assert_eq!(
            one_error("* é * allow"),
            "t.policy:1: invalid source `é`: character `é` not allowed (names use A-Z a-z 0-9 _ . -)"
        );
    }

    #[test]
    fn error_for_a_bad_action() {
        assert_eq!(one_error("* * * ask"), "t.policy:1: invalid action `ask`: expected `allow` or `deny`");
        assert_eq!(
            one_error("* * * Allow"),
            "t.policy:1: invalid action `Allow`: expected `allow` or `deny`"
        );
    }

    #[test]
    fn reports_every_error_of_a_file_in_line_order() {
        let errors = errors_of("* * * allow\nx 1 @foo maybe\n* * * allow\n* *\n");
        assert_eq!(
            errors,
            [
                "t.policy:2: invalid source `1`: a bare number looks like a domain id; rules name domains by name or label (`@tag:T`, `@type:T`), since domain ids change on migration",
                "t.policy:2: invalid target `@foo`: unknown token (expected `@anyvm`, `@backend`, `@toolstack`, `@tag:T` or `@type:T`)",
                "t.policy:2: invalid action `maybe`: expected `allow` or `deny`",
                "t.policy:4: incomplete rule: expected `SERVICE SOURCE TARGET ACTION`, found 2 fields",
            ]
        );
    }

    #[test]
    fn reports_at_most_100_errors_then_counts_the_rest() {
        let text = "bad\n".repeat(150);
        let errors = Policy::parse_file("t.policy", &text).unwrap_err();
        assert_eq!(errors.len(), MAX_ERRORS_PER_FILE + 1);
        assert_eq!(errors[99].line, 100);
        assert_eq!(errors[100].to_string(), "t.policy:101: … and 50 more errors");
    }

    #[test]
    fn shows_a_long_or_odd_token_escaped_and_cut() {
        let long = "\u{1b}".repeat(200);
        let message = one_error(&format!("{long} * * allow"));
        assert!(message.starts_with("t.policy:1: invalid service `\\u{1b}"), "{message}");
        assert!(message.contains("…`: longer than 64 bytes"), "{message}");
        assert!(message.len() < 1000, "{message}");
        assert!(!message.contains('\u{1b}'));
    }

    #[test]
    fn from_text_takes_one_rule() {
        let origin = Origin { file: "a.policy".to_string(), line: 7 };
        assert_eq!(
            Rule::from_text("* * * allow\n* * * deny", origin.clone()).unwrap_err().to_string(),
            "a.policy:7: a rule is one line"
        );
        assert_eq!(
            Rule::from_text(" # nothing", origin.clone()).unwrap_err().to_string(),
            "a.policy:7: no rule (the text is blank or a comment)"
        );
        assert_eq!(
            Rule::from_text("* * * no", origin).unwrap_err().to_string(),
            "a.policy:7: invalid action `no`: expected `allow` or `deny`"
        );
    }

    #[test]
    fn service_tokens_match() {
        let named = ServiceRef { port: 9, name: Some("storage") };
        assert!(Service::Any.matches(port(1)));
        assert!(Service::Any.matches(named));
        assert!(Service::Port(9).matches(named));
        assert!(!Service::Port(9).matches(port(10)));
        let storage = Service::Name(Name::new("storage").unwrap());
        assert!(storage.matches(named));
        assert!(!storage.matches(port(9)), "a port without a registered name matches no name");
        assert!(!storage.matches(ServiceRef { port: 9, name: Some("storage2") }));
    }

    #[test]
    fn subject_tokens_match() {
        let tags = ["web".to_string(), "prod".to_string()];
        let guest =
            DomainView { name: "web1", type_: Some("guest"), tags: &tags, backend: false, toolstack: false };
        let backend = DomainView { name: "be", type_: None, tags: NO_TAGS, backend: true, toolstack: false };
        let toolstack =
            DomainView { name: "ts", type_: None, tags: NO_TAGS, backend: false, toolstack: true };
        let dom0 =
            DomainView { name: "Domain-0", type_: None, tags: NO_TAGS, backend: true, toolstack: true };
        let s = |t: &str| Subject::parse(t).unwrap();

        for d in [&guest, &backend, &toolstack, &dom0] {
            assert!(s("*").matches(d));
        }
        assert!(s("@anyvm").matches(&guest));
        assert!(!s("@anyvm").matches(&backend));
        assert!(!s("@anyvm").matches(&toolstack));
        assert!(!s("@anyvm").matches(&dom0));
        assert!(s("@backend").matches(&backend) && s("@backend").matches(&dom0));
        assert!(!s("@backend").matches(&guest) && !s("@backend").matches(&toolstack));
        assert!(s("@toolstack").matches(&toolstack) && s("@toolstack").matches(&dom0));
        assert!(!s("@toolstack").matches(&guest) && !s("@toolstack").matches(&backend));
        assert!(s("@tag:web").matches(&guest) && s("@tag:prod").matches(&guest));
        assert!(!s("@tag:we").matches(&guest) && !s("@tag:web").matches(&backend));
        assert!(s("@type:guest").matches(&guest));
        assert!(!s("@type:guest").matches(&backend) && !s("@type:Guest").matches(&guest));
        assert!(s("web1").matches(&guest));
        assert!(!s("web").matches(&guest) && !s("web1").matches(&dom0));
    }

    #[test]
    fn decide_takes_the_first_match_and_denies_without_one() {
        let policy = Policy::from_rules(
            Policy::parse_file("a.policy", "5 a b deny\n5 a * allow\n6 * * allow").unwrap(),
        );
        let (a, b, c) = (domain("a"), domain("b"), domain("c"));
        let d = policy.decide(port(5), &a, &b);
        assert_eq!(d.action, Action::Deny);
        assert_eq!(d.rule.unwrap().origin.line, 1);
        let d = policy.decide(port(5), &a, &c);
        assert_eq!((d.action, d.rule.unwrap().origin.line), (Action::Allow, 2));
        let d = policy.decide(port(7), &a, &c);
        assert_eq!(d, Decision { action: Action::Deny, rule: None });
        assert_eq!(Policy::default().decide(port(5), &a, &b), Decision { action: Action::Deny, rule: None });
    }

    #[test]
    fn decide_tries_rules_for_any_service_port_and_name_in_rule_order() {
        let text = "9 a b deny\n* a c deny\ns1 a b deny\n5 a b allow\n* a b allow\ns1 a b allow\n";
        let policy = Policy::from_rules(Policy::parse_file("a.policy", text).unwrap());
        let (a, b, c) = (domain("a"), domain("b"), domain("c"));
        let line = |service: ServiceRef<'_>, target: &DomainView<'_>| {
            let d = policy.decide(service, &a, target);
            (d.action, d.rule.map(|r| r.origin.line))
        };
        let s1 = |port| ServiceRef { port, name: Some("s1") };
        assert_eq!(line(s1(5), &b), (Action::Deny, Some(3)));
        assert_eq!(line(port(5), &b), (Action::Allow, Some(4)));
        assert_eq!(line(s1(6), &b), (Action::Deny, Some(3)));
        assert_eq!(line(ServiceRef { port: 6, name: Some("s2") }, &b), (Action::Allow, Some(5)));
        assert_eq!(line(s1(9), &b), (Action::Deny, Some(1)));
        assert_eq!(line(s1(5), &c), (Action::Deny, Some(2)));
        assert_eq!(policy.decide(s1(5), &c, &b), Decision { action: Action::Deny, rule: None });
    }

    #[test]
    fn files_are_read_in_byte_order_of_their_names_and_first_match_wins() {
        let dir = TestDir::new();
        dir.write("9-late.policy", "* * * deny\n");
        dir.write("10-early.policy", "# allow a to b\n5 a b allow\n");
        dir.write("B.policy", "5 a c allow\n");
        dir.write("a.policy", "5 a c deny\n");
        let policy = Policy::load_dir(&dir.0).unwrap();
        let order: Vec<String> = policy.rules().iter().map(|r| r.origin.to_string()).collect();
        assert_eq!(order, ["10-early.policy:2", "9-late.policy:1", "B.policy:1", "a.policy:1"]);
        let d = policy.decide(port(5), &domain("a"), &domain("b"));
        assert_eq!(
            (d.action, d.rule.unwrap().origin.to_string()),
            (Action::Allow, "10-early.policy:2".to_string())
        );
        let d = policy.decide(port(5), &domain("a"), &domain("c"));
        assert_eq!(
            (d.action, d.rule.unwrap().origin.to_string()),
            (Action::Deny, "9-late.policy:1".to_string())
        );
    }

    #[test]
    fn skips_hidden_files_and_other_names() {
        let dir = TestDir::new();
        dir.write("50.policy", "5 a b allow\n");
        for skipped in [".0.policy", ".50.policy.swp", "0.policy~", "0.policy.bak", "#0.policy#", "README"] {
            dir.write(skipped, "* * * deny\n");
        }
        fs::create_dir(dir.0.join("sub")).unwrap();
        let policy = Policy::load_dir(&dir.0).unwrap();
        assert_eq!(policy.rules().len(), 1);
        assert_eq!(policy.decide(port(5), &domain("a"), &domain("b")).action, Action::Allow);
    }

    #[test]
    fn load_reports_every_error_of_every_file() {
        let dir = TestDir::new();
        dir.write("a.policy", "* * * allow\n* * *\n");
        dir.write("b.policy", "* * * allow\n\n* * * allow extra\n");
        dir.write("c.policy", "* * * allow\n");
        fs::create_dir(dir.0.join("d.policy")).unwrap();
        fs::write(dir.0.join("e.policy"), b"* * * allow\n* \xff * deny\n").unwrap();
        let errors: Vec<String> =
            Policy::load_dir(&dir.0).unwrap_err().errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            errors,
            [
                "a.policy:2: incomplete rule: expected `SERVICE SOURCE TARGET ACTION`, found 3 fields",
                "b.policy:3: unexpected fifth field `extra`: a rule is `SERVICE SOURCE TARGET ACTION` (`#` starts a comment)",
                "d.policy:0: not a regular file",
                "e.policy:2: not UTF-8 text",
            ]
        );
    }

    #[test]
    fn load_of_a_missing_directory_is_an_error() {
        let dir = TestDir::new();
        let missing = dir.0.join("missing");
        let error = Policy::load_dir(&missing).unwrap_err();
        assert_eq!(error.errors.len(), 1);
        assert_eq!(error.errors[0].file, missing.display().to_string());
        assert_eq!(error.errors[0].line, 0);
        assert!(error.to_string().contains(":0: cannot read the policy directory: "), "{error}");
    }

    #[test]
    fn load_bound_files() {
        let dir = TestDir::new();
        for i in 0..MAX_FILES {
            dir.write(&format!("{i:03}.policy"), "");
        }
        assert!(Policy::load_dir(&dir.0).is_ok());
        dir.write("256.policy", "");
        dir.write("257.policy", "");
        let errors = Policy::load_dir(&dir.0).unwrap_err().errors;
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            "256.policy:0: over the limit of 256 policy files in a directory (258 files): this file and the later ones are not read"
        );
    }

    #[test]
    fn load_bound_file_size() {
        let dir = TestDir::new();
        let line = "* * * deny # padding\n";
        let mut text = line.repeat(MAX_FILE_BYTES / line.len());
        text.push_str(&"#".repeat(MAX_FILE_BYTES - text.len()));
        assert_eq!(text.len(), MAX_FILE_BYTES);
        dir.write("a.policy", &text);
        assert!(Policy::load_dir(&dir.0).is_ok());
        text.push('#');
        dir.write("a.policy", &text);
        assert_eq!(
            Policy::load_dir(&dir.0).unwrap_err().to_string(),
            "a.policy:0: larger than the limit of 1048576 bytes (1 MiB) per policy file"
        );
    }

    #[test]
    fn load_bound_rules() {
        let dir = TestDir::new();
        dir.write("a.policy", &"1 * * deny\n".repeat(MAX_RULES - 1));
        dir.write("b.policy", "2 * * deny\n");
        assert_eq!(Policy::load_dir(&dir.0).unwrap().rules().len(), MAX_RULES);
        dir.write("b.policy", "2 * * deny\n# and\n3 * * deny\n4 * * deny\n");
        assert_eq!(
            Policy::load_dir(&dir.0).unwrap_err().to_string(),
            "b.policy:3: over the limit of 65536 rules in a policy: this rule and the later ones"
        );
    }

    #[test]
    fn add_appends_inserts_and_keeps_the_other_lines() {
        let dir = TestDir::new();
        let text = "# header\n5 a b allow # first\n\n# before the second\n6 a b allow";
        dir.write("a.policy", text);
        let edit = PolicyDir::new(&dir.0);
        let added = edit.add("7 a b deny", "a.policy", None).unwrap();
        assert_eq!(added.origin.to_string(), "a.policy:6");
        assert_eq!(dir.read("a.policy"), format!("{text}\n7 a b deny\n"));
        let added = edit.add("8 a b deny # why", "a.policy", Some(2)).unwrap();
        assert_eq!(added.origin.to_string(), "a.policy:5");
        assert_eq!(added.to_string(), "8 a b deny");
        assert_eq!(
            dir.read("a.policy"),
            "# header\n5 a b allow # first\n\n# before the second\n8 a b deny # why\n6 a b allow\n7 a b deny\n"
        );
        let added = edit.add("9 a b deny", "a.policy", Some(1)).unwrap();
        assert_eq!(added.origin.to_string(), "a.policy:2");
        let added = edit.add("10 a b deny", "a.policy", Some(6)).unwrap();
        assert_eq!(added.origin.to_string(), "a.policy:9");
        let policy = Policy::load_dir(&dir.0).unwrap();
        let ports: Vec<String> = policy.rules().iter().map(|r| r.service.to_string()).collect();
        assert_eq!(ports, ["9", "5", "8", "6", "7", "10"]);
        for r in policy.rules() {
            assert_eq!(
                rule(dir.read("a.policy").lines().nth(r.origin.line as usize - 1).unwrap()).service,
                r.service
            );
        }
    }

    #[test]
    fn add_creates_a_file_and_leaves_no_temporary_file() {
        let dir = TestDir::new();
        let edit = PolicyDir::new(&dir.0);
        let added = edit.add("storage @anyvm @backend allow", "50-storage.policy", Some(1)).unwrap();
        assert_eq!(added.origin.to_string(), "50-storage.policy:1");
        let names: Vec<String> = dir.snapshot().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["50-storage.policy"]);
        assert_eq!(dir.read("50-storage.policy"), "storage @anyvm @backend allow\n");
    }

    #[test]
    fn add_refuses_bad_arguments() {
        let dir = TestDir::new();
        dir.write("a.policy", "5 a b allow\n");
        let edit = PolicyDir::new(&dir.0);
        let before = dir.snapshot();
        let long = format!("{}.policy", "a".repeat(194));
        assert!(check_file_name(&long[1..]).is_ok());
        for name in [
            ".a.policy",
            "a.policy~",
            "a",
            ".policy",
            "x/a.policy",
            "../a.policy",
            "a b.policy",
            "é.policy",
            &long,
        ] {
            assert!(
                matches!(edit.add("* * * deny", name, None), Err(EditError::BadFileName(n)) if n == name),
                "{name}"
            );
        }
        let e = edit.add("* * * deny", "a.policy", Some(3)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no rule 3 in a.policy: it has 1 rule(s), so positions 1 to 2 are accepted"
        );
        assert!(matches!(edit.add("* * * deny", "a.policy", Some(0)), Err(EditError::BadPosition { .. })));
        let e = edit.add("* * 5 deny", "a.policy", None).unwrap_err();
        assert!(e.to_string().starts_with("<rule>:1: invalid target `5`: a bare number"), "{e}");
        assert!(matches!(edit.add("* * * deny\n", "a.policy", None), Err(EditError::BadRule(_))));
        assert!(matches!(edit.add("# nothing", "a.policy", None), Err(EditError::BadRule(_))));
        assert_eq!(dir.snapshot(), before);
    }

    #[test]
    fn refused_edits_leave_every_file_unchanged() {
        let dir = TestDir::new();
        dir.write("a.policy", "5 a b allow\n# keep\n");
        dir.write("b.policy", "* * * oops\n");
        let edit = PolicyDir::new(&dir.0);
        let before = dir.snapshot();
        let e = edit.add("6 a b allow", "a.policy", None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the policy would be invalid after this edit:\nb.policy:1: invalid action `oops`: expected `allow` or `deny`"
        );
        assert!(matches!(edit.remove("a.policy", 1), Err(EditError::Invalid(_))));
        assert!(matches!(edit.remove_matching("5 a b allow"), Err(EditError::Invalid(_))));
        assert_eq!(dir.snapshot(), before);

        // An edit that would break a bound.
        dir.write("b.policy", &"1 * * deny\n".repeat(MAX_RULES - 1));
        assert!(edit.load().is_ok());
        let before = dir.snapshot();
        let e = edit.add("6 a b allow", "a.policy", Some(1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the policy would be invalid after this edit:\nb.policy:65535: over the limit of 65536 rules in a policy: this rule and the later ones"
        );
        assert!(matches!(edit.add("6 a b allow", "c.policy", None), Err(EditError::Invalid(_))));
        assert_eq!(dir.snapshot(), before);
    }

    #[test]
    fn add_refuses_to_grow_a_file_past_its_bound() {
        let dir = TestDir::new();
        dir.write("a.policy", &"#".repeat(MAX_FILE_BYTES - 5));
        let before = dir.snapshot();
        let e = PolicyDir::new(&dir.0).add("* * * deny", "a.policy", None).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("a.policy:0: larger than the limit of 1048576 bytes (1 MiB) per policy file"),
            "{e}"
        );
        assert_eq!(dir.snapshot(), before);
    }

    #[test]
    fn an_edit_may_fix_an_invalid_directory() {
        let dir = TestDir::new();
        dir.write("a.policy", "5 a b allow\n");
        dir.write("b.policy", &"1 * * deny\n".repeat(MAX_RULES));
        let edit = PolicyDir::new(&dir.0);
        assert!(edit.load().is_err());
        let removed = edit.remove("a.policy", 1).unwrap();
        assert_eq!(
            (removed.to_string(), removed.origin.to_string()),
            ("5 a b allow".to_string(), "a.policy:1".to_string())
        );
        assert!(edit.load().is_ok());
    }

    #[test]
    fn remove_takes_out_one_rule_line() {
        let dir = TestDir::new();
        dir.write("a.policy", "# one\n5 a b allow # x\n# two\n6 a b allow\n");
        let edit = PolicyDir::new(&dir.0);
        for line in [0, 1, 3, 5, 99, u32::MAX] {
            let e = edit.remove("a.policy", line).unwrap_err();
            assert_eq!(e.to_string(), format!("a.policy:{line}: no rule on this line"));
        }
        assert!(matches!(edit.remove("b.policy", 1), Err(EditError::NoRule { .. })));
        let removed = edit.remove("a.policy", 2).unwrap();
        assert_eq!(removed, rule("5 a b allow").with_origin("a.policy", 2));
        assert_eq!(dir.read("a.policy"), "# one\n# two\n6 a b allow\n");
    }

    #[test]
    fn remove_matching_takes_out_every_copy_in_every_file() {
        let dir = TestDir::new();
        dir.write("a.policy", "5 a b allow\n6 a b allow\n5  a  b  allow # again\n");
        dir.write("b.policy", "# b\n5 a b allow");
        dir.write("c.policy", "5 a b deny\n");
        let edit = PolicyDir::new(&dir.0);
        let removed: Vec<String> =
            edit.remove_matching("5 a b allow").unwrap().iter().map(|r| r.origin.to_string()).collect();
        assert_eq!(removed, ["a.policy:1", "a.policy:3", "b.policy:2"]);
        assert_eq!(dir.read("a.policy"), "6 a b allow\n");
        assert_eq!(dir.read("b.policy"), "# b\n");
        assert_eq!(dir.read("c.policy"), "5 a b deny\n");
        let before = dir.snapshot();
        assert_eq!(edit.remove_matching("5 a b allow").unwrap(), []);
        assert_eq!(dir.snapshot(), before);
    }

    #[test]
    fn edits_keep_the_file_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TestDir::new();
        dir.write("a.policy", "5 a b allow\n");
        fs::set_permissions(dir.0.join("a.policy"), fs::Permissions::from_mode(0o600)).unwrap();
        PolicyDir::new(&dir.0).add("6 a b allow", "a.policy", None).unwrap();
        assert_eq!(fs::metadata(dir.0.join("a.policy")).unwrap().permissions().mode() & 0o777, 0o600);
    }

    impl Rule {
        fn with_origin(self, file: &str, line: u32) -> Rule {
            Rule { origin: Origin { file: file.to_string(), line }, ..self }
        }
    }

    fn lint_of(files: &[(&str, &str)]) -> LintReport {
        let dir = TestDir::new();
        for (name, text) in files {
            dir.write(name, text);
        }
        lint(&dir.0)
    }

    fn warnings(report: &LintReport) -> Vec<String> {
        report.warnings.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn lint_warns_of_duplicates_and_shadowed_rules() {
        let report = lint_of(&[
            ("a.policy", "5 a b allow\n* a * deny\n"),
            (
                "b.policy",
                "5 a b allow\n5 a b deny\n5 a c allow\n6 a b allow\n7 x y allow\n* * * deny\n8 q r allow\n",
            ),
        ]);
        assert_eq!(report.errors, []);
        assert_eq!(
            warnings(&report),
            [
                "b.policy:1: rule `5 a b allow` never matches: a duplicate of `5 a b allow` at a.policy:1",
                "b.policy:2: rule `5 a b deny` never matches: contradicted by `5 a b allow` at a.policy:1",
                "b.policy:3: rule `5 a c allow` never matches: shadowed by `* a * deny` at a.policy:2",
                "b.policy:4: rule `6 a b allow` never matches: shadowed by `* a * deny` at a.policy:2",
                "b.policy:7: rule `8 q r allow` never matches: shadowed by `* * * deny` at b.policy:6",
            ]
        );
    }

    #[test]
    fn lint_gives_no_warning_where_a_later_rule_can_match() {
        let report = lint_of(&[(
            "a.policy",
            "5 a b allow\nsvc a b allow\n5 a @tag:b allow\n5 a * allow\n* a b deny\n\
             * @anyvm * deny\n* @tag:x * allow\n* @backend * allow\n* dom0 * allow\n\
             * @type:t * deny\n* @tag:t * deny\n* * @toolstack deny\n* * @anyvm deny\n* * @backend deny\n",
        )]);
        assert_eq!(report, LintReport::default());
    }

    #[test]
    fn lint_reports_errors_and_skipped_files() {
        let report = lint_of(&[
            ("a.policy", "* * * allow\n* * * allow\n"),
            ("b.policy", "x"),
            (".c.policy", ""),
            ("d.policy~", ""),
        ]);
        let errors: Vec<String> = report.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            errors,
            ["b.policy:1: incomplete rule: expected `SERVICE SOURCE TARGET ACTION`, found 1 field"]
        );
        assert_eq!(
            warnings(&report),
            [
                ".c.policy:0: skipped: hidden file",
                "d.policy~:0: skipped: not a `*.policy` file",
                "a.policy:2: rule `* * * allow` never matches: a duplicate of `* * * allow` at a.policy:1",
            ]
        );
    }

    #[test]
    fn lint_is_linear_in_the_rules() {
        // Rules that no other rule covers, so every rule is checked in full: at the bound, about
        // 0.15 s on the 2-core dev machine (a check of every pair of rules takes 14 s).
        let rules: Vec<Rule> = (0..MAX_RULES).map(|i| rule(&format!("{i} d{i} * allow"))).collect();
        let start = std::time::Instant::now();
        assert_eq!(shadowed(&rules), []);
        let took = start.elapsed();
        assert!(took < std::time::Duration::from_secs(3), "{took:?} for {} rules", rules.len());
    }

    #[test]
    fn serde_round_trips_and_checks_names() {
        let r = rule("svc @tag:t dom allow");
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Rule>(&json).unwrap(), r);
        let e = PolicyError { file: "a.policy".to_string(), line: 3, message: "m".to_string() };
        assert_eq!(serde_json::from_str::<PolicyError>(&serde_json::to_string(&e).unwrap()).unwrap(), e);
        assert_eq!(serde_json::to_string(&Action::Allow).unwrap(), "\"allow\"");
        assert_eq!(serde_json::to_string(&Subject::AnyVm).unwrap(), "\"any_vm\"");
        let bad = json.replace("\"dom\"", "\"12\"");
        assert!(serde_json::from_str::<Rule>(&bad).is_err(), "{bad}");
        assert!(serde_json::from_str::<Subject>(r#"{"tag":"a b"}"#).is_err());
    }
}
