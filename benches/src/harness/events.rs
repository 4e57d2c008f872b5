//! The subscription suite (`events-compare`): publish-to-subscriber latency of a 64-byte event
//! over `xen:` with wake-ups and with adaptive polling, each beside a 64-byte call of the same
//! service on the same pair of processes, interleaved round by round; events per second to one
//! and to many subscribers beside pipelined calls per second; the wake-ups on each path; and
//! every event a resync said was missed (see [`crate::events`]).

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Batches, Bench, CountRow, Plan, RateRow, Results, RunInfo, Spec, Suite, bench, number, vs};
use crate::events::{CALL_DEPTH, EventsBench, Mode, Tally, wakeups_per_op};
use crate::{PingPong, fmt_us, own_cpu_time};

/// The tallies of the events rows' instances, by row name, as each instance is dropped.
type Tallies = Arc<Mutex<Vec<(String, Tally)>>>;

/// The subscription suite.
#[derive(Debug)]
pub struct EventsSuite;

/// The subscription suite's own options.
#[derive(Debug, Clone)]
pub struct EventsOptions {
    /// Adaptive-polling budget of the `xen_spin` rows.
    pub spin: Duration,
    /// Throughput: timed batches per round ...
    pub batches: u64,
    /// ... events published (or calls made) per batch ...
    pub events: u64,
    /// ... and subscribers of the many-subscriber rows.
    pub subscribers: usize,
    /// Calls and events over which wake-ups are counted, per mode.
    pub wake_ops: u64,
}

impl EventsOptions {
    /// The burst ring: twice a batch, so a burst never pushes out an event a subscriber has not
    /// had (each batch waits until every subscriber has had all of it).
    fn ring(&self) -> u64 {
        (self.events * 2).max(1024)
    }
}

/// What one row's tally is called in the counts.
const MISSED: &str = "events missed (resyncs)";
/// What the wake-up counts are called.
const WAKEUPS: &str = "wake-ups per op (parent: subscriber/caller and simulator, peer: server)";

impl Suite for EventsSuite {
    const NAME: &'static str = "events-compare";
    const USAGE: &'static str = "usage: events-compare [--quick] [--iters N] [--rounds N] [--spin US] [--batches N] \
                                 [--events N] [--subscribers N] [--wake-ops N] [--pin split|same|none] [--only NAME[,NAME...]]";
    const SAMPLES: &'static str = "samples";
    const SMOKE: &'static str = "row";
    type Options = EventsOptions;

    fn options() -> EventsOptions {
        EventsOptions {
            spin: Duration::from_micros(50),
            batches: 3,
            events: 5_000,
            subscribers: 100,
            wake_ops: 2_000,
        }
    }

    fn quick(plan: &mut Plan<EventsOptions>) {
        plan.suite.batches = 1;
        plan.suite.events = 500;
        plan.suite.wake_ops = 200;
        plan.cpu_window = Duration::from_millis(40);
    }

    fn option(
        plan: &mut Plan<EventsOptions>,
        flag: &str,
        value: &mut dyn FnMut() -> Result<String, String>,
    ) -> Result<bool, String> {
        let o = &mut plan.suite;
        match flag {
            "--spin" => o.spin = Duration::from_micros(number(flag, value()?)?),
            "--batches" => o.batches = number(flag, value()?)?,
            "--events" => o.events = number(flag, value()?)?,
            "--subscribers" => {
                o.subscribers = usize::try_from(number(flag, value()?)?).map_err(|e| e.to_string())?;
            }
            "--wake-ops" => o.wake_ops = number(flag, value()?)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn no_throughput_verdict(plan: &Plan<EventsOptions>) -> Option<String> {
        // No throughput target: the figures are reported beside their baselines.
        plan.quick.then(|| "quick run".into())
    }

    fn measure(plan: &Plan<EventsOptions>) -> io::Result<Results> {
        let o = &plan.suite;
        let tallies: Tallies = Arc::default();
        let specs: Vec<Spec<'_>> = specs(o, &tallies).into_iter().filter(|s| plan.wants(&s.name)).collect();
        eprintln!(
            "{} rows; {} samples each in {} rounds after {} warm-up; throughput: {} x {} events or calls, ring {}",
            specs.len(),
            plan.iters,
            plan.rounds,
            plan.warmup,
            o.batches * plan.rounds,
            o.events,
            o.ring()
        );
        let shape = Batches {
            per_round: vec![o.batches; usize::try_from(plan.rounds).unwrap_or(usize::MAX)],
            units: o.events,
            warmup_units: o.events.div_ceil(4),
            unit_size: 1.0,
        };
        let mut r = Results::default();
        r.group(plan, specs, plan.rounds, Some(&shape))?;

        // Everything a resync said was missed, per row (every round, warm-up batches too).
        let tallies = std::mem::take(&mut *tallies.lock().unwrap_or_else(|p| p.into_inner()));
        for t in &r.throughput {
            if t.name.contains("_events_") {
                let mut sum = Tally::default();
                for (_, tally) in tallies.iter().filter(|(n, _)| *n == t.name) {
                    sum.add(tally);
                }
                r.counts.push(count(&t.name, MISSED, sum.missed as f64));
                r.counts.push(count(&t.name, "other resyncs", sum.resyncs as f64));
                r.counts.push(count(&t.name, "failed polls", sum.errors as f64));
                r.counts.push(count(&t.name, "events delivered", sum.delivered as f64));
            }
        }

        // Wake-ups on each path: a phase of its own, on fresh instances.
        for (mode, spin) in modes(o) {
            for (row, what) in
                [(format!("{mode}_call_64"), Mode::Call), (format!("{mode}_event_64"), Mode::Paced)]
            {
                if !plan.wants(&row) {
                    continue;
                }
                let mut b = EventsBench::new(what, spin, o.ring())?;
                b.run(o.wake_ops.div_ceil(4), None)?;
                let (parent, peer) = wakeups_per_op(&mut b, o.wake_ops)?;
                r.counts.push(count(&row, &format!("{WAKEUPS}: parent"), parent));
                r.counts.push(count(&row, &format!("{WAKEUPS}: peer"), peer));
            }
        }
        Ok(r)
    }

    fn describe(plan: &Plan<EventsOptions>, run: &RunInfo) {
        let o = &plan.suite;
        println!(
            "Over xen: (simulator), server in the peer process (domain 2), subscriber and caller in this one (domain 1, \
             with the simulated hypervisor). Latency: {} samples per row in {} interleaved rounds (each row on a fresh pair \
             of processes per round, after {} warm-up samples): a 64 B call one at a time, or a 64 B event published while \
             the subscriber's long poll waits, timed from the publisher's CLOCK_MONOTONIC stamp to the subscriber's stream. \
             Throughput: median of {} batches of {} events published as fast as the server can into a ring of {} (or {} calls, \
             {CALL_DEPTH} in flight), timed until every subscriber had every event. CPU = user+sys of both processes (all \
             threads). Wake-ups: voluntary context switches per op over {} ops. Runtime: current-thread in both processes. \
             Pinning: {:?}. Load average at start: {}, at end: {}. Took {:.0} s.",
            plan.iters,
            plan.rounds,
            plan.round_warmup(),
            o.batches * plan.rounds,
            o.events,
            o.ring(),
            o.events,
            o.wake_ops,
            run.pinning,
            run.load_start,
            run.load_end,
            run.took.as_secs_f64()
        );
    }

    fn report(plan: &Plan<EventsOptions>, results: &Results) {
        let value = |row: &str, what: &str| {
            results.counts.iter().find(|c| c.name == row && c.what == what).map(|c| c.value)
        };
        println!(
            "| latency (64 B) | p50 | p99 | CPU / op | wake-ups / op (parent + peer) | vs | ratio (p50) | ratio (p99) |"
        );
        println!("|---|---:|---:|---:|---:|---|---:|---:|");
        for r in &results.latency {
            let (vs, ratio, _) = results.latency_cells(r, None);
            let p99_ratio = r
                .versus
                .as_ref()
                .and_then(|v| results.latency_row(&v.base))
                .map(|b| format!("{:.2}x", r.stats.p99.as_secs_f64() / b.stats.p99.as_secs_f64().max(1e-12)))
                .unwrap_or_default();
            let wakeups = match (
                value(&r.name, &format!("{WAKEUPS}: parent")),
                value(&r.name, &format!("{WAKEUPS}: peer")),
            ) {
                (Some(a), Some(b)) => format!("{:.2} ({a:.2} + {b:.2})", a + b),
                _ => String::new(),
            };
            println!(
                "| {} | {} | {} | {} | {wakeups} | {vs} | {ratio} | {p99_ratio} |",
                r.name,
                fmt_us(r.stats.p50),
                fmt_us(r.stats.p99),
                fmt_us(r.stats.cpu_per_op)
            );
        }

        println!();
        println!(
            "| throughput (64 B) | subscribers | per subscriber (median) | min | max | all subscribers | CPU / event delivered | missed | vs | ratio |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|");
        let no_verdict = Self::no_throughput_verdict(plan);
        for t in &results.throughput {
            print_rate_row(results, t, plan.suite.subscribers, no_verdict.as_deref(), &value);
        }
    }
}

/// The modes: name prefix and the links' polling budget.
fn modes(o: &EventsOptions) -> [(String, Option<Duration>); 2] {
    [("xen_wakeup".to_string(), None), (format!("xen_spin{}us", o.spin.as_micros()), Some(o.spin))]
}

fn count(name: &str, what: &str, value: f64) -> CountRow {
    CountRow { name: name.into(), what: what.into(), value }
}

/// Subscribers of throughput row `name` (0 for the call rows).
fn subscribers_of(name: &str, many: usize) -> usize {
    if name.ends_with("_events_x1") {
        1
    } else if name.contains("_events_x") {
        many
    } else {
        0
    }
}

/// Every row of the suite, in the order measured; the throughput rows of events leave their
/// subscribers' tallies in `tallies` when they are dropped.
fn specs<'a>(o: &EventsOptions, tallies: &Tallies) -> Vec<Spec<'a>> {
    let ring = o.ring();
    let mut out = Vec::new();
    for (mode, spin) in modes(o) {
        let call = format!("{mode}_call_64");
        out.push(Spec::latency(
            &call,
            None,
            bench(move || EventsBench::new(Mode::Call, spin, ring).map(Latency)),
        ));
        out.push(Spec::latency(
            format!("{mode}_event_64"),
            vs(call.as_str(), None),
            bench(move || EventsBench::new(Mode::Paced, spin, ring).map(Latency)),
        ));
    }
    for (mode, spin) in modes(o) {
        let calls = format!("{mode}_calls_x{CALL_DEPTH}");
        let one = format!("{mode}_events_x1");
        out.push(Spec::throughput(
            &calls,
            None,
            bench(move || EventsBench::new(Mode::Call, spin, ring).map(|b| Throughput { b, row: None })),
        ));
        for (name, k, base) in [
            (one.clone(), 1, calls.clone()),
            (format!("{mode}_events_x{}", o.subscribers), o.subscribers, one.clone()),
        ] {
            let tallies = tallies.clone();
            let row = name.clone();
            out.push(Spec::throughput(
                name,
                vs(base, None),
                bench(move || {
                    let b = EventsBench::new(Mode::Burst(k), spin, ring)?;
                    Ok(Throughput { b, row: Some((row.clone(), tallies.clone())) })
                }),
            ));
        }
    }
    out
}

/// A latency row's instance.
struct Latency(EventsBench);

impl Bench for Latency {
    fn ping_pong(&mut self) -> Option<&mut dyn PingPong> {
        Some(&mut self.0)
    }
    fn cpu_time(&self) -> io::Result<Duration> {
        Ok(own_cpu_time()? + self.0.peer().cpu_time()?)
    }
}

/// A throughput row's instance; an events row hands its subscribers' tally over when dropped.
struct Throughput {
    b: EventsBench,
    row: Option<(String, Tallies)>,
}

impl Bench for Throughput {
    fn batch(&mut self, units: u64) -> Option<io::Result<Duration>> {
        Some(self.b.batch(units))
    }
    fn cpu_time(&self) -> io::Result<Duration> {
        Ok(own_cpu_time()? + self.b.peer().cpu_time()?)
    }
}

impl Drop for Throughput {
    fn drop(&mut self) {
        if let (Some((row, tallies)), Some(tally)) = (&self.row, self.b.tally()) {
            tallies.lock().unwrap_or_else(|p| p.into_inner()).push((row.clone(), tally));
        }
    }
}

/// Events (or calls) per second, in thousands or millions.
fn fmt_rate(r: f64) -> String {
    if r >= 1e6 { format!("{:.2} M/s", r / 1e6) } else { format!("{:.1} k/s", r / 1e3) }
}

/// One row of the throughput table: a row's rate is per subscriber (events every subscriber
/// had, per second); all subscribers together deliver that many times more.
fn print_rate_row(
    results: &Results,
    t: &RateRow,
    many: usize,
    no_verdict: Option<&str>,
    value: &dyn Fn(&str, &str) -> Option<f64>,
) {
    let (vs, ratio, _) = results.throughput_cells(t, no_verdict);
    let k = subscribers_of(&t.name, many);
    let per = k.max(1) as f64;
    let (subs, total) = match k {
        0 => (format!("({CALL_DEPTH} calls in flight)"), String::new()),
        k => (k.to_string(), fmt_rate(t.median * per)),
    };
    let cpu = t.cpu_per_unit().map_or_else(String::new, |c| fmt_us(c / u32::try_from(k.max(1)).unwrap_or(1)));
    let missed = value(&t.name, MISSED).map_or_else(String::new, |m| format!("{m:.0}"));
    // Many subscribers: what they all had, against what one subscriber had.
    let base = t.versus.as_ref().and_then(|v| results.throughput_row(&v.base));
    let ratio = match base {
        Some(b) if k > 1 => {
            format!("{ratio} per subscriber, {:.2}x all", t.median * per / b.median.max(1e-12))
        }
        _ => ratio,
    };
    println!(
        "| {} | {subs} | {} | {} | {} | {total} | {cpu} | {missed} | {vs} | {ratio} |",
        t.name,
        fmt_rate(t.median),
        fmt_rate(t.min()),
        fmt_rate(t.max())
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::tests::plan;

    #[test]
    fn events_are_compared_with_calls_of_the_same_mode_and_phase() {
        let o = EventsSuite::options();
        let all = specs(&o, &Arc::default());
        let find =
            |name: &str| all.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no row {name}"));
        for mode in ["xen_wakeup", "xen_spin50us"] {
            let lat = find(&format!("{mode}_event_64")).latency.clone().flatten();
            assert_eq!(lat, vs(format!("{mode}_call_64"), None));
            let one = find(&format!("{mode}_events_x1")).throughput.clone().flatten();
            assert_eq!(one, vs(format!("{mode}_calls_x32"), None));
            let many = find(&format!("{mode}_events_x100")).throughput.clone().flatten();
            assert_eq!(many, vs(format!("{mode}_events_x1"), None));
        }
        assert_eq!(subscribers_of("xen_wakeup_events_x1", 100), 1);
        assert_eq!(subscribers_of("xen_wakeup_events_x100", 100), 100);
        assert_eq!(subscribers_of("xen_wakeup_calls_x32", 100), 0);
    }

    #[test]
    fn quick_runs_are_small_and_the_ring_holds_a_batch() {
        let q = plan::<EventsSuite>(&["--quick"]);
        assert!(q.quick && q.suite.events <= 500 && q.suite.batches == 1 && q.suite.wake_ops <= 200);
        let p = plan::<EventsSuite>(&["--events", "70000", "--subscribers", "7", "--spin", "20"]);
        assert_eq!(
            (p.suite.events, p.suite.subscribers, p.suite.spin),
            (70_000, 7, Duration::from_micros(20))
        );
        assert!(p.suite.ring() >= p.suite.events);
        assert_eq!(EventsSuite::no_throughput_verdict(&q).as_deref(), Some("quick run"));
        assert_eq!(EventsSuite::no_throughput_verdict(&p), None);
    }
}
