//! The simulated xenstore: a tree of nodes with owners, permissions, quotas and watches.
//!
//! Pure data structure: every operation names the calling domain and returns the watch events
//! it caused; the daemon delivers them. The rules are xenstored's:
//!
//! * a node's permission list starts with the owner (who, like dom0, has full access) and the
//!   access of every unlisted domain; later entries give specific domains their access;
//! * reading (`read`, `directory`, `get_perms`) needs read, changing an existing node needs
//!   write, creating needs write on the nearest existing ancestor; new nodes inherit their
//!   parent's permissions with the creating (unprivileged) domain as owner;
//! * only the owner or dom0 may change permissions and an unprivileged owner may not give the
//!   node away;
//! * a watch fires once when registered, then for every change at or below its path that the
//!   watcher may read.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::proto::WireError;
use dombus_transport_xen::backend::{Perm, PermKind};
use dombus_transport_xen::types::DomId;

/// Maximum length of a store path, as in xenstored.
pub const MAX_PATH: usize = 3072;
/// Maximum size of a store value.
pub const MAX_VALUE: usize = 4096;
/// Nodes an unprivileged domain may own.
pub const NODE_QUOTA: usize = 10_000;
/// Watches one domain may register.
pub const WATCH_QUOTA: usize = 4096;
/// Special watch path fired when a domain attaches.
pub const INTRODUCE: &str = "@introduceDomain";
/// Special watch path fired when a domain dies.
pub const RELEASE: &str = "@releaseDomain";

/// A watch event to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fire {
    /// Watching domain.
    pub dom: DomId,
    /// Its watch id.
    pub watch: u64,
    /// The path to report.
    pub path: String,
}

#[derive(Clone)]
struct Node {
    value: Vec<u8>,
    perms: Vec<Perm>,
    children: BTreeSet<String>,
}

#[derive(Clone)]
struct WatchReg {
    dom: DomId,
    id: u64,
    /// Absolute path or a special name.
    path: String,
    /// Registered relative to the domain's home: report paths relative to it.
    relative: bool,
}

/// The store tree.
#[derive(Clone)]
pub struct StoreTree {
    nodes: BTreeMap<String, Node>,
    owned: HashMap<DomId, usize>,
    watches: Vec<WatchReg>,
    quota: usize,
}

impl Default for StoreTree {
    fn default() -> Self {
        StoreTree::new()
    }
}

/// The home directory of a domain.
pub fn home(dom: DomId) -> String {
    format!("/local/domain/{dom}")
}

fn access(dom: DomId, perms: &[Perm]) -> PermKind {
    if dom == DomId::DOM0 {
        return PermKind::Both;
    }
    let Some(owner) = perms.first() else {
        return PermKind::None;
    };
    if owner.domid == dom {
        return PermKind::Both;
    }
    perms[1..].iter().find(|p| p.domid == dom).map_or(owner.kind, |p| p.kind)
}

fn parent_of(path: &str) -> &str {
    match path.rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((p, _)) => p,
    }
}

fn at_or_below(changed: &str, watched: &str) -> bool {
    watched == "/"
        || changed == watched
        || (changed.len() > watched.len()
            && changed.starts_with(watched)
            && changed.as_bytes()[watched.len()] == b'/')
}

fn invalid(msg: impl Into<String>) -> WireError {
    WireError::InvalidArgument(msg.into())
}

/// Validates `path` and makes it absolute (relative paths live under the caller's home).
/// Returns the absolute path and whether `path` was relative.
pub fn resolve(dom: DomId, path: &str) -> Result<(String, bool), WireError> {
    if path.is_empty() {
        return Err(invalid("empty store path"));
    }
    if path.len() > MAX_PATH {
        return Err(invalid(format!("store path of {} bytes exceeds {MAX_PATH}", path.len())));
    }
    if let Some(c) = path.chars().find(|c| !(c.is_ascii_alphanumeric() || "_/@.-".contains(*c))) {
        return Err(invalid(format!("store path {path:?} contains invalid character {c:?}")));
    }
    if path.starts_with('@') {
        return Err(invalid(format!("special path {path:?} is only valid for watches")));
    }
    if path.contains("//") {
        return Err(invalid(format!("store path {path:?} has an empty component")));
    }
    if path != "/" && path.ends_with('/') {
        return Err(invalid(format!("store path {path:?} ends with '/'")));
    }
    let (abs, relative) = if path.starts_with('/') {
        (path.to_string(), false)
    } else {
        (format!("{}/{path}", home(dom)), true)
    };
    if abs.len() > MAX_PATH {
        return Err(invalid(format!("store path {abs:?} exceeds {MAX_PATH} bytes")));
    }
    Ok((abs, relative))
}

fn check_perms(perms: &[Perm]) -> Result<(), WireError> {
    if perms.is_empty() {
        return Err(invalid("empty permission list"));
    }
    if perms.len() > 256 {
        return Err(invalid("permission list longer than 256 entries"));
    }
    if let Some(p) = perms.iter().find(|p| !p.domid.is_guest_id()) {
        return Err(invalid(format!("permission entry names reserved domain {}", p.domid)));
    }
    Ok(())
}

impl StoreTree {
    /// A tree with `/`, `/local` and `/local/domain` owned by dom0 (no access for others).
    pub fn new() -> StoreTree {
        StoreTree::with_quota(NODE_QUOTA)
    }

    /// As [`StoreTree::new`] with a custom node quota (for tests).
    pub fn with_quota(quota: usize) -> StoreTree {
        let mut t = StoreTree { nodes: BTreeMap::new(), owned: HashMap::new(), watches: Vec::new(), quota };
        let perms = vec![Perm { domid: DomId::DOM0, kind: PermKind::None }];
        for (p, child) in [("/", Some("local")), ("/local", Some("domain")), ("/local/domain", None)] {
            let mut children = BTreeSet::new();
            if let Some(c) = child {
                children.insert(c.to_string());
            }
            t.nodes.insert(p.to_string(), Node { value: Vec::new(), perms: perms.clone(), children });
        }
        t
    }

    fn node(&self, abs: &str) -> Result<&Node, WireError> {
        self.nodes.get(abs).ok_or_else(|| WireError::NotFound(format!("no store node {abs}")))
    }

    fn readable(&self, dom: DomId, abs: &str) -> Result<&Node, WireError> {
        let n = self.node(abs)?;
        if !access(dom, &n.perms).can_read() {
            return Err(WireError::PermissionDenied(format!("domain {dom} may not read {abs}")));
        }
        Ok(n)
    }

    /// Events for a change of `abs`: watchers that may read it under every one of `perms`.
    fn fires_for(&self, abs: &str, perms: &[&[Perm]]) -> Vec<Fire> {
        self.watches
            .iter()
            .filter(|w| !w.path.starts_with('@') && at_or_below(abs, &w.path))
            .filter(|w| perms.iter().all(|p| access(w.dom, p).can_read()))
            .map(|w| Fire { dom: w.dom, watch: w.id, path: report(w, abs) })
            .collect()
    }

    fn special_fires(&self, name: &str) -> Vec<Fire> {
        self.watches
            .iter()
            .filter(|w| w.path == name)
            .map(|w| Fire { dom: w.dom, watch: w.id, path: name.to_string() })
            .collect()
    }

    /// Creates `abs` and missing ancestors on behalf of `dom`.
    fn create(&mut self, dom: DomId, abs: &str) -> Result<(), WireError> {
        let mut missing = vec![abs.to_string()];
        let mut anc = parent_of(abs).to_string();
        while !self.nodes.contains_key(&anc) {
            missing.push(anc.clone());
            anc = parent_of(&anc).to_string();
        }
        let ancestor = self.node(&anc)?;
        if !access(dom, &ancestor.perms).can_write() {
            return Err(WireError::PermissionDenied(format!(
                "domain {dom} may not create nodes under {anc}"
            )));
        }
        let mut perms = ancestor.perms.clone();
        if dom != DomId::DOM0 {
            if let Some(first) = perms.first_mut() {
                first.domid = dom;
            }
        }
        let owner = perms.first().map_or(DomId::DOM0, |p| p.domid);
        let used = self.owned.get(&owner).copied().unwrap_or(0);
        if owner != DomId::DOM0 && dom != DomId::DOM0 && used + missing.len() > self.quota {
            return Err(WireError::Limit(format!(
                "domain {owner} would exceed its quota of {} store nodes",
                self.quota
            )));
        }
        *self.owned.entry(owner).or_insert(0) += missing.len();
        for p in missing.iter().rev() {
            let name = p.rsplit('/').next().unwrap_or_default().to_string();
            if let Some(parent) = self.nodes.get_mut(parent_of(p)) {
                parent.children.insert(name);
            }
            self.nodes.insert(
                p.clone(),
                Node { value: Vec::new(), perms: perms.clone(), children: BTreeSet::new() },
            );
        }
        Ok(())
    }

    /// The value of `path`.
    pub fn read(&self, dom: DomId, path: &str) -> Result<Vec<u8>, WireError> {
        let (abs, _) = resolve(dom, path)?;
        Ok(self.readable(dom, &abs)?.value.clone())
    }

    /// Creates or replaces the value of `path`.
    pub fn write(&mut self, dom: DomId, path: &str, value: &[u8]) -> Result<Vec<Fire>, WireError> {
        if value.len() > MAX_VALUE {
            return Err(invalid(format!("store value of {} bytes exceeds {MAX_VALUE}", value.len())));
        }
        let (abs, _) = resolve(dom, path)?;
        match self.nodes.get(&abs) {
            Some(n) if !access(dom, &n.perms).can_write() => {
                return Err(WireError::PermissionDenied(format!("domain {dom} may not write {abs}")));
            }
            Some(_) => {}
            None => self.create(dom, &abs)?,
        }
        let node = self.nodes.get_mut(&abs).ok_or_else(|| WireError::NotFound(abs.clone()))?;
        node.value = value.to_vec();
        let perms = node.perms.clone();
        Ok(self.fires_for(&abs, &[&perms]))
    }

    /// Creates `path` with an empty value if missing.
    pub fn mkdir(&mut self, dom: DomId, path: &str) -> Result<Vec<Fire>, WireError> {
        let (abs, _) = resolve(dom, path)?;
        if let Some(n) = self.nodes.get(&abs) {
            if !access(dom, &n.perms).can_write() {
                return Err(WireError::PermissionDenied(format!("domain {dom} may not write {abs}")));
            }
            return Ok(Vec::new());
        }
        self.create(dom, &abs)?;
        let perms = self.node(&abs)?.perms.clone();
        Ok(self.fires_for(&abs, &[&perms]))
    }

    /// Removes `path` and its subtree.
    pub fn rm(&mut self, dom: DomId, path: &str) -> Result<Vec<Fire>, WireError> {
        let (abs, _) = resolve(dom, path)?;
        if abs == "/" {
            return Err(invalid("cannot remove the root node"));
        }
        let Some(node) = self.nodes.get(&abs) else {
            // As xenstored: removing a missing node is fine if its parent exists.
            self.node(parent_of(&abs))?;
            return Ok(Vec::new());
        };
        if !access(dom, &node.perms).can_write() {
            return Err(WireError::PermissionDenied(format!("domain {dom} may not remove {abs}")));
        }
        Ok(self.remove_subtree(&abs))
    }

    /// Removes a subtree without permission checks; returns the watch events (judged by the
    /// permissions before removal).
    fn remove_subtree(&mut self, abs: &str) -> Vec<Fire> {
        let Some(node) = self.nodes.get(abs) else {
            return Vec::new();
        };
        let mut fires = self.fires_for(abs, &[&node.perms]);
        // Watches inside the removed subtree fire with their own path.
        for w in &self.watches {
            if w.path.starts_with('@') || w.path == abs || !at_or_below(&w.path, abs) {
                continue;
            }
            let perms = self.nodes.get(&w.path).map_or(&node.perms, |n| &n.perms);
            if access(w.dom, perms).can_read() {
                fires.push(Fire { dom: w.dom, watch: w.id, path: report(w, &w.path) });
            }
        }
        let prefix = format!("{abs}/");
        let doomed: Vec<String> = std::iter::once(abs.to_string())
            .chain(
                self.nodes
                    .range(prefix.clone()..)
                    .map(|(k, _)| k)
                    .take_while(|k| k.starts_with(&prefix))
                    .cloned(),
            )
            .collect();
        for k in doomed {
            let owner = self.nodes.remove(&k).and_then(|n| n.perms.first().map(|p| p.domid));
            if let Some(c) = owner.and_then(|o| self.owned.get_mut(&o)) {
                *c = c.saturating_sub(1);
            }
        }
        let name = abs.rsplit('/').next().unwrap_or_default();
        if let Some(parent) = self.nodes.get_mut(parent_of(abs)) {
            parent.children.remove(name);
        }
        fires
    }

    /// Child names of `path`.
    pub fn directory(&self, dom: DomId, path: &str) -> Result<Vec<String>, WireError> {
        let (abs, _) = resolve(dom, path)?;
        Ok(self.readable(dom, &abs)?.children.iter().cloned().collect())
    }

    /// Permissions of `path`.
    pub fn get_perms(&self, dom: DomId, path: &str) -> Result<Vec<Perm>, WireError> {
        let (abs, _) = resolve(dom, path)?;
        Ok(self.readable(dom, &abs)?.perms.clone())
    }

    /// Replaces the permissions of `path`.
    pub fn set_perms(&mut self, dom: DomId, path: &str, perms: &[Perm]) -> Result<Vec<Fire>, WireError> {
        let (abs, _) = resolve(dom, path)?;
        check_perms(perms)?;
        let node = self.node(&abs)?;
        let old = node.perms.clone();
        let old_owner = old.first().map_or(DomId::DOM0, |p| p.domid);
        if dom != DomId::DOM0 {
            if old_owner != dom {
                return Err(WireError::PermissionDenied(format!(
                    "only the owner (domain {old_owner}) or dom0 may change the permissions of {abs}"
                )));
            }
            if perms[0].domid != dom {
                return Err(WireError::PermissionDenied(format!(
                    "domain {dom} may not give {abs} away to domain {}",
                    perms[0].domid
                )));
            }
        }
        let new_owner = perms[0].domid;
        if new_owner != old_owner {
            if let Some(c) = self.owned.get_mut(&old_owner) {
                *c = c.saturating_sub(1);
            }
            *self.owned.entry(new_owner).or_insert(0) += 1;
        }
        if let Some(n) = self.nodes.get_mut(&abs) {
            n.perms = perms.to_vec();
        }
        // As xenstored (watch_permitted with the old permissions): only watchers that could read
        // the node before *and* after the change hear of it; a domain just given access is not told.
        Ok(self.fires_for(&abs, &[&old, perms]))
    }

    /// Registers watch `id` of `dom` on `path`; returns the immediate event.
    pub fn watch(&mut self, dom: DomId, id: u64, path: &str) -> Result<Vec<Fire>, WireError> {
        let (abs, relative) = if path == INTRODUCE || path == RELEASE {
            (path.to_string(), false)
        } else {
            resolve(dom, path)?
        };
        if self.watches.iter().any(|w| w.dom == dom && w.id == id) {
            return Err(WireError::AlreadyExists(format!("watch id {id} already registered")));
        }
        if self.watches.iter().filter(|w| w.dom == dom).count() >= WATCH_QUOTA {
            return Err(WireError::Limit(format!("domain {dom} has {WATCH_QUOTA} watches")));
        }
        self.watches.push(WatchReg { dom, id, path: abs, relative });
        Ok(vec![Fire { dom, watch: id, path: path.to_string() }])
    }

    /// Removes watch `id` of `dom`.
    pub fn unwatch(&mut self, dom: DomId, id: u64) -> Result<(), WireError> {
        let before = self.watches.len();
        self.watches.retain(|w| !(w.dom == dom && w.id == id));
        if self.watches.len() == before {
            return Err(WireError::NotFound(format!("no watch {id}")));
        }
        Ok(())
    }

    /// Removes every watch of `dom`.
    pub fn remove_watches(&mut self, dom: DomId) {
        self.watches.retain(|w| w.dom != dom);
    }

    /// Creates the home of a new domain (owned by it, no access for others) with its `domid`
    /// and `name`, and fires `@introduceDomain`.
    pub fn introduce(&mut self, dom: DomId, name: &str) -> Result<Vec<Fire>, WireError> {
        let h = home(dom);
        let mut fires = if self.nodes.contains_key(&h) { Vec::new() } else { self.mkdir(DomId::DOM0, &h)? };
        let perms = vec![Perm { domid: dom, kind: PermKind::None }];
        fires.extend(self.set_perms(DomId::DOM0, &h, &perms)?);
        // As libxl does: the domain reads its id and name but cannot change them (the
        // connection manager's policy is keyed on names).
        let fixed = vec![
            Perm { domid: DomId::DOM0, kind: PermKind::None },
            Perm { domid: dom, kind: PermKind::Read },
        ];
        for (key, value) in [("domid", dom.to_string()), ("name", name.to_string())] {
            let path = format!("{h}/{key}");
            fires.extend(self.write(DomId::DOM0, &path, value.as_bytes())?);
            fires.extend(self.set_perms(DomId::DOM0, &path, &fixed)?);
        }
        fires.extend(self.special_fires(INTRODUCE));
        Ok(fires)
    }

    /// Removes the home of a dead domain and fires `@releaseDomain` (its watches must already
    /// be gone, see [`StoreTree::remove_watches`]).
    pub fn release(&mut self, dom: DomId) -> Vec<Fire> {
        let mut fires = self.remove_subtree(&home(dom));
        fires.extend(self.special_fires(RELEASE));
        fires
    }

    /// Number of nodes `dom` owns.
    pub fn owned_by(&self, dom: DomId) -> usize {
        self.owned.get(&dom).copied().unwrap_or(0)
    }
}

fn report(w: &WatchReg, abs: &str) -> String {
    if w.relative {
        let h = format!("{}/", home(w.dom));
        if let Some(rel) = abs.strip_prefix(&h) {
            return rel.to_string();
        }
    }
    abs.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(d: DomId, kind: PermKind) -> Perm {
        Perm { domid: d, kind }
    }

    fn tree() -> StoreTree {
        let mut t = StoreTree::new();
        assert!(t.introduce(DomId(1), "a").is_ok());
        assert!(t.introduce(DomId(2), "b").is_ok());
        t
    }

    #[test]
    fn path_validation() {
        assert!(resolve(DomId(1), "data/x").is_ok_and(|(p, rel)| p == "/local/domain/1/data/x" && rel));
        assert!(resolve(DomId(1), "/a/b-c_d.e@f").is_ok_and(|(p, rel)| p == "/a/b-c_d.e@f" && !rel));
        assert!(resolve(DomId(1), "/").is_ok());
        for bad in ["", "a//b", "/a/", "a b", "a/ü", "@releaseDomain", "//", "a\0b"] {
            assert!(matches!(resolve(DomId(1), bad), Err(WireError::InvalidArgument(_))), "{bad:?}");
        }
        assert!(matches!(resolve(DomId(1), &"a".repeat(MAX_PATH + 1)), Err(WireError::InvalidArgument(_))));
        assert!(matches!(resolve(DomId(1), &"a".repeat(MAX_PATH - 5)), Err(WireError::InvalidArgument(_))));
        let mut t = tree();
        assert!(matches!(
            t.write(DomId(1), "x", &vec![0; MAX_VALUE + 1]),
            Err(WireError::InvalidArgument(_))
        ));
        assert!(t.write(DomId(1), "x", &vec![0; MAX_VALUE]).is_ok());
        assert!(matches!(t.rm(DomId(0), "/"), Err(WireError::InvalidArgument(_))));
    }

    #[test]
    fn homes_are_private_and_relative_paths_resolve() {
        let mut t = tree();
        assert_eq!(t.read(DomId(1), "domid").ok(), Some(b"1".to_vec()));
        assert_eq!(t.read(DomId(2), "name").ok(), Some(b"b".to_vec()));
        assert!(matches!(t.read(DomId(2), "/local/domain/1/name"), Err(WireError::PermissionDenied(_))));
        assert!(matches!(t.write(DomId(2), "/local/domain/1/x", b"v"), Err(WireError::PermissionDenied(_))));
        assert!(matches!(t.directory(DomId(1), "/local/domain"), Err(WireError::PermissionDenied(_))));
        assert!(matches!(t.write(DomId(1), "/tool/x", b"v"), Err(WireError::PermissionDenied(_))));
        assert!(t.read(DomId(0), "/local/domain/1/name").is_ok());
        assert!(matches!(t.read(DomId(1), "nothing"), Err(WireError::NotFound(_))));
        assert!(t.rm(DomId(1), "nothing").is_ok(), "a missing node under an existing parent");
        assert!(matches!(t.rm(DomId(1), "no/such/parent"), Err(WireError::NotFound(_))));
    }

    #[test]
    fn created_nodes_inherit_perms_with_creator_as_owner() {
        let mut t = tree();
        // dom0 opens a directory to domain 2 for writing.
        assert!(t.mkdir(DomId(0), "/shared").is_ok());
        assert!(
            t.set_perms(
                DomId(0),
                "/shared",
                &[perm(DomId(0), PermKind::None), perm(DomId(2), PermKind::Both)]
            )
            .is_ok()
        );
        assert!(t.write(DomId(2), "/shared/a/b", b"x").is_ok());
        let p = t.get_perms(DomId(2), "/shared/a/b").unwrap_or_default();
        assert_eq!(p, vec![perm(DomId(2), PermKind::None), perm(DomId(2), PermKind::Both)]);
        assert!(matches!(t.read(DomId(1), "/shared/a/b"), Err(WireError::PermissionDenied(_))));
        assert!(matches!(t.write(DomId(1), "/shared/c", b"x"), Err(WireError::PermissionDenied(_))));
        assert_eq!(t.directory(DomId(2), "/shared/a").unwrap_or_default(), vec!["b".to_string()]);
    }

    #[test]
    fn grant_read_and_ownership_rules() {
        let mut t = tree();
        assert!(t.write(DomId(1), "data/x", b"hello").is_ok());
        assert!(matches!(t.read(DomId(2), "/local/domain/1/data/x"), Err(WireError::PermissionDenied(_))));
        let ok = [perm(DomId(1), PermKind::None), perm(DomId(2), PermKind::Read)];
        assert!(t.set_perms(DomId(1), "data/x", &ok).is_ok());
        assert_eq!(t.read(DomId(2), "/local/domain/1/data/x").ok(), Some(b"hello".to_vec()));
        assert!(matches!(
            t.write(DomId(2), "/local/domain/1/data/x", b"no"),
            Err(WireError::PermissionDenied(_))
        ));
        // Domain 2 is not the owner: no set_perms.
        assert!(matches!(
            t.set_perms(DomId(2), "/local/domain/1/data/x", &ok),
            Err(WireError::PermissionDenied(_))
        ));
        // Owner may not give it away; dom0 may.
        let away = [perm(DomId(2), PermKind::None)];
        assert!(matches!(t.set_perms(DomId(1), "data/x", &away), Err(WireError::PermissionDenied(_))));
        assert!(t.set_perms(DomId(0), "/local/domain/1/data/x", &away).is_ok());
        assert!(t.read(DomId(2), "/local/domain/1/data/x").is_ok());
        assert!(matches!(t.set_perms(DomId(1), "data/x", &[]), Err(WireError::InvalidArgument(_))));
        assert!(matches!(t.set_perms(DomId(0), "/x", &ok), Err(WireError::NotFound(_))));
        // rm needs write and removes the subtree.
        assert!(t.write(DomId(1), "data/y/z", b"1").is_ok());
        assert!(matches!(t.rm(DomId(2), "/local/domain/1/data"), Err(WireError::PermissionDenied(_))));
        assert!(t.rm(DomId(1), "data").is_ok());
        assert!(matches!(t.read(DomId(1), "data/y/z"), Err(WireError::NotFound(_))));
        assert_eq!(t.directory(DomId(1), "").ok(), None);
        let names = t.directory(DomId(1), "/local/domain/1").unwrap_or_default();
        assert_eq!(names, vec!["domid".to_string(), "name".to_string()]);
    }

    #[test]
    fn a_domain_reads_but_cannot_change_its_name() {
        let mut t = tree();
        t.introduce(DomId(5), "guest5").unwrap();
        assert_eq!(t.read(DomId(5), "/local/domain/5/name").unwrap(), b"guest5");
        assert!(t.write(DomId(5), "/local/domain/5/name", b"storage").is_err());
        assert!(t.rm(DomId(5), "/local/domain/5/name").is_err());
        assert!(t.read(DomId(6), "/local/domain/5/name").is_err());
        // Its home stays its own to write in.
        t.write(DomId(5), "/local/domain/5/data/x", b"1").unwrap();
    }

    #[test]
    fn quota_limits_nodes() {
        let mut t = StoreTree::with_quota(5);
        assert!(t.introduce(DomId(1), "a").is_ok());
        // Its home; its id and name are dom0's.
        assert_eq!(t.owned_by(DomId(1)), 1);
        for n in ["a", "b", "x", "y"] {
            assert!(t.write(DomId(1), n, b"").is_ok());
        }
        assert!(matches!(t.write(DomId(1), "c", b""), Err(WireError::Limit(_))));
        assert!(t.rm(DomId(1), "a").is_ok());
        assert!(t.write(DomId(1), "c", b"").is_ok());
    }

    #[test]
    fn watches_fire_on_readable_changes_only() {
        let mut t = tree();
        let f = t.watch(DomId(2), 10, "/local/domain/1").unwrap_or_default();
        assert_eq!(f, vec![Fire { dom: DomId(2), watch: 10, path: "/local/domain/1".into() }]);
        assert!(t.watch(DomId(1), 11, "data").is_ok());
        // Not readable by 2: only domain 1's watch fires (relative path).
        let f = t.write(DomId(1), "data/x", b"1").unwrap_or_default();
        assert_eq!(f, vec![Fire { dom: DomId(1), watch: 11, path: "data/x".into() }]);
        // Readable only after set_perms: as on xenstored, the newly allowed watcher is not told of
        // the permission change itself, only of later changes.
        let f = t
            .set_perms(DomId(1), "data/x", &[perm(DomId(1), PermKind::None), perm(DomId(2), PermKind::Read)])
            .unwrap_or_default();
        assert_eq!(f, vec![Fire { dom: DomId(1), watch: 11, path: "data/x".into() }]);
        let mut f = t.write(DomId(1), "data/x", b"2").unwrap_or_default();
        f.sort_by_key(|f| f.dom);
        assert_eq!(
            f,
            vec![
                Fire { dom: DomId(1), watch: 11, path: "data/x".into() },
                Fire { dom: DomId(2), watch: 10, path: "/local/domain/1/data/x".into() },
            ]
        );
        // Outside the watched path: nothing.
        assert!(t.write(DomId(1), "other", b"1").is_ok_and(|f| f.is_empty()));
        // rm judged by perms before removal; a watch inside the subtree fires too.
        assert!(t.watch(DomId(1), 12, "data/x/deeper").is_ok());
        let f = t.rm(DomId(1), "data").unwrap_or_default();
        let mut paths: Vec<_> = f.iter().map(|f| (f.dom, f.path.clone())).collect();
        paths.sort();
        assert_eq!(paths, vec![(DomId(1), "data".to_string()), (DomId(1), "data/x/deeper".to_string())]);
        assert!(t.unwatch(DomId(1), 11).is_ok());
        // An unwatched watch no longer fires (and domain 2 may not read the new node).
        assert_eq!(t.write(DomId(1), "data/z", b"1").ok(), Some(Vec::new()));
        assert!(matches!(t.unwatch(DomId(1), 11), Err(WireError::NotFound(_))));
        assert!(matches!(t.watch(DomId(1), 12, "x"), Err(WireError::AlreadyExists(_))));
        assert!(matches!(t.watch(DomId(1), 13, "a//b"), Err(WireError::InvalidArgument(_))));
    }

    #[test]
    fn special_watches_and_release() {
        let mut t = tree();
        assert!(t.watch(DomId(1), 1, INTRODUCE).is_ok());
        assert!(t.watch(DomId(1), 2, RELEASE).is_ok());
        assert!(t.watch(DomId(3), 3, RELEASE).is_ok());
        let f = t.introduce(DomId(5), "e").unwrap_or_default();
        assert_eq!(f, vec![Fire { dom: DomId(1), watch: 1, path: INTRODUCE.into() }]);
        t.remove_watches(DomId(3));
        let f = t.release(DomId(5));
        assert_eq!(f, vec![Fire { dom: DomId(1), watch: 2, path: RELEASE.into() }]);
        assert!(matches!(t.read(DomId(0), "/local/domain/5"), Err(WireError::NotFound(_))));
        assert_eq!(t.owned_by(DomId(5)), 0);
    }
}
