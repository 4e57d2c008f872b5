//! `scale`: the connection manager with many simulated domains ([`dombus_benches::scale`]). Two
//! hosts side by side in one run, a small one (10 domains) and a large one (1,000), every
//! domain's agent linked to the backend domain and registered with its manager: the time each
//! takes to come up, a decision's p50/p99 on each (in the manager, and an agent's introduction
//! round trip over its link), measured in interleaved rounds, and the backend's and the
//! simulator's memory per linked domain. Prints Markdown tables.
//!
//! ```text
//! cargo run --release -p dombus-benches --bin scale            # 10 and 1,000 domains (~1 min)
//! cargo run --release -p dombus-benches --bin scale -- --quick # CI smoke run: 5 and 50 (a few s)
//! # Options: --domains N (the large host), --small N, --rounds N, --decisions N (per round,
//! #          in the manager), --checks N (per round, end to end), --rings small|default,
//! #          --stall SECONDS (a bring-up gives up when no domain registered for that long)
//! ```

use std::io;
use std::time::Duration;

use dombus_benches::agent::Memory;
use dombus_benches::percentile;
use dombus_benches::scale::{BringUp, Host, LinkLimits, ScaleConfig, small_rings};
use dombus_tools::diag::CountingAlloc;
use dombus_transport_xen::link::LinkConfig;

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

/// The p99 ratio (large host / small host) a decision may have.
const TARGET_P99_RATIO: f64 = 1.2;

struct Options {
    quick: bool,
    small: u16,
    large: u16,
    rounds: usize,
    decisions: usize,
    checks: usize,
    rings: LinkConfig,
    stall: Duration,
}

fn options() -> Result<Options, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = if quick {
        Options {
            quick,
            small: 5,
            large: 50,
            rounds: 2,
            decisions: 500,
            checks: 100,
            rings: small_rings(),
            stall: Duration::from_secs(5),
        }
    } else {
        Options {
            quick,
            small: 10,
            large: 1000,
            rounds: 5,
            decisions: 2000,
            checks: 400,
            rings: small_rings(),
            stall: Duration::from_secs(5),
        }
    };
    let mut it = args.iter().filter(|a| *a != "--quick");
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = || value.parse::<usize>().map_err(|e| format!("{flag} {value}: {e}"));
        let dom = || value.parse::<u16>().map_err(|e| format!("{flag} {value}: {e}"));
        match flag.as_str() {
            "--domains" => o.large = dom()?,
            "--small" => o.small = dom()?,
            "--rounds" => o.rounds = num()?.max(1),
            "--decisions" => o.decisions = num()?.max(1),
            "--checks" => o.checks = num()?.max(1),
            "--stall" => o.stall = Duration::from_secs(u64::try_from(num()?).unwrap_or(u64::MAX)),
            "--rings" => {
                o.rings = match value.as_str() {
                    "small" => small_rings(),
                    "default" => LinkConfig::default(),
                    other => return Err(format!("--rings small|default, not {other:?}")),
                }
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if o.small < 2 || o.large < 2 {
        return Err("each host needs at least 2 domains (the decisions are between domains 1 and 2)".into());
    }
    Ok(o)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn kib(bytes: f64) -> f64 {
    bytes / 1024.0
}

/// A row's samples on each host, pooled over the rounds, and each round's p99 ratio.
#[derive(Default)]
struct Row {
    small: Vec<Duration>,
    large: Vec<Duration>,
    ratios: Vec<f64>,
}

impl Row {
    fn round(&mut self, mut small: Vec<Duration>, mut large: Vec<Duration>) {
        small.sort_unstable();
        large.sort_unstable();
        let (s, l) = (percentile(&small, 99.0), percentile(&large, 99.0));
        if !s.is_zero() {
            self.ratios.push(l.as_secs_f64() / s.as_secs_f64());
        }
        self.small.extend(small);
        self.large.extend(large);
    }

    fn print(&mut self, name: &str, o: &Options, large_registered: usize) {
        self.small.sort_unstable();
        self.large.sort_unstable();
        let (s50, s99) = (percentile(&self.small, 50.0), percentile(&self.small, 99.0));
        let (l50, l99) = (percentile(&self.large, 50.0), percentile(&self.large, 99.0));
        let ratio = l99.as_secs_f64() / s99.as_secs_f64().max(1e-12);
        let lo = self.ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = self.ratios.iter().copied().fold(0.0, f64::max);
        let held = self.ratios.iter().filter(|r| **r <= TARGET_P99_RATIO).count();
        let verdict = if o.quick || o.rounds < 3 {
            "no verdict (quick run)".to_string()
        } else if ratio <= TARGET_P99_RATIO {
            format!("≤ {TARGET_P99_RATIO}x: met ({held}/{} rounds)", self.ratios.len())
        } else {
            format!("≤ {TARGET_P99_RATIO}x: **missed** (met in {held}/{} rounds)", self.ratios.len())
        };
        println!(
            "| {name} | {} | {:.2} µs | {:.2} µs | {} | {:.2} µs | {:.2} µs | {ratio:.2}x ({lo:.2}–{hi:.2}) | {verdict} |",
            self.small.len(),
            us(s50),
            us(s99),
            large_registered,
            us(l50),
            us(l99),
        );
    }
}

fn print_up(name: &str, u: &BringUp) {
    let per = u.elapsed.as_secs_f64() * 1e3 / u.registered.max(1) as f64;
    println!(
        "| {name} | {} | {} | {} | {:.1} ms | {:.1} ms | {per:.2} ms | {} |",
        u.asked,
        u.attached,
        u.registered,
        u.elapsed.as_secs_f64() * 1e3,
        u.attaching.as_secs_f64() * 1e3,
        u.error.as_deref().unwrap_or("")
    );
}

fn print_memory(name: &str, before: Memory, after: Memory, n: usize, heap: Option<f64>) {
    let per = |a: u64, b: u64| kib((b as f64 - a as f64) / n.max(1) as f64);
    println!(
        "| {name} | {:.1} MiB | {:.1} MiB | {:.1} KiB | {:.1} KiB | {:.1} KiB | {} |",
        before.rss as f64 / 1048576.0,
        after.rss as f64 / 1048576.0,
        per(before.rss, after.rss),
        per(before.anon, after.anon),
        per(before.shmem, after.shmem),
        heap.map_or_else(|| "—".to_string(), |h| format!("{:.1} KiB", kib(h))),
    );
}

fn run(o: &Options) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let _in_runtime = rt.enter();
    let cfg = ScaleConfig { rings: o.rings.clone(), up_timeout: Duration::from_secs(600), stall: o.stall };
    let limits = LinkLimits::of(&o.rings).ok_or_else(|| io::Error::other("rings too large"))?;
    println!(
        "# scale: {} and {} domains, rings {} B / {} B (client → server / server → client), load {}\n",
        o.small,
        o.large,
        o.rings.client_to_server,
        o.rings.server_to_client,
        dombus_benches::load_average()
    );
    println!(
        "Per link the backend domain serves: {} grant(s), {} simulator descriptors, 1 event-channel port; \
         the simulator's per-domain limits allow {} links by grants, {} by descriptors, {} by ports: at most {}.\n",
        limits.grants,
        limits.descriptors,
        limits.by_grants,
        limits.by_descriptors,
        limits.by_ports,
        limits.most()
    );
    let mut small = Host::start("small", &cfg)?;
    let mut large = Host::start("large", &cfg)?;

    let up_small = small.bring_up(o.small)?;
    let (m0, h0) = (large.memory()?, CountingAlloc::live());
    let up_large = large.bring_up(o.large)?;
    let (m1, h1) = (large.memory()?, CountingAlloc::live());

    println!(
        "| bring-up | asked | attached | registered | until all registered | of which attaching | per domain | error |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    print_up("small host", &up_small);
    print_up("large host", &up_large);
    println!();
    let registered = (small.registered(), large.registered());
    if registered.0 < 2 || registered.1 < 2 {
        return Err(io::Error::other(format!("too few domains registered: {registered:?}")));
    }

    let (mut by_id, mut by_name, mut e2e) = (Row::default(), Row::default(), Row::default());
    for _ in 0..o.rounds {
        by_id.round(small.decisions(o.decisions, false)?, large.decisions(o.decisions, false)?);
        by_name.round(small.decisions(o.decisions, true)?, large.decisions(o.decisions, true)?);
        e2e.round(small.checks(1, o.checks)?, large.checks(1, o.checks)?);
    }
    println!(
        "| decision | samples | p50 ({} domains) | p99 | domains | p50 | p99 | p99 ratio (rounds) | target |",
        registered.0
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    by_id.print("manager, target by id", o, registered.1);
    by_name.print("manager, target by name", o, registered.1);
    e2e.print("agent's introduction round trip", o, registered.1);
    println!();

    let n = up_large.registered;
    let heap = (h0 != 0).then(|| (h1 - h0) as f64 / n.max(1) as f64);
    println!(
        "| large host, memory per registered domain ({n}) | VmRSS before | after | per domain | anon | shmem | heap |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    print_memory("backend domain + manager (this process)", m0.0, m1.0, n, heap);
    print_memory("simulator daemon", m0.1, m1.1, n, None);
    print_memory("guests (every domain's agent sockets)", m0.2, m1.2, n, None);
    let threads = |pid: u32| -> String {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:").map(|t| t.trim().to_string())))
            .unwrap_or_else(|| "?".into())
    };
    println!(
        "\nThreads now: this process {}, the large host's simulator {}, its guests {}.",
        threads(std::process::id()),
        threads(large.hypervisor().id()),
        threads(large.guests().id())
    );
    Ok(())
}

fn main() {
    dombus_benches::run_child_if_requested();
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("scale: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&o) {
        eprintln!("scale: {e}");
        std::process::exit(1);
    }
}
