//! Prometheus metrics over HTTP (the proxy's server: HTTP/1.1 or HTTP/2), off unless
//! `metrics.listen` is set.
//!
//! - `GET /metrics` (or `HEAD`): 200 with every metric family (all named `sticky_lb_*`) in the
//!   Prometheus text format 0.0.4 (`text/plain; version=0.0.4`), `# HELP` and `# TYPE` lines
//!   included.
//! - 500 with the reason as plain text when the scrape cannot be answered: no data path is
//!   pinned, a map cannot be read, or the controller has not written its state yet.
//! - 404 for any other path, 405 for any other method on `/metrics`.
//!
//! Counters are read from the pinned maps at scrape time; occupancy per backend and service
//! comes from the last expiry sweep (walking a million-entry table on every scrape would cost
//! seconds).

use crate::{
    dataplane::{PinDir, PinnedMaps},
    expiry::SweepReport,
    health::Latencies,
    state::RuntimeState,
};
use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, prometheus_text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};
use sticky_lb_common::{BackendCounters, BackendId, Counter, ServiceCounters, ServiceId};
use tokio::{net::TcpListener, sync::oneshot};
use tracing::debug;

/// Prepended (with `_`) to every family name.
const PREFIX: &str = "sticky_lb";
/// How long a client may take to send a request's headers before its connection is closed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long scrapes in progress may go on once [`MetricsServer::shutdown`] closed the listening
/// socket; connections still open then are cut.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// What the controller knows that the maps do not, kept current by the controller.
pub struct Snapshot {
    pub state: Option<RuntimeState>,
    pub latencies: Latencies,
    pub live_by_backend: BTreeMap<BackendId, u64>,
    pub live_by_service: BTreeMap<ServiceId, u64>,
    pub expired_total: BTreeMap<ServiceId, u64>,
    pub sweep_seconds: f64,
    pub sweeps: u64,
    /// The shared stick table's counters, while it runs.
    pub shared: Option<Arc<crate::shared::Stats>>,
    /// The HTTP proxy's counters (`mode: http` services).
    pub http: Option<Arc<crate::http::stats::Stats>>,
}

impl Snapshot {
    pub fn new(latencies: Latencies) -> Snapshot {
        Snapshot {
            state: None,
            latencies,
            live_by_backend: BTreeMap::new(),
            live_by_service: BTreeMap::new(),
            expired_total: BTreeMap::new(),
            sweep_seconds: 0.0,
            sweeps: 0,
            shared: None,
            http: None,
        }
    }

    pub fn record_sweep(&mut self, report: &SweepReport) {
        self.live_by_backend = report.live_by_backend.clone();
        self.live_by_service = report.live_by_service.clone();
        for (service, n) in &report.expired_by_service {
            *self.expired_total.entry(*service).or_default() += n;
        }
        self.sweep_seconds = report.duration_ms as f64 / 1000.0;
        self.sweeps += 1;
    }
}

/// The metrics endpoint, serving on the controller's runtime until [`MetricsServer::shutdown`]
/// (or until dropped, which stops it without waiting for the socket to close).
pub struct MetricsServer {
    listen: SocketAddr,
    /// Asks the server task to stop; it answers on the enclosed sender once its listening
    /// socket is closed.
    stop: crate::http::server::Stop,
}

/// What a scrape reads.
struct Source {
    pins: PinDir,
    snapshot: Arc<Mutex<Snapshot>>,
    stick_capacity: u32,
}

impl MetricsServer {
    /// Binds `listen` and serves until `shutdown`. Must be called from within the async runtime
    /// (the server is a task on it). A port of 0 binds a free port, which
    /// [`MetricsServer::listen`] then gives. `stick_capacity` is the stick table's size in
    /// entries.
    ///
    /// Errors: the bind error, naming the address.
    pub fn start(
        listen: SocketAddr,
        pins: PinDir,
        snapshot: Arc<Mutex<Snapshot>>,
        stick_capacity: u32,
    ) -> Result<MetricsServer> {
        // Bound synchronously so that a taken address fails here, not later in the task.
        let listener = std::net::TcpListener::bind(listen)
            .and_then(|l| {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            })
            .with_context(|| format!("metrics: binding {listen}"))?;
        let listen = listener
            .local_addr()
            .with_context(|| format!("metrics: the address bound for {listen}"))?;
        let source = Arc::new(Source {
            pins,
            snapshot,
            stick_capacity,
        });
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(crate::http::server::serve(
            "metrics",
            listener,
            stopped,
            DRAIN_TIMEOUT,
            move |stream, peer, drain| connection(stream, peer, source.clone(), drain),
        ));
        Ok(MetricsServer { listen, stop })
    }

    /// The address the server listens on (with the real port if it was started with port 0).
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Stops accepting, and returns once the listening socket is closed (so the same address
    /// can be bound again at once). Idle keep-alive connections are closed; scrapes in progress
    /// get up to [`DRAIN_TIMEOUT`] (2 s) to finish in the background, so a slow client cannot
    /// hold the caller up.
    pub async fn shutdown(self) {
        let (closed_tx, closed) = oneshot::channel();
        // Either fails only if the task is gone already, and its socket with it.
        if self.stop.send(closed_tx).is_ok() {
            let _ = closed.await;
        }
    }
}

/// Serves one scrape connection on the server the proxy's listeners run (HTTP/1.1 or HTTP/2).
async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    source: Arc<Source>,
    drain: tokio::sync::watch::Receiver<bool>,
) {
    let service = service_fn(move |request| respond(request, source.clone()));
    let builder = crate::http::server::builder(REQUEST_TIMEOUT);
    if let Err(e) =
        crate::http::server::until_drained(&builder, TokioIo::new(stream), service, drain).await
    {
        debug!("metrics: connection from {peer}: {e}");
    }
}

/// Answers one request; errors become responses, so the connection is never torn down.
async fn respond(
    request: Request<Incoming>,
    source: Arc<Source>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() != "/metrics" {
        return Ok(plain(StatusCode::NOT_FOUND, "try GET /metrics\n".into()));
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "try GET /metrics\n".into());
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    // Reading the maps is a series of system calls: off the runtime's worker threads.
    let rendered = tokio::task::spawn_blocking(move || {
        render(&source.pins, &source.snapshot, source.stick_capacity)
    })
    .await
    .unwrap_or_else(|e| Err(anyhow::anyhow!("metrics: rendering: {e}")));
    Ok(match rendered {
        Ok(text) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(prometheus_text::CONTENT_TYPE),
            );
            response
        }
        Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")),
    })
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Every family, read from the pinned maps at `pins` and from `snapshot`, in the Prometheus
/// text format 0.0.4. `stick_capacity` is the stick table's size in entries.
///
/// Errors: no data path is pinned at `pins`, a counter map cannot be read, the snapshot's lock
/// is poisoned, or the controller has not written its state yet.
pub fn render(pins: &PinDir, snapshot: &Mutex<Snapshot>, stick_capacity: u32) -> Result<String> {
    let maps = PinnedMaps::open(pins)?;
    let snap = snapshot
        .lock()
        .map_err(|_| anyhow::anyhow!("metrics state poisoned"))?;
    encode(read(&maps, &snap, stick_capacity)?)
}

/// The data path's counters. Implemented by the pinned maps; tests give fixed numbers.
trait Counts {
    fn service(&self, id: ServiceId) -> Result<ServiceCounters>;
    fn backend(&self, id: BackendId) -> Result<BackendCounters>;
    /// Open connections to the backend; 0 if the slot cannot be read.
    fn active(&self, id: BackendId) -> i64;
    /// Packets not forwarded, indexed by [`Counter`].
    fn not_forwarded(&self) -> Result<Vec<u64>>;
}

impl Counts for PinnedMaps {
    fn service(&self, id: ServiceId) -> Result<ServiceCounters> {
        self.service_counters(id)
    }

    fn backend(&self, id: BackendId) -> Result<BackendCounters> {
        self.backend_counters(id)
    }

    fn active(&self, id: BackendId) -> i64 {
        self.active.get(&id, 0).unwrap_or(0)
    }

    fn not_forwarded(&self) -> Result<Vec<u64>> {
        self.counters()
    }
}

/// Label names and values of one sample.
type Labels = Vec<(&'static str, String)>;

/// One family's description and samples, as read for one scrape.
#[derive(Debug)]
struct Family<N> {
    /// Without the prefix, the unit, or (for a counter) `_total`: the encoder appends those.
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    samples: Vec<(Labels, N)>,
}

// The sample type decides the metric type (see `AnyFamily`); these name it at each use.
impl Family<u64> {
    fn counter(name: &'static str, help: &'static str) -> Family<u64> {
        Family::new(name, help, None)
    }
}

impl Family<i64> {
    fn gauge(name: &'static str, help: &'static str) -> Family<i64> {
        Family::new(name, help, None)
    }
}

impl Family<f64> {
    /// A gauge of durations; `_seconds` is appended to `name`.
    fn seconds(name: &'static str, help: &'static str) -> Family<f64> {
        Family::new(name, help, Some(Unit::Seconds))
    }
}

impl<N: Copy> Family<N> {
    fn new(name: &'static str, help: &'static str, unit: Option<Unit>) -> Family<N> {
        Family {
            name,
            help,
            unit,
            samples: Vec::new(),
        }
    }

    fn add(&mut self, labels: &Labels, value: N) {
        self.samples.push((labels.clone(), value));
    }

    /// Writes the description, then the samples; a family without samples is still described,
    /// as it was before its first sample (no health check has finished yet, say).
    fn encode<M: EncodeMetric>(
        &self,
        encoder: &mut DescriptorEncoder,
        metric_type: MetricType,
        metric: impl Fn(N) -> M,
    ) -> std::fmt::Result {
        let mut family =
            encoder.encode_descriptor(self.name, self.help, self.unit.as_ref(), metric_type)?;
        for (labels, value) in &self.samples {
            metric(*value).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

/// A family of any of the sample types used here: `u64` samples make a counter, `i64` and
/// `f64` samples a gauge.
#[derive(Debug)]
enum AnyFamily {
    Counter(Family<u64>),
    Gauge(Family<i64>),
    FloatGauge(Family<f64>),
    /// A histogram without labels: (name, help, unit, the live histogram).
    Histogram(&'static str, &'static str, Unit, Histogram),
    /// Histograms, one per label set: (name, help, unit, samples).
    Histograms(&'static str, &'static str, Unit, Vec<(Labels, Histogram)>),
}

impl From<Family<u64>> for AnyFamily {
    fn from(f: Family<u64>) -> AnyFamily {
        AnyFamily::Counter(f)
    }
}

impl From<Family<i64>> for AnyFamily {
    fn from(f: Family<i64>) -> AnyFamily {
        AnyFamily::Gauge(f)
    }
}

impl From<Family<f64>> for AnyFamily {
    fn from(f: Family<f64>) -> AnyFamily {
        AnyFamily::FloatGauge(f)
    }
}

/// Everything one scrape exposes, already read.
///
/// Built afresh for each scrape and registered in a fresh registry, rather than a collector
/// that reads the maps from inside a long-lived registry: a collector can only fail with a
/// formatting error, so the reason a scrape failed (no maps pinned, say) would be lost instead
/// of answered as a 500, and a registry costs microseconds next to the map reads.
#[derive(Debug)]
struct Scrape(Vec<AnyFamily>);

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        for family in &self.0 {
            match family {
                AnyFamily::Counter(f) => {
                    f.encode(&mut encoder, MetricType::Counter, ConstCounter::new)?
                }
                AnyFamily::Gauge(f) => {
                    f.encode(&mut encoder, MetricType::Gauge, ConstGauge::new)?
                }
                AnyFamily::FloatGauge(f) => {
                    f.encode(&mut encoder, MetricType::Gauge, ConstGauge::new)?
                }
                AnyFamily::Histogram(name, help, unit, histogram) => {
                    let metric =
                        encoder.encode_descriptor(name, help, Some(unit), MetricType::Histogram)?;
                    histogram.encode(metric)?;
                }
                AnyFamily::Histograms(name, help, unit, samples) => {
                    let mut family =
                        encoder.encode_descriptor(name, help, Some(unit), MetricType::Histogram)?;
                    for (labels, histogram) in samples {
                        histogram.encode(family.encode_family(labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Gauges of entry counts, which cannot come near `i64::MAX`.
fn level(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Reads every family from `counts` and `snap`.
///
/// Errors: a counter that cannot be read, or no state written by the controller yet.
fn read(counts: &impl Counts, snap: &Snapshot, stick_capacity: u32) -> Result<Scrape> {
    let state = snap
        .state
        .as_ref()
        .context("the controller has not written its state yet")?;
    let latencies = snap.latencies.lock().map(|l| l.clone()).unwrap_or_default();

    let mut packets = Family::counter("backend_packets", "Packets forwarded to the backend.");
    let mut bytes = Family::counter("backend_bytes", "Bytes forwarded to the backend.");
    let mut active = Family::gauge(
        "backend_active_connections",
        "Open connections counted by the data path (from the SYN to the client's FIN or RST).",
    );
    let mut stuck = Family::gauge(
        "backend_stick_entries",
        "Clients stuck to the backend, as of the last expiry sweep.",
    );
    let mut up = Family::gauge("backend_up", "1 if the backend takes new clients.");
    let mut states = Family::gauge(
        "backend_state",
        "The backend's state (1 for the current one).",
    );
    let mut weights = Family::gauge("backend_weight", "The backend's weight.");
    let mut check_seconds = Family::seconds(
        "backend_health_check_duration",
        "Duration of the backend's last health check.",
    );
    let mut hits = Family::counter(
        "service_stick_hits",
        "Packets whose client had a live stick entry.",
    );
    let mut misses = Family::counter(
        "service_stick_misses",
        "New connections (and unknown segments) whose client had no live stick entry.",
    );
    let mut inserts = Family::counter("service_stick_inserts", "Stick entries created.");
    let mut redispatches = Family::counter(
        "service_redispatches",
        "Clients moved off a failed, disabled or removed backend.",
    );
    let mut races = Family::counter(
        "service_stick_races_lost",
        "Placements where another CPU placed the same client first (its choice was used).",
    );
    let mut skipped = Family::counter(
        "service_stick_inserts_skipped",
        "New clients placed without a stick entry because the flood guard's rate was exceeded.",
    );
    let mut untracked = Family::counter(
        "service_connections_untracked",
        "New connections not tracked because the connection table was full.",
    );
    let mut expired = Family::counter(
        "service_stick_expired",
        "Stick entries deleted by the expiry sweep.",
    );
    let mut entries = Family::gauge(
        "service_stick_entries",
        "Stick entries of the service, as of the last sweep.",
    );
    for s in &state.services {
        let service: Labels = vec![("service", s.name.clone())];
        let c = counts.service(s.id)?;
        hits.add(&service, c.stick_hits);
        misses.add(&service, c.stick_misses);
        inserts.add(&service, c.stick_inserts);
        redispatches.add(&service, c.redispatches);
        races.add(&service, c.races_lost);
        skipped.add(&service, c.inserts_skipped);
        untracked.add(&service, c.flows_untracked);
        expired.add(
            &service,
            snap.expired_total.get(&s.id).copied().unwrap_or(0),
        );
        entries.add(
            &service,
            level(snap.live_by_service.get(&s.id).copied().unwrap_or(0)),
        );
        for b in &s.backends {
            let mut labels = service.clone();
            labels.push(("backend", b.name.clone()));
            let bc = counts.backend(b.id)?;
            packets.add(&labels, bc.packets);
            bytes.add(&labels, bc.bytes);
            active.add(&labels, counts.active(b.id));
            stuck.add(
                &labels,
                level(snap.live_by_backend.get(&b.id).copied().unwrap_or(0)),
            );
            up.add(&labels, i64::from(b.state == "up"));
            for st in ["up", "drain", "down", "disabled"] {
                let mut with_state = labels.clone();
                with_state.push(("state", st.to_string()));
                states.add(&with_state, i64::from(b.state == st));
            }
            weights.add(&labels, i64::from(b.weight));
            if let Some(seconds) = latencies.get(&b.id) {
                check_seconds.add(&labels, *seconds);
            }
        }
    }
    let mut capacity = Family::gauge(
        "stick_table_capacity_entries",
        "Size of the stick table (all services).",
    );
    capacity.add(&Vec::new(), i64::from(stick_capacity));
    let counters = counts.not_forwarded()?;
    let mut reasons = Family::counter(
        "packets_not_forwarded",
        "Packets passed to the kernel or dropped, by reason.",
    );
    for c in Counter::ALL {
        let n = counters.get(c as usize).copied().unwrap_or(0);
        reasons.add(&vec![("reason", c.name().to_string())], n);
    }
    let mut sweep_seconds = Family::seconds("sweep_duration", "Duration of the last expiry sweep.");
    sweep_seconds.add(&Vec::new(), snap.sweep_seconds);
    let mut sweeps = Family::counter("sweeps", "Expiry sweeps completed.");
    sweeps.add(&Vec::new(), snap.sweeps);
    let mut shared: Vec<AnyFamily> = Vec::new();
    if let Some(stats) = &snap.shared {
        for (name, help, value) in stats.counters() {
            let mut family = Family::counter(name, help);
            family.add(&Vec::new(), value);
            shared.push(family.into());
        }
        let mut connected = Family::gauge(
            "shared_redis_connected",
            "1 while the shared table's command connection to Redis is up.",
        );
        connected.add(
            &Vec::new(),
            i64::from(stats.connected.load(std::sync::atomic::Ordering::Relaxed)),
        );
        shared.push(connected.into());
        shared.push(AnyFamily::Histogram(
            "shared_replication_lag",
            "Time from a placement on another node to its write in this node's stick table (the two nodes' wall clocks).",
            Unit::Seconds,
            stats.lag.clone(),
        ));
    }

    let mut families: Vec<AnyFamily> = vec![
        packets.into(),
        bytes.into(),
        active.into(),
        stuck.into(),
        up.into(),
        states.into(),
        weights.into(),
        check_seconds.into(),
        hits.into(),
        misses.into(),
        inserts.into(),
        redispatches.into(),
        races.into(),
        skipped.into(),
        untracked.into(),
        expired.into(),
        entries.into(),
        capacity.into(),
        reasons.into(),
        sweep_seconds.into(),
        sweeps.into(),
    ];
    families.extend(shared);
    if let Some(stats) = &snap.http {
        families.extend(http_families(stats));
    }
    Ok(Scrape(families))
}

/// The proxy's families: per `mode: http` service (label `service`) and backend.
fn http_families(stats: &crate::http::stats::Stats) -> Vec<AnyFamily> {
    use crate::http::stats::REJECT_REASONS;
    use std::sync::atomic::Ordering::Relaxed;
    let mut responses = Family::counter(
        "http_responses",
        "Responses sent to clients of mode: http services, by status class.",
    );
    let mut sessions = Family::counter(
        "http_sessions",
        "Requests by what their session did: new (placed by the policy), kept (reached the backend their cookie or token named), redispatched (its backend was down or refused the connection).",
    );
    let mut issued = Family::counter(
        "http_cookies_issued",
        "Set-Cookie headers (or tokens) sent: new sessions, re-placed ones and last-seen refreshes.",
    );
    let mut rejected = Family::counter(
        "http_sessions_rejected",
        "Cookies or tokens that counted as absent, by reason.",
    );
    let mut refused = Family::counter(
        "http_refused",
        "503s: no backend up, or on_failure: strict with the session's backend down.",
    );
    let mut errors = Family::counter(
        "http_upstream_errors",
        "Backend exchanges that failed: error (502) or timeout (504).",
    );
    let mut upgrades = Family::counter(
        "http_upgrades",
        "Connections upgraded (WebSocket) and relayed as bytes.",
    );
    let mut latencies = Vec::new();
    for (service, s) in stats.services() {
        let labels = |extra: Option<(&'static str, &str)>| {
            let mut l: Labels = vec![("service", service.clone())];
            if let Some((k, v)) = extra {
                l.push((k, v.to_string()));
            }
            l
        };
        for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
            responses.add(
                &labels(Some(("class", class))),
                s.responses[i].load(Relaxed),
            );
        }
        for (what, counter) in [
            ("new", &s.sessions_new),
            ("kept", &s.sessions_kept),
            ("redispatched", &s.redispatched),
        ] {
            sessions.add(&labels(Some(("outcome", what))), counter.load(Relaxed));
        }
        issued.add(&labels(None), s.cookies_issued.load(Relaxed));
        for (i, reason) in REJECT_REASONS.iter().enumerate() {
            rejected.add(
                &labels(Some(("reason", reason))),
                s.rejected[i].load(Relaxed),
            );
        }
        refused.add(&labels(None), s.refused.load(Relaxed));
        errors.add(
            &labels(Some(("kind", "error"))),
            s.upstream_errors.load(Relaxed),
        );
        errors.add(
            &labels(Some(("kind", "timeout"))),
            s.upstream_timeouts.load(Relaxed),
        );
        upgrades.add(&labels(None), s.upgrades.load(Relaxed));
        latencies.push((labels(None), s.upstream_latency.clone()));
    }
    let mut open = Family::gauge(
        "http_backend_open_requests",
        "Requests sent to a backend and not answered yet (least-conn's measure).",
    );
    let mut requests = Family::counter("http_backend_requests", "Requests sent to a backend.");
    for ((service, backend), load) in stats.backends() {
        let l: Labels = vec![("service", service), ("backend", backend)];
        open.add(&l, load.open.load(Relaxed));
        requests.add(&l, load.requests.load(Relaxed));
    }
    let mut tokens: Vec<AnyFamily> = Vec::new();
    for (name, help, value) in stats.tokens.counters() {
        let mut family = Family::counter(name, help);
        family.add(&Vec::new(), value);
        tokens.push(family.into());
    }
    let mut down = Family::gauge(
        "token_store_down",
        "1 while the token store's Redis is not used (tokens are routed by cache and fallback hash).",
    );
    down.add(
        &Vec::new(),
        i64::from(stats.tokens.store_down.load(Relaxed)),
    );
    tokens.push(down.into());
    let mut families = vec![
        responses.into(),
        sessions.into(),
        issued.into(),
        rejected.into(),
        refused.into(),
        errors.into(),
        upgrades.into(),
        AnyFamily::Histograms(
            "http_upstream_latency",
            "Time from sending a request to a backend to its response's headers.",
            Unit::Seconds,
            latencies,
        ),
        open.into(),
        requests.into(),
    ];
    families.extend(tokens);
    families
}

/// `scrape` in the Prometheus text format 0.0.4.
///
/// Errors: only if the encoder rejects a value (writing into a `String` itself cannot fail).
fn encode(scrape: Scrape) -> Result<String> {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(scrape));
    let mut text = String::new();
    prometheus_text::encode(&mut text, &registry).context("encoding the metrics")?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{BackendRecord, ServiceRecord};
    use std::net::{Ipv4Addr, TcpListener as StdListener};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    /// Fixed counters: service `id` counts `id * 100 + field`, backend `id` forwards
    /// `id * 10` packets of 100 bytes, reason `i` counts `i`.
    struct Fixed;

    impl Counts for Fixed {
        fn service(&self, id: ServiceId) -> Result<ServiceCounters> {
            let base = u64::from(id) * 100;
            Ok(ServiceCounters {
                stick_hits: base + 1,
                stick_misses: base + 2,
                stick_inserts: base + 3,
                redispatches: base + 4,
                races_lost: base + 5,
                inserts_skipped: base + 6,
                flows_untracked: base + 7,
                ..ServiceCounters::default()
            })
        }

        fn backend(&self, id: BackendId) -> Result<BackendCounters> {
            let packets = u64::from(id) * 10;
            Ok(BackendCounters {
                packets,
                bytes: packets * 100,
            })
        }

        fn active(&self, id: BackendId) -> i64 {
            i64::from(id) + 40
        }

        fn not_forwarded(&self) -> Result<Vec<u64>> {
            Ok((0..Counter::ALL.len() as u64).collect())
        }
    }

    fn backend(id: BackendId, name: &str, state: &str, weight: u32) -> BackendRecord {
        BackendRecord {
            id,
            name: name.into(),
            address: Ipv4Addr::new(198, 18, 0, 1).into(),
            port: None,
            mac: None,
            weight,
            state: state.into(),
            admin: "enabled".into(),
            from_api: false,
            retiring: false,
            healthy: Some(state != "down"),
        }
    }

    /// One service `web` (id 1) with `b1` (id 1, up, weight 2) and `b"2` (id 2, down, weight
    /// 1; the quote must be escaped), after 3 sweeps; only `b1` has a check duration.
    fn snapshot() -> Snapshot {
        let latencies = Latencies::default();
        latencies.lock().unwrap().insert(1, 0.25);
        let mut snap = Snapshot::new(latencies);
        snap.state = Some(RuntimeState {
            interface: "eth0".into(),
            netns: None,
            xdp_mode: "generic".into(),
            pid: 1,
            config: "/etc/sticky-lb.yaml".into(),
            maglev_stride: 0,
            maglev_services: 0,
            retired_backends: Default::default(),
            retired_services: Default::default(),
            runtime_changes: Default::default(),
            services: vec![ServiceRecord {
                id: 1,
                name: "web".into(),
                vip: Ipv4Addr::new(198, 18, 0, 100).into(),
                port: 80,
                mode: "tcp".into(),
                policy: "maglev".into(),
                forwarding: "nat".into(),
                forwarding_detail: None,
                stick_timeout_ms: 1000,
                client_mask: 32,
                maglev_table_size: 0,
                backends: vec![backend(1, "b1", "up", 2), backend(2, "b\"2", "down", 1)],
            }],
        });
        snap.live_by_backend.insert(1, 7);
        snap.live_by_service.insert(1, 7);
        snap.expired_total.insert(1, 5);
        snap.sweep_seconds = 0.5;
        snap.sweeps = 3;
        snap
    }

    fn page() -> String {
        encode(read(&Fixed, &snapshot(), 1000).unwrap()).unwrap()
    }

    #[test]
    fn every_family_keeps_its_name_and_type() {
        let text = page();
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        assert_eq!(
            types,
            [
                "# TYPE sticky_lb_backend_packets_total counter",
                "# TYPE sticky_lb_backend_bytes_total counter",
                "# TYPE sticky_lb_backend_active_connections gauge",
                "# TYPE sticky_lb_backend_stick_entries gauge",
                "# TYPE sticky_lb_backend_up gauge",
                "# TYPE sticky_lb_backend_state gauge",
                "# TYPE sticky_lb_backend_weight gauge",
                "# TYPE sticky_lb_backend_health_check_duration_seconds gauge",
                "# TYPE sticky_lb_service_stick_hits_total counter",
                "# TYPE sticky_lb_service_stick_misses_total counter",
                "# TYPE sticky_lb_service_stick_inserts_total counter",
                "# TYPE sticky_lb_service_redispatches_total counter",
                "# TYPE sticky_lb_service_stick_races_lost_total counter",
                "# TYPE sticky_lb_service_stick_inserts_skipped_total counter",
                "# TYPE sticky_lb_service_connections_untracked_total counter",
                "# TYPE sticky_lb_service_stick_expired_total counter",
                "# TYPE sticky_lb_service_stick_entries gauge",
                "# TYPE sticky_lb_stick_table_capacity_entries gauge",
                "# TYPE sticky_lb_packets_not_forwarded_total counter",
                "# TYPE sticky_lb_sweep_duration_seconds gauge",
                "# TYPE sticky_lb_sweeps_total counter",
            ]
        );
        assert!(text.contains(
            "# HELP sticky_lb_service_stick_hits_total Packets whose client had a live stick entry.\n"
        ));
    }

    #[test]
    fn samples_carry_the_snapshot_and_the_counters() {
        let text = page();
        for line in [
            r#"sticky_lb_backend_packets_total{service="web",backend="b1"} 10"#,
            r#"sticky_lb_backend_bytes_total{service="web",backend="b\"2"} 2000"#,
            r#"sticky_lb_backend_active_connections{service="web",backend="b1"} 41"#,
            r#"sticky_lb_backend_stick_entries{service="web",backend="b1"} 7"#,
            r#"sticky_lb_backend_stick_entries{service="web",backend="b\"2"} 0"#,
            r#"sticky_lb_backend_up{service="web",backend="b1"} 1"#,
            r#"sticky_lb_backend_up{service="web",backend="b\"2"} 0"#,
            r#"sticky_lb_backend_state{service="web",backend="b1",state="up"} 1"#,
            r#"sticky_lb_backend_state{service="web",backend="b1",state="down"} 0"#,
            r#"sticky_lb_backend_state{service="web",backend="b\"2",state="down"} 1"#,
            r#"sticky_lb_backend_weight{service="web",backend="b1"} 2"#,
            r#"sticky_lb_backend_health_check_duration_seconds{service="web",backend="b1"} 0.25"#,
            r#"sticky_lb_service_stick_hits_total{service="web"} 101"#,
            r#"sticky_lb_service_stick_misses_total{service="web"} 102"#,
            r#"sticky_lb_service_stick_inserts_total{service="web"} 103"#,
            r#"sticky_lb_service_redispatches_total{service="web"} 104"#,
            r#"sticky_lb_service_stick_races_lost_total{service="web"} 105"#,
            r#"sticky_lb_service_stick_inserts_skipped_total{service="web"} 106"#,
            r#"sticky_lb_service_connections_untracked_total{service="web"} 107"#,
            r#"sticky_lb_service_stick_expired_total{service="web"} 5"#,
            r#"sticky_lb_service_stick_entries{service="web"} 7"#,
            "sticky_lb_stick_table_capacity_entries 1000",
            r#"sticky_lb_packets_not_forwarded_total{reason="pass_not_ip"} 0"#,
            r#"sticky_lb_packets_not_forwarded_total{reason="pass_bad_tcp_header"} 8"#,
            "sticky_lb_sweep_duration_seconds 0.5",
            "sticky_lb_sweeps_total 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
        assert!(
            !text.contains(r#"duration_seconds{service="web",backend="b\"2"}"#),
            "a backend without a finished check has no duration"
        );
    }

    /// What a scraper checks: each family is described (HELP, then TYPE) before its samples,
    /// each sample belongs to the family described last, and each value is a number.
    #[test]
    fn the_page_is_well_formed_text() {
        let text = page();
        let mut family: Option<String> = None;
        let mut described = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                family = None;
                described += 1;
                let name = rest.split(' ').next().unwrap();
                assert!(name.starts_with("sticky_lb_"), "{line}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["counter", "gauge"].contains(&kind), "{line}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
                family = Some(name.to_string());
            } else {
                let name = family
                    .as_deref()
                    .unwrap_or_else(|| panic!("{line}: no TYPE"));
                let rest = line.strip_prefix(name).unwrap_or_else(|| panic!("{line}"));
                let (labels, value) = rest.rsplit_once(' ').unwrap();
                assert!(
                    labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                    "{line}"
                );
                value
                    .parse::<f64>()
                    .unwrap_or_else(|e| panic!("{line}: {e}"));
            }
        }
        assert_eq!(described, 21);
    }

    #[test]
    fn no_state_yet_is_an_error() {
        let snap = Snapshot::new(Latencies::default());
        let err = read(&Fixed, &snap, 1000).unwrap_err();
        assert!(
            err.to_string().contains("has not written its state"),
            "{err}"
        );
    }

    /// A server whose pins do not exist: every scrape fails.
    fn unpinned(listen: SocketAddr) -> Result<MetricsServer> {
        MetricsServer::start(
            listen,
            PinDir::new(Some("metrics-unit-test-no-such-netns"), "none0"),
            Arc::new(Mutex::new(Snapshot::new(Latencies::default()))),
            1000,
        )
    }

    /// Sends `request` and reads until the server closes the connection.
    async fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
            .await
            .expect("the server answers and closes")
            .unwrap();
        response
    }

    #[tokio::test]
    async fn answers_500_with_the_reason_404_and_405() {
        let server = unpinned((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        let addr = server.listen();
        assert_ne!(addr.port(), 0, "the real port");

        let failed = exchange(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            failed.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
            "{failed}"
        );
        assert!(
            failed.ends_with(
                "\r\n\r\nno sticky-lb data path is pinned at \
                 /sys/fs/bpf/sticky-lb/metrics-unit-test-no-such-netns/none0\n"
            ),
            "{failed}"
        );
        // HTTP/1.0, as the end-to-end tests and simple scrapers send it.
        let old = exchange(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(old.starts_with("HTTP/1.0 500 "), "{old}");

        let missing = exchange(
            addr,
            "GET /other HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );
        let post = exchange(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: lb\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{post}"
        );
        assert!(post.contains("allow: GET, HEAD\r\n"), "{post}");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_taken_address_is_an_error_naming_it() {
        let server = unpinned((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        let addr = server.listen();
        let err = unpinned(addr).err().expect("the address is taken");
        assert!(
            format!("{err:#}").contains(&format!("binding {addr}")),
            "{err:#}"
        );
        server.shutdown().await;
    }

    /// A reload that keeps the address shuts the old server down, then binds again at once:
    /// the listening socket must be closed by then, even with a scraper's idle keep-alive
    /// connection open and a client that stopped halfway through its request.
    #[tokio::test]
    async fn after_shutdown_the_address_can_be_bound_again_at_once() {
        let server = unpinned((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        let addr = server.listen();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /other HTTP/1.1\r\nHost: lb\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        while !response.ends_with(b"try GET /metrics\n") {
            let mut chunk = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut chunk))
                .await
                .expect("a response")
                .unwrap();
            assert_ne!(n, 0, "kept alive");
            response.extend_from_slice(&chunk[..n]);
        }
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .await
            .unwrap();

        tokio::time::timeout(Duration::from_secs(1), server.shutdown())
            .await
            .expect("open connections do not hold the shutdown up");
        let again = StdListener::bind(addr).expect("the address is free again");
        drop(again);
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(1), idle.read_to_end(&mut rest))
            .await
            .expect("the idle connection was closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        let n = tokio::time::timeout(
            DRAIN_TIMEOUT + Duration::from_secs(1),
            stalled.read_to_end(&mut rest),
        )
        .await
        .expect("the stalled connection was closed")
        .unwrap_or(0);
        assert_eq!(n, 0);

        let restarted = unpinned(addr).expect("a new server binds the same address");
        let failed = exchange(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(failed.starts_with("HTTP/1.1 500 "), "{failed}");
        restarted.shutdown().await;
    }
}
