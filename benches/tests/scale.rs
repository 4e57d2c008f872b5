//! The scale bench's host end to end, small: domains come up registered with the backend
//! domain's manager, decisions in the manager are timed and allowed, and every agent's check goes
//! to the manager over its link and comes back denied. A test binary without libtest's harness,
//! so that it can play the bench's peer processes (the hypervisor, the guests) itself.

use std::io;
use std::time::Duration;

use dombus_benches::scale::{Host, ScaleConfig};

fn check(ok: bool, what: impl FnOnce() -> String) -> io::Result<()> {
    if ok { Ok(()) } else { Err(io::Error::other(what())) }
}

/// Two bring-ups on one host: each waits until the manager has registered every new domain.
fn domains_come_up_registered(host: &mut Host) -> io::Result<()> {
    let first = host.bring_up(3)?;
    check(first.attached == 3 && first.registered == 3 && first.error.is_none(), || {
        format!("first: {first:?}")
    })?;
    let second = host.bring_up(4)?;
    check(second.attached == 4 && second.registered == 7 && second.error.is_none(), || {
        format!("second: {second:?}")
    })?;
    check(host.registered() == 7, || format!("the manager has {} domains", host.registered()))
}

/// The in-process decision is the manager's (it resolves names among the registered domains).
fn decisions_are_the_managers(host: &mut Host) -> io::Result<()> {
    for by_name in [false, true] {
        let s = host.decisions(50, by_name)?;
        check(s.len() == 50, || format!("{} decisions", s.len()))?;
    }
    Ok(())
}

/// Each check is a round trip to the manager (denials are not cached by the agent), denied.
fn checks_are_denied_round_trips(host: &mut Host) -> io::Result<()> {
    for dom in [1, 7] {
        let s = host.checks(dom, 20)?;
        check(s.len() == 20, || format!("domain {dom}: {} checks", s.len()))?;
        // A round trip over a link and back is never free; a cached answer would be.
        let mut sorted = s.clone();
        sorted.sort_unstable();
        check(sorted[10] > Duration::from_micros(5), || {
            format!("domain {dom}: median check {:?}", sorted[10])
        })?;
    }
    check(host.checks(8, 1).is_err(), || "domain 8 was never brought up, yet it checked".into())
}

/// One test: `Err` says what failed.
type Check = fn(&mut Host) -> io::Result<()>;

fn main() {
    dombus_benches::run_child_if_requested();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let _in_runtime = rt.enter();
    let cfg = ScaleConfig { up_timeout: Duration::from_secs(30), ..ScaleConfig::default() };
    let mut host = match Host::start("test", &cfg) {
        Ok(h) => h,
        Err(e) => panic!("starting the host: {e}"),
    };
    let tests: [(&str, Check); 3] = [
        ("domains_come_up_registered", domains_come_up_registered),
        ("decisions_are_the_managers", decisions_are_the_managers),
        ("checks_are_denied_round_trips", checks_are_denied_round_trips),
    ];
    let mut failed = 0;
    for (name, test) in tests {
        match test(&mut host) {
            Ok(()) => println!("test {name} ... ok"),
            Err(e) => {
                println!("test {name} ... FAILED: {e}");
                failed += 1;
            }
        }
    }
    drop(host);
    println!("\n{} passed, {failed} failed", tests.len() - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}
