//! The connection manager of a dombus host: it runs in the backend domain and decides which
//! domains are *introduced* to each other (default deny), under a policy of rules keyed on
//! domain names and labels; every decision is audited; the toolstack edits the policy through
//! the manager's admin service; and the same policy yields the XSM/FLASK fragment that enforces
//! it in the hypervisor. See `docs/manager.md`.
//!
//! - [`policy`]: rules, policy files, evaluation, editing, lint.
//! - [`audit`]: the audit trail.
//! - [`xsm`]: the XSM/FLASK fragment.
//! - [`watch`]: what the manager announces as it happens (the admin service's `watch`).
//! - [`Manager`]: the manager itself — its protocol with the agents, its decisions and
//!   introductions, the backend domain's own sockets ([`BackendSockets`]) and the admin service
//!   ([`admin::PolicyAdmin`]).

pub mod admin;
mod agents;
pub mod audit;
mod backend;
mod core;
pub mod daemon;
pub mod policy;
pub mod watch;
pub mod xsm;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use dombus::transport::types::DomId;
use dombus_agent::manager::MANAGER_PORT;
use dombus_agent::{DomainSockets, ManagerOps};
use tokio::task::JoinHandle;

pub use crate::admin::{Admin, PolicyAdmin, PolicyAdminClient, PolicyAdminRequest};
pub use crate::backend::BackendSockets;
pub use crate::core::{Labels, ManagerConfig};

/// How often the manager looks at the policy directory for changes made by hand.
pub const POLICY_POLL: Duration = Duration::from_secs(1);

/// A running connection manager. Dropping it stops it.
pub struct Manager {
    core: Arc<core::Core>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.core.stopping.send_replace(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Manager {
    /// Starts the manager of the backend domain whose sockets are `sockets` and `ops` (see
    /// `dombus_agent::attach::Attach::start_backend`; inside a tokio runtime): it takes the
    /// domain's gate, listens on [`MANAGER_PORT`] for the agents, and watches the policy
    /// directory.
    pub fn start(
        sockets: Arc<dyn DomainSockets>,
        ops: Arc<dyn ManagerOps>,
        cfg: ManagerConfig,
    ) -> std::io::Result<Manager> {
        let core = core::Core::new(sockets.clone(), ops.clone(), cfg)?;
        ops.set_gate(Arc::new(backend::BackendGate(Arc::downgrade(&core))));
        let listener = sockets.listen(MANAGER_PORT)?;
        let accept = tokio::spawn(agents::accept(core.clone(), listener));
        let weak = Arc::downgrade(&core);
        let poll = tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLICY_POLL).await;
                let Some(core) = weak.upgrade() else { return };
                core.reload(false);
            }
        });
        tracing::info!(domain = %core.me, port = MANAGER_PORT, "connection manager ready");
        Ok(Manager { core, tasks: vec![accept, poll] })
    }

    /// The backend domain's sockets as its processes use them: every connection decided by the
    /// manager first (serve these to the domain's agent clients).
    pub fn sockets(&self) -> Arc<dyn DomainSockets> {
        Arc::new(BackendSockets { core: self.core.clone() })
    }

    /// The admin service.
    pub fn admin(&self) -> Admin {
        Admin { core: self.core.clone() }
    }

    /// Bytes the agents' sessions carried to the manager since it started: its protocol only,
    /// never a connection's data (the manager carries none).
    pub fn bytes_received(&self) -> u64 {
        self.core.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Domains registered now.
    pub fn registered(&self) -> Vec<DomId> {
        let mut v: Vec<DomId> = self.core.state().agents.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Loads the policy directory again now (if it changed); whether the policy changed.
    pub fn reload(&self) -> bool {
        self.core.reload(false)
    }

    /// For the scale benchmark (`dombus-benches`, `scale`): decides, exactly as for an agent's
    /// introduction (audited, numbered), whether `source` may connect to `port` of `target`,
    /// without a session or a link in between. Not an API: the agents' protocol is.
    #[doc(hidden)]
    pub fn decide_for_bench(&self, source: DomId, target: &dombus_agent::manager::Peer, port: u32) -> bool {
        self.core.decide(source, target, port).allowed
    }

    /// For the scale benchmark: how many domains the manager has registered (sessions up).
    #[doc(hidden)]
    pub fn registered_for_bench(&self) -> usize {
        self.core.state().agents.len()
    }
}

/// What the XSM fragment is made from: the FLASK types of the domains the manager knows
/// (registered or labelled) and the pairs of them some allowing rule introduces.
pub(crate) fn xsm_input(core: &core::Core) -> Result<xsm::XsmInput, xsm::XsmError> {
    use crate::policy::Action;
    use std::collections::BTreeMap;
    let st = core.state();
    let mut doms: Vec<(Option<DomId>, Option<String>)> = Vec::new();
    for (&d, a) in &st.agents {
        doms.push((Some(d), a.name.clone()));
    }
    doms.push((Some(core.me), core.name_of(&st, core.me)));
    let named: BTreeSet<String> = doms.iter().filter_map(|(_, n)| n.clone()).collect();
    for name in st.labels.keys().filter(|n| !named.contains(*n)) {
        doms.push((None, Some(name.clone())));
    }
    let flask = |d: Option<DomId>, name: Option<&str>| -> Result<String, xsm::XsmError> {
        match name.and_then(|n| st.labels.get(n)).and_then(|l| l.type_.as_deref()) {
            Some(t) => xsm::flask_type(t),
            None if d == Some(DomId::DOM0) => Ok("dom0_t".to_string()),
            None => Ok("domU_t".to_string()),
        }
    };
    let mut types = BTreeSet::new();
    let mut views = Vec::new();
    for (d, n) in &doms {
        let is_ts = d.is_some_and(|d| core.is_toolstack(d));
        let t = flask(*d, n.as_deref())?;
        types.insert(t.clone());
        views.push((core.view_of_name(&st, n.as_deref(), *d == Some(core.me), is_ts), t));
    }
    // Per allowing rule, the domains it lets connect and be connected to, by type: linear in
    // the domains, not quadratic. A type paired with itself needs two different domains.
    let mut pairs = BTreeSet::new();
    for rule in st.policy.rules().iter().filter(|r| r.action == Action::Allow) {
        let mut sources: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        let mut targets: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, (v, t)) in views.iter().enumerate() {
            if rule.source.matches(&v.view()) {
                sources.entry(t.as_str()).or_default().push(i);
            }
            if rule.target.matches(&v.view()) {
                targets.entry(t.as_str()).or_default().push(i);
            }
        }
        for (a, sa) in &sources {
            for (b, tb) in &targets {
                let distinct = a != b || sa.len() > 1 || tb.len() > 1 || sa != tb;
                if distinct {
                    let (a, b) = if a <= b { (a, b) } else { (b, a) };
                    pairs.insert((a.to_string(), b.to_string()));
                }
            }
        }
    }
    Ok(xsm::XsmInput { pairs, types, widened: Vec::new() })
}
