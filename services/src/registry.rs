//! The host registry, kept by the backend domain: which domains run on the host and what they
//! serve where. The toolstack (domain 0) registers every domain it starts; a domain may also
//! register itself, but never another one — the caller's domain comes from the transport (the
//! link's set-up through the store), not from the request.

use std::collections::BTreeMap;
use std::sync::Mutex;

use dombus::transport::types::DomId;
use serde::{Deserialize, Serialize};

/// The toolstack's domain: may register any domain.
pub const TOOLSTACK: DomId = DomId::DOM0;

/// A domain of the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainEntry {
    /// Its domain id.
    pub domid: DomId,
    /// Its name (`storage`).
    pub name: String,
    /// What it is for (`backend`, `storage`, …).
    pub role: String,
    /// What it serves, and where.
    pub services: Vec<ServiceEntry>,
}

/// A service of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// The service's name (`storage`).
    pub name: String,
    /// Its address (`xen:2:5100`).
    pub addr: String,
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RegistryError {
    /// The caller may register only itself.
    #[error("domain {caller} may not register domain {domid}")]
    Denied {
        /// Who asked.
        caller: String,
        /// Whom for.
        domid: DomId,
    },
    /// A field is out of bounds.
    #[error("invalid entry: {0}")]
    Invalid(String),
}

/// Who runs what on this host.
#[dombus::service(name = "registry", version = 1)]
pub trait Registry {
    /// Records (or replaces) `domain`'s entry. The toolstack may register any domain, any
    /// other domain only itself.
    #[idempotent]
    async fn register(&self, domain: DomainEntry) -> Result<(), RegistryError>;

    /// Forgets domain `domid` (same rule as `register`); whether it was known.
    #[idempotent]
    async fn unregister(&self, domid: DomId) -> Result<bool, RegistryError>;

    /// Every registered domain, by domain id.
    #[idempotent]
    async fn domains(&self) -> Vec<DomainEntry>;
}

/// The registry's state (the backend domain's daemon serves it).
#[derive(Debug, Default)]
pub struct HostRegistry {
    domains: Mutex<BTreeMap<DomId, DomainEntry>>,
}

/// Most domains one registry keeps.
const MAX_DOMAINS: usize = 4096;

impl HostRegistry {
    fn allowed(domid: DomId) -> Result<(), RegistryError> {
        // Over Unix or TCP there is no domain: only local tools reach those, as the toolstack.
        let caller = dombus::rpc::current_caller().and_then(|c| c.domain);
        match caller {
            None => Ok(()),
            Some(c) if c == u32::from(TOOLSTACK.0) || c == u32::from(domid.0) => Ok(()),
            Some(c) => Err(RegistryError::Denied { caller: c.to_string(), domid }),
        }
    }
}

impl Registry for HostRegistry {
    async fn register(&self, domain: DomainEntry) -> Result<(), RegistryError> {
        Self::allowed(domain.domid)?;
        let too_long = |s: &str| s.is_empty() || s.len() > 256;
        if too_long(&domain.name)
            || too_long(&domain.role)
            || domain.services.len() > 64
            || domain.services.iter().any(|s| too_long(&s.name) || too_long(&s.addr))
        {
            return Err(RegistryError::Invalid(
                "names and addresses are 1 to 256 bytes, at most 64 services".into(),
            ));
        }
        let mut domains = self.domains.lock().unwrap_or_else(|p| p.into_inner());
        if domains.len() >= MAX_DOMAINS && !domains.contains_key(&domain.domid) {
            return Err(RegistryError::Invalid(format!("at most {MAX_DOMAINS} domains")));
        }
        tracing::info!(domid = domain.domid.0, name = %domain.name, "registered");
        domains.insert(domain.domid, domain);
        Ok(())
    }

    async fn unregister(&self, domid: DomId) -> Result<bool, RegistryError> {
        Self::allowed(domid)?;
        Ok(self.domains.lock().unwrap_or_else(|p| p.into_inner()).remove(&domid).is_some())
    }

    async fn domains(&self) -> Vec<DomainEntry> {
        self.domains.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }
}
