//! Links by introduction: where the connection manager puts a rendezvous for two domains, how a
//! domain tells a real one from a forged one, and the gate every incoming connection passes.
//!
//! With [`LinkSetUp::Introduced`], a domain links on its own only with the backend domain; a link
//! with any other domain is built in a *rendezvous* directory the backend domain's connection
//! manager created for exactly that pair: `/local/domain/<backend>/data/dombus/rendezvous/<id>`,
//! owned by the backend domain, no access for anyone else, and access for the two domains. A
//! guest cannot create a node owned by another domain (xenstored makes an unprivileged domain
//! the owner of what it creates), so a directory with those permissions was made by the backend
//! domain (or a privileged one): [`check_rendezvous`] is what makes an agent accept a link only
//! where the manager introduced it.

use std::future::Future;
use std::io;
use std::pin::Pin;

use crate::backend::{Perm, PermKind};
use crate::types::DomId;

/// How links between domains come about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinkSetUp {
    /// Any domain may ask any other for a link, through the store: a host without a connection
    /// manager (two domains of a test, the layers below the manager).
    #[default]
    Open,
    /// A domain links on request only with the backend domain; every other link is built only
    /// where the connection manager introduced the pair ([`super::domain::VsockDomain::introduce`]).
    Introduced,
}

/// Decides whether a connection from `peer` to one of this domain's ports may be accepted: every
/// incoming connection passes it before a listener sees it (see
/// [`super::domain::VsockDomain::set_gate`]). A refused connection is closed at once.
pub trait Gate: Send + Sync + 'static {
    /// Whether a connection from `peer` to our `port` may be accepted.
    fn admit(&self, peer: DomId, port: u32) -> Pin<Box<dyn Future<Output = bool> + Send + 'static>>;
}

/// The directory of rendezvous `id`, made by the backend domain `backend`.
pub fn rendezvous_path(backend: DomId, id: u64) -> String {
    format!("{}{id}", rendezvous_prefix(backend))
}

fn rendezvous_prefix(backend: DomId) -> String {
    format!("/local/domain/{}/data/dombus/rendezvous/", backend.0)
}

/// The permissions of a rendezvous for domains `a` and `b`: owned by the backend, no access for
/// others, both of them may read and write.
pub fn rendezvous_perms(backend: DomId, a: DomId, b: DomId) -> [Perm; 3] {
    [
        Perm { domid: backend, kind: PermKind::None },
        Perm { domid: a, kind: PermKind::Both },
        Perm { domid: b, kind: PermKind::Both },
    ]
}

/// Whether `path`, with permissions `perms` as the store reports them, is a rendezvous the
/// backend domain made for exactly `me` and `peer`: a path under the backend's rendezvous
/// directory, owned by the backend, no access for other domains, and listed access for the two
/// domains and no one else. Anything else is refused with `PermissionDenied`.
pub fn check_rendezvous(
    path: &str,
    perms: &[Perm],
    backend: DomId,
    me: DomId,
    peer: DomId,
) -> io::Result<()> {
    let forged = |why: String| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "refusing the link with domain {peer} at {path}: not a rendezvous of the connection manager ({why})"
            ),
        )
    };
    let id = path.strip_prefix(&rendezvous_prefix(backend)).ok_or_else(|| forged("wrong place".into()))?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(forged("wrong place".into()));
    }
    let Some((owner, listed)) = perms.split_first() else {
        return Err(forged("no permissions".into()));
    };
    if owner.domid != backend {
        return Err(forged(format!("owned by domain {}, not the backend domain {backend}", owner.domid)));
    }
    if owner.kind != PermKind::None {
        return Err(forged("open to other domains".into()));
    }
    let mut doms: Vec<DomId> = listed.iter().map(|p| p.domid).collect();
    doms.sort_unstable();
    let mut want = vec![me, peer];
    want.sort_unstable();
    if doms != want {
        return Err(forged(format!("for domains {doms:?}, not exactly {want:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: DomId = DomId(0);

    fn ok(path: &str, perms: &[Perm]) -> bool {
        check_rendezvous(path, perms, B, DomId(3), DomId(4)).is_ok()
    }

    #[test]
    fn only_the_backends_rendezvous_for_exactly_the_two_domains_is_accepted() {
        let path = rendezvous_path(B, 17);
        assert_eq!(path, "/local/domain/0/data/dombus/rendezvous/17");
        assert!(ok(&path, &rendezvous_perms(B, DomId(3), DomId(4))));
        assert!(ok(&path, &rendezvous_perms(B, DomId(4), DomId(3))));
        // Owned by a guest (what a guest's own node looks like).
        let mut p = rendezvous_perms(B, DomId(3), DomId(4));
        p[0].domid = DomId(3);
        let e = check_rendezvous(&path, &p, B, DomId(3), DomId(4)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("owned by domain 3"), "{e}");
        // Open to everyone.
        let mut p = rendezvous_perms(B, DomId(3), DomId(4));
        p[0].kind = PermKind::Read;
        assert!(!ok(&path, &p));
        // A third domain listed, or one missing.
        let mut p = rendezvous_perms(B, DomId(3), DomId(4)).to_vec();
        p.push(Perm { domid: DomId(5), kind: PermKind::Read });
        assert!(!ok(&path, &p));
        assert!(!ok(&path, &rendezvous_perms(B, DomId(3), DomId(5))));
        assert!(!ok(&path, &rendezvous_perms(B, DomId(3), DomId(4))[..2]));
        assert!(!ok(&path, &[]));
        // Elsewhere.
        let p = rendezvous_perms(B, DomId(3), DomId(4));
        assert!(!ok("/local/domain/3/data/dombus/rendezvous/17", &p));
        assert!(!ok("/local/domain/0/data/dombus/rendezvous/", &p));
        assert!(!ok("/local/domain/0/data/dombus/rendezvous/1/../2", &p));
        assert!(!ok("/local/domain/0/data/dombus/link/3", &p));
    }
}
