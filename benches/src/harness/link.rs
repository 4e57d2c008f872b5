//! The link suite (`compare`): every two-process link and virtual-socket benchmark against the
//! baselines, with the targets stated as ratios to them.
//!
//! Rows: `eventfd_pingpong`, `shm_spin_64`/`_4k` and `memcpy_64k` (plus `memcpy_64k_cold` for
//! context) are the baselines; `link_wakeup_*` is compared with eventfd (target ≤ 1.3x),
//! `link_spin<N>us_*` with shm spin (target ≤ 2x), `link_stream_*` with memcpy (target ≥ 0.25x).
//! Virtual sockets: `vsock_wakeup_64` (one connection) with `link_wakeup_64`, and with 100 and
//! 10,000 idle connections beside it with `vsock_wakeup_64` (target ≤ 1.2x: the cost of a
//! wake-up is flat in the number of connections); `vsock_stream_64k_*` with `link_stream_64k*`.

use std::io;
use std::time::Duration;

use super::{
    Batches, Bench, Plan, Results, RunInfo, Spec, Suite, Target, VERDICT_ROUNDS, VERDICT_SAMPLES, bench,
    latency, vs,
};
use crate::baseline::{CHUNK, EventfdPingPong, Memcpy, ShmSpinPingPong, ShmStream};
use crate::link::{LinkPingPong, LinkStream, VsockPingPong, VsockStreams};
use crate::{fmt_us, own_cpu_time};

/// A throughput target is judged only on at least this many batches ...
const VERDICT_BATCHES: u64 = 5;
/// ... of at least this many 64 KiB chunks.
const VERDICT_CHUNKS: u64 = 256;

/// The link suite.
#[derive(Debug)]
pub struct LinkSuite;

/// The link suite's own options.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// Timed batches of the throughput benchmarks (over all rounds) ...
    pub batches: u64,
    /// ... and 64 KiB chunks per batch.
    pub chunks: u64,
    /// Spin budgets (µs) of the 64-byte adaptive-polling sweep; the first 50 µs one (or the
    /// first) is also used for 4 KiB and the stream.
    pub spins: Vec<u64>,
}

impl LinkOptions {
    /// The spin budget used for the 4 KiB and stream rows.
    fn main_spin(&self) -> Duration {
        let us = self.spins.iter().copied().find(|&s| s == 50).or(self.spins.first().copied()).unwrap_or(50);
        Duration::from_micros(us)
    }
}

/// Rounds of the throughput group: no more than there are batches.
fn throughput_rounds(plan: &Plan<LinkOptions>) -> u64 {
    plan.suite.batches.clamp(1, plan.rounds)
}

/// `batches` spread over `rounds`, the first rounds taking one more where they do not divide
/// evenly.
fn spread(batches: u64, rounds: u64) -> Vec<u64> {
    (0..rounds).map(|i| batches / rounds + u64::from(i < batches % rounds)).collect()
}

impl Suite for LinkSuite {
    const NAME: &'static str = "compare";
    const USAGE: &'static str =
        "usage: compare [--quick] [--iters N] [--spin US[,US...]] [--only NAME[,NAME...]]";
    const SAMPLES: &'static str = "round trips";
    const SMOKE: &'static str = "path";
    type Options = LinkOptions;

    fn options() -> LinkOptions {
        LinkOptions { batches: 9, chunks: 512, spins: vec![5, 20, 50, 200] }
    }

    fn quick(plan: &mut Plan<LinkOptions>) {
        plan.suite.batches = 3;
        plan.suite.chunks = 16;
        plan.suite.spins = vec![50];
        plan.cpu_window = Duration::from_millis(50);
    }

    fn option(
        plan: &mut Plan<LinkOptions>,
        flag: &str,
        value: &mut dyn FnMut() -> Result<String, String>,
    ) -> Result<bool, String> {
        match flag {
            "--spin" => {
                let v = value()?;
                plan.suite.spins = v
                    .split(',')
                    .map(|s| s.parse().map_err(|_| format!("bad --spin {v}")))
                    .collect::<Result<_, _>>()?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn no_throughput_verdict(plan: &Plan<LinkOptions>) -> Option<String> {
        let rounds = throughput_rounds(plan);
        let LinkOptions { batches, chunks, .. } = plan.suite;
        if plan.quick {
            Some("quick run".into())
        } else if batches < VERDICT_BATCHES || rounds < VERDICT_ROUNDS || chunks < VERDICT_CHUNKS {
            Some(format!(
                "{batches} batches of {chunks} chunks in {rounds} rounds: a verdict needs ≥ {VERDICT_BATCHES} of \
                 ≥ {VERDICT_CHUNKS} in ≥ {VERDICT_ROUNDS}"
            ))
        } else {
            None
        }
    }

    fn measure(plan: &Plan<LinkOptions>) -> io::Result<Results> {
        let mut r = Results::default();
        let main_spin = plan.suite.main_spin();
        let spin_us = main_spin.as_micros();
        let wake = LinkPingPong::config(None);
        let spin = LinkPingPong::config(Some(main_spin));

        eprintln!(
            "wake-ups, link and virtual sockets ({} round trips each after {} warm-up, {} rounds)",
            plan.iters, plan.warmup, plan.rounds
        );
        // One phase: every ratio below compares rows whose rounds alternate.
        let vs_eventfd = |target| vs("eventfd_pingpong", target);
        r.group(
            plan,
            vec![
                Spec::latency("eventfd_pingpong", None, latency(EventfdPingPong::new)),
                Spec::latency(
                    "link_wakeup_64",
                    vs_eventfd(Some(Target::AtMost(1.3))),
                    latency(|| LinkPingPong::new(64, &wake)),
                ),
                Spec::latency("link_wakeup_4k", vs_eventfd(None), latency(|| LinkPingPong::new(4096, &wake))),
                Spec::latency(
                    "vsock_wakeup_64",
                    vs("link_wakeup_64", None),
                    latency(|| VsockPingPong::new(0)),
                ),
                Spec::latency(
                    "vsock_wakeup_64_idle100",
                    vs("vsock_wakeup_64", None),
                    latency(|| VsockPingPong::new(100)),
                ),
                Spec::latency(
                    "vsock_wakeup_64_idle10000",
                    vs("vsock_wakeup_64", Some(Target::AtMost(1.2))),
                    latency(|| VsockPingPong::new(10_000)),
                ),
            ],
            plan.rounds,
            None,
        )?;

        eprintln!("polling");
        let mut group = vec![Spec::latency("shm_spin_64", None, latency(|| ShmSpinPingPong::new(64)))];
        for &us in &plan.suite.spins {
            let cfg = LinkPingPong::config(Some(Duration::from_micros(us)));
            let make = latency(move || LinkPingPong::new(64, &cfg));
            group.push(Spec::latency(
                format!("link_spin{us}us_64"),
                vs("shm_spin_64", Some(Target::AtMost(2.0))),
                make,
            ));
        }
        r.group(plan, group, plan.rounds, None)?;
        r.group(
            plan,
            vec![
                Spec::latency("shm_spin_4k", None, latency(|| ShmSpinPingPong::new(4096))),
                Spec::latency(
                    format!("link_spin{spin_us}us_4k"),
                    vs("shm_spin_4k", Some(Target::AtMost(2.0))),
                    latency(|| LinkPingPong::new(4096, &spin)),
                ),
            ],
            plan.rounds,
            None,
        )?;

        let LinkOptions { batches, chunks, .. } = plan.suite;
        eprintln!(
            "throughput, link and virtual sockets ({batches} batches of {chunks} x 64 KiB; over virtual sockets \
             the same batches spread over the connections)"
        );
        let rounds = throughput_rounds(plan);
        let per_round = spread(batches, rounds);
        let shape =
            Batches { per_round, units: chunks, warmup_units: chunks.min(64), unit_size: CHUNK as f64 };
        let vs_memcpy = vs("memcpy_64k", Some(Target::AtLeast(0.25)));
        let vs_link = vs("link_stream_64k", None);
        let vs_link_spin = vs(format!("link_stream_64k_spin{spin_us}us"), None);
        r.group(
            plan,
            vec![
                Spec::throughput("memcpy_64k", None, bench(|| Ok(Memcpy::new()))),
                Spec::throughput("memcpy_64k_cold", None, bench(|| Ok(Memcpy::cold()))),
                Spec::throughput("shm_stream_64k", None, bench(ShmStream::new)),
                Spec::throughput("link_stream_64k", vs_memcpy.clone(), bench(|| LinkStream::new(None))),
                Spec::throughput(
                    format!("link_stream_64k_spin{spin_us}us"),
                    vs_memcpy,
                    bench(move || LinkStream::new(Some(main_spin))),
                ),
                Spec::throughput(
                    "vsock_stream_64k_x1",
                    vs_link.clone(),
                    bench(|| VsockStreams::new(1, None)),
                ),
                Spec::throughput("vsock_stream_64k_x16", vs_link, bench(|| VsockStreams::new(16, None))),
                Spec::throughput(
                    format!("vsock_stream_64k_x16_spin{spin_us}us"),
                    vs_link_spin,
                    bench(move || VsockStreams::new(16, Some(main_spin))),
                ),
            ],
            rounds,
            Some(&shape),
        )?;
        Ok(r)
    }

    fn describe(plan: &Plan<LinkOptions>, run: &RunInfo) {
        println!(
            "{} round trips per row in {} interleaved rounds (each on a fresh set-up, after {} warm-up round trips); throughput: median of {} batches of {} x 64 KiB. \
             CPU = user+sys of both processes (all threads), over a separate phase of at least {} ms. \
             Pinning: {:?}. Load average at start: {}, at end: {}.",
            plan.iters,
            plan.rounds,
            plan.round_warmup(),
            plan.suite.batches,
            plan.suite.chunks,
            plan.cpu_window.as_millis(),
            run.pinning,
            run.load_start,
            run.load_end
        );
        println!(
            "Every ratio is to a baseline measured in the same run; rows and their baselines alternate \
             round by round unless marked \"separate phase\". Ratio (lo–hi): the pooled ratio, and the \
             lowest and highest of the round-by-round ratios. Targets get a verdict only in a full run \
             (≥ {VERDICT_SAMPLES} round trips per row in ≥ {VERDICT_ROUNDS} rounds; throughput ≥ {VERDICT_BATCHES} \
             batches of ≥ {VERDICT_CHUNKS} chunks), as a ratio to an interleaved baseline."
        );
    }

    fn report(plan: &Plan<LinkOptions>, results: &Results) {
        println!("| benchmark | p50 | p99 | CPU / round trip | cores busy | vs | ratio (p50) | target |");
        println!("|---|---:|---:|---:|---:|---|---:|---|");
        let no_verdict = plan.no_latency_verdict(Self::SAMPLES);
        for r in &results.latency {
            let (vs, ratio, target) = results.latency_cells(r, no_verdict.as_deref());
            println!(
                "| {} | {} | {} | {} | {:.2} | {vs} | {ratio} | {target} |",
                r.name,
                fmt_us(r.stats.p50),
                fmt_us(r.stats.p99),
                fmt_us(r.stats.cpu_per_op),
                r.stats.cores_busy
            );
        }
        println!();
        println!("| throughput (64 KiB chunks) | median | min | max | cores busy | vs | ratio | target |");
        println!("|---|---:|---:|---:|---:|---|---:|---|");
        let no_verdict = Self::no_throughput_verdict(plan);
        for t in &results.throughput {
            let (vs, ratio, target) = results.throughput_cells(t, no_verdict.as_deref());
            println!(
                "| {} | {:.2} GB/s | {:.2} GB/s | {:.2} GB/s | {:.2} | {vs} | {ratio} | {target} |",
                t.name,
                t.median / 1e9,
                t.min() / 1e9,
                t.max() / 1e9,
                t.cores_busy()
            );
        }
        // The stream target is stated against memcpy, but bytes that cross between two cores
        // can go no faster than the raw two-process stream: show that ratio too.
        if let Some(ceiling) = results.throughput_row("shm_stream_64k") {
            for t in results.throughput.iter().filter(|t| t.name.starts_with("link_stream")) {
                let vs = if t.phase == ceiling.phase {
                    "shm_stream_64k"
                } else {
                    "shm_stream_64k (separate phase)"
                };
                println!(
                    "| {} | {:.2} GB/s | | | | {vs} | {:.2}x | (the two-process ceiling) |",
                    t.name,
                    t.median / 1e9,
                    t.median / ceiling.median.max(1e-12)
                );
            }
        }
    }
}

impl Bench for Memcpy {
    fn batch(&mut self, chunks: u64) -> Option<io::Result<Duration>> {
        Some(Ok(self.run(chunks)))
    }
    fn cpu_time(&self) -> io::Result<Duration> {
        own_cpu_time()
    }
}

impl Bench for ShmStream {
    fn batch(&mut self, chunks: u64) -> Option<io::Result<Duration>> {
        Some(Ok(self.run(chunks)))
    }
    fn cpu_time(&self) -> io::Result<Duration> {
        Ok(own_cpu_time()? + self.peer().cpu_time()?)
    }
}

impl Bench for LinkStream {
    fn batch(&mut self, chunks: u64) -> Option<io::Result<Duration>> {
        Some(self.run(chunks))
    }
    fn cpu_time(&self) -> io::Result<Duration> {
        Ok(own_cpu_time()? + self.peer().cpu_time()?)
    }
}

impl Bench for VsockStreams {
    fn batch(&mut self, chunks: u64) -> Option<io::Result<Duration>> {
        Some(self.run(chunks))
    }
    fn cpu_time(&self) -> io::Result<Duration> {
        Ok(own_cpu_time()? + self.peer().cpu_time()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::tests::plan;

    #[test]
    fn only_full_runs_give_verdicts() {
        crate::harness::tests::only_full_runs_give_verdicts::<LinkSuite>(&["--rounds", "2"]);
    }

    #[test]
    fn throughput_batches_spread_over_the_rounds() {
        assert_eq!(spread(9, 5), [2, 2, 2, 2, 1]);
        assert_eq!(spread(3, 2), [2, 1]);
        assert_eq!(spread(10, 5), [2; 5]);
        assert_eq!(throughput_rounds(&plan::<LinkSuite>(&["--quick"])), 2);
        assert_eq!(spread(3, 2).iter().sum::<u64>(), plan::<LinkSuite>(&["--quick"]).suite.batches);
    }
}
