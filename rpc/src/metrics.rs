//! Per-method call counts, errors and latency histograms, and a server's connections (open,
//! refused, paused, calls in flight), exportable in Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most bytes of the Prometheus text a server answers to the built-in metrics call or a
/// scrape ([`Metrics::prometheus_within`]): far more than the few services a server hosts
/// render to (about 2 KiB per method).
pub const MAX_METRICS_TEXT: usize = 1 << 20;

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
    connections: Arc<Connections>,
}

/// A server's connection counts (see [`ConnectionStats`]).
#[derive(Debug, Default)]
struct Connections {
    open: AtomicUsize,
    refused: AtomicU64,
    paused: AtomicUsize,
    in_flight_peak: AtomicUsize,
}

/// A server's connections, as [`Metrics::connections`] returns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectionStats {
    /// Connections open now, including those still sending their preamble (at most
    /// `ServerConfig::max_connections`).
    pub open: usize,
    /// Connections refused since the start because `max_connections` were open.
    pub refused: u64,
    /// Connections not being read now because their calls in flight reached
    /// `ServerConfig::max_in_flight` or `max_in_flight_bytes`: their replies are not being read
    /// (or the service is slow); reading resumes as the replies drain.
    pub paused: usize,
    /// The most calls in flight (read and not yet answered) on one connection at once, since
    /// the start.
    pub in_flight_peak: usize,
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
        Metrics { side, methods: Arc::default(), connections: Arc::default() }
    }

    /// Counts a new connection open, unless `max` are open already (then counts nothing and
    /// answers false).
    pub(crate) fn try_open(&self, max: usize) -> bool {
        let open = &self.connections.open;
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
    }

    /// Counts a connection [`try_open`](Self::try_open) counted as closed.
    pub(crate) fn closed(&self) {
        self.connections.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// Counts a connection refused because too many were open.
    pub(crate) fn refused(&self) {
        self.connections.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection paused (`true`) or resumed (`false`).
    pub(crate) fn paused(&self, paused: bool) {
        if paused {
            self.connections.paused.fetch_add(1, Ordering::Relaxed);
        } else {
            self.connections.paused.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Notes `n` calls in flight on one connection.
    pub(crate) fn in_flight(&self, n: usize) {
        self.connections.in_flight_peak.fetch_max(n, Ordering::Relaxed);
    }

    /// The server's connections now.
    pub fn connections(&self) -> ConnectionStats {
        let c = &*self.connections;
        ConnectionStats {
            open: c.open.load(Ordering::Acquire),
            refused: c.refused.load(Ordering::Relaxed),
            paused: c.paused.load(Ordering::Relaxed),
            in_flight_peak: c.in_flight_peak.load(Ordering::Relaxed),
        }
    }

    /// Records one completed call.
    pub fn record(&self, service: &str, method: &str, ok: bool, latency: Duration) {
        let s = latency.as_secs_f64();
        let i = BUCKETS.iter().position(|&b| s <= b).unwrap_or(BUCKETS.len());
        let mut m = self.methods.lock().unwrap_or_else(|p| p.into_inner());
        update(&mut m, service, method, |e| {
            e.calls += 1;
            e.errors += u64::from(!ok);
            e.sum += s;
            e.buckets[i] += 1;
        });
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
        if side == "server" {
            let c = self.connections();
            let mut put = |name: &str, kind: &str, help: &str, labels: &str, value: u64| {
                let _ = writeln!(out, "# HELP dombus_rpc_server_{name} {help}");
                let _ = writeln!(out, "# TYPE dombus_rpc_server_{name} {kind}");
                let _ = writeln!(out, "dombus_rpc_server_{name}{labels} {value}");
            };
            let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
            put("connections", "gauge", "Connections open.", "", n(c.open));
            put(
                "connections_refused_total",
                "counter",
                "Connections refused, by reason.",
                "{reason=\"too_many_connections\"}",
                c.refused,
            );
            put(
                "connections_paused",
                "gauge",
                "Connections not read until their replies drain (calls in flight at the bound).",
                "",
                n(c.paused),
            );
            put(
                "calls_in_flight_peak",
                "gauge",
                "Most calls in flight on one connection at once.",
                "",
                n(c.in_flight_peak),
            );
        }
        out
    }
}

impl Metrics {
    /// [`prometheus`](Self::prometheus), cut after the last whole line that fits in `max`
    /// bytes, with a comment line saying so.
    pub fn prometheus_within(&self, max: usize) -> String {
        let mut text = self.prometheus();
        if text.len() > max {
            const CUT: &str = "# truncated: longer than the server answers\n";
            let room = max.saturating_sub(CUT.len());
            let end = text.as_bytes()[..room].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            text.truncate(end);
            if text.len() + CUT.len() <= max {
                text.push_str(CUT);
            }
        }
        text
    }
}

/// Escapes a Prometheus label value.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Updates the counts of `service`'s `method` with `f`, making them on first use: one search
/// of each map when they exist (every call but a method's first); names are copied only when
/// they do not.
fn update(
    m: &mut BTreeMap<String, BTreeMap<String, Method>>,
    service: &str,
    method: &str,
    f: impl FnOnce(&mut Method),
) {
    match m.get_mut(service) {
        Some(methods) => match methods.get_mut(method) {
            Some(e) => f(e),
            None => f(methods.entry(method.to_string()).or_default()),
        },
        None => f(m.entry(service.to_string()).or_default().entry(method.to_string()).or_default()),
    }
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

    #[test]
    fn text_is_cut_at_a_whole_line_within_the_bound() {
        let m = Metrics::new("server");
        for i in 0..50 {
            m.record("svc", &format!("method{i}"), true, Duration::from_micros(30));
        }
        let whole = m.prometheus();
        assert_eq!(m.prometheus_within(whole.len()), whole);
        for max in [0, 10, 60, 1000, 4096, whole.len() - 1] {
            let cut = m.prometheus_within(max);
            assert!(cut.len() <= max, "{max}: {} bytes", cut.len());
            assert!(
                cut.is_empty() || cut.ends_with("# truncated: longer than the server answers\n"),
                "{cut}"
            );
            let kept = cut.trim_end_matches("# truncated: longer than the server answers\n");
            assert!(whole.starts_with(kept) && (kept.is_empty() || kept.ends_with('\n')), "{max}");
        }
    }
}
