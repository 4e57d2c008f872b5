//! What the manager announces to the toolstack as it happens, for a live audit view (`dombus
//! policy watch`): the [`ManagerEvent`]s the core publishes, the [`WatchState`] a new watcher
//! starts from, and the [`Selector`] that narrows a watch to one domain.

use serde::{Deserialize, Serialize};

use crate::audit::{AuditRecord, Party, Verdict};
use crate::core::Labels;

/// Most events the manager's topic holds for watchers that fell behind.
pub const WATCH_EVENTS: usize = 4096;
/// Most bytes of events it holds.
pub const WATCH_BYTES: usize = 2 << 20;
/// The bytes kept of a rejected policy's error text in its event (the whole text is in the
/// manager's log and `dombus policy status`).
pub const MAX_ERROR_TEXT: usize = 4096;

/// One thing that happened in the manager.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManagerEvent {
    /// A domain's agent registered: the domain started, or its agent connected again.
    DomainRegistered {
        /// Its domain id.
        domid: u16,
        /// The name the toolstack gave it.
        name: Option<String>,
        /// Its labels as they are now.
        labels: Labels,
    },
    /// A domain's agent session ended: the domain is gone, or its agent registers again (a
    /// [`ManagerEvent::DomainRegistered`] follows).
    DomainGone {
        /// Its domain id.
        domid: u16,
        /// Its name.
        name: Option<String>,
    },
    /// A connection allowed: the decision, as audited.
    Allowed(AuditRecord),
    /// A connection denied: the decision, as audited (its id is the one the denied caller's
    /// error carries).
    Denied(AuditRecord),
    /// Two domains introduced under an allowing decision: they set up their link at
    /// `rendezvous`.
    Introduced {
        /// The decision that allowed it.
        decision: u64,
        /// The domain that asked.
        source: Party,
        /// The domain it connects to.
        target: Party,
        /// The port asked for.
        port: u32,
        /// Where the two set up their link.
        rendezvous: String,
    },
    /// An introduction ended (the toolstack revoked it, or the policy no longer allows anything
    /// between the two): their link and its connections end.
    IntroductionEnded {
        /// One domain (the lower id).
        a: Party,
        /// The other.
        b: Party,
        /// The decision that had introduced them.
        decision: u64,
    },
    /// The connections from `source` to `port` of `target` were reset: the policy no longer
    /// allows them.
    Revoked {
        /// The connecting domain.
        source: Party,
        /// The domain connected to.
        target: Party,
        /// The port.
        port: u32,
        /// The decision that had allowed them.
        allowed_by: Option<u64>,
    },
    /// A policy was loaded and is in force.
    PolicyReloaded {
        /// Its generation.
        generation: u64,
        /// Its rules.
        rules: u32,
        /// The files its rules come from, in the order they are matched.
        files: Vec<String>,
    },
    /// The policy directory is invalid: the policy in force stays.
    PolicyRejected {
        /// The errors (`file:line: message`), clipped to [`MAX_ERROR_TEXT`] bytes.
        errors: String,
    },
    /// The toolstack set the labels of the domain named `name` (all empty: removed).
    LabelsChanged {
        /// The domain's name.
        name: String,
        /// Its labels now.
        labels: Labels,
    },
}

/// A domain in a [`WatchState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchedDomain {
    /// Its domain id.
    pub domid: u16,
    /// Its name.
    pub name: Option<String>,
    /// Its labels.
    pub labels: Labels,
}

/// Where a watch starts (and starts again after a resync): the policy's generation and the
/// domains registered now, the backend domain first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchState {
    /// The policy's generation.
    pub generation: u64,
    /// The registered domains (and the backend domain), by id.
    pub domains: Vec<WatchedDomain>,
}

/// One domain a watch is narrowed to: by id, or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// The domain with this id.
    Id(u16),
    /// The domain with this name.
    Name(String),
}

impl Selector {
    /// A domain id, else a name; `None` when `s` is neither.
    pub fn parse(s: &str) -> Option<Selector> {
        match s.parse::<u16>() {
            Ok(id) => Some(Selector::Id(id)),
            Err(_) if dombus_agent::manager::valid_name(s) => Some(Selector::Name(s.to_string())),
            Err(_) => None,
        }
    }

    fn is(&self, domid: Option<u32>, name: Option<&str>) -> bool {
        match self {
            Selector::Id(id) => domid == Some(u32::from(*id)),
            Selector::Name(n) => name == Some(n.as_str()),
        }
    }

    fn is_party(&self, p: &Party) -> bool {
        self.is(Some(p.domid), Some(&p.name))
    }

    fn in_record(&self, r: &AuditRecord) -> bool {
        // What the caller asked for counts too: a denial of a domain that does not exist names
        // it only there.
        let requested = match self {
            Selector::Id(id) => r.target.requested == id.to_string(),
            Selector::Name(n) => r.target.requested == *n,
        };
        self.is_party(&r.source) || self.is(r.target.domid, r.target.name.as_deref()) || requested
    }

    /// Whether `domain` is the one selected.
    pub fn is_domain(&self, domain: &WatchedDomain) -> bool {
        self.is(Some(u32::from(domain.domid)), domain.name.as_deref())
    }
}

impl ManagerEvent {
    /// The event of a decision.
    pub fn decided(record: AuditRecord) -> ManagerEvent {
        match record.result {
            Verdict::Allow => ManagerEvent::Allowed(record),
            Verdict::Deny => ManagerEvent::Denied(record),
        }
    }

    /// The event of a policy directory that did not load.
    pub fn rejected(errors: &str) -> ManagerEvent {
        let mut end = errors.len().min(MAX_ERROR_TEXT);
        while !errors.is_char_boundary(end) {
            end -= 1;
        }
        ManagerEvent::PolicyRejected { errors: errors[..end].to_string() }
    }

    /// Whether this is a denial.
    pub fn is_denial(&self) -> bool {
        matches!(self, ManagerEvent::Denied(_))
    }

    /// Whether the event is about the domain `who` selects (as the one that asked, the one
    /// asked for, or the one that came, went or was labelled). Policy loads are about no one
    /// domain.
    pub fn involves(&self, who: &Selector) -> bool {
        match self {
            ManagerEvent::DomainRegistered { domid, name, .. } | ManagerEvent::DomainGone { domid, name } => {
                who.is(Some(u32::from(*domid)), name.as_deref())
            }
            ManagerEvent::Allowed(r) | ManagerEvent::Denied(r) => who.in_record(r),
            ManagerEvent::Introduced { source, target, .. }
            | ManagerEvent::Revoked { source, target, .. } => who.is_party(source) || who.is_party(target),
            ManagerEvent::IntroductionEnded { a, b, .. } => who.is_party(a) || who.is_party(b),
            ManagerEvent::LabelsChanged { name, .. } => who.is(None, Some(name)),
            ManagerEvent::PolicyReloaded { .. } | ManagerEvent::PolicyRejected { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Target;

    fn record(result: Verdict) -> AuditRecord {
        AuditRecord {
            time: "2026-01-01T00:00:00.000Z".into(),
            decision: 7,
            source: Party { name: "alpha".into(), domid: 3 },
            target: Target { name: None, domid: None, requested: "nosuch".into() },
            service: "5000".into(),
            port: 5000,
            rule: None,
            result,
            reason: "no such domain".into(),
        }
    }

    #[test]
    fn a_decision_is_about_its_source_and_what_it_asked_for() {
        let e = ManagerEvent::decided(record(Verdict::Deny));
        assert!(e.is_denial());
        assert!(!ManagerEvent::decided(record(Verdict::Allow)).is_denial());
        for who in ["alpha", "3", "nosuch"] {
            assert!(e.involves(&Selector::parse(who).unwrap()), "{who}");
        }
        for who in ["beta", "4", "0"] {
            assert!(!e.involves(&Selector::parse(who).unwrap()), "{who}");
        }
        let mut by_id = record(Verdict::Deny);
        by_id.target.requested = "9".into();
        assert!(ManagerEvent::decided(by_id).involves(&Selector::Id(9)));
        assert_eq!(Selector::parse("no/such"), None);
        assert_eq!(Selector::parse(""), None);
    }

    #[test]
    fn a_rejected_policy_is_clipped_on_a_character() {
        let text = "é".repeat(MAX_ERROR_TEXT);
        let ManagerEvent::PolicyRejected { errors } = ManagerEvent::rejected(&text) else { panic!() };
        assert!(errors.len() <= MAX_ERROR_TEXT && errors.len() >= MAX_ERROR_TEXT - 1);
        assert!(errors.chars().all(|c| c == 'é'));
    }
}
