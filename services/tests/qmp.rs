//! The QMP client against the real qemu (`qemu-system-x86_64 -machine none -S`, one per test,
//! killed at the end) and against a fake hostile qemu (a Unix listener in the test): typed
//! commands and answers, events, error answers, commands qemu lacks, file descriptors passed,
//! the end of the connection, and every way a hostile qemu can break the protocol.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TempDir, err, missing_prerequisite};
use dombus_services::device_model::qmp::{MAX_LINE, Qmp, QmpError, QmpEvent, QmpNotice};
use qapi::qmp;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

const TIMEOUT: Duration = Duration::from_secs(10);
const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}"#;

/// A qemu of this test, killed when dropped, with its QMP socket.
struct Qemu {
    _child: tokio::process::Child,
    socket: PathBuf,
    _dir: TempDir,
}

/// Starts a paused qemu with no machine; None (after saying so) where qemu is missing.
async fn qemu(test: &str) -> Option<Qemu> {
    let dir = TempDir::new(&format!("qmp-{test}"));
    let socket = dir.path("qmp.sock");
    let child = tokio::process::Command::new("qemu-system-x86_64")
        .args(["-machine", "none", "-nodefaults", "-display", "none", "-S", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            missing_prerequisite(test, &format!("qemu-system-x86_64 ({e}; apt-get install qemu-system-x86)"));
            return None;
        }
    };
    // qemu creates the socket before it listens: wait for it.
    for _ in 0..500 {
        if UnixStream::connect(&socket).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Some(Qemu { _child: child, socket, _dir: dir })
}

/// The notices the client gave, in order.
#[derive(Clone, Default)]
struct Notices(Arc<Mutex<Vec<QmpNotice>>>);

impl Notices {
    fn sink(&self) -> impl Fn(QmpNotice) + Send + Sync + 'static {
        let list = self.0.clone();
        move |n| list.lock().unwrap().push(n)
    }

    /// Waits until a notice matches `want`; it.
    async fn wait(&self, what: &str, want: impl Fn(&QmpNotice) -> bool) -> QmpNotice {
        for _ in 0..1000 {
            if let Some(n) = self.0.lock().unwrap().iter().find(|n| want(n)) {
                return n.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no notice {what}: {:?}", self.0.lock().unwrap());
    }

    async fn closed(&self) -> String {
        match self.wait("Closed", |n| matches!(n, QmpNotice::Closed(_))).await {
            QmpNotice::Closed(why) => why,
            QmpNotice::Event(_) => unreachable!(),
        }
    }

    fn event_names(&self) -> Vec<String> {
        let list = self.0.lock().unwrap();
        list.iter()
            .filter_map(|n| match n {
                QmpNotice::Event(e) => Some(e.name()),
                QmpNotice::Closed(_) => None,
            })
            .collect()
    }
}

async fn connect(socket: &Path, notices: &Notices) -> Qmp {
    Qmp::connect(socket, TIMEOUT, notices.sink()).await.unwrap()
}

#[tokio::test]
async fn status_cont_stop_and_their_events() {
    let Some(q) = qemu("status").await else { return };
    let notices = Notices::default();
    let qmp = connect(&q.socket, &notices).await;
    let v = qmp.version();
    assert_eq!((v.major, v.minor), (7, 2), "{v}");
    assert!(v.to_string().starts_with("7.2."), "{v}");

    let status = qmp.execute(qmp::query_status {}).await.unwrap();
    assert!(!status.running);
    assert!(matches!(status.status, qmp::RunState::prelaunch), "{status:?}");

    qmp.execute(qmp::cont {}).await.unwrap();
    let status = qmp.execute(qmp::query_status {}).await.unwrap();
    assert!(status.running && matches!(status.status, qmp::RunState::running), "{status:?}");
    notices.wait("RESUME", |n| matches!(n, QmpNotice::Event(e) if e.name() == "RESUME")).await;

    qmp.execute(qmp::stop {}).await.unwrap();
    let stop = notices.wait("STOP", |n| matches!(n, QmpNotice::Event(e) if e.name() == "STOP")).await;
    assert!(
        matches!(stop, QmpNotice::Event(QmpEvent::Typed { event: qmp::Event::STOP { .. }, micros }) if micros > 0)
    );
    qmp.execute(qmp::cont {}).await.unwrap();
    let names = notices.event_names();
    let resumes = names.iter().filter(|n| *n == "RESUME").count();
    for _ in 0..100 {
        if notices.event_names().iter().filter(|n| *n == "RESUME").count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(notices.event_names(), ["RESUME", "STOP", "RESUME"], "(had {resumes} RESUME before)");
}

#[tokio::test]
async fn commands_qemu_lacks() {
    let Some(q) = qemu("lacks").await else { return };
    let qmp = connect(&q.socket, &Notices::default()).await;
    // query-audiodevs is in the 9.1 schema (since 8.0), not in 7.2.
    let commands = qmp.execute(qmp::query_commands {}).await.unwrap();
    assert!(commands.iter().any(|c| c.name == "query-status"));
    assert!(!commands.iter().any(|c| c.name == "query-audiodevs"));
    let e = err(qmp.execute(qmp::query_audiodevs {}).await);
    assert!(
        matches!(&e, QmpError::CommandNotFound { command, version } if command == "query-audiodevs" && version.minor == 2),
        "{e:?}"
    );
    assert!(
        e.to_string().starts_with("qemu 7.2.") && e.to_string().ends_with("has no command 'query-audiodevs'"),
        "{e}"
    );
    let e = err(qmp.execute_raw("no-such", serde_json::Value::Null).await);
    assert!(matches!(&e, QmpError::CommandNotFound { command, .. } if command == "no-such"), "{e:?}");
    // The connection is still good.
    let v = qmp.execute_raw("query-version", serde_json::json!({})).await.unwrap();
    assert_eq!(v["qemu"]["major"], 7);
}

#[tokio::test]
async fn error_answer() {
    let Some(q) = qemu("error").await else { return };
    let qmp = connect(&q.socket, &Notices::default()).await;
    let e = err(qmp.execute(qmp::blockdev_del { node_name: "missing0".into() }).await);
    match &e {
        QmpError::Command { command, class, desc } => {
            assert_eq!((command.as_str(), class.as_str()), ("blockdev-del", "GenericError"));
            assert!(desc.contains("missing0"), "{desc}");
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().starts_with("QMP blockdev-del: GenericError: "), "{e}");
}

#[tokio::test]
async fn file_descriptors_passed() {
    let Some(q) = qemu("fds").await else { return };
    let qmp = connect(&q.socket, &Notices::default()).await;
    let file = std::fs::File::create(q._dir.path("state")).unwrap();
    use std::os::fd::AsFd as _;
    let added = qmp
        .execute_with_fd(qmp::add_fd { fdset_id: None, opaque: Some("state-file".into()) }, file.as_fd())
        .await
        .unwrap();
    let sets = qmp.execute(qmp::query_fdsets {}).await.unwrap();
    let set = sets.iter().find(|s| s.fdset_id == added.fdset_id).expect("the fdset");
    assert!(
        set.fds.iter().any(|f| f.fd == added.fd && f.opaque.as_deref() == Some("state-file")),
        "{sets:?}"
    );

    qmp.execute_with_fd(qmp::getfd { fdname: "mig".into() }, file.as_fd()).await.unwrap();
    // qemu holds it under that name: closing it works once, then it is unknown.
    qmp.execute(qmp::closefd { fdname: "mig".into() }).await.unwrap();
    let e = err(qmp.execute(qmp::closefd { fdname: "mig".into() }).await);
    assert!(matches!(e, QmpError::Command { .. }), "{e:?}");
    // Without a descriptor, getfd fails (qemu received none).
    let e = err(qmp.execute(qmp::getfd { fdname: "none".into() }).await);
    assert!(matches!(&e, QmpError::Command { desc, .. } if desc.contains("file descriptor")), "{e:?}");
}

#[tokio::test]
async fn quit_closes() {
    let Some(q) = qemu("quit").await else { return };
    let notices = Notices::default();
    let qmp = connect(&q.socket, &notices).await;
    // quit answers, then qemu closes the socket.
    let _ = qmp.execute(qmp::quit {}).await;
    let why = notices.closed().await;
    assert!(why.starts_with("qemu closed its QMP socket"), "{why}");
    assert_eq!(qmp.closed().await, why);
    let e = err(qmp.execute(qmp::query_status {}).await);
    assert!(
        matches!(&e, QmpError::Closed { command, reason } if command == "query-status" && *reason == why),
        "{e:?}"
    );
}

/// A fake qemu at a fresh socket: `script` runs on the accepted connection.
async fn fake<F, Fut>(test: &str, script: F) -> (TempDir, PathBuf)
where
    F: FnOnce(BufReader<UnixStream>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let dir = TempDir::new(&format!("qmp-fake-{test}"));
    let socket = dir.path("qmp.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        script(BufReader::new(stream)).await;
    });
    (dir, socket)
}

/// The fake's side of the greeting and capabilities negotiation.
async fn negotiate(s: &mut BufReader<UnixStream>) {
    s.get_mut().write_all(format!("{GREETING}\r\n").as_bytes()).await.unwrap();
    let id = read_command(s).await["id"].clone();
    s.get_mut().write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\r\n").as_bytes()).await.unwrap();
}

async fn read_command(s: &mut BufReader<UnixStream>) -> serde_json::Value {
    let mut line = String::new();
    s.read_line(&mut line).await.unwrap();
    serde_json::from_str(&line).unwrap()
}

/// Connects to a fake whose script follows the negotiation with `then`, runs one query-status,
/// and returns its result and the Closed reason.
async fn against<F, Fut>(test: &str, then: F) -> (Result<qmp::StatusInfo, QmpError>, String, Notices)
where
    F: FnOnce(BufReader<UnixStream>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (_dir, socket) = fake(test, |mut s| async move {
        negotiate(&mut s).await;
        then(s).await;
    })
    .await;
    let notices = Notices::default();
    let qmp = Qmp::connect(&socket, TIMEOUT, notices.sink()).await.unwrap();
    let r = tokio::time::timeout(2 * TIMEOUT, qmp.execute(qmp::query_status {})).await.expect("no hang");
    let why = tokio::time::timeout(TIMEOUT, notices.closed()).await.expect("a Closed notice");
    (r, why, notices)
}

#[tokio::test]
async fn hostile_line_over_1_mib() {
    let (r, why, _) = against("long", |mut s| async move {
        let _ = read_command(&mut s).await;
        let big = vec![b' '; MAX_LINE + 10];
        let _ = s.get_mut().write_all(&big).await;
        // Hold the connection open: the client must end it, not wait for a newline.
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    assert_eq!(why, "line longer than 1 MiB");
    assert!(matches!(&r, Err(QmpError::Closed { reason, .. }) if *reason == why), "{r:?}");
}

#[tokio::test]
async fn hostile_unknown_id() {
    let (r, why, _) = against("id", |mut s| async move {
        let id = read_command(&mut s).await["id"].as_u64().unwrap();
        let answer = format!("{{\"return\": {{}}, \"id\": {}}}\n", id + 1000);
        let _ = s.get_mut().write_all(answer.as_bytes()).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    assert!(why.starts_with("an answer with id ") && why.ends_with("which no call awaits"), "{why}");
    assert!(matches!(r, Err(QmpError::Closed { .. })), "{r:?}");
}

#[tokio::test]
async fn hostile_invalid_json() {
    let (r, why, _) = against("json", |mut s| async move {
        let _ = read_command(&mut s).await;
        let _ = s.get_mut().write_all(b"{\"return\": {\xff\n").await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    assert!(why.starts_with("a line that is not JSON"), "{why}");
    assert!(matches!(r, Err(QmpError::Closed { .. })), "{r:?}");
}

#[tokio::test]
async fn hostile_unknown_event_then_garbage_answer() {
    let (r, why, notices) = against("event", |mut s| async move {
        let id = read_command(&mut s).await["id"].clone();
        let event = r#"{"event": "NEW_IN_QEMU_42", "data": {"a": [1]}, "timestamp": {"seconds": 3, "microseconds": 4}}"#;
        let _ = s.get_mut().write_all(format!("{event}\n").as_bytes()).await;
        // An answer that is not a StatusInfo: an error for this call only.
        let _ = s.get_mut().write_all(format!("{{\"return\": 5, \"id\": {id}}}\n").as_bytes()).await;
    })
    .await;
    match notices.0.lock().unwrap().first() {
        Some(QmpNotice::Event(QmpEvent::Other { name, data, micros })) => {
            assert_eq!((name.as_str(), *micros), ("NEW_IN_QEMU_42", 3_000_004));
            assert_eq!(data, &serde_json::json!({"a": [1]}));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(&r, Err(QmpError::Protocol { command, .. }) if command == "query-status"), "{r:?}");
    assert_eq!(why, "qemu closed its QMP socket");
}

#[tokio::test]
async fn hostile_no_greeting() {
    let (_dir, socket) = fake("silent", |s| async move {
        let _held = s;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let e = err(Qmp::connect(&socket, Duration::from_millis(300), |_| {}).await);
    assert!(matches!(&e, QmpError::Timeout { command } if command.starts_with("connect")), "{e:?}");
}

#[tokio::test]
async fn hostile_old_qemu_and_bad_greeting() {
    let (_dir, socket) = fake("old", |mut s| async move {
        let old = GREETING.replace("\"major\": 7", "\"major\": 6");
        let _ = s.get_mut().write_all(format!("{old}\n").as_bytes()).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let e = err(Qmp::connect(&socket, TIMEOUT, |_| {}).await);
    assert!(matches!(e, QmpError::TooOld { .. }), "{e:?}");
    assert_eq!(e.to_string(), "qemu 6.2.0 (fake) is too old: dombus needs qemu 7.0 or newer");

    let (_dir, socket) = fake("nogreet", |mut s| async move {
        let _ = s.get_mut().write_all(b"{\"return\": {}, \"id\": 0}\n").await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let e = err(Qmp::connect(&socket, TIMEOUT, |_| {}).await);
    assert!(matches!(e, QmpError::Protocol { .. }), "{e:?}");
}

#[tokio::test]
async fn a_late_answer_is_dropped_and_slots_are_bounded() {
    let (_dir, socket) = fake("late", |mut s| async move {
        negotiate(&mut s).await;
        // The first command is answered late (after the caller gave up), the rest at once.
        let first = read_command(&mut s).await["id"].clone();
        let second = read_command(&mut s).await["id"].clone();
        let _ = s.get_mut().write_all(format!("{{\"return\": 1, \"id\": {first}}}\n").as_bytes()).await;
        let _ = s.get_mut().write_all(format!("{{\"return\": 2, \"id\": {second}}}\n").as_bytes()).await;
        loop {
            let id = read_command(&mut s).await["id"].clone();
            let _ = s.get_mut().write_all(format!("{{\"return\": 3, \"id\": {id}}}\n").as_bytes()).await;
        }
    })
    .await;
    let notices = Notices::default();
    let qmp = Qmp::connect(&socket, Duration::from_millis(500), notices.sink()).await.unwrap();
    // The first call times out before the fake answers (it waits for the second command).
    let e = err(qmp.execute_raw("first", serde_json::Value::Null).await);
    assert!(matches!(&e, QmpError::Timeout { command } if command == "first"), "{e:?}");
    // The late answer 1 is dropped; the second call gets its own answer, 2.
    assert_eq!(qmp.execute_raw("second", serde_json::Value::Null).await.unwrap(), 2);
    assert_eq!(qmp.execute_raw("third", serde_json::Value::Null).await.unwrap(), 3);
    assert!(notices.0.lock().unwrap().is_empty(), "{:?}", notices.0.lock().unwrap());
}

#[tokio::test]
async fn commands_in_flight_are_bounded() {
    let received = Arc::new(Mutex::new(0usize));
    let counter = received.clone();
    let (_dir, socket) = fake("bound", |mut s| async move {
        negotiate(&mut s).await;
        // Never answers: every command stays in flight.
        loop {
            let mut line = String::new();
            if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            *counter.lock().unwrap() += 1;
        }
    })
    .await;
    let qmp = Qmp::connect(&socket, Duration::from_millis(400), |_| {}).await.unwrap();
    let calls: Vec<_> = (0..12)
        .map(|i| {
            let qmp = qmp.clone();
            tokio::spawn(async move { qmp.execute_raw(&format!("c{i}"), serde_json::Value::Null).await })
        })
        .collect();
    for call in calls {
        let e = err(call.await.unwrap());
        assert!(matches!(e, QmpError::Timeout { .. }), "{e:?}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(*received.lock().unwrap(), dombus_services::device_model::qmp::MAX_IN_FLIGHT);
    // The forgotten calls keep their slots until qemu answers them: a wedged qemu gets no more.
    let e = err(qmp.execute_raw("more", serde_json::Value::Null).await);
    assert!(matches!(e, QmpError::Timeout { .. }), "{e:?}");
    assert_eq!(*received.lock().unwrap(), dombus_services::device_model::qmp::MAX_IN_FLIGHT);
}

#[tokio::test]
async fn a_write_cut_short_ends_the_connection() {
    let (_dir, socket) = fake("torn", |mut s| async move {
        negotiate(&mut s).await;
        // Reads nothing more: a large command fills the socket and its write blocks.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(s);
    })
    .await;
    let notices = Notices::default();
    let qmp = Qmp::connect(&socket, Duration::from_millis(300), notices.sink()).await.unwrap();
    let big = serde_json::json!({ "blob": "x".repeat(8 << 20) });
    let e = err(qmp.execute_raw("big", big).await);
    assert!(matches!(&e, QmpError::Timeout { command } if command == "big"), "{e:?}");
    // Half a line went out: the stream is corrupt, so the next call ends the connection.
    let e = err(qmp.execute(qmp::query_status {}).await);
    let reason = "a command was cancelled while being written";
    assert!(matches!(&e, QmpError::Closed { reason: r, .. } if r == reason), "{e:?}");
    assert_eq!(notices.closed().await, reason);
}

#[tokio::test]
async fn dropping_the_client_ends_the_connection() {
    let Some(q) = qemu("drop").await else { return };
    let notices = Notices::default();
    let qmp = connect(&q.socket, &notices).await;
    let clone = qmp.clone();
    drop(qmp);
    // A clone keeps it open.
    clone.execute(qmp::query_status {}).await.unwrap();
    drop(clone);
    assert_eq!(notices.closed().await, "the QMP client was dropped");
    // qemu is still there and takes a new connection.
    let again = connect(&q.socket, &Notices::default()).await;
    again.execute(qmp::query_status {}).await.unwrap();
}

#[tokio::test]
async fn no_socket() {
    let dir = TempDir::new("qmp-none");
    let e = err(Qmp::connect(&dir.path("absent.sock"), TIMEOUT, |_| {}).await);
    assert!(matches!(&e, QmpError::Io { command, .. } if command.ends_with("absent.sock")), "{e:?}");
}
