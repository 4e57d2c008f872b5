//! The `dombus` tool against a live server: describe (text and JSON), ping, metrics, and the
//! exit status when nothing listens.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;

use dombus::{Address, Net, Server, ServerConfig};

const DOMBUS: &str = env!("CARGO_BIN_EXE_dombus");

/// Shelves of books.
#[dombus::service(name = "library", version = 3)]
pub trait Library {
    /// Books on a shelf.
    #[idempotent]
    async fn shelf(&self, number: u32) -> Vec<String>;
}

struct Impl;
impl Library for Impl {
    async fn shelf(&self, number: u32) -> Vec<String> {
        vec![format!("book on shelf {number}")]
    }
}

fn dombus(args: &[&str]) -> std::process::Output {
    // Run on a blocking thread: the server runs on this test's runtime.
    Command::new(DOMBUS).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_a_live_server() {
    let dir = std::env::temp_dir().join(format!("dombus-cli-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let addr = Address::Unix(dir.join("library.sock"));
    let server = Server::new(Net::new(), ServerConfig::default());
    let handle = server.serve(&addr, Impl.into_service()).await.unwrap();
    let client = LibraryClient::connect(Net::new(), addr.clone()).await.unwrap();
    for n in 0..3 {
        client.shelf(dombus::context::current(), n).await.unwrap();
    }
    let a = addr.to_string();

    let out = tokio::task::spawn_blocking({
        let a = a.clone();
        move || dombus(&["metrics", &a])
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l == "dombus_rpc_server_calls_total{service=\"library\",method=\"shelf\"} 3"),
        "{text}"
    );
    assert!(text.contains("# TYPE dombus_rpc_server_latency_seconds histogram"), "{text}");

    let out = tokio::task::spawn_blocking(move || dombus(&["--json", "metrics", &a])).await.unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["prometheus"].as_str().unwrap().contains("method=\"shelf\"} 3"), "{v}");
    handle.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_and_ping_a_live_server() {
    let dir = std::env::temp_dir().join(format!("dombus-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let addr = Address::Unix(dir.join("library.sock"));
    let server = Server::new(Net::new(), ServerConfig::default());
    let handle = server.serve(&addr, Impl.into_service()).await.unwrap();
    let a = addr.to_string();

    let out = tokio::task::spawn_blocking({
        let a = a.clone();
        move || dombus(&["describe", &a])
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "library (version 3): Shelves of books.\n  shelf(number: u32) -> Vec<String>  [idempotent]\n      Books on a shelf."
    );

    let out = tokio::task::spawn_blocking({
        let a = a.clone();
        move || dombus(&["--json", "describe", &a])
    })
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["methods"][0]["args"][0]["ty"], "u32");

    let out = tokio::task::spawn_blocking({
        let a = a.clone();
        move || dombus(&["--json", "ping", &a, "--count", "50"])
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["count"], 50);
    assert!(v["p50_us"].as_f64().unwrap() > 0.0 && v["p99_us"].as_f64() >= v["p50_us"].as_f64());

    handle.stop().await;
    let out = tokio::task::spawn_blocking(move || dombus(&["describe", &a])).await.unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = dombus(&["describe", "nonsense:1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
