//! Comparison harness: times every round trip of each two-process benchmark, and prints Markdown
//! tables of percentiles, CPU cost and the ratios the performance targets are stated in.
//!
//! ```text
//! cargo run --release -p dombus-benches --bin compare            # 20,000 round trips each
//! cargo run --release -p dombus-benches --bin compare -- --quick # CI smoke run, every path
//! cargo run --release -p dombus-benches --bin compare -- --iters 50000 --spin 10,50
//! cargo run --release -p dombus-benches --bin compare -- --only eventfd,link_wakeup
//! ```
//!
//! Rows: `eventfd_pingpong`, `shm_spin_64`/`_4k` and `memcpy_64k` (plus `memcpy_64k_cold` for
//! context) are the baselines; `link_wakeup_*` is compared with eventfd (target ≤ 1.3x),
//! `link_spin<N>us_*` with shm spin (target ≤ 2x), `link_stream_*` with memcpy (target ≥ 0.25x).
//! Virtual sockets: `vsock_wakeup_64` (one connection) with `link_wakeup_64`, and with 100 and
//! 10,000 idle connections beside it with `vsock_wakeup_64` (target ≤ 1.2x: the cost of a
//! wake-up is flat in the number of connections); `vsock_stream_64k_*` with `link_stream_64k*`.
//!
//! Evidence rules: a row and its baseline are measured in the same phase, their rounds
//! alternating on fresh set-ups (a ratio to a row of another phase is printed as such, without a
//! verdict); the ratio cell gives the pooled ratio and the range of round-by-round ratios; a
//! target is judged only in a full run (not `--quick`, enough samples and rounds), and only ever
//! as a ratio to a same-run baseline.

use std::io;
use std::time::{Duration, Instant};

use dombus_benches::baseline::{CHUNK, EventfdPingPong, Memcpy, ShmSpinPingPong, ShmStream, bandwidth};
use dombus_benches::link::{LinkPingPong, LinkStream, VsockPingPong, VsockStreams};
use dombus_benches::{PingPong, Pinning, Sampler, Stats, fmt_us, median, own_cpu_time};

const USAGE: &str = "usage: compare [--quick] [--iters N] [--spin US[,US...]] [--only NAME[,NAME...]]";

/// What to run, and how long.
#[derive(Debug, Clone)]
struct Plan {
    warmup: u64,
    iters: u64,
    /// Batches of the throughput benchmarks, and chunks per batch.
    batches: usize,
    chunks: u64,
    /// Length of the CPU-accounting phase of each latency benchmark.
    cpu_window: Duration,
    /// Spin budgets (µs) of the 64-byte adaptive-polling sweep; the first 50 µs one (or the
    /// first) is also used for 4 KiB and the stream.
    spins: Vec<u64>,
    /// Run only rows whose name contains one of these.
    only: Vec<String>,
    /// Where the two processes run (default: `DOMBUS_BENCH_PIN`, else split).
    pin: Option<Pinning>,
    /// Each group of compared rows is measured in this many interleaved rounds, every round on
    /// a fresh set-up, samples pooled: baseline and link see the same machine load.
    rounds: u64,
    /// `--quick`: a smoke run of every path, never a verdict.
    quick: bool,
}

impl Plan {
    /// The plan the command-line arguments (without the program name) ask for.
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Plan, String> {
        let mut plan = Plan {
            warmup: 2_000,
            iters: 20_000,
            batches: 9,
            chunks: 512,
            cpu_window: Duration::from_millis(300),
            spins: vec![5, 20, 50, 200],
            only: Vec::new(),
            pin: None,
            rounds: 5,
            quick: false,
        };
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
            match a.as_str() {
                "--quick" => {
                    plan.warmup = 50;
                    plan.iters = 300;
                    plan.batches = 3;
                    plan.chunks = 16;
                    plan.cpu_window = Duration::from_millis(50);
                    plan.spins = vec![50];
                    plan.rounds = 2;
                    plan.quick = true;
                }
                "--iters" => {
                    let v = value()?;
                    plan.iters = v.parse().map_err(|_| format!("bad --iters {v}"))?;
                    plan.warmup = (plan.iters / 10).max(10);
                }
                "--spin" => {
                    let v = value()?;
                    plan.spins = v
                        .split(',')
                        .map(|s| s.parse().map_err(|_| format!("bad --spin {v}")))
                        .collect::<Result<_, _>>()?;
                }
                "--rounds" => {
                    let v = value()?;
                    plan.rounds = v.parse().ok().filter(|&r| r > 0).ok_or(format!("bad --rounds {v}"))?;
                }
                "--pin" => plan.pin = Some(value()?.parse()?),
                "--only" => plan.only = value()?.split(',').map(str::to_string).collect(),
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other}\n{USAGE}")),
            }
        }
        Ok(plan)
    }

    fn wants(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| name.contains(o.as_str()))
    }

    /// Why this run gives no verdict on latency targets, if it gives none.
    fn no_latency_verdict(&self) -> Option<String> {
        if self.quick {
            Some("quick run".into())
        } else if self.iters < VERDICT_SAMPLES || self.rounds < VERDICT_ROUNDS {
            Some(format!(
                "{} round trips in {} rounds: a verdict needs ≥ {VERDICT_SAMPLES} in ≥ {VERDICT_ROUNDS}",
                self.iters, self.rounds
            ))
        } else {
            None
        }
    }

    /// Why this run gives no verdict on throughput targets, if it gives none.
    fn no_throughput_verdict(&self) -> Option<String> {
        let rounds = u64::try_from(self.batches).unwrap_or(1).clamp(1, self.rounds);
        if self.quick {
            Some("quick run".into())
        } else if self.batches < VERDICT_BATCHES || rounds < VERDICT_ROUNDS || self.chunks < VERDICT_CHUNKS {
            Some(format!(
                "{} batches of {} chunks in {rounds} rounds: a verdict needs ≥ {VERDICT_BATCHES} of \
                 ≥ {VERDICT_CHUNKS} in ≥ {VERDICT_ROUNDS}",
                self.batches, self.chunks
            ))
        } else {
            None
        }
    }

    /// The spin budget used for the 4 KiB and stream rows.
    fn main_spin(&self) -> Duration {
        let us = self.spins.iter().copied().find(|&s| s == 50).or(self.spins.first().copied()).unwrap_or(50);
        Duration::from_micros(us)
    }
}

/// A latency target is judged only on runs with at least this many round trips per row ...
const VERDICT_SAMPLES: u64 = 10_000;
/// ... in at least this many interleaved rounds (so do throughput targets).
const VERDICT_ROUNDS: u64 = 3;
/// A throughput target is judged only on at least this many batches ...
const VERDICT_BATCHES: usize = 5;
/// ... of at least this many 64 KiB chunks.
const VERDICT_CHUNKS: u64 = 256;

/// A baseline a row is compared with, and the target ratio if there is one.
type Versus = Option<(String, Option<f64>)>;

/// Compare with row `base`, against `target` if given.
fn vs(base: impl Into<String>, target: Option<f64>) -> Versus {
    Some((base.into(), target))
}

/// One latency row.
struct Row {
    name: String,
    stats: Stats,
    /// Median of each round, in round order.
    round_p50s: Vec<Duration>,
    versus: Versus,
    /// Which group of interleaved rows it was measured in: a ratio to a row of another phase
    /// compares measurements taken at different times, under different load.
    phase: usize,
}

/// One throughput row (bytes per second over batches).
struct Tput {
    name: String,
    median: f64,
    min: f64,
    max: f64,
    cores_busy: f64,
    /// Median of each round, in round order.
    round_medians: Vec<f64>,
    versus: Versus,
    /// As [`Row::phase`].
    phase: usize,
}

#[derive(Default)]
struct Results {
    rows: Vec<Row>,
    tputs: Vec<Tput>,
    /// Groups measured so far: each is one phase of interleaved rounds.
    phases: usize,
}

/// Makes a fresh instance of a latency benchmark.
type MakeLatency<'a> = Box<dyn Fn() -> io::Result<Box<dyn PingPong>> + 'a>;

/// A throughput benchmark: moves 64 KiB chunks; reports the CPU time of everything involved.
trait Throughput {
    fn run(&mut self, chunks: u64) -> io::Result<Duration>;
    fn cpu_time(&self) -> io::Result<Duration>;
}

impl Throughput for Memcpy {
    fn run(&mut self, chunks: u64) -> io::Result<Duration> {
        Ok(Memcpy::run(self, chunks))
    }
    fn cpu_time(&self) -> io::Result<Duration> {
        own_cpu_time()
    }
}

impl Throughput for ShmStream {
    fn run(&mut self, chunks: u64) -> io::Result<Duration> {
        Ok(ShmStream::run(self, chunks))
    }
    fn cpu_time(&self) -> io::Result<Duration> {
        Ok(own_cpu_time()? + self.peer().cpu_time()?)
    }
}

impl Throughput for LinkStream {
    fn run(&mut self, chunks: u64) -> io::Result<Duration> {
        LinkStream::run(self, chunks)
    }
    fn cpu_time(&self) -> io::Result<Duration> {
        Ok(own_cpu_time()? + self.peer().cpu_time()?)
    }
}

impl Throughput for VsockStreams {
    fn run(&mut self, chunks: u64) -> io::Result<Duration> {
        VsockStreams::run(self, chunks)
    }
    fn cpu_time(&self) -> io::Result<Duration> {
        Ok(own_cpu_time()? + self.peer().cpu_time()?)
    }
}

/// Makes a fresh instance of a throughput benchmark.
type MakeThroughput<'a> = Box<dyn Fn() -> io::Result<Box<dyn Throughput>> + 'a>;

/// Boxes a latency benchmark constructor.
fn lat<'a, B: PingPong + 'static>(make: impl Fn() -> io::Result<B> + 'a) -> MakeLatency<'a> {
    Box::new(move || Ok(Box::new(make()?) as Box<dyn PingPong>))
}

/// Boxes a throughput benchmark constructor.
fn tput<'a, B: Throughput + 'static>(make: impl Fn() -> io::Result<B> + 'a) -> MakeThroughput<'a> {
    Box::new(move || Ok(Box::new(make()?) as Box<dyn Throughput>))
}

impl Results {
    /// Measures the wanted rows of a group in `plan.rounds` interleaved rounds, each round on a
    /// fresh instance of each benchmark, and records the pooled statistics.
    fn latency_group(
        &mut self,
        plan: &Plan,
        group: Vec<(String, Versus, MakeLatency<'_>)>,
    ) -> io::Result<()> {
        let group: Vec<_> = group.into_iter().filter(|(name, ..)| plan.wants(name)).collect();
        let phase = self.phases;
        self.phases += 1;
        let mut samplers = vec![Sampler::default(); group.len()];
        let n = (plan.iters / plan.rounds).max(1);
        let warmup = (plan.warmup / plan.rounds).max(plan.warmup.min(200));
        let window = plan.cpu_window / u32::try_from(plan.rounds).unwrap_or(u32::MAX);
        for _ in 0..plan.rounds {
            for ((_, _, make), sampler) in group.iter().zip(&mut samplers) {
                let mut bench = make()?;
                sampler.round(&mut *bench, warmup, n, window)?;
            }
        }
        for ((name, versus, _), sampler) in group.into_iter().zip(samplers) {
            let round_p50s = sampler.round_p50s().to_vec();
            let stats = sampler.stats();
            eprintln!("  {name}: p50 {} p99 {}", fmt_us(stats.p50), fmt_us(stats.p99));
            self.rows.push(Row { name, stats, round_p50s, versus, phase });
        }
        Ok(())
    }

    /// Measures the wanted throughput rows: `plan.batches` timed batches of `plan.chunks` 64 KiB
    /// chunks each, spread over interleaved rounds on fresh instances.
    fn throughput_group(
        &mut self,
        plan: &Plan,
        group: Vec<(String, Versus, MakeThroughput<'_>)>,
    ) -> io::Result<()> {
        let group: Vec<_> = group.into_iter().filter(|(name, ..)| plan.wants(name)).collect();
        let phase = self.phases;
        self.phases += 1;
        // Per row: bandwidth of every batch, the median of each round, CPU time and wall time.
        let mut acc: Vec<(Vec<f64>, Vec<f64>, Duration, Duration)> =
            vec![(Vec::new(), Vec::new(), Duration::ZERO, Duration::ZERO); group.len()];
        let rounds = u64::try_from(plan.batches).unwrap_or(1).clamp(1, plan.rounds);
        for round in 0..rounds {
            let batches = plan.batches / rounds as usize
                + usize::from((round as usize) < plan.batches % rounds as usize);
            for ((_, _, make), (bw, round_medians, cpu, wall)) in group.iter().zip(&mut acc) {
                let mut bench = make()?;
                bench.run(plan.chunks.min(64))?; // warm-up
                let cpu0 = bench.cpu_time()?;
                let start = Instant::now();
                let first = bw.len();
                for _ in 0..batches {
                    let t = bench.run(plan.chunks)?;
                    bw.push(bandwidth(plan.chunks * CHUNK as u64, t));
                }
                round_medians.push(median(&mut bw[first..].to_vec()));
                *wall += start.elapsed();
                *cpu += bench.cpu_time()?.saturating_sub(cpu0);
            }
        }
        for ((name, versus, _), (mut v, round_medians, cpu, wall)) in group.into_iter().zip(acc) {
            let median = median(&mut v);
            let (min, max) = (v.first().copied().unwrap_or(0.0), v.last().copied().unwrap_or(0.0));
            let cores_busy = cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9);
            eprintln!("  {name}: {:.2} GB/s", median / 1e9);
            self.tputs.push(Tput { name, median, min, max, cores_busy, round_medians, versus, phase });
        }
        Ok(())
    }

    fn print(&self, plan: &Plan) {
        println!("| benchmark | p50 | p99 | CPU / round trip | cores busy | vs | ratio (p50) | target |");
        println!("|---|---:|---:|---:|---:|---|---:|---|");
        let no_verdict = plan.no_latency_verdict();
        for r in &self.rows {
            let base = r.versus.as_ref().and_then(|(b, _)| self.rows.iter().find(|x| x.name == *b));
            let cmp = base.map(|b| {
                // Round i of the row and round i of its baseline ran one after the other.
                let rounds = (b.phase == r.phase).then(|| {
                    r.round_p50s
                        .iter()
                        .zip(&b.round_p50s)
                        .map(|(x, y)| x.as_secs_f64() / y.as_secs_f64().max(1e-12))
                        .collect()
                });
                Compared { ratio: r.stats.p50.as_secs_f64() / b.stats.p50.as_secs_f64().max(1e-12), rounds }
            });
            let (vs, ratio, target) = columns(&r.versus, cmp, false, no_verdict.as_deref());
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
        let no_verdict = plan.no_throughput_verdict();
        for t in &self.tputs {
            let base = t.versus.as_ref().and_then(|(b, _)| self.tputs.iter().find(|x| x.name == *b));
            let cmp = base.map(|b| Compared {
                ratio: t.median / b.median.max(1e-12),
                // Round i of the row and round i of its baseline ran one after the other.
                rounds: (b.phase == t.phase).then(|| {
                    t.round_medians.iter().zip(&b.round_medians).map(|(x, y)| x / y.max(1e-12)).collect()
                }),
            });
            let (vs, ratio, target) = columns(&t.versus, cmp, true, no_verdict.as_deref());
            println!(
                "| {} | {:.2} GB/s | {:.2} GB/s | {:.2} GB/s | {:.2} | {vs} | {ratio} | {target} |",
                t.name,
                t.median / 1e9,
                t.min / 1e9,
                t.max / 1e9,
                t.cores_busy
            );
        }
        // The stream target is stated against memcpy, but bytes that cross between two cores
        // can go no faster than the raw two-process stream: show that ratio too.
        if let Some(ceiling) = self.tputs.iter().find(|t| t.name == "shm_stream_64k") {
            for t in self.tputs.iter().filter(|t| t.name.starts_with("link_stream")) {
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

/// A row's ratio to its baseline.
struct Compared {
    /// Of the pooled medians.
    ratio: f64,
    /// `None` if the baseline was measured in a separate phase; else the ratio of each round to
    /// the baseline's same round (empty where rounds are not tracked).
    rounds: Option<Vec<f64>>,
}

/// The "vs", "ratio" and "target" cells of a row. A target gets a verdict only from a full run
/// (`no_verdict` is `None`) and a baseline interleaved with the row; absolute figures never do.
fn columns(
    versus: &Versus,
    cmp: Option<Compared>,
    higher_is_better: bool,
    no_verdict: Option<&str>,
) -> (String, String, String) {
    let Some((base, target)) = versus else {
        return ("(baseline)".into(), String::new(), String::new());
    };
    let Some(cmp) = cmp else {
        return (base.clone(), "n/a".into(), String::new());
    };
    let meets = |ratio: f64, t: f64| if higher_is_better { ratio >= t } else { ratio <= t };
    let Some(rounds) = &cmp.rounds else {
        let target = target.map_or_else(String::new, |t| {
            let op = if higher_is_better { "≥" } else { "≤" };
            format!("{op} {t}x: no verdict (baseline from a separate phase)")
        });
        return (format!("{base} (separate phase)"), format!("{:.2}x", cmp.ratio), target);
    };
    let ratio = if rounds.len() > 1 {
        let lo = rounds.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = rounds.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{:.2}x ({lo:.2}–{hi:.2})", cmp.ratio)
    } else {
        format!("{:.2}x", cmp.ratio)
    };
    let target = match (target, no_verdict) {
        (None, _) => String::new(),
        (Some(t), why) => {
            let op = if higher_is_better { "≥" } else { "≤" };
            match why {
                Some(why) => format!("{op} {t}x: no verdict ({why})"),
                None => {
                    let verdict = if meets(cmp.ratio, *t) { "met" } else { "**missed**" };
                    let agree = rounds.iter().filter(|&&r| meets(r, *t)).count();
                    if rounds.is_empty() {
                        format!("{op} {t}x: {verdict}")
                    } else {
                        format!("{op} {t}x: {verdict} (met in {agree}/{} rounds)", rounds.len())
                    }
                }
            }
        }
    };
    (base.clone(), ratio, target)
}

fn run(plan: &Plan) -> io::Result<()> {
    let pinning = dombus_benches::apply_pinning(plan.pin)?;
    let load_start = dombus_benches::load_average();
    let mut r = Results::default();
    let wake = LinkPingPong::config(None);
    let spin = LinkPingPong::config(Some(plan.main_spin()));
    let spin_us = plan.main_spin().as_micros();

    eprintln!(
        "wake-ups, link and virtual sockets ({} round trips each after {} warm-up, {} rounds)",
        plan.iters, plan.warmup, plan.rounds
    );
    // One phase: every ratio below compares rows whose rounds alternate.
    let vs_eventfd = |target| vs("eventfd_pingpong", target);
    r.latency_group(
        plan,
        vec![
            ("eventfd_pingpong".into(), None, lat(EventfdPingPong::new)),
            ("link_wakeup_64".into(), vs_eventfd(Some(1.3)), lat(|| LinkPingPong::new(64, &wake))),
            ("link_wakeup_4k".into(), vs_eventfd(None), lat(|| LinkPingPong::new(4096, &wake))),
            ("vsock_wakeup_64".into(), vs("link_wakeup_64", None), lat(|| VsockPingPong::new(0))),
            ("vsock_wakeup_64_idle100".into(), vs("vsock_wakeup_64", None), lat(|| VsockPingPong::new(100))),
            (
                "vsock_wakeup_64_idle10000".into(),
                vs("vsock_wakeup_64", Some(1.2)),
                lat(|| VsockPingPong::new(10_000)),
            ),
        ],
    )?;

    eprintln!("polling");
    let mut group = vec![("shm_spin_64".to_string(), None, lat(|| ShmSpinPingPong::new(64)))];
    for &us in &plan.spins {
        let cfg = LinkPingPong::config(Some(Duration::from_micros(us)));
        let make = lat(move || LinkPingPong::new(64, &cfg));
        group.push((format!("link_spin{us}us_64"), vs("shm_spin_64", Some(2.0)), make));
    }
    r.latency_group(plan, group)?;
    r.latency_group(
        plan,
        vec![
            ("shm_spin_4k".into(), None, lat(|| ShmSpinPingPong::new(4096))),
            (
                format!("link_spin{spin_us}us_4k"),
                vs("shm_spin_4k", Some(2.0)),
                lat(|| LinkPingPong::new(4096, &spin)),
            ),
        ],
    )?;

    eprintln!(
        "throughput, link and virtual sockets ({} batches of {} x 64 KiB; over virtual sockets \
         the same batches spread over the connections)",
        plan.batches, plan.chunks
    );
    let vs_memcpy = vs("memcpy_64k", Some(0.25));
    let main_spin = plan.main_spin();
    let vs_link = vs("link_stream_64k", None);
    let vs_link_spin = vs(format!("link_stream_64k_spin{spin_us}us"), None);
    r.throughput_group(
        plan,
        vec![
            ("memcpy_64k".into(), None, tput(|| Ok(Memcpy::new()))),
            ("memcpy_64k_cold".into(), None, tput(|| Ok(Memcpy::cold()))),
            ("shm_stream_64k".into(), None, tput(ShmStream::new)),
            ("link_stream_64k".into(), vs_memcpy.clone(), tput(|| LinkStream::new(None))),
            (
                format!("link_stream_64k_spin{spin_us}us"),
                vs_memcpy,
                tput(move || LinkStream::new(Some(main_spin))),
            ),
            ("vsock_stream_64k_x1".into(), vs_link.clone(), tput(|| VsockStreams::new(1, None))),
            ("vsock_stream_64k_x16".into(), vs_link, tput(|| VsockStreams::new(16, None))),
            (
                format!("vsock_stream_64k_x16_spin{spin_us}us"),
                vs_link_spin,
                tput(move || VsockStreams::new(16, Some(main_spin))),
            ),
        ],
    )?;

    println!();
    println!(
        "{} round trips per row in {} interleaved rounds (each on a fresh set-up, after {} warm-up round trips); throughput: median of {} batches of {} x 64 KiB. \
         CPU = user+sys of both processes (all threads), over a separate phase of at least {} ms. \
         Pinning: {pinning:?}. Load average at start: {load_start}, at end: {}.",
        plan.iters,
        plan.rounds,
        (plan.warmup / plan.rounds).max(plan.warmup.min(200)),
        plan.batches,
        plan.chunks,
        plan.cpu_window.as_millis(),
        dombus_benches::load_average()
    );
    println!(
        "Every ratio is to a baseline measured in the same run; rows and their baselines alternate \
         round by round unless marked \"separate phase\". Ratio (lo–hi): the pooled ratio, and the \
         lowest and highest of the round-by-round ratios. Targets get a verdict only in a full run \
         (≥ {VERDICT_SAMPLES} round trips per row in ≥ {VERDICT_ROUNDS} rounds; throughput ≥ {VERDICT_BATCHES} \
         batches of ≥ {VERDICT_CHUNKS} chunks), as a ratio to an interleaved baseline."
    );
    if plan.quick {
        println!("Quick run: a smoke test of every path; no verdicts.");
    }
    println!();
    r.print(plan);
    Ok(())
}

fn main() {
    dombus_benches::run_child_if_requested();
    let plan = match Plan::parse(std::env::args().skip(1)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("compare: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&plan) {
        eprintln!("compare: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Plan {
        Plan::parse(args.iter().map(|a| a.to_string())).unwrap()
    }

    #[test]
    fn only_full_runs_give_verdicts() {
        assert_eq!(plan(&[]).no_latency_verdict(), None);
        assert_eq!(plan(&[]).no_throughput_verdict(), None);
        assert_eq!(plan(&["--quick"]).no_latency_verdict().as_deref(), Some("quick run"));
        assert_eq!(plan(&["--quick"]).no_throughput_verdict().as_deref(), Some("quick run"));
        assert!(plan(&["--iters", "300"]).no_latency_verdict().is_some());
        assert!(plan(&["--rounds", "2"]).no_latency_verdict().is_some());
        assert!(plan(&["--rounds", "2"]).no_throughput_verdict().is_some());
    }

    fn interleaved(ratio: f64, rounds: &[f64]) -> Option<Compared> {
        Some(Compared { ratio, rounds: Some(rounds.to_vec()) })
    }

    #[test]
    fn a_verdict_needs_a_full_run_and_an_interleaved_baseline() {
        let v = vs("eventfd_pingpong", Some(1.3));
        let (base, ratio, target) = columns(&v, interleaved(1.07, &[1.03, 1.4, 1.05]), false, None);
        assert_eq!(base, "eventfd_pingpong");
        assert_eq!(ratio, "1.07x (1.03–1.40)");
        assert_eq!(target, "≤ 1.3x: met (met in 2/3 rounds)");
        let (_, _, target) = columns(&v, interleaved(1.5, &[1.5]), false, None);
        assert_eq!(target, "≤ 1.3x: **missed** (met in 0/1 rounds)");

        let (_, _, target) = columns(&v, interleaved(1.07, &[1.07, 1.07]), false, Some("quick run"));
        assert_eq!(target, "≤ 1.3x: no verdict (quick run)");

        let apart = Some(Compared { ratio: 1.07, rounds: None });
        let (base, ratio, target) = columns(&v, apart, false, None);
        assert_eq!(base, "eventfd_pingpong (separate phase)");
        assert_eq!(ratio, "1.07x");
        assert_eq!(target, "≤ 1.3x: no verdict (baseline from a separate phase)");

        // Higher is better for throughput; no rounds tracked there.
        let v = vs("memcpy_64k", Some(0.25));
        assert_eq!(columns(&v, interleaved(0.3, &[]), true, None).2, "≥ 0.25x: met");
        assert_eq!(columns(&v, interleaved(0.2, &[]), true, None).2, "≥ 0.25x: **missed**");
        assert_eq!(
            columns(&v, interleaved(0.3, &[0.2, 0.3, 0.4]), true, None).2,
            "≥ 0.25x: met (met in 2/3 rounds)"
        );
        // A baseline that was not measured; a row without a baseline.
        assert_eq!(columns(&v, None, true, None), ("memcpy_64k".into(), "n/a".into(), String::new()));
        assert_eq!(columns(&None, None, true, None).0, "(baseline)");
    }
}
