//! The `dombus` tool speaks to people and to scripts: against a storage service served here
//! (real qemu-img, a Unix socket), a service's error is its sentence in text and its variant in
//! `--json`; sizes are `10G` in text and exact bytes in `--json`; help shows whole sentences.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::PathBuf;
use std::process::{Command, Output};

use dombus::{Address, Net, Server, ServerConfig};
use dombus_services::storage::{QemuImg, Storage};

const DOMBUS: &str = env!("CARGO_BIN_EXE_dombus");

/// `dombus ARGS…`, on a blocking thread (the server runs on the test's runtime).
async fn dombus(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || Command::new(DOMBUS).args(&args).output().unwrap()).await.unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_sentences_and_sizes_are_for_people_json_stays_exact() {
    let dir = TempDir(std::env::temp_dir().join(format!("dombus-people-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let storage = QemuImg::new(dir.0.join("images"), "qemu-img".into()).unwrap();
    let addr = Address::Unix(dir.0.join("storage.sock"));
    let handle =
        Server::new(Net::new(), ServerConfig::default()).serve(&addr, storage.into_service()).await.unwrap();
    let at = format!("--addr={addr}");
    // No host is up in this state directory: `--addr` says where the service is.
    let state = dir.0.join("state");
    let state = format!("--state={}", state.display());

    let o = dombus(&[&state, "storage", &at, "create", "disk0", "--size", "10G"]).await;
    assert!(o.status.success(), "{o:?}");

    // Twice: the service's own sentence in text, exit status 1.
    let o = dombus(&[&state, "storage", &at, "create", "disk0", "--size", "10G"]).await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_eq!(text(&o.stderr), r#"error: image "disk0" already exists"#);
    // …and the variant and its fields in JSON.
    let o = dombus(&[&state, "--json", "storage", &at, "create", "disk0", "--size", "10G"]).await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v, serde_json::json!({"error": {"AlreadyExists": {"name": "disk0"}}}));

    // Sizes: exact bytes in JSON, for people in a table.
    let o = dombus(&[&state, "--json", "storage", &at, "list"]).await;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["virtual_size"], serde_json::json!(10737418240u64), "{v}");
    let allocated = v[0]["actual_size"].as_u64().unwrap();
    let o = dombus(&[&state, "storage", &at, "list"]).await;
    assert!(o.status.success(), "{o:?}");
    let out = text(&o.stdout);
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let column = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!(column("NAME"), "disk0", "{out}");
    assert_eq!(column("VIRTUAL_SIZE"), "10G", "{out}");
    assert_eq!(column("ACTUAL_SIZE"), dombus::Size(allocated).to_string(), "{out}");
    // One value: `info` as `key  value` lines.
    let o = dombus(&[&state, "storage", &at, "info", "disk0"]).await;
    assert!(text(&o.stdout).lines().any(|l| l.split_whitespace().eq(["virtual_size", "10G"])), "{o:?}");

    // Help: the whole first sentence of a doc comment wrapped over two lines.
    let o = dombus(&["storage", "--help"]).await;
    assert!(o.status.success(), "{o:?}");
    let help = text(&o.stdout);
    let create = help.lines().find(|l| l.trim_start().starts_with("create")).unwrap();
    assert!(
        create
            .trim_end()
            .ends_with("optionally a linked clone of the image `backing` (qcow2 only), owned by the caller."),
        "{help}"
    );
    let o = dombus(&[&state, "describe", &addr.to_string()]).await;
    assert!(
        text(&o.stdout).contains(
            "      Creates an empty image `name` of `size` bytes (qcow2 unless `format` says otherwise), \
             optionally a linked clone of the image `backing` (qcow2 only), owned by the caller.\n"
        ),
        "{o:?}"
    );

    handle.stop().await;
}
