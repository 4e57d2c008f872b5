//! The waker fan-out: one waker registered for the event-channel fd wakes both stream halves.
//!
//! tokio keeps only one read waker per fd, and a link's reading and writing tasks both wait on
//! its one event channel. So the link registers a [`Fanout`] waker with tokio, and each half
//! leaves its own task's waker in the fan-out's slot for it; an event wakes both.

use std::sync::{Arc, Mutex};
use std::task::{Wake, Waker};

/// The tasks waiting on a link's event channel: one reader, one writer.
#[derive(Default)]
pub(super) struct Fanout {
    reader: Mutex<Option<Waker>>,
    writer: Mutex<Option<Waker>>,
}

impl Fanout {
    /// Leaves the reading task's waker (or the accepting task's) to be woken on the next event.
    pub(super) fn register_reader(&self, w: &Waker) {
        store_waker(&self.reader, w);
    }

    /// Leaves the writing task's waker to be woken on the next event.
    pub(super) fn register_writer(&self, w: &Waker) {
        store_waker(&self.writer, w);
    }
}

/// Puts `w` in `slot`, unless the waker there already wakes the same task.
fn store_waker(slot: &Mutex<Option<Waker>>, w: &Waker) {
    let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    match &*slot {
        Some(old) if old.will_wake(w) => {}
        _ => *slot = Some(w.clone()),
    }
}

impl Wake for Fanout {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    /// Wakes (and forgets) each registered task once.
    fn wake_by_ref(self: &Arc<Self>) {
        for slot in [&self.reader, &self.writer] {
            let w = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(w) = w {
                w.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A task's waker that counts its wake-ups.
    #[derive(Default)]
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn task() -> (Arc<Task>, Waker) {
        let t = Arc::new(Task::default());
        (t.clone(), Waker::from(t))
    }

    #[test]
    fn one_event_wakes_the_reader_and_the_writer_once_each() {
        let fanout = Arc::new(Fanout::default());
        let waker = Waker::from(fanout.clone());
        let ((reader, rw), (writer, ww)) = (task(), task());
        fanout.register_reader(&rw);
        fanout.register_reader(&rw);
        fanout.register_writer(&ww);
        waker.wake_by_ref();
        assert_eq!((reader.0.load(Ordering::SeqCst), writer.0.load(Ordering::SeqCst)), (1, 1));
        // Woken tasks are forgotten: they register again when they wait again.
        waker.wake_by_ref();
        assert_eq!((reader.0.load(Ordering::SeqCst), writer.0.load(Ordering::SeqCst)), (1, 1));
        // A new reader replaces the old one; only it is woken.
        let (other, ow) = task();
        fanout.register_reader(&rw);
        fanout.register_reader(&ow);
        waker.wake();
        assert_eq!((reader.0.load(Ordering::SeqCst), other.0.load(Ordering::SeqCst)), (1, 1));
    }
}
