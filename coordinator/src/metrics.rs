//! Prometheus text-format counters for `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Request counters per route and status class, plus a few named gauges.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    pub tokens_issued: AtomicU64,
    pub tokens_validated: AtomicU64,
    pub failed_logins: AtomicU64,
}

impl Metrics {
    /// Counts one finished request.
    pub fn observe(&self, method: &str, route: &str, status: u16) {
        let mut m = self.requests.lock().unwrap();
        *m.entry((method.to_string(), route.to_string(), status)).or_default() += 1;
    }

    /// Renders everything in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP edgecloud_http_requests_total HTTP requests served, by method, route and status.\n");
        out.push_str("# TYPE edgecloud_http_requests_total counter\n");
        for ((method, route, status), n) in self.requests.lock().unwrap().iter() {
            out.push_str(&format!(
                "edgecloud_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}\n"
            ));
        }
        for (name, help, v) in [
            ("edgecloud_tokens_issued_total", "Tokens issued.", &self.tokens_issued),
            ("edgecloud_tokens_validated_total", "Tokens validated.", &self.tokens_validated),
            ("edgecloud_failed_logins_total", "Failed password logins.", &self.failed_logins),
        ] {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n", v.load(Ordering::Relaxed)));
        }
        out
    }
}
