//! The service author's example end to end, as processes: `greeter serve` in one simulated
//! domain, the generated command-line client in another, over transport-xen link sockets.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dombus_sim::{SimBackend, SimHypervisor, TOKEN_ENV};
use dombus_transport_xen::types::DomId;

const GREETER: &str = env!("CARGO_BIN_EXE_greeter");

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn greeter(sock: &std::path::Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(GREETER);
    // Two domains and no connection manager: links open to any domain.
    cmd.args(["xen:1:7000", "--open-links", "--sim"])
        .arg(sock)
        .args(["--domid", "2", "--timeout", "20"])
        .args(args);
    cmd.env(TOKEN_ENV, token(sock, 2));
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

/// As the toolstack, creates domain `domid` for a greeter process: its one-time token.
fn token(sock: &std::path::Path, domid: u16) -> String {
    SimBackend::create_domain(sock, Some(DomId(domid)), "greeter").unwrap().1
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

#[test]
fn greeter_serves_and_its_generated_cli_calls_it_across_domains() {
    let dir = std::env::temp_dir().join(format!("dombus-greeter-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("simxen.sock");
    let _hv = SimHypervisor::spawn(&sock).unwrap();
    let _server = Kill(
        Command::new(GREETER)
            .args(["serve", "xen:1:7000", "--open-links", "--sim"])
            .arg(&sock)
            .args(["--domid", "1"])
            .env(TOKEN_ENV, token(&sock, 1))
            .spawn()
            .unwrap(),
    );

    // The first call waits for the server's listener to appear (connect_wait): started at the
    // same time as the server, it succeeds instead of being refused (it gives up after the
    // --timeout of 20 s).
    let out = greeter(&sock, &["hello", "world", "--excited"], None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "hello, world!");

    // Arguments as JSON on stdin.
    let out = greeter(&sock, &["hello", "--stdin"], Some(r#"{"name": "json", "excited": false}"#));
    assert_eq!(text(&out.stdout), "hello, json.", "{out:?}");

    // A list of records: a table for people, JSON for scripts.
    let out = greeter(&sock, &["guests"], None);
    assert_eq!(text(&out.stdout), "NAME   LETTERS\njson   4\nworld  5", "{out:?}");
    let out = greeter(&sock, &["guests", "--json"], None);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[1]["name"], "world");

    // The service's own error: exit 1, the error named.
    let out = greeter(&sock, &["hello", ""], None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(text(&out.stderr), "error: BadName: length=0");

    // Usage errors: exit 2, before any call.
    for bad in [&["nope"][..], &["hello", "--excited"][..], &["hello", "x", "--stdin"][..]] {
        let out = greeter(&sock, bad, None);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
    let out = greeter(&sock, &["hello", "--stdin"], Some("{not json"));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("the arguments on stdin"), "{out:?}");

    // Nothing there: refused, exit 3.
    let out = Command::new(GREETER).args(["unix:/nonexistent/greeter.sock", "guests"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(text(&out.stderr).contains("/nonexistent/greeter.sock"), "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The generated command line of a stream: updates printed as they arrive, `--count`, `--json`,
/// `--from`, and Ctrl-C ending it cleanly.
#[test]
fn a_stream_prints_updates_as_they_arrive_and_ends_on_ctrl_c() {
    use std::io::BufRead;
    let dir = std::env::temp_dir().join(format!("dombus-greeter-stream-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let addr = format!("unix:{}", dir.join("greeter.sock").display());
    let _server = Kill(Command::new(GREETER).args(["serve", &addr]).stderr(Stdio::null()).spawn().unwrap());
    let call = |args: &[&str]| {
        let t = Instant::now();
        loop {
            let out = Command::new(GREETER).arg(&addr).args(args).output().unwrap();
            if out.status.code() != Some(3) || t.elapsed() > Duration::from_secs(20) {
                break out;
            }
            std::thread::sleep(Duration::from_millis(20)); // not listening yet
        }
    };
    assert!(call(&["hello", "ada"]).status.success());

    // Text: the state first (a resync with the snapshot), then each arrival on one line.
    let mut watcher = Kill(
        Command::new(GREETER)
            .args([&addr, "arrivals"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = std::io::BufReader::new(watcher.0.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.ends_with("-- resync: subscribed"), "{first}");
    // The snapshot, indented: a table of the guests so far.
    let header = lines.next().unwrap().unwrap();
    let row = lines.next().unwrap().unwrap();
    assert_eq!((header.as_str(), row.as_str()), ("    NAME  LETTERS", "    ada   3"));
    assert!(call(&["hello", "grace"]).status.success());
    assert!(call(&["hello", "ada"]).status.success()); // not new: no arrival
    assert!(call(&["hello", "alan"]).status.success());
    let mut arrivals = Vec::new();
    for _ in 0..2 {
        let line = lines.next().unwrap().unwrap();
        arrivals.push(line.split_once("  ").map(|(_, rest)| rest.to_string()).unwrap());
    }
    assert_eq!(arrivals, ["name=grace, letters=5", "name=alan, letters=4"]);
    // Ctrl-C ends it with status 0.
    let pid = rustix::process::Pid::from_child(&watcher.0);
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let status = watcher.0.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");

    // JSON, ending after --count events: the state, then exactly the arrivals.
    let mut json = Command::new(GREETER)
        .args([&addr, "arrivals", "--json", "--count", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(json.stdout.take().unwrap()).lines();
    let v: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(v["resync"]["reason"], "Start", "{v}");
    assert!(call(&["hello", "barbara"]).status.success());
    assert!(call(&["hello", "edsger"]).status.success());
    let events: Vec<serde_json::Value> = lines.map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect();
    assert!(json.wait().unwrap().success());
    let names: Vec<&str> = events.iter().map(|v| v["event"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["barbara", "edsger"]);
    // From a cursor: what came after it, at once.
    let after_barbara = events[0]["cursor"].as_str().unwrap();
    let out = call(&["arrivals", "--json", "--count", "1", "--from", after_barbara]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["event"]["name"], "edsger", "{out:?}");

    // A bad cursor is a usage error.
    assert_eq!(call(&["arrivals", "--from", "nope"]).status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_ten_line_service_of_the_docs_runs_as_shown() {
    let hello = env!("CARGO_BIN_EXE_hello");
    let dir = std::env::temp_dir().join(format!("dombus-hello-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let addr = format!("unix:{}", dir.join("hello.sock").display());
    let _server = Kill(Command::new(hello).args(["serve", &addr]).spawn().unwrap());
    let t = Instant::now();
    let out = loop {
        let out = Command::new(hello).args([&addr, "hello", "world", "--excited"]).output().unwrap();
        if out.status.code() != Some(3) || t.elapsed() > Duration::from_secs(20) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(20)); // not listening yet
    };
    assert_eq!(text(&out.stdout), "hello, world!", "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
