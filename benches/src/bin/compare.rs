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

use std::io;
use std::time::{Duration, Instant};

use dombus_benches::baseline::{CHUNK, EventfdPingPong, Memcpy, ShmSpinPingPong, ShmStream, bandwidth};
use dombus_benches::link::{LinkPingPong, LinkStream, VsockPingPong, VsockStreams};
use dombus_benches::{PingPong, Pinning, Sampler, Stats, fmt_us, own_cpu_time};

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
}

impl Plan {
    fn from_args() -> Result<Plan, String> {
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
        };
        let mut args = std::env::args().skip(1);
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

    /// The spin budget used for the 4 KiB and stream rows.
    fn main_spin(&self) -> Duration {
        let us = self.spins.iter().copied().find(|&s| s == 50).or(self.spins.first().copied()).unwrap_or(50);
        Duration::from_micros(us)
    }
}

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
    versus: Versus,
}

/// One throughput row (bytes per second over batches).
struct Tput {
    name: String,
    median: f64,
    min: f64,
    max: f64,
    cores_busy: f64,
    versus: Versus,
}

#[derive(Default)]
struct Results {
    rows: Vec<Row>,
    tputs: Vec<Tput>,
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
            let stats = sampler.stats();
            eprintln!("  {name}: p50 {} p99 {}", fmt_us(stats.p50), fmt_us(stats.p99));
            self.rows.push(Row { name, stats, versus });
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
        // Per row: bandwidth of every batch, CPU time and wall time.
        let mut acc: Vec<(Vec<f64>, Duration, Duration)> =
            vec![(Vec::new(), Duration::ZERO, Duration::ZERO); group.len()];
        let rounds = u64::try_from(plan.batches).unwrap_or(1).clamp(1, plan.rounds);
        for round in 0..rounds {
            let batches = plan.batches / rounds as usize
                + usize::from((round as usize) < plan.batches % rounds as usize);
            for ((_, _, make), (bw, cpu, wall)) in group.iter().zip(&mut acc) {
                let mut bench = make()?;
                bench.run(plan.chunks.min(64))?; // warm-up
                let cpu0 = bench.cpu_time()?;
                let start = Instant::now();
                for _ in 0..batches {
                    let t = bench.run(plan.chunks)?;
                    bw.push(bandwidth(plan.chunks * CHUNK as u64, t));
                }
                *wall += start.elapsed();
                *cpu += bench.cpu_time()?.saturating_sub(cpu0);
            }
        }
        for ((name, versus, _), (mut v, cpu, wall)) in group.into_iter().zip(acc) {
            v.sort_by(f64::total_cmp);
            let median = v.get(v.len() / 2).copied().unwrap_or(0.0);
            let (min, max) = (v.first().copied().unwrap_or(0.0), v.last().copied().unwrap_or(0.0));
            let cores_busy = cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9);
            eprintln!("  {name}: {:.2} GB/s", median / 1e9);
            self.tputs.push(Tput { name, median, min, max, cores_busy, versus });
        }
        Ok(())
    }

    fn print(&self) {
        println!("| benchmark | p50 | p99 | CPU / round trip | cores busy | vs | ratio (p50) | target |");
        println!("|---|---:|---:|---:|---:|---|---:|---|");
        for r in &self.rows {
            let base = r.versus.as_ref().and_then(|(b, _)| self.rows.iter().find(|x| x.name == *b));
            let ratio = base.map(|b| r.stats.p50.as_secs_f64() / b.stats.p50.as_secs_f64().max(1e-12));
            let (vs, ratio, target) = columns(&r.versus, ratio, false);
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
        for t in &self.tputs {
            let base = t.versus.as_ref().and_then(|(b, _)| self.tputs.iter().find(|x| x.name == *b));
            let ratio = base.map(|b| t.median / b.median.max(1e-12));
            let (vs, ratio, target) = columns(&t.versus, ratio, true);
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
                println!(
                    "| {} | {:.2} GB/s | | | | shm_stream_64k | {:.2}x | (same-run ceiling) |",
                    t.name,
                    t.median / 1e9,
                    t.median / ceiling.median.max(1e-12)
                );
            }
        }
    }
}

/// The "vs", "ratio" and "target" cells of a row.
fn columns(versus: &Versus, ratio: Option<f64>, higher_is_better: bool) -> (String, String, String) {
    let Some((base, target)) = versus else {
        return ("(baseline)".into(), String::new(), String::new());
    };
    let Some(ratio) = ratio else {
        return (base.clone(), "n/a".into(), String::new());
    };
    let target = match target {
        None => String::new(),
        Some(t) => {
            let met = if higher_is_better { ratio >= *t } else { ratio <= *t };
            let op = if higher_is_better { "≥" } else { "≤" };
            format!("{op} {t}x: {}", if met { "met" } else { "**missed**" })
        }
    };
    (base.clone(), format!("{ratio:.2}x"), target)
}

fn run(plan: &Plan) -> io::Result<()> {
    let pinning = dombus_benches::apply_pinning(plan.pin)?;
    let load_start = dombus_benches::load_average();
    let mut r = Results::default();
    let wake = LinkPingPong::config(None);
    let spin = LinkPingPong::config(Some(plan.main_spin()));
    let spin_us = plan.main_spin().as_micros();

    eprintln!(
        "wake-ups ({} round trips each after {} warm-up, {} rounds)",
        plan.iters, plan.warmup, plan.rounds
    );
    let vs_eventfd = |target| vs("eventfd_pingpong", target);
    r.latency_group(
        plan,
        vec![
            ("eventfd_pingpong".into(), None, lat(EventfdPingPong::new)),
            ("link_wakeup_64".into(), vs_eventfd(Some(1.3)), lat(|| LinkPingPong::new(64, &wake))),
            ("link_wakeup_4k".into(), vs_eventfd(None), lat(|| LinkPingPong::new(4096, &wake))),
        ],
    )?;

    eprintln!("virtual sockets (wake-ups)");
    r.latency_group(
        plan,
        vec![
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

    eprintln!("throughput ({} batches of {} x 64 KiB)", plan.batches, plan.chunks);
    let vs_memcpy = vs("memcpy_64k", Some(0.25));
    let main_spin = plan.main_spin();
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
        ],
    )?;
    eprintln!("virtual-socket throughput (the same batches spread over the connections)");
    let vs_link = vs("link_stream_64k", None);
    let vs_link_spin = vs(format!("link_stream_64k_spin{spin_us}us"), None);
    r.throughput_group(
        plan,
        vec![
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
    println!();
    r.print();
    Ok(())
}

fn main() {
    dombus_benches::run_child_if_requested();
    let plan = match Plan::from_args() {
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
