//! dombus benchmarks: a two-process ping-pong harness, the baselines every performance target
//! is a ratio to, and the link benchmarks built on it.
//!
//! # The two-process model
//!
//! Every round-trip benchmark runs between two real processes, as a link between two domains
//! would. The benchmark binary (the criterion bench `link` or the `compare` harness) re-executes
//! itself with [`std::env::current_exe`]; the environment variable [`ROLE_ENV`] tells the copy
//! which peer role to play, [`ARG_ENV`] carries a role-specific argument and [`FDS_ENV`] lists the
//! file descriptors it inherited. Descriptors are created close-on-exec in the parent and made
//! inheritable only in the forked child, between `fork` and `exec`, so unrelated children never
//! see them. Each binary must call [`run_child_if_requested`] first thing in `main`.
//!
//! The peer is set up once per benchmark ([`PeerProcess::spawn`]), answers a few round trips
//! before the constructor returns (so process start-up never lands in a timed section), and is
//! killed when the benchmark object is dropped. It also dies with its parent
//! (`PR_SET_PDEATHSIG`), so a panicking bench never leaves a spinning process behind.
//!
//! # Measuring
//!
//! A benchmark implements [`PingPong`]: run `n` round trips, optionally recording each one's
//! duration. Criterion uses the total ([`PingPong::run`] without a sample vector, from
//! `iter_custom`); the comparison harness uses a [`Sampler`] (or [`measure`] for one round),
//! which warms up, records every round trip, and reports percentiles plus the CPU time both
//! processes burnt per round trip. A sampler can pool several rounds on fresh instances, so a
//! harness can interleave a benchmark with its baseline.
//!
//! # Placement
//!
//! [`set_pinning`] / [`pin_from_env`] put the parent on one CPU and the peer on another
//! ([`Pinning::Split`], two domains on two CPUs) or both on one ([`Pinning::Same`]). Unpinned on
//! a 2-CPU VM, wake-up results are bimodal (same-CPU context switch vs. inter-processor wake-up)
//! and spinning benchmarks may share a CPU.
//!
//! # Baselines ([`baseline`])
//!
//! * [`baseline::EventfdPingPong`]: two eventfds, each side blocks in `read`: the cost of a
//!   cross-process wake-up, the floor for a link that sleeps on its event channel.
//! * [`baseline::ShmSpinPingPong`]: a sequence word and two data areas in a shared memfd page,
//!   each side spinning for the peer's counter and copying the payload in and out: the floor for
//!   a link that polls.
//! * [`baseline::Memcpy`]: single-process copy bandwidth of 64 KiB chunks, the throughput floor.
//!
//! # Link benchmarks ([`link`])
//!
//! The parent runs the simulated hypervisor in-process, is domain 1 (server) and listens; the
//! peer attaches as domain 2 (client), connects and echoes.
//!
//! # The connection manager at scale ([`scale`])
//!
//! A host of many domains in three processes: the parent is the backend domain and runs the
//! connection manager, one peer is the simulated hypervisor, one plays every guest domain.
//!
//! # The domain agent ([`agent`])
//!
//! A third process can be its domain's agent ([`agent::AgentProcess`], on the parent's CPU:
//! processes of one domain share its CPUs); the parent then reaches the virtual sockets through
//! it, and [`PingPong::peer_cpu_time`] counts its CPU time with the peer's.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The project's one percentile definition (nearest rank), which every figure here uses.
pub use dombus_tools::diag::percentile;

pub mod agent;
pub mod baseline;
pub mod events;
pub mod harness;
pub mod link;
pub mod rpc;
pub mod scale;

/// Environment variable naming the peer role a re-executed benchmark binary plays.
pub const ROLE_ENV: &str = "DOMBUS_BENCH_ROLE";
/// Environment variable with the role-specific argument.
pub const ARG_ENV: &str = "DOMBUS_BENCH_ARG";
/// Environment variable with the comma-separated numbers of the inherited file descriptors.
pub const FDS_ENV: &str = "DOMBUS_BENCH_FDS";

/// If this process was started as a benchmark peer, plays that role and exits; otherwise returns.
///
/// Call it first thing in `main` of every binary that uses this crate's benchmarks.
pub fn run_child_if_requested() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    let arg = std::env::var(ARG_ENV).unwrap_or_default();
    let pin = std::env::var(PIN_CPU_ENV).ok().and_then(|c| c.parse().ok());
    if let Err(e) = pin.map_or(Ok(()), pin_current_thread) {
        child_fail(&role, e);
    }
    let fds = match inherited_fds() {
        Ok(f) => f,
        Err(e) => child_fail(&role, e),
    };
    let res = match role.as_str() {
        baseline::EVENTFD_ROLE => baseline::eventfd_child(fds),
        baseline::SHM_SPIN_ROLE => baseline::shm_spin_child(fds, &arg),
        baseline::SHM_STREAM_ROLE => baseline::shm_stream_child(fds),
        link::ECHO_ROLE => link::echo_child(&arg),
        link::SINK_ROLE => link::sink_child(&arg),
        link::VSOCK_ECHO_ROLE => link::vsock_echo_child(&arg),
        link::VSOCK_SINK_ROLE => link::vsock_sink_child(&arg),
        rpc::SERVER_ROLE => rpc::server_child(&arg),
        events::SERVER_ROLE => events::server_child(&arg),
        agent::AGENT_ROLE => agent::agent_child(&arg),
        agent::DOMAINS_ROLE => agent::domains_child(&arg),
        scale::SIMXEN_ROLE => scale::simxen_child(&arg),
        scale::GUESTS_ROLE => scale::guests_child(fds, &arg),
        other => Err(io::Error::new(io::ErrorKind::InvalidInput, format!("unknown role {other}"))),
    };
    match res {
        Ok(()) => std::process::exit(0),
        Err(e) => child_fail(&role, e),
    }
}

/// Environment variable telling a peer which CPU to pin itself to (set by [`PeerProcess::spawn`]
/// under [`Pinning::Split`] and [`Pinning::Same`]).
pub const PIN_CPU_ENV: &str = "DOMBUS_BENCH_PIN_CPU";
/// Environment variable choosing the [`Pinning`] of [`pin_from_env`]: `split`, `same` or `none`.
pub const PIN_ENV: &str = "DOMBUS_BENCH_PIN";

/// Where the two processes of a benchmark run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinning {
    /// Wherever the scheduler puts them: on a small machine the peer is sometimes woken on the
    /// same CPU (a plain context switch) and sometimes on the other (an inter-processor wake-up,
    /// many times dearer in a VM), so wake-up results are bimodal.
    None,
    /// The parent's main thread (and threads it starts later) on the first allowed CPU, the peer
    /// on the second: two domains on two CPUs, as on Xen. Needed for spinning benchmarks.
    Split,
    /// Both on the first allowed CPU: every wake-up is a context switch. Spinning benchmarks are
    /// meaningless here.
    Same,
}

impl std::str::FromStr for Pinning {
    type Err = String;
    fn from_str(s: &str) -> Result<Pinning, String> {
        match s {
            "none" => Ok(Pinning::None),
            "split" => Ok(Pinning::Split),
            "same" => Ok(Pinning::Same),
            other => Err(format!("pinning must be none, split or same, not {other:?}")),
        }
    }
}

/// (parent CPU, peer CPU) chosen by [`set_pinning`], if any.
static PINNED: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();

fn pinned_cpus() -> Option<(usize, usize)> {
    PINNED.get().copied()
}

/// The CPUs this thread may run on.
fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; all-zero is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let max = usize::try_from(libc::CPU_SETSIZE).unwrap_or(1024);
    // SAFETY: CPU_ISSET reads the initialised set at an index below CPU_SETSIZE.
    Ok((0..max).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect())
}

/// Pins the calling thread to `cpu`.
fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: as in `allowed_cpus`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of `set`; its index is bounds-checked.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Applies `pinning` to this (parent) process and to every peer spawned afterwards. Call it
/// early in `main`, before any thread is started: the parent pins its calling thread, and threads
/// inherit the affinity of the thread that creates them. Can be set once.
pub fn set_pinning(pinning: Pinning) -> io::Result<()> {
    let cpus = allowed_cpus()?;
    let chosen = match (pinning, cpus.as_slice()) {
        (Pinning::None, _) => return Ok(()),
        (Pinning::Same, [a, ..]) => (*a, *a),
        (Pinning::Split, [a, b, ..]) => (*a, *b),
        _ => return Err(io::Error::other(format!("cannot pin {pinning:?} with CPUs {cpus:?}"))),
    };
    pin_current_thread(chosen.0)?;
    PINNED.set(chosen).map_err(|_| io::Error::other("pinning already set"))
}

/// Applies `pinning` if given, else the one named by [`PIN_ENV`] (default split): what the
/// comparison binaries' `--pin` does.
pub fn apply_pinning(pinning: Option<Pinning>) -> io::Result<Pinning> {
    match pinning {
        Some(p) => set_pinning(p).map(|()| p),
        None => pin_from_env(Pinning::Split),
    }
}

/// The 1-, 5- and 15-minute load averages, as `/proc/loadavg` gives them (for result headers).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Times a run of round trips: call [`Laps::lap`] after each; samples each lap's duration when
/// asked to (the timing bookkeeping every `PingPong::run` shares).
#[derive(Debug)]
pub struct Laps<'a> {
    start: std::time::Instant,
    prev: std::time::Instant,
    samples: Option<&'a mut Vec<Duration>>,
}

impl<'a> Laps<'a> {
    /// Starts the clock.
    pub fn start(samples: Option<&'a mut Vec<Duration>>) -> Laps<'a> {
        let now = std::time::Instant::now();
        Laps { start: now, prev: now, samples }
    }

    /// One round trip done.
    pub fn lap(&mut self) {
        if let Some(s) = self.samples.as_deref_mut() {
            let now = std::time::Instant::now();
            s.push(now - self.prev);
            self.prev = now;
        }
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Applies the pinning named by [`PIN_ENV`] (default `default`).
pub fn pin_from_env(default: Pinning) -> io::Result<Pinning> {
    let pinning = match std::env::var(PIN_ENV) {
        Ok(v) => v.parse().map_err(io::Error::other)?,
        Err(_) => default,
    };
    set_pinning(pinning)?;
    Ok(pinning)
}

fn child_fail(role: &str, e: io::Error) -> ! {
    eprintln!("dombus-benches peer ({role}): {e}");
    std::process::exit(1)
}

/// Takes ownership of the descriptors listed in [`FDS_ENV`] (in the peer process).
fn inherited_fds() -> io::Result<Vec<OwnedFd>> {
    let Ok(list) = std::env::var(FDS_ENV) else {
        return Ok(Vec::new());
    };
    let mut fds = Vec::new();
    for part in list.split(',').filter(|s| !s.is_empty()) {
        let raw: RawFd = part
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("bad fd {part:?}")))?;
        // Check it is open before claiming it.
        // SAFETY: `raw` is only borrowed for the duration of this fcntl call.
        rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(raw) })?;
        // SAFETY: the parent passed this descriptor to us by inheritance and listed it exactly
        // once; nothing else in this process knows of it, so we are its sole owner.
        fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
    }
    Ok(fds)
}

/// Converts an OS error from rustix into `std::io::Error`.
pub(crate) fn os(e: rustix::io::Errno) -> io::Error {
    io::Error::from(e)
}

/// The peer process of a two-process benchmark. Dropping it kills and reaps the process.
#[derive(Debug)]
pub struct PeerProcess {
    child: Child,
}

impl PeerProcess {
    /// Re-executes the current binary as peer `role` with argument `arg`, passing `fds` by
    /// inheritance (they keep their numbers; close-on-exec is cleared in the child only).
    pub fn spawn(role: &str, arg: &str, fds: &[BorrowedFd<'_>]) -> io::Result<PeerProcess> {
        PeerProcess::spawn_placed(role, arg, fds, pinned_cpus().map(|(_, peer)| peer))
    }

    /// Like [`PeerProcess::spawn`] for a peer that belongs to the parent's domain (a domain
    /// agent): pinned, if the parent is, to the parent's CPU, as processes of one domain share
    /// its virtual CPUs.
    pub fn spawn_beside_parent(role: &str, arg: &str, fds: &[BorrowedFd<'_>]) -> io::Result<PeerProcess> {
        PeerProcess::spawn_placed(role, arg, fds, pinned_cpus().map(|(parent, _)| parent))
    }

    fn spawn_placed(
        role: &str,
        arg: &str,
        fds: &[BorrowedFd<'_>],
        cpu: Option<usize>,
    ) -> io::Result<PeerProcess> {
        let exe = std::env::current_exe()?;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let list = raw.iter().map(|fd| fd.to_string()).collect::<Vec<_>>().join(",");
        let mut cmd = Command::new(exe);
        cmd.env_remove(PIN_CPU_ENV);
        if let Some(cpu) = cpu {
            cmd.env(PIN_CPU_ENV, cpu.to_string());
        }
        cmd.env(ROLE_ENV, role)
            .env(ARG_ENV, arg)
            .env(FDS_ENV, list)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: the hook runs in the forked child before exec. It only issues fcntl and prctl
        // system calls (async-signal-safe) on descriptors that are open in the parent and thus
        // in the child, and does not allocate (the vector was built before fork).
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &raw {
                    rustix::io::fcntl_setfd(BorrowedFd::borrow_raw(fd), rustix::io::FdFlags::empty())?;
                }
                rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
                Ok(())
            });
        }
        Ok(PeerProcess { child: cmd.spawn()? })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// CPU time (user + system, all threads) the peer has used so far.
    pub fn cpu_time(&self) -> io::Result<Duration> {
        self.cpu_clock().cpu_time()
    }

    /// A clock reading the peer's CPU time that does not borrow `self`.
    pub fn cpu_clock(&self) -> CpuClock {
        CpuClock { pid: self.child.id() }
    }

    /// Waits up to `timeout` for the peer to exit by itself; true if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return true,
                Ok(None) if std::time::Instant::now() >= deadline => return false,
                Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// Fails if the peer has already exited (reporting how).
    pub fn check_alive(&mut self) -> io::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(io::Error::other(format!("benchmark peer exited: {status}"))),
        }
    }
}

/// The CPU-time clock of another process (`clock_getcpuclockid`).
///
/// The kernel accounts a process that keeps running on another core at scheduler ticks, so
/// differences are only accurate over windows of many milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct CpuClock {
    pid: u32,
}

impl CpuClock {
    /// CPU time (user + system, all threads) the process has used so far.
    pub fn cpu_time(&self) -> io::Result<Duration> {
        let pid = libc::pid_t::try_from(self.pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "pid out of range"))?;
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `clock` is a valid out-pointer for the duration of the call.
        let rc = unsafe { libc::clock_getcpuclockid(pid, &mut clock) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        clock_time(clock)
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_time(clock: libc::clockid_t) -> io::Result<Duration> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer for the duration of the call.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(ts.tv_nsec).unwrap_or(0);
    Ok(Duration::new(secs, nanos))
}

/// CPU time (user + system, all threads) this process has used so far.
pub fn own_cpu_time() -> io::Result<Duration> {
    clock_time(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// A two-process round-trip benchmark, set up and ready.
pub trait PingPong {
    /// Runs `n` round trips and returns their total wall time. If `samples` is given, each round
    /// trip's own duration is pushed onto it (one clock read per round trip).
    fn run(&mut self, n: u64, samples: Option<&mut Vec<Duration>>) -> io::Result<Duration>;

    /// The peer process, for CPU accounting.
    fn peer(&self) -> &PeerProcess;

    /// CPU time (user + system, all threads) of every peer process so far: the peer's, plus
    /// that of any other process the benchmark runs besides the parent (a domain agent).
    fn peer_cpu_time(&self) -> io::Result<Duration> {
        self.peer().cpu_time()
    }
}

/// Runs `n` round trips of `f`, timing each if `samples` is given; returns the total wall time.
///
/// The building block for [`PingPong::run`] implementations whose round trip is a plain
/// function call.
pub fn timed_loop(
    n: u64,
    samples: Option<&mut Vec<Duration>>,
    mut f: impl FnMut() -> io::Result<()>,
) -> io::Result<Duration> {
    let mut laps = Laps::start(samples);
    for _ in 0..n {
        f()?;
        laps.lap();
    }
    Ok(laps.elapsed())
}

/// Latency statistics of one benchmark from [`Sampler::stats`].
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// Round trips measured.
    pub n: u64,
    /// Median round trip.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Mean (total wall time / n).
    pub mean: Duration,
    /// CPU time of both processes (user + system, all threads) per round trip, measured over a
    /// separate phase (see [`Sampler::round`]).
    pub cpu_per_op: Duration,
    /// CPU time of both processes divided by wall time over that phase: how many cores the
    /// benchmark kept busy (2.0 for two processes spinning).
    pub cores_busy: f64,
}

/// Sorts `v` and returns its median (the mean of the two middle values for an even count; 0 for
/// none): the comparison harnesses' median of per-round ratios.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Accumulates the measurements of one benchmark over one or more rounds, each possibly on a
/// freshly set-up instance (see [`Sampler::round`]), and turns them into [`Stats`].
///
/// Rounds let a harness interleave a benchmark with its baseline (A, B, A, B, ...), so that
/// both see the same mix of machine load: on a shared machine this matters more than anything.
#[derive(Debug, Default, Clone)]
pub struct Sampler {
    samples: Vec<Duration>,
    wall: Duration,
    cpu: Duration,
    cpu_ops: u64,
    cpu_wall: Duration,
    /// The median of each round's own samples, in round order.
    round_p50s: Vec<Duration>,
}

impl Sampler {
    /// Warms `bench` up with `warmup` round trips, records `n` individually timed ones, then
    /// measures CPU cost over a separate phase of at least `cpu_window`.
    ///
    /// The CPU phase is separate and long because the kernel accounts another process's CPU
    /// time only at scheduler ticks (milliseconds) while it keeps running: a peer spinning on
    /// another core shows no CPU use over a window shorter than a tick. Over a total of a few
    /// hundred milliseconds the error is a few percent.
    pub fn round(
        &mut self,
        bench: &mut dyn PingPong,
        warmup: u64,
        n: u64,
        cpu_window: Duration,
    ) -> io::Result<()> {
        bench.run(warmup, None)?;
        let first = self.samples.len();
        self.samples.reserve(usize::try_from(n).unwrap_or(0));
        self.wall += bench.run(n, Some(&mut self.samples))?;
        let mut this_round = self.samples[first..].to_vec();
        this_round.sort_unstable();
        self.round_p50s.push(percentile(&this_round, 50.0));

        let batch = (n / 20).max(100);
        let (mut done, mut elapsed) = (0u64, Duration::ZERO);
        let cpu0 = own_cpu_time()? + bench.peer_cpu_time()?;
        while elapsed < cpu_window || done == 0 {
            elapsed += bench.run(batch, None)?;
            done += batch;
        }
        self.cpu += (own_cpu_time()? + bench.peer_cpu_time()?).saturating_sub(cpu0);
        self.cpu_ops += done;
        self.cpu_wall += elapsed;
        Ok(())
    }

    /// The median round trip of each round so far, in round order: a harness that interleaves
    /// a benchmark with its baseline can pair round `i` of one with round `i` of the other and
    /// show how many rounds agree with the pooled ratio.
    pub fn round_p50s(&self) -> &[Duration] {
        &self.round_p50s
    }

    /// Percentiles over every recorded round trip, CPU cost over every CPU phase.
    pub fn stats(mut self) -> Stats {
        self.samples.sort_unstable();
        let n = self.samples.len().max(1) as u64;
        Stats {
            n,
            p50: percentile(&self.samples, 50.0),
            p99: percentile(&self.samples, 99.0),
            mean: Duration::from_secs_f64(self.wall.as_secs_f64() / n as f64),
            cpu_per_op: Duration::from_secs_f64(self.cpu.as_secs_f64() / self.cpu_ops.max(1) as f64),
            cores_busy: self.cpu.as_secs_f64() / self.cpu_wall.as_secs_f64().max(1e-9),
        }
    }
}

/// One [`Sampler::round`] of `bench`: warm-up, `n` timed round trips, CPU phase.
pub fn measure(bench: &mut dyn PingPong, warmup: u64, n: u64, cpu_window: Duration) -> io::Result<Stats> {
    let mut s = Sampler::default();
    s.round(bench, warmup, n, cpu_window)?;
    Ok(s.stats())
}

/// Formats a duration in microseconds with two decimals.
pub fn fmt_us(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&mut []), 0.0);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0]), 2.5);
    }
}
