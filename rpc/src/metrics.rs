//! Per-method call counts, errors and latency histograms, exportable in Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 12] = [1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0];

#[derive(Debug, Default, Clone)]
struct Method {
    calls: u64,
    errors: u64,
    /// Count per bucket (not cumulative), plus one for +Inf.
    buckets: [u64; BUCKETS.len() + 1],
    sum: f64,
}

/// Call statistics of one side (a server or a client), keyed by service and method.
/// Cheap to clone; clones share the numbers.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    side: &'static str,
    /// service → method → numbers (nested so that recording a known method allocates nothing).
    methods: Arc<Mutex<BTreeMap<String, BTreeMap<String, Method>>>>,
}

/// One method's numbers, as [`Metrics::snapshot`] returns them.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodStats {
    /// Service name.
    pub service: String,
    /// Method name.
    pub method: String,
    /// Calls completed (successfully or not).
    pub calls: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Total latency, seconds.
    pub seconds: f64,
}

impl Metrics {
    /// Metrics named `dombus_rpc_<side>_…` (`side`: "server" or "client").
    pub fn new(side: &'static str) -> Metrics {
        Metrics { side, methods: Arc::default() }
    }

    /// Records one completed call.
    pub fn record(&self, service: &str, method: &str, ok: bool, latency: Duration) {
        let mut m = self.methods.lock().unwrap_or_else(|p| p.into_inner());
        if !m.contains_key(service) {
            m.insert(service.to_string(), BTreeMap::new());
        }
        let Some(methods) = m.get_mut(service) else { return };
        if !methods.contains_key(method) {
            methods.insert(method.to_string(), Method::default());
        }
        let Some(e) = methods.get_mut(method) else { return };
        let s = latency.as_secs_f64();
        e.calls += 1;
        e.errors += u64::from(!ok);
        e.sum += s;
        let i = BUCKETS.iter().position(|&b| s <= b).unwrap_or(BUCKETS.len());
        e.buckets[i] += 1;
    }

    /// Every method's counts.
    pub fn snapshot(&self) -> Vec<MethodStats> {
        let m = self.methods.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .flat_map(|(service, methods)| methods.iter().map(move |(method, v)| (service, method, v)))
            .map(|(service, method, v)| MethodStats {
                service: service.clone(),
                method: method.clone(),
                calls: v.calls,
                errors: v.errors,
                seconds: v.sum,
            })
            .collect()
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let m = self.methods.lock().unwrap_or_else(|p| p.into_inner());
        let side = self.side;
        let mut out = String::new();
        let label = |s: &str, me: &str| format!("service=\"{}\",method=\"{}\"", escape(s), escape(me));
        let _ = writeln!(out, "# HELP dombus_rpc_{side}_calls_total Calls completed.");
        let _ = writeln!(out, "# TYPE dombus_rpc_{side}_calls_total counter");
        for (s, me, v) in m.iter().flat_map(|(s, ms)| ms.iter().map(move |(me, v)| (s, me, v))) {
            let _ = writeln!(out, "dombus_rpc_{side}_calls_total{{{}}} {}", label(s, me), v.calls);
        }
        let _ = writeln!(out, "# HELP dombus_rpc_{side}_errors_total Calls that failed.");
        let _ = writeln!(out, "# TYPE dombus_rpc_{side}_errors_total counter");
        for (s, me, v) in m.iter().flat_map(|(s, ms)| ms.iter().map(move |(me, v)| (s, me, v))) {
            let _ = writeln!(out, "dombus_rpc_{side}_errors_total{{{}}} {}", label(s, me), v.errors);
        }
        let _ = writeln!(out, "# HELP dombus_rpc_{side}_latency_seconds Call latency.");
        let _ = writeln!(out, "# TYPE dombus_rpc_{side}_latency_seconds histogram");
        for (s, me, v) in m.iter().flat_map(|(s, ms)| ms.iter().map(move |(me, v)| (s, me, v))) {
            let l = label(s, me);
            let mut cumulative = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                cumulative += v.buckets[i];
                let _ =
                    writeln!(out, "dombus_rpc_{side}_latency_seconds_bucket{{{l},le=\"{b}\"}} {cumulative}");
            }
            cumulative += v.buckets[BUCKETS.len()];
            let _ = writeln!(out, "dombus_rpc_{side}_latency_seconds_bucket{{{l},le=\"+Inf\"}} {cumulative}");
            let _ = writeln!(out, "dombus_rpc_{side}_latency_seconds_sum{{{l}}} {}", v.sum);
            let _ = writeln!(out, "dombus_rpc_{side}_latency_seconds_count{{{l}}} {}", v.calls);
        }
        out
    }
}

/// Escapes a Prometheus label value.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_histogram_render() {
        let m = Metrics::new("server");
        m.record("echo", "Echo", true, Duration::from_micros(30));
        m.record("echo", "Echo", false, Duration::from_millis(2));
        m.record("echo", "Sl\"ow", true, Duration::from_secs(9));
        let s = m.snapshot();
        assert_eq!(s[0].calls, 2);
        assert_eq!(s[0].errors, 1);
        let text = m.prometheus();
        assert!(text.contains("dombus_rpc_server_calls_total{service=\"echo\",method=\"Echo\"} 2"), "{text}");
        assert!(text.contains("dombus_rpc_server_errors_total{service=\"echo\",method=\"Echo\"} 1"));
        assert!(text.contains("le=\"0.00005\"} 1"), "{text}");
        assert!(text.contains("le=\"0.005\"} 2"));
        assert!(text.contains("method=\"Sl\\\"ow\",le=\"+Inf\"} 1"), "{text}");
        assert!(text.contains("dombus_rpc_server_latency_seconds_count{service=\"echo\",method=\"Echo\"} 2"));
    }
}
