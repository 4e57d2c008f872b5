//! RPC comparison harness: 64-byte `Echo` calls over dombus-rpc (`xen:` with wake-ups and with
//! adaptive polling, `unix:`, `tcp:`) against plain tarpc over Unix and TCP, measured in the
//! same run, interleaved; prints Markdown tables of call latency, pipelined calls/s, the cost of
//! each layer of the `xen:` path, and the targets.
//!
//! ```text
//! cargo run --release -p dombus-benches --bin rpc-compare            # 20,000 calls per row
//! cargo run --release -p dombus-benches --bin rpc-compare -- --quick # CI smoke run, every row
//! cargo run --release -p dombus-benches --bin rpc-compare -- --only tarpc_unix,xen_spin
//! ```
//!
//! Every row is a fresh pair of processes per round (server: the peer, client: this process),
//! see `dombus_benches::rpc`.

use std::io;
use std::time::{Duration, Instant};

use dombus_benches::link::LinkPingPong;
use dombus_benches::rpc::{Flavor, RpcPingPong, Stack, Transport};
use dombus_benches::{PingPong, Pinning, Sampler, Stats, fmt_us, own_cpu_time};
use dombus_rpc::Codec;

const USAGE: &str = "usage: rpc-compare [--quick] [--iters N] [--rounds N] [--calls N] [--depth N] \
                     [--spin US] [--runtime current|multi|multiN] [--pin split|same|none] [--only NAME[,NAME...]]";

/// What to run, and how long.
#[derive(Debug, Clone)]
struct Plan {
    /// Latency: warm-up calls and timed calls per row (over all rounds).
    warmup: u64,
    iters: u64,
    /// Interleaved rounds; every row is set up afresh in each.
    rounds: u64,
    /// Pipelined: timed batches per round, calls per batch, calls in flight.
    batches: u64,
    calls: u64,
    depth: usize,
    /// Length of the CPU-accounting phase of each latency row (over all rounds).
    cpu_window: Duration,
    /// Adaptive-polling budget of the `xen_spin` rows.
    spin: Duration,
    /// Runtime of both processes.
    flavor: Flavor,
    only: Vec<String>,
    pin: Option<Pinning>,
}

impl Plan {
    fn from_args() -> Result<Plan, String> {
        let mut plan = Plan {
            warmup: 2_000,
            iters: 20_000,
            rounds: 5,
            batches: 3,
            calls: 5_000,
            depth: 32,
            cpu_window: Duration::from_millis(300),
            spin: Duration::from_micros(50),
            flavor: Flavor::Current,
            only: Vec::new(),
            pin: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
            let number = |v: String| v.parse::<u64>().ok().filter(|&n| n > 0).ok_or(format!("bad {a} {v}"));
            match a.as_str() {
                "--quick" => {
                    plan.warmup = 50;
                    plan.iters = 300;
                    plan.rounds = 2;
                    plan.batches = 1;
                    plan.calls = 400;
                    plan.cpu_window = Duration::from_millis(40);
                }
                "--iters" => {
                    plan.iters = number(value()?)?;
                    plan.warmup = (plan.iters / 10).max(10);
                }
                "--rounds" => plan.rounds = number(value()?)?,
                "--calls" => plan.calls = number(value()?)?,
                "--depth" => plan.depth = usize::try_from(number(value()?)?).map_err(|e| e.to_string())?,
                "--spin" => plan.spin = Duration::from_micros(number(value()?)?),
                "--runtime" => plan.flavor = value()?.parse()?,
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
}

/// A benchmark instance: one-call-at-a-time round trips, and pipelined calls where supported.
trait Bench: PingPong {
    fn pipelined(&mut self, _calls: u64, _depth: usize) -> Option<io::Result<Duration>> {
        None
    }
}

impl Bench for RpcPingPong {
    fn pipelined(&mut self, calls: u64, depth: usize) -> Option<io::Result<Duration>> {
        Some(RpcPingPong::pipelined(self, calls, depth))
    }
}

impl Bench for LinkPingPong {}

type Make = Box<dyn Fn() -> io::Result<Box<dyn Bench>>>;

/// A target a row is held to.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// At least this many times faster (p50) than its baseline.
    Faster(f64),
    /// At least this many times the baseline's calls/s.
    Throughput(f64),
}

/// One row: what it measures and what it is compared with.
struct Spec {
    name: String,
    make: Make,
    /// Latency baseline (row name) and target.
    vs: Option<(&'static str, Option<Target>)>,
    /// Pipelined baseline and target.
    pipe_vs: Option<(&'static str, Option<Target>)>,
    pipelines: bool,
}

/// Measured numbers of one row.
struct Measured {
    stats: Stats,
    /// calls/s of every pipelined batch.
    rates: Vec<f64>,
    /// CPU of both processes per pipelined call.
    pipe_cpu: Option<Duration>,
}

fn rpc_row(name: &str, transport: Transport, stack: Stack, flavor: Flavor) -> (String, Make, bool) {
    let make: Make =
        Box::new(
            move || Ok(Box::new(RpcPingPong::with_runtime(transport, stack, flavor)?) as Box<dyn Bench>),
        );
    (name.to_string(), make, stack.pipelines())
}

fn specs(plan: &Plan) -> Vec<Spec> {
    let f = plan.flavor;
    let spin_us = plan.spin.as_micros();
    let wake = Transport::Xen { spin: None };
    let spin = Transport::Xen { spin: Some(plan.spin) };
    let bincode = Stack::Rpc(Codec::Bincode);
    let mut out = Vec::new();
    let mut add = |(name, make, pipelines): (String, Make, bool),
                   vs: Option<(&'static str, Option<Target>)>,
                   pipe_vs: Option<(&'static str, Option<Target>)>| {
        out.push(Spec { name, make, vs, pipe_vs, pipelines });
    };
    // Baselines and dombus-rpc over Unix and TCP.
    add(rpc_row("tarpc_unix_64", Transport::Unix, Stack::Tarpc, f), None, None);
    add(rpc_row("unix_raw_64", Transport::Unix, Stack::Raw, f), Some(("tarpc_unix_64", None)), None);
    add(rpc_row("unix_framed_64", Transport::Unix, Stack::Framed, f), Some(("tarpc_unix_64", None)), None);
    add(
        rpc_row("unix_64", Transport::Unix, bincode, f),
        Some(("tarpc_unix_64", None)),
        Some(("tarpc_unix_64", None)),
    );
    add(
        rpc_row("unix_postcard_64", Transport::Unix, Stack::Rpc(Codec::Postcard), f),
        Some(("unix_64", None)),
        Some(("unix_64", None)),
    );
    add(rpc_row("tarpc_tcp_64", Transport::Tcp, Stack::Tarpc, f), None, None);
    add(
        rpc_row("tcp_64", Transport::Tcp, bincode, f),
        Some(("tarpc_tcp_64", None)),
        Some(("tarpc_tcp_64", None)),
    );
    // The xen path, layer by layer, with wake-ups and with adaptive polling.
    let modes =
        [("xen_wakeup".to_string(), wake, None), (format!("xen_spin{spin_us}us"), spin, Some(plan.spin))];
    for (mode, transport, link_spin) in &modes {
        let cfg = LinkPingPong::config(*link_spin);
        let make: Make = Box::new(move || Ok(Box::new(LinkPingPong::new(64, &cfg)?) as Box<dyn Bench>));
        add((format!("{mode}_link_64"), make, false), None, None);
        add(rpc_row(&format!("{mode}_vsock_64"), *transport, Stack::Raw, f), None, None);
        add(rpc_row(&format!("{mode}_framed_64"), *transport, Stack::Framed, f), None, None);
        add(
            rpc_row(&format!("{mode}_tarpc_64"), *transport, Stack::Tarpc, f),
            Some(("tarpc_unix_64", None)),
            Some(("tarpc_unix_64", None)),
        );
        let (vs, pipe_vs) = if link_spin.is_some() {
            (Some(Target::Faster(7.0)), Some(Target::Throughput(3.0)))
        } else {
            (None, None)
        };
        add(
            rpc_row(&format!("{mode}_64"), *transport, bincode, f),
            Some(("tarpc_unix_64", vs)),
            Some(("tarpc_unix_64", pipe_vs)),
        );
    }
    out
}

fn run_rows(plan: &Plan, specs: &[Spec]) -> io::Result<Vec<Measured>> {
    let n = (plan.iters / plan.rounds).max(1);
    let warmup = (plan.warmup / plan.rounds).max(plan.warmup.min(200));
    let window = plan.cpu_window / u32::try_from(plan.rounds).unwrap_or(u32::MAX);
    let mut samplers = vec![Sampler::default(); specs.len()];
    let mut rates = vec![Vec::new(); specs.len()];
    let mut pipe_cpu = vec![(Duration::ZERO, 0u64); specs.len()];
    for round in 0..plan.rounds {
        eprintln!("round {}/{}", round + 1, plan.rounds);
        for (i, spec) in specs.iter().enumerate() {
            let mut bench =
                (spec.make)().map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", spec.name)))?;
            samplers[i].round(&mut *bench, warmup, n, window)?;
            if spec.pipelines {
                // Warm-up batch, then the timed ones; CPU over the timed ones.
                if let Some(r) = bench.pipelined(plan.calls.div_ceil(4), plan.depth) {
                    r?;
                }
                let cpu0 = own_cpu_time()? + bench.peer().cpu_time()?;
                for _ in 0..plan.batches {
                    if let Some(t) = bench.pipelined(plan.calls, plan.depth) {
                        rates[i].push(plan.calls as f64 / t?.as_secs_f64().max(1e-9));
                    }
                }
                let cpu = (own_cpu_time()? + bench.peer().cpu_time()?).saturating_sub(cpu0);
                pipe_cpu[i].0 += cpu;
                pipe_cpu[i].1 += plan.batches * plan.calls;
            }
            drop(bench);
        }
    }
    Ok(samplers
        .into_iter()
        .zip(rates)
        .zip(pipe_cpu)
        .map(|((s, mut r), (cpu, calls))| {
            r.sort_by(f64::total_cmp);
            let pipe_cpu = (calls > 0).then(|| Duration::from_secs_f64(cpu.as_secs_f64() / calls as f64));
            Measured { stats: s.stats(), rates: r, pipe_cpu }
        })
        .collect())
}

fn median(v: &[f64]) -> f64 {
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn target_cell(target: Option<Target>, ratio: f64) -> String {
    match target {
        None => String::new(),
        Some(Target::Faster(t)) => {
            let speedup = 1.0 / ratio.max(1e-12);
            let met = if speedup >= t { "met" } else { "**missed**" };
            format!("≥ {t}x faster: {met} ({speedup:.2}x)")
        }
        Some(Target::Throughput(t)) => {
            let met = if ratio >= t { "met" } else { "**missed**" };
            format!("≥ {t}x: {met}")
        }
    }
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 { format!("{:.2} M/s", r / 1e6) } else { format!("{:.1} k/s", r / 1e3) }
}

/// Signed difference of two p50s in µs.
fn delta(a: Duration, b: Duration) -> String {
    format!("{:+.2} µs", (a.as_secs_f64() - b.as_secs_f64()) * 1e6)
}

fn print(plan: &Plan, specs: &[Spec], m: &[Measured]) {
    let find = |name: &str| specs.iter().position(|s| s.name == name);
    println!("| benchmark (64 B echo) | p50 | p99 | CPU / call | vs | ratio (p50) | target |");
    println!("|---|---:|---:|---:|---|---:|---|");
    for (s, r) in specs.iter().zip(m) {
        let (vs, ratio, target) = match s.vs {
            None => ("(baseline)".to_string(), String::new(), String::new()),
            Some((base, target)) => match find(base) {
                None => (base.to_string(), "n/a".into(), String::new()),
                Some(b) => {
                    let ratio = r.stats.p50.as_secs_f64() / m[b].stats.p50.as_secs_f64().max(1e-12);
                    (base.to_string(), format!("{ratio:.2}x"), target_cell(target, ratio))
                }
            },
        };
        let vs = if s.vs.is_none() && s.name.starts_with("xen_") { String::new() } else { vs };
        println!(
            "| {} | {} | {} | {} | {vs} | {ratio} | {target} |",
            s.name,
            fmt_us(r.stats.p50),
            fmt_us(r.stats.p99),
            fmt_us(r.stats.cpu_per_op)
        );
    }

    println!();
    println!(
        "| pipelined ({} in flight) | median | min | max | CPU / call | vs | ratio | target |",
        plan.depth
    );
    println!("|---|---:|---:|---:|---:|---|---:|---|");
    for (s, r) in specs.iter().zip(m).filter(|(s, _)| s.pipelines) {
        let (vs, ratio, target) = match s.pipe_vs {
            None => ("(baseline)".to_string(), String::new(), String::new()),
            Some((base, target)) => match find(base).filter(|&b| !m[b].rates.is_empty()) {
                None => (base.to_string(), "n/a".into(), String::new()),
                Some(b) => {
                    let ratio = median(&r.rates) / median(&m[b].rates).max(1e-12);
                    (base.to_string(), format!("{ratio:.2}x"), target_cell(target, ratio))
                }
            },
        };
        println!(
            "| {} | {} | {} | {} | {} | {vs} | {ratio} | {target} |",
            s.name,
            fmt_rate(median(&r.rates)),
            fmt_rate(r.rates.first().copied().unwrap_or(0.0)),
            fmt_rate(r.rates.last().copied().unwrap_or(0.0)),
            r.pipe_cpu.map_or_else(String::new, fmt_us)
        );
    }

    // Where the time goes: p50 of each layer, and what each adds to the one below.
    let spin_us = plan.spin.as_micros();
    let columns = [
        ("xen wake-ups".to_string(), "xen_wakeup".to_string()),
        (format!("xen spin {spin_us} µs"), format!("xen_spin{spin_us}us")),
    ];
    let layers = [
        ("link", "link_64", "raw link, 64 B"),
        ("vsock", "vsock_64", "+ virtual-socket connection (mux)"),
        ("framed", "framed_64", "+ framing and bincode (tarpc's messages)"),
        ("tarpc", "tarpc_64", "+ tarpc dispatch (client task, server channel, task per call)"),
        ("rpc", "64", "+ dombus-rpc stack (preamble'd connection, tower, metrics, spans)"),
    ];
    let p50 = |name: &str| find(name).map(|i| m[i].stats.p50);
    let any = columns
        .iter()
        .any(|(_, prefix)| layers.iter().any(|(_, l, _)| p50(&format!("{prefix}_{l}")).is_some()));
    if any {
        println!();
        print!("| layer (p50) |");
        for (title, _) in &columns {
            print!(" {title} | Δ |");
        }
        println!();
        println!("|---|{}", "---:|---:|".repeat(columns.len()));
        for (k, (_, suffix, what)) in layers.iter().enumerate() {
            print!("| {what} |");
            for (_, prefix) in &columns {
                let here = p50(&format!("{prefix}_{suffix}"));
                let below = k.checked_sub(1).and_then(|j| p50(&format!("{prefix}_{}", layers[j].1)));
                let d = match (here, below) {
                    (Some(h), Some(b)) => delta(h, b),
                    _ => String::new(),
                };
                print!(" {} | {d} |", here.map_or_else(|| "–".into(), fmt_us));
            }
            println!();
        }
        // The same steps over Unix, for comparison (tarpc there uses its own transport).
        let unix = ["unix_raw_64", "unix_framed_64", "tarpc_unix_64", "unix_64"];
        if unix.iter().all(|n| p50(n).is_some()) {
            let v: Vec<Duration> = unix.iter().filter_map(|n| p50(n)).collect();
            println!(
                "\nOver Unix: raw {} → framed {} ({}) → plain tarpc {} ({}) → dombus-rpc {} ({}).",
                fmt_us(v[0]),
                fmt_us(v[1]),
                delta(v[1], v[0]),
                fmt_us(v[2]),
                delta(v[2], v[1]),
                fmt_us(v[3]),
                delta(v[3], v[2])
            );
        }
    }

    let spin_row = format!("xen_spin{spin_us}us_64");
    if let Some(i) = find(&spin_row) {
        let p = m[i].stats.p50;
        let met = if p <= Duration::from_micros(10) { "met" } else { "**missed**" };
        println!("\nTarget: {spin_row} p50 ≤ 10 µs: {met} ({}).", fmt_us(p));
    }
}

fn run(plan: &Plan) -> io::Result<()> {
    let pinning = dombus_benches::apply_pinning(plan.pin)?;
    let load_start = dombus_benches::load_average();
    let started = Instant::now();
    let specs: Vec<Spec> = specs(plan).into_iter().filter(|s| plan.wants(&s.name)).collect();
    eprintln!(
        "{} rows; {} calls each in {} rounds after {} warm-up; pipelined: {} x {} calls, {} in flight",
        specs.len(),
        plan.iters,
        plan.rounds,
        plan.warmup,
        plan.batches * plan.rounds,
        plan.calls,
        plan.depth
    );
    let measured = run_rows(plan, &specs)?;
    println!();
    println!(
        "{} calls per row, one at a time, in {} interleaved rounds (each row on a fresh pair of processes per round, \
         after {} warm-up calls); pipelined: median of {} batches of {} calls with {} in flight. \
         CPU = user+sys of both processes (all threads). Runtime: {} on both sides. Pinning: {pinning:?}. \
         Load average at start: {load_start}, at end: {}. Took {:.0} s.",
        plan.iters,
        plan.rounds,
        (plan.warmup / plan.rounds).max(plan.warmup.min(200)),
        plan.batches * plan.rounds,
        plan.calls,
        plan.depth,
        plan.flavor,
        dombus_benches::load_average(),
        started.elapsed().as_secs_f64()
    );
    println!();
    print(plan, &specs, &measured);
    Ok(())
}

fn main() {
    dombus_benches::run_child_if_requested();
    let plan = match Plan::from_args() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("rpc-compare: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&plan) {
        eprintln!("rpc-compare: {e}");
        std::process::exit(1);
    }
}
