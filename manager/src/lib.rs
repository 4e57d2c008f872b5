//! The connection manager of a dombus host: it runs in the backend domain and decides which
//! domains are *introduced* to each other (default deny), under a policy of rules keyed on
//! domain names and labels; every decision is audited; the toolstack edits the policy through
//! the manager's admin service; and the same policy yields the XSM/FLASK fragment that enforces
//! it in the hypervisor. See `docs/manager.md`.

pub mod audit;
pub mod policy;
pub mod xsm;
