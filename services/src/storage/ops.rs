//! The operations running on the images of a root: which image each changes and which it
//! reads (one change at a time per image, no change under a reader), how far each has come, and
//! what each reserves against the root's bounds (images, virtual bytes) until it is recorded.
//!
//! Only a map under a lock: no file, no process; the service registers an operation with
//! [`Operations::claim`] and the [`OpGuard`] it gets unregisters it when dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{Progress, StorageError};

/// The operations running on a root, and its bounds.
#[derive(Debug)]
pub(super) struct Operations {
    running: Mutex<HashMap<String, Running>>,
    /// Most images in the root.
    max_images: usize,
    /// Most bytes the virtual sizes of the images may add up to.
    max_virtual_bytes: u64,
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
}

impl Operations {
    /// No operation yet, on a root of at most `max_images` images adding up to at most
    /// `max_virtual_bytes` of virtual size.
    pub(super) fn new(max_images: usize, max_virtual_bytes: u64) -> Arc<Operations> {
        Arc::new(Operations { running: Mutex::new(HashMap::new()), max_images, max_virtual_bytes })
    }

    fn running(&self) -> MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `operation` on `name` (which it changes) reading `reads`; Busy if `name` or one
    /// of `reads` is being changed, or `name` is being read.
    pub(super) fn claim(
        self: &Arc<Self>,
        name: &str,
        operation: String,
        reads: &[&str],
    ) -> Result<OpGuard, StorageError> {
        let mut running = self.running();
        if let Some(r) = running.get(name) {
            return Err(StorageError::Busy { name: name.to_owned(), operation: r.operation.clone() });
        }
        if let Some((other, r)) = running.iter().find(|(_, r)| r.reads.iter().any(|n| n == name)) {
            return Err(StorageError::Busy {
                name: name.to_owned(),
                operation: format!("read by {:?} on {other:?}", r.operation),
            });
        }
        for read in reads {
            if let Some(r) = running.get(*read) {
                return Err(StorageError::Busy { name: (*read).to_owned(), operation: r.operation.clone() });
            }
        }
        running.insert(
            name.to_owned(),
            Running {
                operation,
                percent: 0.0,
                reads: reads.iter().map(|s| (*s).to_owned()).collect(),
                reserved: (false, 0),
            },
        );
        Ok(OpGuard { ops: Arc::clone(self), name: name.to_owned() })
    }

    /// Reserves, for the operation `op`, a new image (`new_image`) and `bytes` more of virtual
    /// size, against the bounds: TooManyImages or QuotaExceeded past them, counting what the
    /// other running operations reserved and what `recorded` says the recorded images hold
    /// (their number and virtual bytes; asked while the operations are locked, so that none
    /// is counted neither as recorded nor as reserved).
    pub(super) fn reserve(
        &self,
        op: &OpGuard,
        new_image: bool,
        bytes: u64,
        recorded: impl FnOnce() -> (usize, u128),
    ) -> Result<(), StorageError> {
        let mut running = self.running();
        let (others_images, others_bytes) =
            running.iter().filter(|(n, _)| **n != op.name).fold((0usize, 0u128), |(i, b), (_, r)| {
                (i + usize::from(r.reserved.0), b + u128::from(r.reserved.1))
            });
        let (images, total) = recorded();
        if new_image && images + others_images >= self.max_images {
            return Err(StorageError::TooManyImages { limit: self.max_images as u64 });
        }
        let wanted = total + others_bytes + u128::from(bytes);
        if bytes > 0 && wanted > u128::from(self.max_virtual_bytes) {
            return Err(StorageError::QuotaExceeded {
                requested: bytes,
                used: u64::try_from(total + others_bytes).unwrap_or(u64::MAX),
                limit: self.max_virtual_bytes,
            });
        }
        if let Some(r) = running.get_mut(&op.name) {
            r.reserved = (new_image, bytes);
        }
        Ok(())
    }

    /// The operation running on `name`, if any, and how far it is.
    pub(super) fn progress(&self, name: &str) -> Option<Progress> {
        self.running().get(name).map(|r| Progress { operation: r.operation.clone(), percent: r.percent })
    }
}

/// The registration of a running operation; unregistered when dropped.
#[derive(Debug)]
pub(super) struct OpGuard {
    ops: Arc<Operations>,
    name: String,
}

impl OpGuard {
    /// Records how far it is, 0 to 100.
    pub(super) fn set_percent(&self, percent: f32) {
        if let Some(r) = self.ops.running().get_mut(&self.name) {
            r.percent = percent;
        }
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.ops.running().remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

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
        let ops = Operations::new(10, 1 << 30);
        let clone = ops.claim("copy", "clone from base".into(), &["base"]).unwrap();
        assert_eq!(busy(ops.claim("copy", "delete".into(), &[])), "copy");
        assert_eq!(busy(ops.claim("base", "delete".into(), &[])), "base");
        let other = ops.claim("other", "create".into(), &["base"]).unwrap();
        assert_eq!(busy(ops.claim("x", "clone from copy".into(), &["copy"])), "copy");
        clone.set_percent(42.5);
        assert_eq!(
            ops.progress("copy"),
            Some(Progress { operation: "clone from base".into(), percent: 42.5 })
        );
        drop(clone);
        assert_eq!(ops.progress("copy"), None);
        assert_eq!(busy(ops.claim("base", "delete".into(), &[])), "base");
        drop(other);
        ops.claim("base", "delete".into(), &[]).unwrap();
    }

    /// Reservations count the recorded images and the other operations' reservations, not
    /// their own twice; they end with their operation.
    #[test]
    fn reservations_hold_the_bounds() {
        let ops = Operations::new(3, 1000);
        let a = ops.claim("a", "create".into(), &[]).unwrap();
        ops.reserve(&a, true, 600, || (1, 0)).unwrap();
        ops.reserve(&a, true, 600, || (1, 0)).unwrap();
        let b = ops.claim("b", "create".into(), &[]).unwrap();
        assert_eq!(
            ops.reserve(&b, true, 500, || (1, 0)),
            Err(StorageError::QuotaExceeded { requested: 500, used: 600, limit: 1000 })
        );
        assert_eq!(ops.reserve(&b, true, 100, || (2, 300)), Err(StorageError::TooManyImages { limit: 3 }));
        ops.reserve(&b, false, 100, || (2, 300)).unwrap();
        drop(a);
        ops.reserve(&b, true, 1000, || (0, 0)).unwrap();
    }
}
