//! The comparison harness behind the `compare` and `rpc-compare` binaries: the command line, the
//! interleaved rounds, the row and target model, and the verdict rules. A [`Suite`] supplies its
//! rows and its tables: [`link::LinkSuite`] (`compare`), [`rpc::RpcSuite`] (`rpc-compare`) and
//! [`events::EventsSuite`] (`events-compare`).
//!
//! Evidence rules: a row and its baseline are measured in the same phase, their rounds
//! alternating on fresh set-ups (a ratio to a row of another phase is printed as such, without a
//! verdict); the ratio cell gives the pooled ratio and the range of round-by-round ratios; a
//! target is judged only in a full run (not `--quick`, enough samples and rounds), and only ever
//! as a ratio to a same-run baseline.

use std::io;
use std::time::{Duration, Instant};

use crate::{PingPong, Pinning, Sampler, Stats, median};

pub mod events;
pub mod link;
pub mod rpc;

/// A latency target is judged only on runs with at least this many samples per row ...
pub const VERDICT_SAMPLES: u64 = 10_000;
/// ... in at least this many interleaved rounds (so are throughput targets).
pub const VERDICT_ROUNDS: u64 = 3;

/// One comparison binary: its options, its rows and its tables.
pub trait Suite {
    /// The binary's name, for messages.
    const NAME: &'static str;
    /// The usage line.
    const USAGE: &'static str;
    /// What one latency sample is ("round trips", "calls").
    const SAMPLES: &'static str;
    /// What `--quick` runs once each ("path", "row").
    const SMOKE: &'static str;
    /// The suite's own options.
    type Options;

    /// The suite's options before the command line.
    fn options() -> Self::Options;
    /// Cuts the suite's options down to a smoke run (`--quick`; the common part is cut already).
    fn quick(plan: &mut Plan<Self::Options>);
    /// Takes the suite's own command-line option `flag`, reading its value from `value`; false
    /// if the suite has no such option.
    fn option(
        plan: &mut Plan<Self::Options>,
        flag: &str,
        value: &mut dyn FnMut() -> Result<String, String>,
    ) -> Result<bool, String>;
    /// Why this run gives no verdict on throughput targets, if it gives none.
    fn no_throughput_verdict(plan: &Plan<Self::Options>) -> Option<String>;
    /// Measures every wanted row.
    fn measure(plan: &Plan<Self::Options>) -> io::Result<Results>;
    /// Prints the paragraph under the run: what was measured, how, on what machine.
    fn describe(plan: &Plan<Self::Options>, run: &RunInfo);
    /// Prints the tables.
    fn report(plan: &Plan<Self::Options>, results: &Results);
}

/// What to run, and how long: the options every suite has, and the suite's own.
#[derive(Debug, Clone)]
pub struct Plan<O> {
    /// Warm-up samples per row (over all rounds).
    pub warmup: u64,
    /// Timed samples per row (over all rounds).
    pub iters: u64,
    /// Each group of compared rows is measured in this many interleaved rounds, every round on a
    /// fresh set-up, samples pooled: a row and its baseline see the same machine load.
    pub rounds: u64,
    /// Length of the CPU-accounting phase of each latency row (over all rounds).
    pub cpu_window: Duration,
    /// Run only rows whose name contains one of these.
    pub only: Vec<String>,
    /// Where the two processes run (default: `DOMBUS_BENCH_PIN`, else split).
    pub pin: Option<Pinning>,
    /// `--quick`: a smoke run, never a verdict.
    pub quick: bool,
    /// The suite's own options.
    pub suite: O,
}

impl<O> Plan<O> {
    /// The plan the command-line arguments (without the program name) ask for.
    pub fn parse<S: Suite<Options = O>>(args: impl IntoIterator<Item = String>) -> Result<Plan<O>, String> {
        let mut plan = Plan {
            warmup: 2_000,
            iters: 20_000,
            rounds: 5,
            cpu_window: Duration::from_millis(300),
            only: Vec::new(),
            pin: None,
            quick: false,
            suite: S::options(),
        };
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
            match a.as_str() {
                "--quick" => {
                    plan.warmup = 50;
                    plan.iters = 300;
                    plan.rounds = 2;
                    plan.quick = true;
                    S::quick(&mut plan);
                }
                "--iters" => {
                    plan.iters = number(&a, value()?)?;
                    plan.warmup = (plan.iters / 10).max(10);
                }
                "--rounds" => plan.rounds = number(&a, value()?)?,
                "--pin" => plan.pin = Some(value()?.parse()?),
                "--only" => plan.only = value()?.split(',').map(str::to_string).collect(),
                "-h" | "--help" => {
                    println!("{}", S::USAGE);
                    std::process::exit(0);
                }
                other => {
                    if !S::option(&mut plan, other, &mut value)? {
                        return Err(format!("unknown argument {other}\n{}", S::USAGE));
                    }
                }
            }
        }
        Ok(plan)
    }

    /// True if row `name` is to be run.
    pub fn wants(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| name.contains(o.as_str()))
    }

    /// Why this run gives no verdict on latency targets, if it gives none; `samples` names them.
    pub fn no_latency_verdict(&self, samples: &str) -> Option<String> {
        if self.quick {
            Some("quick run".into())
        } else if self.iters < VERDICT_SAMPLES || self.rounds < VERDICT_ROUNDS {
            Some(format!(
                "{} {samples} in {} rounds: a verdict needs ≥ {VERDICT_SAMPLES} in ≥ {VERDICT_ROUNDS}",
                self.iters, self.rounds
            ))
        } else {
            None
        }
    }

    /// Warm-up samples of each row in each round.
    pub fn round_warmup(&self) -> u64 {
        (self.warmup / self.rounds).max(self.warmup.min(200))
    }
}

/// A whole positive number given to option `flag`.
pub fn number(flag: &str, v: String) -> Result<u64, String> {
    v.parse::<u64>().ok().filter(|&n| n > 0).ok_or(format!("bad {flag} {v}"))
}

/// Runs the comparison binary of suite `S`: the peer role if this process is a peer, else the
/// plan of the command line, its measurements and its tables. Exits 2 on a bad command line and
/// 1 if a measurement fails.
pub fn main<S: Suite>() {
    crate::run_child_if_requested();
    let plan = match Plan::parse::<S>(std::env::args().skip(1)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{}: {e}", S::NAME);
            std::process::exit(2);
        }
    };
    if let Err(e) = run::<S>(&plan) {
        eprintln!("{}: {e}", S::NAME);
        std::process::exit(1);
    }
}

/// The circumstances of a run, for the paragraph under it.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// Where the two processes ran.
    pub pinning: Pinning,
    /// Load averages at the start and at the end.
    pub load_start: String,
    /// See `load_start`.
    pub load_end: String,
    /// Wall time of the measurements.
    pub took: Duration,
}

fn run<S: Suite>(plan: &Plan<S::Options>) -> io::Result<()> {
    let pinning = crate::apply_pinning(plan.pin)?;
    let load_start = crate::load_average();
    let started = Instant::now();
    let results = S::measure(plan)?;
    let run = RunInfo { pinning, load_start, load_end: crate::load_average(), took: started.elapsed() };
    println!();
    S::describe(plan, &run);
    if plan.quick {
        println!("Quick run: a smoke test of every {}; no verdicts.", S::SMOKE);
    }
    println!();
    S::report(plan, &results);
    Ok(())
}

/// A target a row is held to, as a ratio to its baseline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// The ratio (latency: row / baseline) at most this.
    AtMost(f64),
    /// The ratio (throughput: row / baseline) at least this.
    AtLeast(f64),
    /// At least this many times faster (p50) than the baseline: the latency ratio at most 1/t.
    Faster(f64),
}

impl Target {
    /// How the target reads in its cell.
    fn what(self) -> String {
        match self {
            Target::AtMost(t) => format!("≤ {t}x"),
            Target::AtLeast(t) => format!("≥ {t}x"),
            Target::Faster(t) => format!("≥ {t}x faster"),
        }
    }

    /// True if `ratio` meets the target.
    fn met_by(self, ratio: f64) -> bool {
        match self {
            Target::AtMost(t) => ratio <= t,
            Target::AtLeast(t) => ratio >= t,
            Target::Faster(t) => 1.0 / ratio.max(1e-12) >= t,
        }
    }
}

/// The baseline a row is compared with (a row name), and the target if there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct Versus {
    /// The baseline row's name.
    pub base: String,
    /// The target, if the ratio has one.
    pub target: Option<Target>,
}

/// Compare with row `base`, against `target` if given.
pub fn vs(base: impl Into<String>, target: Option<Target>) -> Option<Versus> {
    Some(Versus { base: base.into(), target })
}

/// A benchmark instance, set up and ready, as the harness drives it.
pub trait Bench {
    /// The round-trip benchmark, for rows that measure latency.
    fn ping_pong(&mut self) -> Option<&mut dyn PingPong> {
        None
    }
    /// Runs `units` units of throughput work (64 KiB chunks, pipelined calls) and returns the
    /// wall time; `None` if the benchmark measures no throughput.
    fn batch(&mut self, _units: u64) -> Option<io::Result<Duration>> {
        None
    }
    /// CPU time (user + system, all threads) of every process involved so far.
    fn cpu_time(&self) -> io::Result<Duration>;
}

/// A latency-only benchmark as a [`Bench`].
struct Latency<B>(B);

impl<B: PingPong> Bench for Latency<B> {
    fn ping_pong(&mut self) -> Option<&mut dyn PingPong> {
        Some(&mut self.0)
    }
    fn cpu_time(&self) -> io::Result<Duration> {
        Ok(crate::own_cpu_time()? + self.0.peer_cpu_time()?)
    }
}

/// Makes a fresh instance of a benchmark.
pub type Make<'a> = Box<dyn Fn() -> io::Result<Box<dyn Bench>> + 'a>;

/// Boxes the constructor of a latency-only benchmark.
pub fn latency<'a, B: PingPong + 'static>(make: impl Fn() -> io::Result<B> + 'a) -> Make<'a> {
    Box::new(move || Ok(Box::new(Latency(make()?)) as Box<dyn Bench>))
}

/// Boxes the constructor of any [`Bench`].
pub fn bench<'a, B: Bench + 'static>(make: impl Fn() -> io::Result<B> + 'a) -> Make<'a> {
    Box::new(move || Ok(Box::new(make()?) as Box<dyn Bench>))
}

/// One row to measure: its name, its constructor, and what it is compared with.
pub struct Spec<'a> {
    /// The row's name (and the name other rows' [`Versus`] refer to).
    pub name: String,
    /// Makes a fresh instance for each round.
    pub make: Make<'a>,
    /// `Some` if the row measures latency: then its baseline, if any.
    pub latency: Option<Option<Versus>>,
    /// `Some` if the row measures throughput: then its baseline, if any.
    pub throughput: Option<Option<Versus>>,
}

impl<'a> Spec<'a> {
    /// A latency row compared with `versus`.
    pub fn latency(name: impl Into<String>, versus: Option<Versus>, make: Make<'a>) -> Spec<'a> {
        Spec { name: name.into(), make, latency: Some(versus), throughput: None }
    }

    /// A throughput row compared with `versus`.
    pub fn throughput(name: impl Into<String>, versus: Option<Versus>, make: Make<'a>) -> Spec<'a> {
        Spec { name: name.into(), make, latency: None, throughput: Some(versus) }
    }

    /// Also measures throughput, compared with `versus`.
    pub fn and_throughput(mut self, versus: Option<Versus>) -> Spec<'a> {
        self.throughput = Some(versus);
        self
    }
}

/// How the throughput of a group is measured.
#[derive(Debug, Clone)]
pub struct Batches {
    /// Timed batches in each round.
    pub per_round: Vec<u64>,
    /// Units of work (chunks, calls) per timed batch.
    pub units: u64,
    /// Units of the untimed warm-up batch of each round.
    pub warmup_units: u64,
    /// What one unit counts for in a rate (bytes per chunk; 1 for calls).
    pub unit_size: f64,
}

/// The latency of one row.
#[derive(Debug, Clone)]
pub struct LatencyRow {
    /// The row's name.
    pub name: String,
    /// Pooled statistics over all rounds.
    pub stats: Stats,
    /// Median of each round, in round order.
    pub round_p50s: Vec<Duration>,
    /// What it is compared with.
    pub versus: Option<Versus>,
    /// Which group of interleaved rows it was measured in: a ratio to a row of another phase
    /// compares measurements taken at different times, under different load.
    pub phase: usize,
}

/// The throughput of one row (units per second over batches).
#[derive(Debug, Clone)]
pub struct RateRow {
    /// The row's name.
    pub name: String,
    /// The rate of every timed batch, sorted.
    pub rates: Vec<f64>,
    /// Their median.
    pub median: f64,
    /// Median of each round, in round order.
    pub round_medians: Vec<f64>,
    /// CPU time of everything involved over the timed batches.
    pub cpu: Duration,
    /// Wall time of the timed batches.
    pub wall: Duration,
    /// Units in the timed batches.
    pub units: u64,
    /// What it is compared with.
    pub versus: Option<Versus>,
    /// As [`LatencyRow::phase`].
    pub phase: usize,
}

impl RateRow {
    /// The slowest batch.
    pub fn min(&self) -> f64 {
        self.rates.first().copied().unwrap_or(0.0)
    }

    /// The fastest batch.
    pub fn max(&self) -> f64 {
        self.rates.last().copied().unwrap_or(0.0)
    }

    /// CPU time over wall time of the timed batches: how many cores the row kept busy.
    pub fn cores_busy(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    /// CPU time per unit, if any unit was timed.
    pub fn cpu_per_unit(&self) -> Option<Duration> {
        (self.units > 0).then(|| Duration::from_secs_f64(self.cpu.as_secs_f64() / self.units as f64))
    }
}

/// A process's memory before and after a step that opened `count` things (connections,
/// links) through it.
#[derive(Debug, Clone)]
pub struct MemoryRow {
    /// The row's name.
    pub name: String,
    /// What the step opened.
    pub what: String,
    /// How many things it opened.
    pub count: u64,
    /// The process's memory before the step ...
    pub before: crate::agent::Memory,
    /// ... and after it.
    pub after: crate::agent::Memory,
}

impl MemoryRow {
    /// Growth per thing opened, in bytes, of the resident set, its anonymous part and its
    /// shared-memory part (negative if it shrank).
    pub fn per_unit(&self) -> (f64, f64, f64) {
        let n = self.count.max(1) as f64;
        let d = |a: u64, b: u64| (a as f64 - b as f64) / n;
        (
            d(self.after.rss, self.before.rss),
            d(self.after.anon, self.before.anon),
            d(self.after.shmem, self.before.shmem),
        )
    }
}

/// A figure a suite measured beside its latency and throughput rows: wake-ups per event, events
/// a resync said were missed.
#[derive(Debug, Clone, PartialEq)]
pub struct CountRow {
    /// The row it belongs to.
    pub name: String,
    /// What is counted.
    pub what: String,
    /// The figure.
    pub value: f64,
}

/// Everything measured in a run.
#[derive(Debug, Default)]
pub struct Results {
    /// Latency rows, in the order measured.
    pub latency: Vec<LatencyRow>,
    /// Throughput rows, in the order measured.
    pub throughput: Vec<RateRow>,
    /// Memory rows, in the order measured.
    pub memory: Vec<MemoryRow>,
    /// Other figures a suite measured beside its rows, in the order measured.
    pub counts: Vec<CountRow>,
    /// Groups measured so far: each is one phase of interleaved rounds.
    phases: usize,
}

/// Throughput bookkeeping of one row while its group runs.
#[derive(Default, Clone)]
struct RateAcc {
    rates: Vec<f64>,
    round_medians: Vec<f64>,
    cpu: Duration,
    wall: Duration,
    units: u64,
}

impl Results {
    /// Measures the wanted rows of `group` as one phase of `rounds` interleaved rounds, each
    /// round on a fresh instance of each row: latency as `plan` says, throughput as `batches`
    /// says (needed if a row measures throughput).
    pub fn group<O>(
        &mut self,
        plan: &Plan<O>,
        group: Vec<Spec<'_>>,
        rounds: u64,
        batches: Option<&Batches>,
    ) -> io::Result<()> {
        let group: Vec<_> = group.into_iter().filter(|s| plan.wants(&s.name)).collect();
        let phase = self.phases;
        self.phases += 1;
        let n = (plan.iters / plan.rounds).max(1);
        let warmup = plan.round_warmup();
        let window = plan.cpu_window / u32::try_from(plan.rounds).unwrap_or(u32::MAX);
        let mut samplers = vec![Sampler::default(); group.len()];
        let mut acc = vec![RateAcc::default(); group.len()];
        for round in 0..rounds {
            if rounds > 1 {
                eprintln!("  round {}/{rounds}", round + 1);
            }
            for ((spec, sampler), acc) in group.iter().zip(&mut samplers).zip(&mut acc) {
                let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", spec.name));
                let mut bench = (spec.make)().map_err(named)?;
                if let (Some(_), Some(pp)) = (&spec.latency, bench.ping_pong()) {
                    sampler.round(pp, warmup, n, window).map_err(named)?;
                }
                if let (Some(_), Some(b)) = (&spec.throughput, batches) {
                    let count =
                        usize::try_from(round).ok().and_then(|r| b.per_round.get(r)).copied().unwrap_or(0);
                    acc.round(&mut *bench, b, count).map_err(named)?;
                }
            }
        }
        for ((spec, sampler), acc) in group.into_iter().zip(samplers).zip(acc) {
            if let Some(versus) = spec.latency {
                let round_p50s = sampler.round_p50s().to_vec();
                let stats = sampler.stats();
                eprintln!(
                    "  {}: p50 {} p99 {}",
                    spec.name,
                    crate::fmt_us(stats.p50),
                    crate::fmt_us(stats.p99)
                );
                self.latency.push(LatencyRow { name: spec.name.clone(), stats, round_p50s, versus, phase });
            }
            if let Some(versus) = spec.throughput {
                let RateAcc { mut rates, round_medians, cpu, wall, units } = acc;
                let median = median(&mut rates);
                self.throughput.push(RateRow {
                    name: spec.name,
                    rates,
                    median,
                    round_medians,
                    cpu,
                    wall,
                    units,
                    versus,
                    phase,
                });
            }
        }
        Ok(())
    }

    /// The latency row called `name`.
    pub fn latency_row(&self, name: &str) -> Option<&LatencyRow> {
        self.latency.iter().find(|r| r.name == name)
    }

    /// The throughput row called `name`.
    pub fn throughput_row(&self, name: &str) -> Option<&RateRow> {
        self.throughput.iter().find(|r| r.name == name)
    }

    /// The "vs", "ratio (p50)" and "target" cells of latency row `r`.
    pub fn latency_cells(&self, r: &LatencyRow, no_verdict: Option<&str>) -> (String, String, String) {
        let base = r.versus.as_ref().and_then(|v| self.latency_row(&v.base));
        let cmp = base.map(|b| Compared {
            ratio: r.stats.p50.as_secs_f64() / b.stats.p50.as_secs_f64().max(1e-12),
            // Round i of the row and round i of its baseline ran one after the other.
            rounds: (b.phase == r.phase).then(|| {
                r.round_p50s
                    .iter()
                    .zip(&b.round_p50s)
                    .map(|(x, y)| x.as_secs_f64() / y.as_secs_f64().max(1e-12))
                    .collect()
            }),
        });
        columns(r.versus.as_ref(), cmp, no_verdict)
    }

    /// The "vs", "ratio" and "target" cells of throughput row `t`.
    pub fn throughput_cells(&self, t: &RateRow, no_verdict: Option<&str>) -> (String, String, String) {
        let base = t.versus.as_ref().and_then(|v| self.throughput_row(&v.base));
        let cmp = base.map(|b| Compared {
            ratio: t.median / b.median.max(1e-12),
            // Round i of the row and round i of its baseline ran one after the other.
            rounds: (b.phase == t.phase).then(|| {
                t.round_medians.iter().zip(&b.round_medians).map(|(x, y)| x / y.max(1e-12)).collect()
            }),
        });
        columns(t.versus.as_ref(), cmp, no_verdict)
    }
}

impl RateAcc {
    /// One round of one row: a warm-up batch, then `count` timed batches, with the CPU time of
    /// everything involved over the timed ones.
    fn round(&mut self, bench: &mut dyn Bench, b: &Batches, count: u64) -> io::Result<()> {
        let Some(warm) = bench.batch(b.warmup_units) else {
            return Ok(());
        };
        warm?;
        let cpu0 = bench.cpu_time()?;
        let start = Instant::now();
        let first = self.rates.len();
        for _ in 0..count {
            if let Some(t) = bench.batch(b.units) {
                self.rates.push(b.units as f64 * b.unit_size / t?.as_secs_f64().max(1e-9));
            }
        }
        if self.rates.len() > first {
            self.round_medians.push(median(&mut self.rates[first..].to_vec()));
        }
        self.wall += start.elapsed();
        self.cpu += bench.cpu_time()?.saturating_sub(cpu0);
        self.units += count * b.units;
        Ok(())
    }
}

/// A row's ratio to its baseline.
#[derive(Debug, Clone)]
pub struct Compared {
    /// Of the pooled figures.
    pub ratio: f64,
    /// `None` if the baseline was measured in a separate phase; else the ratio of each round to
    /// the baseline's same round (empty where rounds are not tracked).
    pub rounds: Option<Vec<f64>>,
}

/// The "vs", "ratio" and "target" cells of a row. A target gets a verdict only from a full run
/// (`no_verdict` is `None`) and a baseline interleaved with the row; absolute figures never do.
pub fn columns(
    versus: Option<&Versus>,
    cmp: Option<Compared>,
    no_verdict: Option<&str>,
) -> (String, String, String) {
    let Some(Versus { base, target }) = versus else {
        return ("(baseline)".into(), String::new(), String::new());
    };
    let Some(cmp) = cmp else {
        return (base.clone(), "n/a".into(), String::new());
    };
    match &cmp.rounds {
        None => (
            format!("{base} (separate phase)"),
            ratio_cell(cmp.ratio, &[]),
            target_cell(*target, cmp.ratio, &[], Some("baseline from a separate phase")),
        ),
        Some(rounds) => {
            (base.clone(), ratio_cell(cmp.ratio, rounds), target_cell(*target, cmp.ratio, rounds, no_verdict))
        }
    }
}

/// The target cell of a row: `ratio` is the row's to its baseline, `rounds` the round-by-round
/// ratios where tracked; `no_verdict` says why the run may not judge, if it may not.
pub fn target_cell(target: Option<Target>, ratio: f64, rounds: &[f64], no_verdict: Option<&str>) -> String {
    let Some(target) = target else {
        return String::new();
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
        let agree = rounds.iter().filter(|&&r| target.met_by(r)).count();
        details.push(format!("met in {agree}/{} rounds", rounds.len()));
    }
    let verdict = match no_verdict {
        Some(_) => "no verdict",
        None if target.met_by(ratio) => "met",
        None => "**missed**",
    };
    let what = target.what();
    if details.is_empty() {
        format!("{what}: {verdict}")
    } else {
        format!("{what}: {verdict} ({})", details.join("; "))
    }
}

/// The ratio cell: the pooled ratio, and the range of the round-by-round ratios if there are
/// several.
pub fn ratio_cell(ratio: f64, rounds: &[f64]) -> String {
    if rounds.len() > 1 {
        let lo = rounds.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = rounds.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{ratio:.2}x ({lo:.2}–{hi:.2})")
    } else {
        format!("{ratio:.2}x")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The plan of `args` for suite `S`.
    pub(crate) fn plan<S: Suite>(args: &[&str]) -> Plan<S::Options> {
        Plan::parse::<S>(args.iter().map(|a| a.to_string())).unwrap()
    }

    /// Suite `S` gives verdicts only in full runs; `thin` are arguments that leave too little
    /// throughput for one.
    pub(crate) fn only_full_runs_give_verdicts<S: Suite>(thin: &[&str]) {
        let no_latency_verdict = |p: &Plan<S::Options>| p.no_latency_verdict(S::SAMPLES);
        assert_eq!(no_latency_verdict(&plan::<S>(&[])), None);
        assert_eq!(S::no_throughput_verdict(&plan::<S>(&[])), None);
        assert_eq!(no_latency_verdict(&plan::<S>(&["--quick"])).as_deref(), Some("quick run"));
        assert_eq!(S::no_throughput_verdict(&plan::<S>(&["--quick"])).as_deref(), Some("quick run"));
        assert!(no_latency_verdict(&plan::<S>(&["--iters", "300"])).is_some());
        assert!(no_latency_verdict(&plan::<S>(&["--rounds", "2"])).is_some());
        assert!(S::no_throughput_verdict(&plan::<S>(thin)).is_some());
    }

    fn interleaved(ratio: f64, rounds: &[f64]) -> Option<Compared> {
        Some(Compared { ratio, rounds: Some(rounds.to_vec()) })
    }

    #[test]
    fn a_verdict_needs_a_full_run_and_an_interleaved_baseline() {
        let v = vs("eventfd_pingpong", Some(Target::AtMost(1.3)));
        let v = v.as_ref();
        let (base, ratio, target) = columns(v, interleaved(1.07, &[1.03, 1.4, 1.05]), None);
        assert_eq!(base, "eventfd_pingpong");
        assert_eq!(ratio, "1.07x (1.03–1.40)");
        assert_eq!(target, "≤ 1.3x: met (met in 2/3 rounds)");
        let (_, _, target) = columns(v, interleaved(1.5, &[1.5]), None);
        assert_eq!(target, "≤ 1.3x: **missed** (met in 0/1 rounds)");

        let (_, _, target) = columns(v, interleaved(1.07, &[1.07, 1.07]), Some("quick run"));
        assert_eq!(target, "≤ 1.3x: no verdict (quick run)");

        let apart = Some(Compared { ratio: 1.07, rounds: None });
        let (base, ratio, target) = columns(v, apart, None);
        assert_eq!(base, "eventfd_pingpong (separate phase)");
        assert_eq!(ratio, "1.07x");
        assert_eq!(target, "≤ 1.3x: no verdict (baseline from a separate phase)");

        // Higher is better for throughput; no rounds tracked there.
        let v = vs("memcpy_64k", Some(Target::AtLeast(0.25)));
        let v = v.as_ref();
        assert_eq!(columns(v, interleaved(0.3, &[]), None).2, "≥ 0.25x: met");
        assert_eq!(columns(v, interleaved(0.2, &[]), None).2, "≥ 0.25x: **missed**");
        assert_eq!(
            columns(v, interleaved(0.3, &[0.2, 0.3, 0.4]), None).2,
            "≥ 0.25x: met (met in 2/3 rounds)"
        );
        // A baseline that was not measured; a row without a baseline.
        assert_eq!(columns(v, None, None), ("memcpy_64k".into(), "n/a".into(), String::new()));
        assert_eq!(columns(None, None, None).0, "(baseline)");
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
        let pipe = Some(Target::AtLeast(3.0));
        assert_eq!(target_cell(pipe, 3.5, &[], None), "≥ 3x: met");
        assert_eq!(target_cell(pipe, 1.2, &[], None), "≥ 3x: **missed**");
        assert_eq!(target_cell(pipe, 3.5, &[], Some("quick run")), "≥ 3x: no verdict (quick run)");
        assert_eq!(target_cell(None, 3.5, &[], None), "");
    }

    /// A throughput benchmark that takes `per_unit` per unit of work, without doing any.
    struct Fixed {
        per_unit: Duration,
    }

    impl Bench for Fixed {
        fn batch(&mut self, units: u64) -> Option<io::Result<Duration>> {
            Some(Ok(self.per_unit * u32::try_from(units).unwrap()))
        }
        fn cpu_time(&self) -> io::Result<Duration> {
            Ok(Duration::ZERO)
        }
    }

    fn fixed_group(only: &[&str]) -> Results {
        let mut plan = Plan::parse::<link::LinkSuite>(std::iter::empty()).unwrap();
        plan.only = only.iter().map(|s| s.to_string()).collect();
        let group = vec![
            Spec::throughput("base", None, bench(|| Ok(Fixed { per_unit: Duration::from_micros(500) }))),
            Spec::throughput(
                "row",
                vs("base", Some(Target::AtLeast(0.25))),
                bench(|| Ok(Fixed { per_unit: Duration::from_millis(1) })),
            ),
        ];
        let shape = Batches { per_round: vec![2, 1], units: 10, warmup_units: 1, unit_size: 100.0 };
        let mut r = Results::default();
        r.group(&plan, group, 2, Some(&shape)).unwrap();
        r
    }

    #[test]
    fn a_group_pools_its_rounds_and_pairs_them_with_the_baseline() {
        let r = fixed_group(&[]);
        let row = r.throughput_row("row").unwrap();
        // 10 units of 100 each in 10 ms: 100,000 a second, in every one of the 2 + 1 batches.
        assert_eq!(row.rates.len(), 3);
        assert_eq!(row.round_medians.len(), 2);
        assert_eq!(row.units, 30);
        assert!((row.median - 100_000.0).abs() < 1.0, "{}", row.median);
        assert_eq!(row.phase, r.throughput_row("base").unwrap().phase);
        let (vs, ratio, target) = r.throughput_cells(row, None);
        assert_eq!((vs.as_str(), ratio.as_str()), ("base", "0.50x (0.50–0.50)"));
        assert_eq!(target, "≥ 0.25x: met (met in 2/2 rounds)");
        // A baseline left out by --only is not measured: no ratio.
        let r = fixed_group(&["row"]);
        assert!(r.throughput_row("base").is_none());
        assert_eq!(r.throughput_cells(&r.throughput[0], None).1, "n/a");
    }

    #[test]
    fn memory_rows_divide_the_growth_by_the_count() {
        use crate::agent::Memory;
        let row = MemoryRow {
            name: "m".into(),
            what: "4 things".into(),
            count: 4,
            before: Memory { rss: 8192, anon: 4096, shmem: 4096 },
            after: Memory { rss: 20480, anon: 20480, shmem: 0 },
        };
        assert_eq!(row.per_unit(), (3072.0, 4096.0, -1024.0));
    }

    #[test]
    fn ratio_cells_show_the_round_range() {
        assert_eq!(ratio_cell(1.07, &[1.03, 1.10, 1.05]), "1.07x (1.03–1.10)");
        assert_eq!(ratio_cell(1.07, &[1.07]), "1.07x");
    }
}
