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
use dombus_benches::{PingPong, Pinning, Sampler, Stats, fmt_us, median, own_cpu_time};
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
    /// `--quick`: a smoke run of every row, never a verdict.
    quick: bool,
}

/// A target is judged only on runs with at least this many calls per row ...
const VERDICT_CALLS: u64 = 10_000;
/// ... in at least this many interleaved rounds ...
const VERDICT_ROUNDS: u64 = 3;
/// ... and, for pipelined targets, at least this many timed batches of ...
const VERDICT_BATCHES: u64 = 5;
/// ... at least this many calls.
const VERDICT_BATCH_CALLS: u64 = 1_000;
/// The absolute latency target of issue 5 (`xen:` with adaptive polling): reported beside the
/// measured p50, never judged (absolute times move between hosts and between runs).
const ABSOLUTE_TARGET: Duration = Duration::from_micros(10);

impl Plan {
    /// The plan the command-line arguments (without the program name) ask for.
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Plan, String> {
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
            quick: false,
        };
        let mut args = args.into_iter();
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
                    plan.quick = true;
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

    /// Why this run gives no verdict on latency targets, if it gives none.
    fn no_latency_verdict(&self) -> Option<String> {
        if self.quick {
            Some("quick run".into())
        } else if self.iters < VERDICT_CALLS || self.rounds < VERDICT_ROUNDS {
            Some(format!(
                "{} calls in {} rounds: a verdict needs ≥ {VERDICT_CALLS} in ≥ {VERDICT_ROUNDS}",
                self.iters, self.rounds
            ))
        } else {
            None
        }
    }

    /// Why this run gives no verdict on pipelined targets, if it gives none.
    fn no_pipelined_verdict(&self) -> Option<String> {
        let batches = self.batches * self.rounds;
        if self.quick {
            Some("quick run".into())
        } else if batches < VERDICT_BATCHES
            || self.rounds < VERDICT_ROUNDS
            || self.calls < VERDICT_BATCH_CALLS
        {
            Some(format!(
                "{batches} batches of {} calls in {} rounds: a verdict needs ≥ {VERDICT_BATCHES} of \
                 ≥ {VERDICT_BATCH_CALLS} in ≥ {VERDICT_ROUNDS}",
                self.calls, self.rounds
            ))
        } else {
            None
        }
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
    /// Median call of each round, in round order.
    round_p50s: Vec<Duration>,
    /// calls/s of every pipelined batch, sorted.
    rates: Vec<f64>,
    /// Their median.
    rate: f64,
    /// The median calls/s of each round, in round order.
    round_rates: Vec<f64>,
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
    let mut round_rates = vec![Vec::new(); specs.len()];
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
                let first = rates[i].len();
                for _ in 0..plan.batches {
                    if let Some(t) = bench.pipelined(plan.calls, plan.depth) {
                        rates[i].push(plan.calls as f64 / t?.as_secs_f64().max(1e-9));
                    }
                }
                if rates[i].len() > first {
                    let this_round = median(&mut rates[i][first..].to_vec());
                    round_rates[i].push(this_round);
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
        .zip(rates.into_iter().zip(round_rates))
        .zip(pipe_cpu)
        .map(|((s, (mut r, round_rates)), (cpu, calls))| {
            let rate = median(&mut r);
            let pipe_cpu = (calls > 0).then(|| Duration::from_secs_f64(cpu.as_secs_f64() / calls as f64));
            let round_p50s = s.round_p50s().to_vec();
            Measured { stats: s.stats(), round_p50s, rate, rates: r, round_rates, pipe_cpu }
        })
        .collect())
}

/// The target cell of a row: `ratio` is the row's to its baseline (p50 for latency, calls/s for
/// pipelined), `rounds` the round-by-round ratios where tracked. Every row and its baseline
/// alternate round by round in this harness, so the only reasons for no verdict are the run's.
fn target_cell(target: Option<Target>, ratio: f64, rounds: &[f64], no_verdict: Option<&str>) -> String {
    let Some(target) = target else {
        return String::new();
    };
    let (what, t, meets): (String, f64, fn(f64, f64) -> bool) = match target {
        // A speed-up of t: the p50 ratio at most 1/t.
        Target::Faster(t) => (format!("≥ {t}x faster"), t, |r, t| 1.0 / r.max(1e-12) >= t),
        Target::Throughput(t) => (format!("≥ {t}x"), t, |r, t| r >= t),
    };
    // Details in parentheses: why there is no verdict, the speed-up, how many rounds agree.
    let mut details = Vec::new();
    if let Some(why) = no_verdict {
        details.push(why.to_string());
    }
    if let Target::Faster(_) = target {
        details.push(format!("{:.2}x faster", 1.0 / ratio.max(1e-12)));
    }
    if no_verdict.is_none() && !rounds.is_empty() {
        let agree = rounds.iter().filter(|&&r| meets(r, t)).count();
        details.push(format!("met in {agree}/{} rounds", rounds.len()));
    }
    let verdict = match no_verdict {
        Some(_) => "no verdict",
        None if meets(ratio, t) => "met",
        None => "**missed**",
    };
    if details.is_empty() {
        format!("{what}: {verdict}")
    } else {
        format!("{what}: {verdict} ({})", details.join("; "))
    }
}

/// The ratio cell: the pooled ratio, and the range of the round-by-round ratios if there are
/// several.
fn ratio_cell(ratio: f64, rounds: &[f64]) -> String {
    if rounds.len() > 1 {
        let lo = rounds.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = rounds.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{ratio:.2}x ({lo:.2}–{hi:.2})")
    } else {
        format!("{ratio:.2}x")
    }
}

/// What the harness says about the absolute latency target: the figure, never a verdict.
fn absolute_line(row: &str, p50: Duration, round_p50s: &[Duration]) -> String {
    format!(
        "{row}: p50 {} (rounds {}). Issue 5's p50 ≤ {} is an absolute time: reported, not judged \
         (absolute times move between hosts and runs; the ratios above are the verdicts).",
        fmt_us(p50),
        range_us(round_p50s),
        fmt_us(ABSOLUTE_TARGET)
    )
}

/// "lo–hi µs" of some durations.
fn range_us(v: &[Duration]) -> String {
    let lo = v.iter().min().copied().unwrap_or_default();
    let hi = v.iter().max().copied().unwrap_or_default();
    format!("{:.2}–{:.2} µs", lo.as_secs_f64() * 1e6, hi.as_secs_f64() * 1e6)
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
    let no_verdict = plan.no_latency_verdict();
    for (s, r) in specs.iter().zip(m) {
        let (vs, ratio, target) = match s.vs {
            None => ("(baseline)".to_string(), String::new(), String::new()),
            Some((base, target)) => match find(base) {
                None => (base.to_string(), "n/a".into(), String::new()),
                Some(b) => {
                    let ratio = r.stats.p50.as_secs_f64() / m[b].stats.p50.as_secs_f64().max(1e-12);
                    // Round i of the row and round i of its baseline ran in the same round.
                    let rounds: Vec<f64> = r
                        .round_p50s
                        .iter()
                        .zip(&m[b].round_p50s)
                        .map(|(x, y)| x.as_secs_f64() / y.as_secs_f64().max(1e-12))
                        .collect();
                    (
                        base.to_string(),
                        ratio_cell(ratio, &rounds),
                        target_cell(target, ratio, &rounds, no_verdict.as_deref()),
                    )
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
    let no_verdict = plan.no_pipelined_verdict();
    for (s, r) in specs.iter().zip(m).filter(|(s, _)| s.pipelines) {
        let (vs, ratio, target) = match s.pipe_vs {
            None => ("(baseline)".to_string(), String::new(), String::new()),
            Some((base, target)) => match find(base).filter(|&b| !m[b].rates.is_empty()) {
                None => (base.to_string(), "n/a".into(), String::new()),
                Some(b) => {
                    let ratio = r.rate / m[b].rate.max(1e-12);
                    // Round i of the row and round i of its baseline ran in the same round.
                    let rounds: Vec<f64> =
                        r.round_rates.iter().zip(&m[b].round_rates).map(|(x, y)| x / y.max(1e-12)).collect();
                    (
                        base.to_string(),
                        ratio_cell(ratio, &rounds),
                        target_cell(target, ratio, &rounds, no_verdict.as_deref()),
                    )
                }
            },
        };
        println!(
            "| {} | {} | {} | {} | {} | {vs} | {ratio} | {target} |",
            s.name,
            fmt_rate(r.rate),
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
        println!("\n{}", absolute_line(&spin_row, m[i].stats.p50, &m[i].round_p50s));
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
    println!(
        "Every row and its baseline alternate round by round, in the same run. Ratio (lo–hi): the \
         pooled ratio, and the lowest and highest of the round-by-round ratios. Targets get a verdict \
         only in a full run (≥ {VERDICT_CALLS} calls per row in ≥ {VERDICT_ROUNDS} rounds; pipelined ≥ \
         {VERDICT_BATCHES} batches of ≥ {VERDICT_BATCH_CALLS} calls), and only as ratios."
    );
    if plan.quick {
        println!("Quick run: a smoke test of every row; no verdicts.");
    }
    println!();
    print(plan, &specs, &measured);
    Ok(())
}

fn main() {
    dombus_benches::run_child_if_requested();
    let plan = match Plan::parse(std::env::args().skip(1)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Plan {
        Plan::parse(args.iter().map(|a| a.to_string())).unwrap()
    }

    #[test]
    fn only_full_runs_give_verdicts() {
        assert_eq!(plan(&[]).no_latency_verdict(), None);
        assert_eq!(plan(&[]).no_pipelined_verdict(), None);
        assert_eq!(plan(&["--quick"]).no_latency_verdict().as_deref(), Some("quick run"));
        assert_eq!(plan(&["--quick"]).no_pipelined_verdict().as_deref(), Some("quick run"));
        assert!(plan(&["--iters", "300"]).no_latency_verdict().is_some());
        assert!(plan(&["--rounds", "2"]).no_latency_verdict().is_some());
        assert!(plan(&["--calls", "400"]).no_pipelined_verdict().is_some());
    }

    #[test]
    fn a_target_cell_judges_only_when_allowed() {
        let faster = Some(Target::Faster(7.0));
        // 0.1x the baseline's p50 = 10x faster.
        let cell = target_cell(faster, 0.1, &[0.1, 0.2, 0.1], None);
        assert_eq!(cell, "≥ 7x faster: met (10.00x faster; met in 2/3 rounds)");
        let cell = target_cell(faster, 0.5, &[0.5], None);
        assert_eq!(cell, "≥ 7x faster: **missed** (2.00x faster; met in 0/1 rounds)");
        let cell = target_cell(faster, 0.1, &[0.1], Some("quick run"));
        assert_eq!(cell, "≥ 7x faster: no verdict (quick run; 10.00x faster)");
        let pipe = Some(Target::Throughput(3.0));
        assert_eq!(target_cell(pipe, 3.5, &[], None), "≥ 3x: met");
        assert_eq!(target_cell(pipe, 1.2, &[], None), "≥ 3x: **missed**");
        assert_eq!(target_cell(pipe, 3.5, &[], Some("quick run")), "≥ 3x: no verdict (quick run)");
        assert_eq!(target_cell(None, 3.5, &[], None), "");
    }

    #[test]
    fn the_absolute_target_is_reported_never_judged() {
        for us in [1, 10, 100] {
            let p50 = Duration::from_micros(us);
            let line = absolute_line("xen_spin50us_64", p50, &[p50, p50 * 2]);
            assert!(!line.contains("met") && !line.contains("missed"), "{line}");
            assert!(line.contains(&fmt_us(p50)), "{line}");
        }
    }

    #[test]
    fn ratio_cells_show_the_round_range() {
        assert_eq!(ratio_cell(1.07, &[1.03, 1.10, 1.05]), "1.07x (1.03–1.10)");
        assert_eq!(ratio_cell(1.07, &[1.07]), "1.07x");
    }
}
