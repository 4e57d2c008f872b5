//! The manager's admin service, `policy`: the toolstack reads and edits the policy, explains
//! decisions, labels domains, lists registrations, introductions and links, revokes, reads
//! the audit trail and watches what happens as it happens. Callable from the toolstack's domains only (and, over the backend domain's
//! local socket, by its own processes).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use dombus::Events;
use dombus::transport::types::DomId;
use dombus_agent::manager::valid_name;
use serde::{Deserialize, Serialize};

use crate::audit::AuditRecord;
use crate::core::{Core, Labels, MAX_TAGS, pair};
use crate::policy::{Action, PolicyDir, ServiceRef};
use crate::watch::{ManagerEvent, Selector, WatchState};
use crate::xsm;

/// The file `add` writes to unless told another.
pub const DEFAULT_FILE: &str = "50-admin.policy";
/// Most audit records one call returns.
const MAX_AUDIT: u32 = 10_000;

/// Why the admin service refused a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum AdminError {
    /// The caller is not the toolstack.
    #[error("only the toolstack may administer the connection manager (the caller is domain {caller})")]
    NotToolstack {
        /// The caller's domain.
        caller: u32,
    },
    /// The edit would leave the policy invalid (every error, `file:line: message`), or the
    /// argument is not valid.
    #[error("{0}")]
    Invalid(String),
    /// Nothing by that name or id.
    #[error("{0}")]
    NotFound(String),
    /// The manager could not carry the call out.
    #[error("{0}")]
    Failed(String),
}

/// A rule as the admin service lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleInfo {
    /// `file:line`.
    pub at: String,
    /// The rule's text.
    pub rule: String,
}

/// What a removal did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// The rule removed.
    pub rule: RuleInfo,
    /// Connections revoked (with `teardown`).
    pub connections_revoked: u32,
    /// Introduced links ended (with `teardown`).
    pub links_ended: u32,
}

/// Which rule decides a connection, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// `allow` or `deny`.
    pub result: String,
    /// The deciding rule (`None`: no rule matched, so denied).
    pub rule: Option<RuleInfo>,
    /// The source as the policy saw it.
    pub source: String,
    /// The target as the policy saw it.
    pub target: String,
    /// The service (its name when the target registered one for the port).
    pub service: String,
}

/// A domain as the manager knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainInfo {
    /// Its domain id (`None`: labelled, not registered now).
    pub domid: Option<u16>,
    /// Its name.
    pub name: Option<String>,
    /// `@type:`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// `@tag:`s.
    pub tags: Vec<String>,
    /// The backend domain, the toolstack.
    pub roles: Vec<String>,
    /// Its ports' service names.
    pub services: Vec<(u32, String)>,
    /// The links its agent reports: (peer, connections).
    pub links: Vec<(u16, u32)>,
}

/// A link between two domains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkInfo {
    /// One end.
    pub a: u16,
    /// The other.
    pub b: u16,
    /// The introduction's rendezvous (`None`: a link with the backend domain).
    pub rendezvous: Option<String>,
    /// The decision that introduced them.
    pub decision: Option<u64>,
    /// Seconds since the introduction.
    pub age_s: Option<u64>,
    /// Whether an agent reports the link up, and its connections.
    pub live: Option<u32>,
}

/// The manager's state in brief.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerStatus {
    /// The backend domain.
    pub domain: u16,
    /// The policy's generation.
    pub generation: u64,
    /// Rules in force.
    pub rules: u32,
    /// The policy directory.
    pub policy_dir: String,
    /// When the last load failed: its errors (the policy in force is the last good one).
    pub policy_error: Option<String>,
    /// Registered domains.
    pub registered: u32,
    /// Introductions in force.
    pub introductions: u32,
    /// Decisions made since the manager started.
    pub decisions: u64,
}

/// The connection manager's administration, for the toolstack.
#[dombus::service(name = "policy", version = 1)]
pub trait PolicyAdmin {
    /// The rules in force, in the order they are matched.
    #[idempotent]
    async fn rules(&self) -> Result<Vec<RuleInfo>, AdminError>;

    /// Adds a rule (`SERVICE SOURCE TARGET ACTION`) to a file of the policy directory (default
    /// 50-admin.policy), before its rule number `before` (1-based) or at its end. The whole
    /// directory is validated first; the file is written atomically.
    async fn add(
        &self,
        rule: String,
        file: Option<String>,
        before: Option<u32>,
    ) -> Result<RuleInfo, AdminError>;

    /// Removes the rule at `file:line`. With `teardown`, the connections and introduced links
    /// the policy no longer allows are torn down.
    async fn remove(&self, file: String, line: u32, teardown: bool) -> Result<Removed, AdminError>;

    /// Which rule decides whether `source` may connect to `service` (a port or a service name)
    /// of `target` (domain names).
    #[idempotent]
    async fn explain(
        &self,
        source: String,
        target: String,
        service: String,
    ) -> Result<Explanation, AdminError>;

    /// A past decision by its id.
    #[idempotent]
    async fn decision(&self, id: u64) -> Result<AuditRecord, AdminError>;

    /// The domains: registered ones and labelled ones.
    #[idempotent]
    async fn domains(&self) -> Result<Vec<DomainInfo>, AdminError>;

    /// Sets the labels of the domain named `name` (`--type T`, `--tags a,b`; neither: none).
    #[idempotent]
    async fn label(&self, name: String, r#type: Option<String>, tags: Vec<String>) -> Result<(), AdminError>;

    /// Introductions and live links.
    #[idempotent]
    async fn links(&self) -> Result<Vec<LinkInfo>, AdminError>;

    /// Ends the introduction of the domains named `a` and `b` (their link and its connections);
    /// a later connection needs a new decision. Whether there was one.
    async fn revoke(&self, a: String, b: String) -> Result<bool, AdminError>;

    /// The newest `count` decisions of the audit trail, oldest first.
    #[idempotent]
    async fn audit(&self, count: Option<u32>) -> Result<Vec<AuditRecord>, AdminError>;

    /// The manager's state: policy generation, the last load's errors, counts.
    #[idempotent]
    async fn status(&self) -> Result<ManagerStatus, AdminError>;

    /// The XSM/FLASK policy fragment that lets exactly the domain types the policy allows to be
    /// introduced share grants and event channels.
    #[idempotent]
    async fn xsm(&self) -> Result<String, AdminError>;

    /// What happens, as it happens: domains registering and going, decisions (allowed and
    /// denied, as audited), introductions made and ended, connections revoked, policy loads,
    /// labels set. A new watch starts with the registered domains. `domain` (a name or an id):
    /// only what involves that domain; `denials`: only denials.
    async fn watch(&self, domain: Option<String>, denials: bool) -> Events<ManagerEvent, WatchState>;
}

/// The admin service of a manager.
#[derive(Clone)]
pub struct Admin {
    pub(crate) core: Arc<Core>,
}

impl Admin {
    fn allowed(&self) -> Result<(), AdminError> {
        // Over the backend domain's local socket there is no domain: only its own processes
        // reach it (the socket's permissions decide).
        match dombus::rpc::current_caller().and_then(|c| c.domain) {
            None => Ok(()),
            Some(d) if u16::try_from(d).is_ok_and(|d| self.core.is_toolstack(DomId(d))) => Ok(()),
            Some(d) => Err(AdminError::NotToolstack { caller: d }),
        }
    }

    fn dir(&self) -> PolicyDir {
        PolicyDir::new(self.core.cfg.policy_dir.clone())
    }

    fn resolve(&self, who: &str) -> Result<(Option<DomId>, Option<String>), AdminError> {
        let st = self.core.state();
        if let Ok(id) = who.parse::<u16>() {
            let dom = DomId(id);
            return Ok((Some(dom), self.core.name_of(&st, dom)));
        }
        if !valid_name(who) {
            return Err(AdminError::Invalid(format!("{who:?} is neither a domain name nor a domain id")));
        }
        Ok((self.core.named(&st, who), Some(who.to_string())))
    }
}

fn info(r: &crate::policy::Rule) -> RuleInfo {
    RuleInfo { at: format!("{}:{}", r.origin.file, r.origin.line), rule: r.to_string() }
}

impl PolicyAdmin for Admin {
    async fn rules(&self) -> Result<Vec<RuleInfo>, AdminError> {
        self.allowed()?;
        let policy = self.core.state().policy.clone();
        Ok(policy.rules().iter().map(info).collect())
    }

    async fn add(
        &self,
        rule: String,
        file: Option<String>,
        before: Option<u32>,
    ) -> Result<RuleInfo, AdminError> {
        self.allowed()?;
        let file = file.unwrap_or_else(|| DEFAULT_FILE.to_string());
        let added = self
            .dir()
            .add(&rule, &file, before.map(|b| b as usize))
            .map_err(|e| AdminError::Invalid(e.to_string()))?;
        self.core.reload(false);
        tracing::info!(rule = %added, at = %format!("{}:{}", added.origin.file, added.origin.line), "rule added");
        Ok(info(&added))
    }

    async fn remove(&self, file: String, line: u32, teardown: bool) -> Result<Removed, AdminError> {
        self.allowed()?;
        let removed = self.dir().remove(&file, line).map_err(|e| AdminError::Invalid(e.to_string()))?;
        tracing::info!(rule = %removed, at = %format!("{file}:{line}"), teardown, "rule removed");
        self.core.reload(false);
        let (connections, links) = if teardown { self.core.revoke_disallowed() } else { (0, 0) };
        Ok(Removed {
            rule: info(&removed),
            connections_revoked: u32::try_from(connections).unwrap_or(u32::MAX),
            links_ended: u32::try_from(links).unwrap_or(u32::MAX),
        })
    }

    async fn explain(
        &self,
        source: String,
        target: String,
        service: String,
    ) -> Result<Explanation, AdminError> {
        self.allowed()?;
        let (sd, sn) = self.resolve(&source)?;
        let (td, tn) = self.resolve(&target)?;
        let st = self.core.state();
        let me = self.core.me;
        let is_ts = |d: Option<DomId>| d.is_some_and(|d| self.core.is_toolstack(d));
        let sv = self.core.view_of_name(&st, sn.as_deref(), sd == Some(me), is_ts(sd));
        let tv = self.core.view_of_name(&st, tn.as_deref(), td == Some(me), is_ts(td));
        let (port, name) = match service.parse::<u32>() {
            Ok(p) => (p, td.and_then(|t| self.core.service_name(&st, t, p))),
            Err(_) if valid_name(&service) => (0, Some(service.clone())),
            Err(_) => {
                return Err(AdminError::Invalid(format!("{service:?} is neither a port nor a service name")));
            }
        };
        let policy = st.policy.clone();
        let d = policy.decide(ServiceRef { port, name: name.as_deref() }, &sv.view(), &tv.view());
        let show = |v: &crate::core::OwnedView, d: Option<DomId>| {
            let mut s = if v.name.is_empty() { "(unnamed)".to_string() } else { v.name.clone() };
            if let Some(d) = d {
                s.push_str(&format!(" (domain {d})"));
            }
            if let Some(t) = &v.labels.type_ {
                s.push_str(&format!(" @type:{t}"));
            }
            for t in &v.labels.tags {
                s.push_str(&format!(" @tag:{t}"));
            }
            if v.backend {
                s.push_str(" @backend");
            }
            if v.toolstack {
                s.push_str(" @toolstack");
            }
            s
        };
        Ok(Explanation {
            result: if d.action == Action::Allow { "allow" } else { "deny" }.to_string(),
            rule: d.rule.map(info),
            source: show(&sv, sd),
            target: show(&tv, td),
            service: match (name, port) {
                (Some(n), 0) => n,
                (Some(n), p) => format!("{n} (port {p})"),
                (None, p) => format!("port {p}"),
            },
        })
    }

    async fn decision(&self, id: u64) -> Result<AuditRecord, AdminError> {
        self.allowed()?;
        self.core
            .find_decision(id)
            .ok_or_else(|| AdminError::NotFound(format!("no decision {id} in the audit trail")))
    }

    async fn domains(&self) -> Result<Vec<DomainInfo>, AdminError> {
        self.allowed()?;
        let st = self.core.state();
        let me = self.core.me;
        let mut out = Vec::new();
        let mut named = BTreeSet::new();
        let mut ids: Vec<DomId> = st.agents.keys().copied().collect();
        ids.push(me);
        ids.sort_unstable();
        for dom in ids {
            let name = self.core.name_of(&st, dom);
            let labels = name.as_ref().and_then(|n| st.labels.get(n)).cloned().unwrap_or_default();
            if let Some(n) = &name {
                named.insert(n.clone());
            }
            let mut roles = Vec::new();
            if dom == me {
                roles.push("backend".to_string());
            }
            if self.core.is_toolstack(dom) {
                roles.push("toolstack".to_string());
            }
            let (services, links) = match st.agents.get(&dom) {
                Some(a) => (a.services.iter().map(|(p, n)| (*p, n.clone())).collect(), a.links.clone()),
                None => (
                    st.backend_services.iter().map(|(p, n)| (*p, n.clone())).collect(),
                    self.core
                        .sockets
                        .links()
                        .into_iter()
                        .map(|(d, n)| (d.0, u32::try_from(n).unwrap_or(u32::MAX)))
                        .collect(),
                ),
            };
            out.push(DomainInfo {
                domid: Some(dom.0),
                name,
                type_: labels.type_,
                tags: labels.tags,
                roles,
                services,
                links,
            });
        }
        for (name, labels) in st.labels.iter().filter(|(n, _)| !named.contains(*n)) {
            out.push(DomainInfo {
                domid: None,
                name: Some(name.clone()),
                type_: labels.type_.clone(),
                tags: labels.tags.clone(),
                roles: Vec::new(),
                services: Vec::new(),
                links: Vec::new(),
            });
        }
        Ok(out)
    }

    async fn label(&self, name: String, r#type: Option<String>, tags: Vec<String>) -> Result<(), AdminError> {
        self.allowed()?;
        if !valid_name(&name) {
            return Err(AdminError::Invalid(format!("{name:?} is not a domain name")));
        }
        let mut tags: Vec<String> = tags
            .iter()
            .flat_map(|t| t.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect();
        tags.sort();
        tags.dedup();
        if let Some(bad) = r#type.iter().chain(&tags).find(|t| !valid_name(t)) {
            return Err(AdminError::Invalid(format!(
                "{bad:?} is not a label (1 to 64 of A-Z a-z 0-9 _ . -)"
            )));
        }
        if tags.len() > MAX_TAGS {
            return Err(AdminError::Invalid(format!("at most {MAX_TAGS} tags")));
        }
        self.core
            .set_labels(&name, Labels { type_: r#type, tags })
            .map_err(|e| AdminError::Failed(e.to_string()))
    }

    async fn links(&self) -> Result<Vec<LinkInfo>, AdminError> {
        self.allowed()?;
        let st = self.core.state();
        let now = SystemTime::now();
        let mut live: std::collections::BTreeMap<(DomId, DomId), u32> = Default::default();
        for (dom, a) in &st.agents {
            for &(peer, n) in &a.links {
                live.insert(pair(*dom, DomId(peer)), n);
            }
        }
        let mut out = Vec::new();
        for (&(a, b), intro) in &st.intros {
            out.push(LinkInfo {
                a: a.0,
                b: b.0,
                rendezvous: Some(intro.rendezvous.clone()),
                decision: Some(intro.decision),
                age_s: now.duration_since(intro.since).ok().map(|d| d.as_secs()),
                live: live.remove(&(a, b)),
            });
        }
        for ((a, b), n) in live {
            out.push(LinkInfo {
                a: a.0,
                b: b.0,
                rendezvous: None,
                decision: None,
                age_s: None,
                live: Some(n),
            });
        }
        out.sort_by_key(|l| (l.a, l.b));
        Ok(out)
    }

    async fn revoke(&self, a: String, b: String) -> Result<bool, AdminError> {
        self.allowed()?;
        let (Some(da), _) = self.resolve(&a)? else {
            return Err(AdminError::NotFound(format!("no domain {a:?} is registered")));
        };
        let (Some(db), _) = self.resolve(&b)? else {
            return Err(AdminError::NotFound(format!("no domain {b:?} is registered")));
        };
        let mut st = self.core.state();
        let had = st.intros.contains_key(&pair(da, db));
        self.core.end_intro(&mut st, da, db);
        tracing::info!(a = %da, b = %db, had, "introduction revoked by the toolstack");
        Ok(had)
    }

    async fn audit(&self, count: Option<u32>) -> Result<Vec<AuditRecord>, AdminError> {
        self.allowed()?;
        let tail = self
            .core
            .audit
            .tail(count.unwrap_or(20).min(MAX_AUDIT) as usize)
            .map_err(|e| AdminError::Failed(format!("reading the audit trail: {e}")))?;
        if tail.skipped > 0 {
            tracing::warn!(skipped = tail.skipped, "damaged lines in the audit trail were skipped");
        }
        Ok(tail.records)
    }

    async fn status(&self) -> Result<ManagerStatus, AdminError> {
        self.allowed()?;
        let st = self.core.state();
        Ok(ManagerStatus {
            domain: self.core.me.0,
            generation: st.generation,
            rules: u32::try_from(st.policy.rules().len()).unwrap_or(u32::MAX),
            policy_dir: self.core.cfg.policy_dir.display().to_string(),
            policy_error: st.policy_error.clone(),
            registered: u32::try_from(st.agents.len()).unwrap_or(u32::MAX),
            introductions: u32::try_from(st.intros.len()).unwrap_or(u32::MAX),
            decisions: self.core.decisions.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    async fn xsm(&self) -> Result<String, AdminError> {
        self.allowed()?;
        let input = crate::xsm_input(&self.core).map_err(|e| AdminError::Invalid(e.to_string()))?;
        xsm::fragment(&input).map_err(|e| AdminError::Invalid(e.to_string()))
    }

    async fn watch(&self, domain: Option<String>, denials: bool) -> Events<ManagerEvent, WatchState> {
        use std::io::ErrorKind;
        if let Err(e) = self.allowed() {
            return Events::refused(ErrorKind::PermissionDenied, e.to_string());
        }
        let who = match domain.as_deref().map(Selector::parse) {
            None => None,
            Some(Some(who)) => Some(who),
            Some(None) => {
                return Events::refused(
                    ErrorKind::InvalidInput,
                    format!("{:?} is neither a domain name nor a domain id", domain.unwrap_or_default()),
                );
            }
        };
        let core = self.core.clone();
        let view = match (who.clone(), denials) {
            (None, false) => self.core.events.events(),
            (who, denials) => self.core.events.events_where(move |e| {
                (!denials || e.is_denial()) && who.as_ref().is_none_or(|w| e.involves(w))
            }),
        };
        view.with_snapshot(move || {
            let mut state = core.watch_state();
            if let Some(w) = &who {
                state.domains.retain(|d| w.is_domain(d));
            }
            state
        })
    }
}
