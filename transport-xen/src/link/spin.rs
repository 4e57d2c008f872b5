//! The adaptive spin policy: how long to watch a ring before sleeping on the event channel.
//!
//! Pure state (a budget and a miss counter) plus a bounded spin loop over caller-supplied
//! checks; it knows nothing of the link, so it is tested here with plain closures.

use std::time::{Duration, Instant};

/// How long a spin stays a pure spin before each check also yields the CPU.
const PURE_SPIN: Duration = Duration::from_micros(2);

/// Rounds between two looks at the clock (and at the rarely changing `done` condition).
const ROUNDS_PER_CLOCK_READ: u32 = 64;

/// Adaptive spin budget: spins while spinning pays off, backs off when it keeps failing so that an
/// idle link does not burn CPU on every wait.
#[derive(Debug)]
pub(super) struct Spin {
    budget: Option<Duration>,
    failures: u32,
    skip: u32,
}

impl Spin {
    /// A policy that spins up to `budget` per wait; `None` or zero never spins.
    pub(super) fn new(budget: Option<Duration>) -> Spin {
        Spin { budget: budget.filter(|d| !d.is_zero()), failures: 0, skip: 0 }
    }

    /// Whether waits may spin at all (a budget was given).
    pub(super) fn enabled(&self) -> bool {
        self.budget.is_some()
    }

    /// The budget for this wait, or `None` if this wait should not spin.
    fn budget(&mut self) -> Option<Duration> {
        let budget = self.budget?;
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        Some(budget)
    }

    /// Records whether a spin saw its condition before the budget ran out.
    fn record(&mut self, success: bool) {
        if success {
            self.failures = 0;
        } else {
            // After 4 misses in a row, skip 1, 2, 4 … up to 64 waits before spinning again.
            self.failures = self.failures.saturating_add(1);
            if self.failures >= 4 {
                self.skip = 1 << (self.failures - 4).min(6);
            }
        }
    }

    /// Spins (bounded by the budget) until `ready` or `done` holds on `state`; true if one did.
    /// False at once if the policy says not to spin on this wait.
    ///
    /// The first microseconds are a pure spin (the peer on another core answers in well under a
    /// microsecond); after that each check also yields the CPU, so that a peer scheduled on the
    /// same core gets to run instead of waiting for our spin budget to run out.
    ///
    /// `ready` is checked every round (one load of the peer's index); `done` (the peer's state,
    /// which changes rarely) every 64 rounds.
    pub(super) fn spin_until<S>(
        &mut self,
        state: &mut S,
        ready: impl Fn(&mut S) -> bool,
        done: impl Fn(&mut S) -> bool,
    ) -> bool {
        let Some(budget) = self.budget() else { return false };
        // The clock is read lazily: a peer on another core usually answers within the first
        // 64 rounds, and then the spin costs no clock read at all.
        let mut start: Option<Instant> = None;
        let mut rounds = 0u32;
        loop {
            if ready(state) {
                self.record(true);
                return true;
            }
            rounds = rounds.wrapping_add(1);
            // Reading the clock costs more than a ring check: look at it every 64 rounds.
            if rounds % ROUNDS_PER_CLOCK_READ == 0 {
                if done(state) {
                    self.record(true);
                    return true;
                }
                let spent = start.get_or_insert_with(Instant::now).elapsed();
                if spent >= budget {
                    self.record(false);
                    return false;
                }
                if spent >= PURE_SPIN {
                    std::thread::yield_now();
                }
            }
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spin_backs_off_when_it_keeps_missing() {
        let mut s = Spin::new(Some(Duration::from_micros(10)));
        for _ in 0..4 {
            assert!(s.budget().is_some());
            s.record(false);
        }
        assert!(s.budget().is_none(), "after four misses the next wait skips spinning");
        assert!(s.budget().is_some());
        s.record(true);
        assert!(s.budget().is_some());
        assert!(Spin::new(None).budget().is_none());
    }

    /// Counts the rounds a spin makes; `ready` from round `ready_at`, `done` from `done_at`.
    struct Probe {
        rounds: u32,
        ready_at: u32,
        done_at: u32,
    }

    fn spin(s: &mut Spin, ready_at: u32, done_at: u32) -> (bool, Probe) {
        let mut p = Probe { rounds: 0, ready_at, done_at };
        let hit = s.spin_until(
            &mut p,
            |p| {
                p.rounds += 1;
                p.rounds >= p.ready_at
            },
            |p| p.rounds >= p.done_at,
        );
        (hit, p)
    }

    #[test]
    fn a_spin_ends_when_ready_or_done_and_gives_up_after_its_budget() {
        let mut s = Spin::new(Some(Duration::from_millis(1)));
        let (hit, p) = spin(&mut s, 10, u32::MAX);
        assert!(hit);
        assert_eq!(p.rounds, 10, "ready is checked every round");
        // `done` is looked at every 64 rounds only.
        let (hit, p) = spin(&mut s, u32::MAX, 1);
        assert!(hit);
        assert_eq!(p.rounds, 64);
        // Never ready, never done: the spin ends once its budget is spent, as a miss.
        let t = Instant::now();
        let (hit, _) = spin(&mut s, u32::MAX, u32::MAX);
        assert!(!hit);
        assert!(t.elapsed() >= Duration::from_millis(1));
        assert_eq!(s.failures, 1);
        // A policy that does not spin checks nothing.
        let (hit, p) = spin(&mut Spin::new(None), 1, 1);
        assert!(!hit);
        assert_eq!(p.rounds, 0);
    }
}
