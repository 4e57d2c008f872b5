//! The manager's state and its one job: deciding. Which domains are registered (by their
//! agents, named by the toolstack), their labels, the policy in force, the introductions made and
//! the connections allowed under them; every decision numbered and audited; a changed policy
//! announced to every agent and, when asked, what it no longer allows torn down.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use dombus::transport::types::DomId;
use dombus::{Topic, TopicLimits};
use dombus_agent::manager::{FromManager, Peer, valid_name};
use dombus_agent::{DomainSockets, ManagerOps};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::audit::{AuditLimits, AuditLog, AuditRecord, Party, Target, Verdict};
use crate::policy::{Action, DomainView, Policy, Rule, ServiceRef};
use crate::watch::{ManagerEvent, WATCH_BYTES, WATCH_EVENTS, WatchState, WatchedDomain};

/// How the manager is set up.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// The policy directory (`*.policy` files).
    pub policy_dir: PathBuf,
    /// Where the manager keeps its state: the domains' labels (`labels.json`) and the audit
    /// trail (`audit.jsonl` and its rotations).
    pub state_dir: PathBuf,
    /// The toolstack's domains (`@toolstack`; the admin service's callers).
    pub toolstack: Vec<DomId>,
    /// The audit file's bounds.
    pub audit: AuditLimits,
}

impl ManagerConfig {
    /// The defaults for a manager with its policy in `policy_dir` and state in `state_dir`: the
    /// toolstack is dom0.
    pub fn new(policy_dir: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> ManagerConfig {
        ManagerConfig {
            policy_dir: policy_dir.into(),
            state_dir: state_dir.into(),
            toolstack: vec![DomId::DOM0],
            audit: AuditLimits::default(),
        }
    }
}

/// What the toolstack says about a domain (by name): its type and tags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labels {
    /// `@type:T`.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    /// `@tag:T`.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// A registered domain's agent.
pub(crate) struct AgentRec {
    /// Which session (a domain's newer session replaces its older).
    pub session: u64,
    pub name: Option<String>,
    pub tx: mpsc::Sender<FromManager>,
    pub services: BTreeMap<u32, String>,
    pub links: Vec<(u16, u32)>,
}

/// An introduction the manager made.
#[derive(Debug, Clone)]
pub(crate) struct Intro {
    pub rendezvous: String,
    pub decision: u64,
    pub since: SystemTime,
}

/// A connection the manager allowed: (source, target, port) → the decision.
#[derive(Debug, Clone)]
pub(crate) struct Allowed {
    pub decision: u64,
}

pub(crate) struct State {
    pub policy: Arc<Policy>,
    pub generation: u64,
    /// The last load's errors, when the policy in force is an older one.
    pub policy_error: Option<String>,
    /// What the policy directory looked like at the last load (names, sizes, times).
    pub policy_stamp: Vec<(String, u64, Option<SystemTime>)>,
    pub labels: BTreeMap<String, Labels>,
    pub agents: HashMap<DomId, AgentRec>,
    /// The registered domains by name (a decision by name costs the same with 10 domains or
    /// 10,000).
    pub by_name: HashMap<String, DomId>,
    /// Names of the backend domain's own ports.
    pub backend_services: BTreeMap<u32, String>,
    /// By the pair (lower id first).
    pub intros: HashMap<(DomId, DomId), Intro>,
    pub allowed: HashMap<(DomId, DomId, u32), Allowed>,
    /// The newest decisions, for a fast lookup by id (older ones are in the audit files).
    pub recent: VecDeque<AuditRecord>,
}

/// Most decisions kept in memory for lookups.
const RECENT: usize = 4096;
/// Most domains the manager registers.
pub const MAX_AGENTS: usize = 65_536;
/// Most labels entries (names) the manager keeps.
pub const MAX_LABELLED: usize = 65_536;
/// Most tags one domain may have.
pub const MAX_TAGS: usize = 32;

/// The manager: shared by its agent sessions, its gate and its admin service.
pub struct Core {
    pub(crate) me: DomId,
    /// The backend domain's own name, read once at start.
    me_name: Option<String>,
    pub(crate) cfg: ManagerConfig,
    pub(crate) ops: Arc<dyn ManagerOps>,
    pub(crate) sockets: Arc<dyn DomainSockets>,
    pub(crate) audit: AuditLog,
    state: Mutex<State>,
    next_decision: AtomicU64,
    pub(crate) next_session: AtomicU64,
    /// Decisions made, ever.
    pub(crate) decisions: AtomicU64,
    /// Bytes the agents' sessions carried to the manager, ever: what the manager receives is
    /// its protocol, never a connection's data.
    pub(crate) received: AtomicU64,
    /// Set when the manager stops: every session ends.
    pub(crate) stopping: tokio::sync::watch::Sender<bool>,
    /// What happens, for the admin service's watchers (`watch`). Published with the state
    /// changed first, so that a watcher's snapshot never misses a change its events skip.
    pub(crate) events: Topic<ManagerEvent, WatchState>,
}

/// A decision, as the manager made it.
#[derive(Debug, Clone)]
pub(crate) struct Decided {
    pub id: u64,
    pub allowed: bool,
    pub target: Option<DomId>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    /// Registers `dom`'s agent (replacing an older session of the domain).
    pub(crate) fn register(&mut self, dom: DomId, rec: AgentRec) {
        if let Some(old) = self.agents.get(&dom).and_then(|a| a.name.clone()) {
            self.forget_name(&old, dom);
        }
        if let Some(n) = &rec.name {
            self.by_name.insert(n.clone(), dom);
        }
        self.agents.insert(dom, rec);
    }

    /// Unregisters `dom` if session `session` is still its own; whether it was.
    pub(crate) fn unregister(&mut self, dom: DomId, session: u64) -> bool {
        if self.agents.get(&dom).is_none_or(|a| a.session != session) {
            return false;
        }
        if let Some(n) = self.agents.remove(&dom).and_then(|a| a.name) {
            self.forget_name(&n, dom);
        }
        true
    }

    fn forget_name(&mut self, name: &str, dom: DomId) {
        if self.by_name.get(name) == Some(&dom) {
            self.by_name.remove(name);
        }
    }
}

/// The pair's key: lower id first.
pub(crate) fn pair(a: DomId, b: DomId) -> (DomId, DomId) {
    if a < b { (a, b) } else { (b, a) }
}

impl Core {
    /// The manager of the backend domain whose sockets are `sockets` / `ops`: loads the labels,
    /// the policy (an invalid or missing one: no rule, so everything is denied, and the error
    /// reported) and opens the audit trail.
    pub fn new(
        sockets: Arc<dyn DomainSockets>,
        ops: Arc<dyn ManagerOps>,
        cfg: ManagerConfig,
    ) -> std::io::Result<Arc<Core>> {
        std::fs::create_dir_all(&cfg.state_dir)?;
        let audit = AuditLog::open(cfg.state_dir.join("audit.jsonl"), cfg.audit)?;
        // Decision ids go on from the last one audited (the current file always holds it), so
        // that an id names one decision across restarts.
        let first = audit.tail(1)?.records.last().map_or(1, |r| r.decision + 1);
        let labels = load_labels(&cfg.state_dir.join("labels.json"))?;
        let me = sockets.domid();
        let core = Arc::new(Core {
            me,
            me_name: ops.domain_name(me).filter(|n| valid_name(n)),
            ops,
            sockets,
            audit,
            state: Mutex::new(State {
                policy: Arc::new(Policy::default()),
                generation: 0,
                policy_error: None,
                policy_stamp: Vec::new(),
                labels,
                agents: HashMap::new(),
                by_name: HashMap::new(),
                backend_services: BTreeMap::new(),
                intros: HashMap::new(),
                allowed: HashMap::new(),
                recent: VecDeque::new(),
            }),
            next_decision: AtomicU64::new(first),
            next_session: AtomicU64::new(1),
            decisions: AtomicU64::new(0),
            received: AtomicU64::new(0),
            stopping: tokio::sync::watch::channel(false).0,
            events: Topic::new(TopicLimits { max_events: WATCH_EVENTS, max_bytes: WATCH_BYTES }),
            cfg,
        });
        core.reload(false);
        Ok(core)
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Whether `dom` is one of the toolstack's domains.
    pub fn is_toolstack(&self, dom: DomId) -> bool {
        self.cfg.toolstack.contains(&dom)
    }

    /// The name of domain `dom` as the manager knows it.
    pub(crate) fn name_of(&self, st: &State, dom: DomId) -> Option<String> {
        match st.agents.get(&dom) {
            Some(a) => a.name.clone(),
            None if dom == self.me => self.me_name.clone(),
            None => None,
        }
    }

    /// The name domain `dom` gave its `port`.
    pub(crate) fn service_name(&self, st: &State, dom: DomId, port: u32) -> Option<String> {
        if dom == self.me {
            st.backend_services.get(&port).cloned()
        } else {
            st.agents.get(&dom).and_then(|a| a.services.get(&port)).cloned()
        }
    }

    /// The domain named `name`: a registered one, or the backend domain.
    pub(crate) fn named(&self, st: &State, name: &str) -> Option<DomId> {
        st.by_name.get(name).copied().or_else(|| (self.me_name.as_deref() == Some(name)).then_some(self.me))
    }

    /// Decides whether `source` may connect to `port` of `target`, and audits it. A target the
    /// manager does not know (not registered, or no such domain) is denied like one the policy
    /// denies.
    pub(crate) fn decide(&self, source: DomId, target: &Peer, port: u32) -> Decided {
        let id = self.next_decision.fetch_add(1, Ordering::Relaxed);
        self.decisions.fetch_add(1, Ordering::Relaxed);
        let mut st = self.state();
        let target_dom = match target {
            Peer::Id(t) => {
                let t = DomId(*t);
                (t == self.me || st.agents.contains_key(&t)).then_some(t)
            }
            Peer::Name(n) => self.named(&st, n),
        };
        let requested = match target {
            Peer::Id(t) => t.to_string(),
            Peer::Name(n) => n.clone(),
        };
        let source_name = self.name_of(&st, source);
        let target_name = target_dom.and_then(|t| self.name_of(&st, t));
        let service_name = target_dom.and_then(|t| self.service_name(&st, t, port));
        let (allowed, rule, reason) = match target_dom {
            None => (false, None, "no such domain".to_string()),
            Some(t) if t == source => (false, None, "a domain does not connect to itself".to_string()),
            Some(t) => {
                let policy = st.policy.clone();
                let src = self.view(&st, source, source_name.as_deref());
                let tgt = self.view(&st, t, target_name.as_deref());
                let d = policy.decide(
                    ServiceRef { port, name: service_name.as_deref() },
                    &src.view(),
                    &tgt.view(),
                );
                let rule = d.rule.map(|r: &Rule| format!("{}:{}", r.origin.file, r.origin.line));
                let reason =
                    if d.rule.is_some() { "rule".to_string() } else { "no rule matched".to_string() };
                (d.action == Action::Allow, rule, reason)
            }
        };
        if allowed && let Some(t) = target_dom {
            st.allowed.insert((source, t, port), Allowed { decision: id });
        }
        let record = AuditRecord {
            time: crate::audit::rfc3339_utc(SystemTime::now()),
            decision: id,
            source: Party { name: source_name.unwrap_or_default(), domid: u32::from(source.0) },
            target: Target { name: target_name, domid: target_dom.map(|t| u32::from(t.0)), requested },
            service: service_name.unwrap_or_else(|| port.to_string()),
            port,
            rule: rule.clone(),
            result: if allowed { Verdict::Allow } else { Verdict::Deny },
            reason,
        };
        if st.recent.len() >= RECENT {
            st.recent.pop_front();
        }
        st.recent.push_back(record.clone());
        drop(st);
        self.audit_record(&record);
        self.events.publish(ManagerEvent::decided(record));
        Decided { id, allowed, target: target_dom }
    }

    fn audit_record(&self, r: &AuditRecord) {
        if let Err(e) = self.audit.record(r) {
            tracing::error!(error = %e, "cannot write the audit trail");
        }
    }

    /// What the policy sees of domain `dom` named `name`.
    pub(crate) fn view(&self, st: &State, dom: DomId, name: Option<&str>) -> OwnedView {
        self.view_of_name(st, name, dom == self.me, self.is_toolstack(dom))
    }

    pub(crate) fn view_of_name(
        &self,
        st: &State,
        name: Option<&str>,
        backend: bool,
        toolstack: bool,
    ) -> OwnedView {
        let labels = name.and_then(|n| st.labels.get(n)).cloned().unwrap_or_default();
        OwnedView { name: name.unwrap_or("").to_string(), labels, backend, toolstack }
    }

    /// Loads the policy directory again if it changed (or `force`): a valid one replaces the
    /// policy in force (the agents are told, and with `teardown` what it no longer allows is
    /// torn down); an invalid one is reported and the policy in force stays. Whether the policy
    /// changed.
    pub fn reload(&self, teardown: bool) -> bool {
        let stamp = dir_stamp(&self.cfg.policy_dir);
        {
            let st = self.state();
            if st.generation > 0 && st.policy_stamp == stamp {
                return false;
            }
        }
        let loaded = Policy::load_dir(&self.cfg.policy_dir);
        let mut st = self.state();
        st.policy_stamp = stamp;
        match loaded {
            Ok(p) => {
                st.generation += 1;
                st.policy = Arc::new(p);
                st.policy_error = None;
                let generation = st.generation;
                tracing::info!(generation, rules = st.policy.rules().len(), dir = %self.cfg.policy_dir.display(), "policy loaded");
                let mut files: Vec<String> = Vec::new();
                for r in st.policy.rules() {
                    if files.last() != Some(&r.origin.file) {
                        files.push(r.origin.file.clone());
                    }
                }
                let rules = u32::try_from(st.policy.rules().len()).unwrap_or(u32::MAX);
                drop(st);
                self.events.publish(ManagerEvent::PolicyReloaded { generation, rules, files });
                self.policy_changed(teardown);
                true
            }
            Err(e) => {
                let text = e.to_string();
                tracing::error!(dir = %self.cfg.policy_dir.display(), errors = %text, "the policy directory is invalid: the policy in force stays");
                if st.generation == 0 {
                    // Nothing was ever in force: no rule, everything denied.
                    st.generation = 1;
                }
                self.events.publish(ManagerEvent::rejected(&text));
                st.policy_error = Some(text);
                false
            }
        }
    }

    /// Tells every agent that cached decisions are void; with `teardown`, revokes what the
    /// policy in force no longer allows.
    pub(crate) fn policy_changed(&self, teardown: bool) {
        let generation = self.state().generation;
        self.broadcast(FromManager::PolicyChanged { generation });
        if teardown {
            let n = self.revoke_disallowed();
            tracing::info!(connections = n.0, links = n.1, "revoked what the policy no longer allows");
        }
    }

    /// Sends `m` to every registered agent.
    pub(crate) fn broadcast(&self, m: FromManager) {
        let st = self.state();
        for (dom, a) in &st.agents {
            if a.tx.try_send(m.clone()).is_err() {
                tracing::warn!(domain = %dom, "an agent does not read its notices: it will register again");
            }
        }
    }

    /// Sends `m` to `dom`'s agent (the backend domain acts itself).
    fn notify(&self, st: &State, dom: DomId, m: FromManager) {
        if let Some(a) = st.agents.get(&dom)
            && a.tx.try_send(m).is_err()
        {
            tracing::warn!(domain = %dom, "an agent does not read its notices");
        }
    }

    /// Re-decides every allowed connection under the policy in force; revokes those now denied
    /// (both ends' connections on that port are reset), and ends the introduced links that no
    /// longer carry anything allowed. (connections, links) revoked.
    pub(crate) fn revoke_disallowed(&self) -> (usize, usize) {
        let mut st = self.state();
        let policy = st.policy.clone();
        let entries: Vec<(DomId, DomId, u32)> = st.allowed.keys().copied().collect();
        let mut revoked = Vec::new();
        for (s, t, port) in entries {
            let sn = self.name_of(&st, s);
            let tn = self.name_of(&st, t);
            let service = self.service_name(&st, t, port);
            let sv = self.view(&st, s, sn.as_deref());
            let tv = self.view(&st, t, tn.as_deref());
            let d = policy.decide(ServiceRef { port, name: service.as_deref() }, &sv.view(), &tv.view());
            if d.action != Action::Allow {
                revoked.push((s, t, port));
            }
        }
        for &(s, t, port) in &revoked {
            let was = st.allowed.remove(&(s, t, port)).map(|a| a.decision);
            tracing::info!(source = %s, target = %t, port, allowed_by = ?was, "no longer allowed");
            self.revoke_port(&st, s, t, port);
            let (source, target) = (self.party(&st, s), self.party(&st, t));
            self.events.publish(ManagerEvent::Revoked { source, target, port, allowed_by: was });
        }
        let dead: Vec<(DomId, DomId)> = st
            .intros
            .keys()
            .filter(|&&(a, b)| !st.allowed.keys().any(|&(s, t, _)| pair(s, t) == (a, b)))
            .copied()
            .collect();
        for &(a, b) in &dead {
            self.end_intro(&mut st, a, b);
        }
        (revoked.len(), dead.len())
    }

    /// Resets the connections from `s` to `port` of `t`, at both ends.
    fn revoke_port(&self, st: &State, s: DomId, t: DomId, port: u32) {
        tracing::info!(source = %s, target = %t, port, "revoking connections");
        for (dom, peer, ours) in [(s, t, false), (t, s, true)] {
            if dom == self.me {
                self.ops.reset_port(peer, port, ours);
            } else {
                self.notify(st, dom, FromManager::Revoke { peer: peer.0, port: Some(port), ours });
            }
        }
    }

    /// Ends the introduction of `a` and `b`: both agents end their link, the rendezvous goes.
    pub(crate) fn end_intro(&self, st: &mut State, a: DomId, b: DomId) {
        let key = pair(a, b);
        if let Some(intro) = st.intros.remove(&key) {
            tracing::info!(a = %key.0, b = %key.1, rendezvous = %intro.rendezvous, "ending an introduction");
            if let Err(e) = self.ops.remove_rendezvous(&intro.rendezvous) {
                tracing::warn!(error = %e, "cannot remove a rendezvous");
            }
            let (a, b) = (self.party(st, key.0), self.party(st, key.1));
            self.events.publish(ManagerEvent::IntroductionEnded { a, b, decision: intro.decision });
        }
        st.allowed.retain(|&(s, t, _), _| pair(s, t) != key);
        for (dom, peer) in [(a, b), (b, a)] {
            self.notify(st, dom, FromManager::Revoke { peer: peer.0, port: None, ours: false });
        }
    }

    /// Makes a rendezvous for `a` and `b` (replacing the pair's earlier one) and introduces
    /// `b` to `a` (the caller answers `a` itself), for `a`'s connection to `port` of `b`. The
    /// rendezvous's path.
    pub(crate) fn introduce(&self, a: DomId, b: DomId, port: u32, decision: u64) -> std::io::Result<String> {
        let path = self.ops.create_rendezvous(a, b, decision)?;
        let mut st = self.state();
        if let Some(old) = st
            .intros
            .insert(pair(a, b), Intro { rendezvous: path.clone(), decision, since: SystemTime::now() })
            && let Err(e) = self.ops.remove_rendezvous(&old.rendezvous)
        {
            tracing::warn!(error = %e, "cannot remove a rendezvous");
        }
        self.notify(&st, b, FromManager::Introduced { peer: a.0, rendezvous: path.clone(), decision });
        let (source, target) = (self.party(&st, a), self.party(&st, b));
        self.events.publish(ManagerEvent::Introduced {
            decision,
            source,
            target,
            port,
            rendezvous: path.clone(),
        });
        Ok(path)
    }

    /// Sets `name`'s labels (the toolstack's call) and persists them.
    pub(crate) fn set_labels(&self, name: &str, labels: Labels) -> std::io::Result<()> {
        let snapshot = {
            let mut st = self.state();
            if !st.labels.contains_key(name) && st.labels.len() >= MAX_LABELLED {
                return Err(std::io::Error::other(format!("at most {MAX_LABELLED} domains may have labels")));
            }
            if labels == Labels::default() {
                st.labels.remove(name);
            } else {
                st.labels.insert(name.to_string(), labels.clone());
            }
            st.generation += 1;
            self.events.publish(ManagerEvent::LabelsChanged { name: name.to_string(), labels });
            st.labels.clone()
        };
        save_json(&self.cfg.state_dir.join("labels.json"), &snapshot)?;
        self.policy_changed(false);
        Ok(())
    }

    /// Domain `dom` as the audit trail names it.
    pub(crate) fn party(&self, st: &State, dom: DomId) -> Party {
        Party { name: self.name_of(st, dom).unwrap_or_default(), domid: u32::from(dom.0) }
    }

    /// What a new watcher starts from: the policy's generation and the registered domains
    /// (with the backend domain), by id.
    pub(crate) fn watch_state(&self) -> WatchState {
        let st = self.state();
        let mut ids: Vec<DomId> = st.agents.keys().copied().collect();
        ids.push(self.me);
        ids.sort_unstable();
        ids.dedup();
        let domains = ids
            .into_iter()
            .map(|dom| {
                let name = self.name_of(&st, dom);
                let labels = name.as_ref().and_then(|n| st.labels.get(n)).cloned().unwrap_or_default();
                WatchedDomain { domid: dom.0, name, labels }
            })
            .collect();
        WatchState { generation: st.generation, domains }
    }

    /// Announces that `dom`'s agent registered (called with the state changed).
    pub(crate) fn registered(&self, st: &State, dom: DomId) {
        let name = self.name_of(st, dom);
        let labels = name.as_ref().and_then(|n| st.labels.get(n)).cloned().unwrap_or_default();
        self.events.publish(ManagerEvent::DomainRegistered { domid: dom.0, name, labels });
    }

    /// A decision by its id: from memory, else from the audit trail.
    pub(crate) fn find_decision(&self, id: u64) -> Option<AuditRecord> {
        let recent = self.state().recent.iter().find(|r| r.decision == id).cloned();
        recent.or_else(|| self.audit.find(id).ok().flatten())
    }
}

/// A domain as the policy sees it, owning its strings.
pub(crate) struct OwnedView {
    pub name: String,
    pub labels: Labels,
    pub backend: bool,
    pub toolstack: bool,
}

impl OwnedView {
    pub fn view(&self) -> DomainView<'_> {
        DomainView {
            name: &self.name,
            type_: self.labels.type_.as_deref(),
            tags: &self.labels.tags,
            backend: self.backend,
            toolstack: self.toolstack,
        }
    }
}

/// What a directory's `*.policy` files look like now: names, sizes, modification times.
fn dir_stamp(dir: &Path) -> Vec<(String, u64, Option<SystemTime>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let meta = e.metadata().ok()?;
            Some((name, meta.len(), meta.modified().ok()))
        })
        .collect();
    v.sort();
    v
}

fn load_labels(path: &Path) -> std::io::Result<BTreeMap<String, Labels>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e),
    }
}

/// Writes `value` as JSON to `path` atomically (a temporary file, synced, renamed over).
pub(crate) fn save_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
