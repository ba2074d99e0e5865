//! The proxy's counters, per `mode: http` service, exported by the metrics endpoint.

use prometheus_client::metrics::histogram::Histogram;
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

/// Why a request's persistence cookie (or token) was not honoured, for the
/// `sticky_lb_http_session_rejected_total{reason}` counter. The first six are the cookie
/// codec's ([`super::cookie::Rejected`]); the last is the proxy's own.
pub const REJECT_REASONS: [&str; 7] = [
    "malformed",
    "unknown_key",
    "tampered",
    "other_service",
    "idle_expired",
    "life_expired",
    "unknown_backend",
];

/// One service's counters.
pub struct ServiceStats {
    /// Responses sent to clients by status class: index 0 = 1xx ... 4 = 5xx.
    pub responses: [AtomicU64; 5],
    /// Time from sending a request to a backend to its response's headers.
    pub upstream_latency: Histogram,
    /// Sessions placed: a new client (no valid cookie or token) given a backend.
    pub sessions_new: AtomicU64,
    /// Requests that reached the backend their cookie or token named.
    pub sessions_kept: AtomicU64,
    /// Cookies (or tokens) sent: new sessions, re-placements and last-seen refreshes.
    pub cookies_issued: AtomicU64,
    /// Sessions moved because their backend was down or disabled (`on_failure: redispatch`),
    /// or its connection failed before the request was sent.
    pub redispatched: AtomicU64,
    /// 503s: `on_failure: strict` with the session's backend down, or no backend up.
    pub refused: AtomicU64,
    /// Backend connections or exchanges that failed (502) and timeouts (504).
    pub upstream_errors: AtomicU64,
    pub upstream_timeouts: AtomicU64,
    /// Connections upgraded (WebSocket) and relayed as bytes.
    pub upgrades: AtomicU64,
    /// Rejected sessions by reason, in the order of [`REJECT_REASONS`].
    pub rejected: [AtomicU64; REJECT_REASONS.len()],
}

impl Default for ServiceStats {
    fn default() -> Self {
        ServiceStats {
            responses: Default::default(),
            // 100 us to ~6.5 s, doubling.
            upstream_latency: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 17),
            ),
            sessions_new: AtomicU64::new(0),
            sessions_kept: AtomicU64::new(0),
            cookies_issued: AtomicU64::new(0),
            redispatched: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            upstream_errors: AtomicU64::new(0),
            upstream_timeouts: AtomicU64::new(0),
            upgrades: AtomicU64::new(0),
            rejected: Default::default(),
        }
    }
}

impl ServiceStats {
    pub fn response(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    pub fn reject(&self, reason: &str) {
        if let Some(i) = REJECT_REASONS.iter().position(|r| *r == reason) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Every service's counters by name, and every backend's load (service, backend) -> counts,
/// kept for the life of the process: a reload that keeps a service keeps its counts.
#[derive(Default)]
pub struct Stats {
    /// The token store's counters (one store per process).
    pub tokens: Arc<super::token::TokenStats>,
    services: Mutex<BTreeMap<String, Arc<ServiceStats>>>,
    backends: Mutex<BTreeMap<(String, String), Arc<super::route::BackendLoad>>>,
}

impl Stats {
    pub fn service(&self, name: &str) -> Arc<ServiceStats> {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        services.entry(name.to_string()).or_default().clone()
    }

    pub fn backend(&self, service: &str, backend: &str) -> Arc<super::route::BackendLoad> {
        let mut backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        backends
            .entry((service.to_string(), backend.to_string()))
            .or_default()
            .clone()
    }

    /// Forgets the services and backends not in `keep` (removed by a plan).
    pub fn retain(&self, keep: &[(String, Vec<String>)]) {
        self.services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| keep.iter().any(|(s, _)| s == name));
        self.backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(service, backend), _| {
                keep.iter()
                    .any(|(s, backends)| s == service && backends.contains(backend))
            });
    }

    /// Every service's counters, by name.
    pub fn services(&self) -> Vec<(String, Arc<ServiceStats>)> {
        let services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        services
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every backend's load, by (service, backend).
    pub fn backends(&self) -> Vec<((String, String), Arc<super::route::BackendLoad>)> {
        let backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        backends
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
