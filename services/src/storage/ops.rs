//! The operations running on the images of a root: which image each changes and which it
//! reads (one change at a time per image, no change under a reader), whose image it changes,
//! how far each has come, and what each reserves against the root's bounds and its owner's quota
//! (images, virtual bytes) until it is recorded.
//!
//! Only a map under a lock, and the topic where the operations' progress is published: no
//! file, no process. The service registers an operation with [`Operations::claim`] (published
//! as its start); the [`OpGuard`] it gets publishes its progress and, when it ends
//! ([`OpGuard::end`]) or is dropped unfinished (cancelled), its outcome, and unregisters it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use dombus::{Events, Topic, TopicLimits};

use super::{Outcome, Owner, Progress, ProgressUpdate, Quota, StorageError};

/// What a root may hold: in all, and per owning domain (the toolstack has no quota).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Bounds {
    /// Most images in the root.
    pub(super) max_images: usize,
    /// Most bytes the virtual sizes of the images may add up to.
    pub(super) max_virtual_bytes: u64,
    /// Most images one domain may own.
    pub(super) quota_images: usize,
    /// Most bytes the virtual sizes of one domain's images may add up to.
    pub(super) quota_bytes: u64,
}

/// Images, and bytes of virtual size, held (recorded or reserved).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Held {
    /// How many images.
    pub(super) images: usize,
    /// The sum of their virtual sizes.
    pub(super) bytes: u128,
}

/// The operations running on a root, its bounds, and the topic of their progress.
#[derive(Debug)]
pub(super) struct Operations {
    running: Mutex<HashMap<String, Running>>,
    bounds: Bounds,
    /// Every operation's start, progress and end, published under the lock of `running` (so in
    /// the order they happen).
    topic: Topic<ProgressUpdate, Vec<ProgressUpdate>>,
}

/// An operation running on an image name.
#[derive(Debug)]
struct Running {
    operation: String,
    percent: f32,
    /// Images it reads (the source of a clone, a backing image): they must not change meanwhile.
    reads: Vec<String>,
    /// Whether it adds an image, and the virtual bytes it adds: counted against the bounds
    /// until it is recorded.
    reserved: (bool, u64),
    /// The owner of the image it changes (or makes): whose quota its reservation counts
    /// against, who may see its progress.
    owner: Owner,
}

impl Operations {
    /// No operation yet, on a root held to `bounds`.
    pub(super) fn new(bounds: Bounds) -> Arc<Operations> {
        Arc::new(Operations {
            running: Mutex::new(HashMap::new()),
            bounds,
            topic: Topic::new(TopicLimits::default()),
        })
    }

    fn running(&self) -> MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `operation` of `caller` on `name` (which it changes, an image of `owner`)
    /// reading `reads`; Busy if `name` or one of `reads` is being changed, or `name` is being
    /// read. A domain is told what the other operation is only if it is on one of its images.
    pub(super) fn claim(
        self: &Arc<Self>,
        name: &str,
        operation: String,
        reads: &[&str],
        owner: Owner,
        caller: Owner,
    ) -> Result<OpGuard, StorageError> {
        let mut running = self.running();
        let busy = |name: &str, r: &Running, what: String| StorageError::Busy {
            name: name.to_owned(),
            operation: if caller == Owner::Toolstack || r.owner == caller {
                what
            } else {
                "another owner's operation".to_owned()
            },
        };
        if let Some(r) = running.get(name) {
            return Err(busy(name, r, r.operation.clone()));
        }
        if let Some((other, r)) = running.iter().find(|(_, r)| r.reads.iter().any(|n| n == name)) {
            return Err(busy(name, r, format!("read by {:?} on {other:?}", r.operation)));
        }
        for read in reads {
            if let Some(r) = running.get(*read) {
                return Err(busy(read, r, r.operation.clone()));
            }
        }
        let r = Running {
            operation,
            percent: 0.0,
            reads: reads.iter().map(|s| (*s).to_owned()).collect(),
            reserved: (false, 0),
            owner,
        };
        self.topic.publish(r.update(name, None));
        running.insert(name.to_owned(), r);
        Ok(OpGuard { ops: Arc::clone(self), name: name.to_owned(), caller, ended: false })
    }

    /// Reserves, for the operation `op`, a new image (`new_image`) and `bytes` more of virtual
    /// size, against the bounds: for an image a domain owns, OwnerQuotaExceeded past its quota;
    /// then TooManyImages or QuotaExceeded past the root's bounds. Counts what the other running
    /// operations reserved and what `recorded` says the recorded images hold, in the root and
    /// of the owner it is given (asked while the operations are locked, so that none is counted
    /// neither as recorded nor as reserved).
    pub(super) fn reserve(
        &self,
        op: &OpGuard,
        new_image: bool,
        bytes: u64,
        recorded: impl FnOnce(Owner) -> (Held, Held),
    ) -> Result<(), StorageError> {
        let mut running = self.running();
        let owner = running.get(&op.name).map_or(Owner::Toolstack, |r| r.owner);
        let (mut root, mut owned) = (Held::default(), Held::default());
        for (_, r) in running.iter().filter(|(n, _)| **n != op.name) {
            let held = Held { images: usize::from(r.reserved.0), bytes: u128::from(r.reserved.1) };
            root = root.plus(held);
            if r.owner == owner {
                owned = owned.plus(held);
            }
        }
        let (recorded_root, recorded_owned) = recorded(owner);
        let (root, owned) = (root.plus(recorded_root), owned.plus(recorded_owned));
        let b = &self.bounds;
        if matches!(owner, Owner::Domain(_)) {
            if new_image && owned.images >= b.quota_images {
                return Err(StorageError::OwnerQuotaExceeded {
                    what: Quota::Images,
                    used: owned.images as u64,
                    limit: b.quota_images as u64,
                });
            }
            if bytes > 0 && owned.bytes + u128::from(bytes) > u128::from(b.quota_bytes) {
                return Err(StorageError::OwnerQuotaExceeded {
                    what: Quota::Bytes,
                    used: u64::try_from(owned.bytes).unwrap_or(u64::MAX),
                    limit: b.quota_bytes,
                });
            }
        }
        if new_image && root.images >= b.max_images {
            return Err(StorageError::TooManyImages { limit: b.max_images as u64 });
        }
        if bytes > 0 && root.bytes + u128::from(bytes) > u128::from(b.max_virtual_bytes) {
            return Err(StorageError::QuotaExceeded {
                requested: bytes,
                used: u64::try_from(root.bytes).unwrap_or(u64::MAX),
                limit: b.max_virtual_bytes,
            });
        }
        if let Some(r) = running.get_mut(&op.name) {
            r.reserved = (new_image, bytes);
        }
        Ok(())
    }

    /// The operation running on `name`, if any, and how far it is: for a domain, only an
    /// operation on one of its images.
    pub(super) fn progress(&self, name: &str, caller: Owner) -> Option<Progress> {
        self.running()
            .get(name)
            .filter(|r| caller == Owner::Toolstack || r.owner == caller)
            .map(|r| Progress { operation: r.operation.clone(), percent: r.percent })
    }

    /// The progress of the operations `caller` may see (see [`Self::progress`]), of those on
    /// `name` only if given: updates of the one topic, the operations running as a resync's
    /// snapshot, filtered alike.
    pub(super) fn updates(
        self: &Arc<Self>,
        caller: Owner,
        name: Option<String>,
    ) -> Events<ProgressUpdate, Vec<ProgressUpdate>> {
        let visible = move |owner: Owner, n: &str| {
            (caller == Owner::Toolstack || owner == caller) && name.as_deref().is_none_or(|name| name == n)
        };
        let keep = visible.clone();
        let ops = Arc::clone(self);
        self.topic.events_where(move |u| keep(u.owner, &u.name)).with_snapshot(move || {
            let mut now: Vec<ProgressUpdate> = ops
                .running()
                .iter()
                .filter(|(n, r)| visible(r.owner, n))
                .map(|(n, r)| r.update(n, None))
                .collect();
            now.sort_by(|a, b| a.name.cmp(&b.name));
            now
        })
    }
}

impl Running {
    /// Its progress as an update of the topic.
    fn update(&self, name: &str, outcome: Option<Outcome>) -> ProgressUpdate {
        ProgressUpdate {
            name: name.to_owned(),
            owner: self.owner,
            operation: self.operation.clone(),
            percent: self.percent,
            outcome,
        }
    }
}

impl Held {
    fn plus(self, other: Held) -> Held {
        Held { images: self.images + other.images, bytes: self.bytes + other.bytes }
    }
}

/// The registration of a running operation; unregistered when dropped (its end published:
/// the outcome given to [`OpGuard::end`], else cancelled).
#[derive(Debug)]
pub(super) struct OpGuard {
    ops: Arc<Operations>,
    name: String,
    /// Whose call it is: told its error in the final update if it owns the image.
    caller: Owner,
    /// Whether its end was published.
    ended: bool,
}

impl OpGuard {
    /// Records how far it is, 0 to 100; published when it passes another whole percent (or
    /// reaches 100), not for every line of `qemu-img -p`.
    pub(super) fn set_percent(&self, percent: f32) {
        let mut running = self.ops.running();
        if let Some(r) = running.get_mut(&self.name) {
            let step = percent.floor() != r.percent.floor();
            r.percent = percent;
            if step {
                self.ops.topic.publish(r.update(&self.name, None));
            }
        }
    }

    /// Its image is recorded: what it reserved is counted as recorded from now on, not twice.
    pub(super) fn recorded(&self) {
        if let Some(r) = self.ops.running().get_mut(&self.name) {
            r.reserved = (false, 0);
        }
    }

    /// Ends it with the outcome of `result` (published as its last update) and answers
    /// `result`.
    pub(super) fn end<T>(mut self, result: Result<T, StorageError>) -> Result<T, StorageError> {
        let outcome = match &result {
            Ok(_) => Outcome::Done,
            Err(e) => Outcome::Failed { error: Some(e.clone()) },
        };
        self.finish(outcome);
        result
    }

    /// Unregisters it and publishes its end (once).
    fn finish(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let mut running = self.ops.running();
        if let Some(r) = running.remove(&self.name) {
            let outcome = match outcome {
                // The caller is told its error; the owner of an image the toolstack acted on
                // only that it failed.
                Outcome::Failed { .. } if r.owner != self.caller => Outcome::Failed { error: None },
                o => o,
            };
            self.ops.topic.publish(r.update(&self.name, Some(outcome)));
        }
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.finish(Outcome::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const TS: Owner = Owner::Toolstack;

    fn bounded(max_images: usize, max_virtual_bytes: u64) -> Arc<Operations> {
        Operations::new(Bounds { max_images, max_virtual_bytes, quota_images: 2, quota_bytes: 100 })
    }

    /// The root's holdings `(images, bytes)`, none of the owner's.
    fn held(images: usize, bytes: u128) -> (Held, Held) {
        (Held { images, bytes }, Held::default())
    }

    fn busy(r: Result<OpGuard, StorageError>) -> String {
        match r {
            Err(StorageError::Busy { name, .. }) => name,
            r => panic!("expected Busy, got {r:?}"),
        }
    }

    /// One change per image, none of an image being read, none reading an image being changed;
    /// a dropped guard frees its image.
    #[test]
    fn claims_exclude_changes_and_reads() {
        let ops = bounded(10, 1 << 30);
        let clone = ops.claim("copy", "clone from base".into(), &["base"], TS, TS).unwrap();
        assert_eq!(busy(ops.claim("copy", "delete".into(), &[], TS, TS)), "copy");
        assert_eq!(busy(ops.claim("base", "delete".into(), &[], TS, TS)), "base");
        let other = ops.claim("other", "create".into(), &["base"], TS, TS).unwrap();
        assert_eq!(busy(ops.claim("x", "clone from copy".into(), &["copy"], TS, TS)), "copy");
        clone.set_percent(42.5);
        assert_eq!(
            ops.progress("copy", TS),
            Some(Progress { operation: "clone from base".into(), percent: 42.5 })
        );
        drop(clone);
        assert_eq!(ops.progress("copy", TS), None);
        assert_eq!(busy(ops.claim("base", "delete".into(), &[], TS, TS)), "base");
        drop(other);
        ops.claim("base", "delete".into(), &[], TS, TS).unwrap();
    }

    /// Reservations count the recorded images and the other operations' reservations, not
    /// their own twice; they end with their operation.
    #[test]
    fn reservations_hold_the_bounds() {
        let ops = bounded(3, 1000);
        let a = ops.claim("a", "create".into(), &[], TS, TS).unwrap();
        ops.reserve(&a, true, 600, |_| held(1, 0)).unwrap();
        ops.reserve(&a, true, 600, |_| held(1, 0)).unwrap();
        let b = ops.claim("b", "create".into(), &[], TS, TS).unwrap();
        assert_eq!(
            ops.reserve(&b, true, 500, |_| held(1, 0)),
            Err(StorageError::QuotaExceeded { requested: 500, used: 600, limit: 1000 })
        );
        assert_eq!(
            ops.reserve(&b, true, 100, |_| held(2, 300)),
            Err(StorageError::TooManyImages { limit: 3 })
        );
        ops.reserve(&b, false, 100, |_| held(2, 300)).unwrap();
        drop(a);
        ops.reserve(&b, true, 1000, |_| held(0, 0)).unwrap();
    }

    /// A domain's reservations count against its quota — its recorded images and its other
    /// running operations, not another owner's — and the toolstack has none.
    #[test]
    fn owner_quotas_count_the_owners_images_and_operations() {
        let ops = bounded(100, 1 << 30);
        let d7 = Owner::Domain(7);
        let seven = |owner: Owner| {
            assert_eq!(owner, d7);
            (Held::default(), Held { images: 1, bytes: 20 })
        };
        let a = ops.claim("a", "create".into(), &[], d7, d7).unwrap();
        ops.reserve(&a, true, 60, seven).unwrap();
        let b = ops.claim("b", "create".into(), &[], d7, d7).unwrap();
        assert_eq!(
            ops.reserve(&b, true, 10, seven),
            Err(StorageError::OwnerQuotaExceeded { what: Quota::Images, used: 2, limit: 2 })
        );
        assert_eq!(
            ops.reserve(&b, false, 30, seven),
            Err(StorageError::OwnerQuotaExceeded { what: Quota::Bytes, used: 80, limit: 100 })
        );
        ops.reserve(&b, false, 20, seven).unwrap();
        // Another domain's and the toolstack's are not counted against domain 7's.
        let d8 = Owner::Domain(8);
        let c = ops.claim("c", "create".into(), &[], d8, d8).unwrap();
        ops.reserve(&c, true, 100, |_| (Held::default(), Held::default())).unwrap();
        let t = ops.claim("t", "create".into(), &[], TS, TS).unwrap();
        ops.reserve(&t, true, 1000, |_| held(0, 0)).unwrap();
        drop(a);
        ops.reserve(&b, true, 80, seven).unwrap();
        drop((b, c, t));
    }

    /// The updates after `from` a view `events` answers at once, and where it stands after.
    async fn published(
        events: Events<ProgressUpdate, Vec<ProgressUpdate>>,
        from: dombus::Cursor,
    ) -> (Vec<ProgressUpdate>, dombus::Cursor) {
        use dombus::rpc::Codec;
        use dombus::rpc::events::{Batch, PollArgs, serve};
        let poll = PollArgs { from: Some(from), max_events: 100, wait_ms: 0 };
        let bytes = serve(events, poll, Codec::Bincode).await.unwrap();
        let batch: Batch<ProgressUpdate, Vec<ProgressUpdate>> = Codec::Bincode.decode(&bytes).unwrap();
        assert!(batch.resync.is_none());
        let next = dombus::Cursor { epoch: from.epoch, seq: batch.next };
        (batch.events.into_iter().map(|(_, u)| u).collect(), next)
    }

    /// An operation publishes its start, each whole percent it passes, and its end: done,
    /// failed (with the error when its caller owns the image), or cancelled when dropped
    /// unfinished; a domain's view holds its own images' operations only.
    #[tokio::test]
    async fn an_operation_publishes_its_start_progress_and_outcome() {
        let ops = bounded(10, 1 << 30);
        let (d7, d8) = (Owner::Domain(7), Owner::Domain(8));
        let from = ops.topic.cursor();
        let op = ops.claim("a", "clone from b".into(), &["b"], TS, TS).unwrap();
        for p in [0.0, 0.5, 1.0, 1.5, 2.2, 100.0] {
            op.set_percent(p);
        }
        drop(op.end(Ok(())));
        ops.claim("x", "delete".into(), &[], d7, d7)
            .unwrap()
            .end::<()>(Err(StorageError::NotFound { name: "x".into() }))
            .ok();
        // The toolstack's call on domain 8's image: domain 8 is not told its error.
        let refused = StorageError::Busy { name: "y".into(), operation: "backing image of t".into() };
        ops.claim("y", "delete".into(), &[], d8, TS).unwrap().end::<()>(Err(refused.clone())).ok();
        drop(ops.claim("z", "resize to 2M".into(), &[], d7, d7).unwrap());

        let (all, _) = published(ops.updates(TS, None), from).await;
        let shown: Vec<(&str, f32, Option<Outcome>)> =
            all.iter().map(|u| (u.name.as_str(), u.percent, u.outcome.clone())).collect();
        assert_eq!(
            shown,
            [
                ("a", 0.0, None),
                ("a", 1.0, None),
                ("a", 2.2, None),
                ("a", 100.0, None),
                ("a", 100.0, Some(Outcome::Done)),
                ("x", 0.0, None),
                (
                    "x",
                    0.0,
                    Some(Outcome::Failed { error: Some(StorageError::NotFound { name: "x".into() }) })
                ),
                ("y", 0.0, None),
                ("y", 0.0, Some(Outcome::Failed { error: None })),
                ("z", 0.0, None),
                ("z", 0.0, Some(Outcome::Cancelled)),
            ]
        );
        let (sevens, _) = published(ops.updates(d7, None), from).await;
        assert!(sevens.iter().all(|u| u.owner == d7) && sevens.len() == 4, "{sevens:?}");
        let (named, _) = published(ops.updates(TS, Some("y".into())), from).await;
        assert!(named.iter().all(|u| u.name == "y") && named.len() == 2, "{named:?}");
    }

    /// A domain hears what another owner's operation is neither from Busy nor from progress.
    #[test]
    fn a_domain_learns_nothing_of_another_owners_operations() {
        let ops = bounded(10, 1 << 30);
        let (d7, d8) = (Owner::Domain(7), Owner::Domain(8));
        let clone = ops.claim("copy", "clone from secret".into(), &["secret"], d7, d7).unwrap();
        clone.set_percent(10.0);
        let operation = |r: Result<OpGuard, StorageError>| match r {
            Err(StorageError::Busy { operation, .. }) => operation,
            r => panic!("expected Busy, got {r:?}"),
        };
        assert_eq!(operation(ops.claim("copy", "create".into(), &[], d8, d8)), "another owner's operation");
        assert_eq!(operation(ops.claim("secret", "delete".into(), &[], d8, d8)), "another owner's operation");
        assert_eq!(operation(ops.claim("copy", "create".into(), &[], d7, d7)), "clone from secret");
        assert_eq!(operation(ops.claim("copy", "delete".into(), &[], d7, TS)), "clone from secret");
        assert_eq!(ops.progress("copy", d8), None);
        assert!(ops.progress("copy", d7).is_some() && ops.progress("copy", TS).is_some());
    }
}
