//! Prometheus metrics: the text exposition format over a minimal HTTP/1.0 listener (`GET
//! /metrics`), off unless `metrics.listen` is set. Counters are read from the pinned maps at
//! scrape time; occupancy per backend and service comes from the last expiry sweep (walking a
//! million-entry table on every scrape would cost seconds).

use crate::{
    dataplane::{PinDir, PinnedMaps},
    expiry::SweepReport,
    health::Latencies,
    state::RuntimeState,
};
use anyhow::{Context, Result};
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};
use sticky_lb_common::{BackendId, Counter, ServiceId};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

/// What the controller knows that the maps do not, kept current by the controller.
pub struct Snapshot {
    pub state: Option<RuntimeState>,
    pub latencies: Latencies,
    pub live_by_backend: BTreeMap<BackendId, u64>,
    pub live_by_service: BTreeMap<ServiceId, u64>,
    pub expired_total: BTreeMap<ServiceId, u64>,
    pub sweep_seconds: f64,
    pub sweeps: u64,
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

/// Serves `/metrics` on `listen` until the handle is aborted.
pub fn serve(
    listen: SocketAddr,
    pins: PinDir,
    snapshot: Arc<Mutex<Snapshot>>,
    stick_capacity: u32,
) -> Result<JoinHandle<()>> {
    let std_listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("metrics: binding {listen}"))?;
    std_listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(std_listener)?;
    Ok(tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let pins = pins.clone();
            let snapshot = snapshot.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let read =
                    tokio::time::timeout(Duration::from_secs(5), stream.read(&mut request)).await;
                let Ok(Ok(n)) = read else { return };
                let line = String::from_utf8_lossy(&request[..n]);
                let response = if line.starts_with("GET /metrics ")
                    || line.starts_with("GET /metrics?")
                {
                    let body = tokio::task::spawn_blocking(move || {
                        render(&pins, &snapshot, stick_capacity)
                    })
                    .await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("{e}")));
                    match body {
                        Ok(body) => format!(
                            "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        ),
                        Err(e) => {
                            let body = format!("{e:#}\n");
                            format!(
                                "HTTP/1.0 500 Internal Server Error\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            )
                        }
                    }
                } else {
                    "HTTP/1.0 404 Not Found\r\nContent-Length: 20\r\n\r\ntry GET /metrics\r\n\r\n"
                        .to_string()
                };
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    }))
}

/// The `/metrics` listener.
pub struct MetricsServer {
    listen: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `listen` and serves until [`MetricsServer::shutdown`]. Errors: the bind error,
    /// naming the address.
    pub fn start(
        listen: SocketAddr,
        pins: PinDir,
        snapshot: Arc<Mutex<Snapshot>>,
        stick_capacity: u32,
    ) -> Result<MetricsServer> {
        let task = serve(listen, pins, snapshot, stick_capacity)?;
        Ok(MetricsServer { listen, task })
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Stops serving; returns once the listening socket is closed.
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Writes one metric family: HELP, TYPE and its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

/// Label values escaped as the exposition format requires.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(pins: &PinDir, snapshot: &Mutex<Snapshot>, stick_capacity: u32) -> Result<String> {
    let maps = PinnedMaps::open(pins)?;
    let snap = snapshot
        .lock()
        .map_err(|_| anyhow::anyhow!("metrics state poisoned"))?;
    let state = snap
        .state
        .as_ref()
        .context("the controller has not written its state yet")?;
    let latencies = snap.latencies.lock().map(|l| l.clone()).unwrap_or_default();
    let mut out = String::new();

    let mut packets = Vec::new();
    let mut bytes = Vec::new();
    let mut active = Vec::new();
    let mut stuck = Vec::new();
    let mut up = Vec::new();
    let mut states = Vec::new();
    let mut weights = Vec::new();
    let mut check_seconds = Vec::new();
    let (mut races, mut skipped, mut untracked) = (Vec::new(), Vec::new(), Vec::new());
    let (mut hits, mut misses, mut inserts, mut redispatches, mut expired, mut entries) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for s in &state.services {
        let service = format!("service=\"{}\"", label(&s.name));
        let c = maps.service_counters(s.id)?;
        hits.push((service.clone(), c.stick_hits as f64));
        misses.push((service.clone(), c.stick_misses as f64));
        inserts.push((service.clone(), c.stick_inserts as f64));
        redispatches.push((service.clone(), c.redispatches as f64));
        races.push((service.clone(), c.races_lost as f64));
        skipped.push((service.clone(), c.inserts_skipped as f64));
        untracked.push((service.clone(), c.flows_untracked as f64));
        expired.push((
            service.clone(),
            snap.expired_total.get(&s.id).copied().unwrap_or(0) as f64,
        ));
        entries.push((
            service.clone(),
            snap.live_by_service.get(&s.id).copied().unwrap_or(0) as f64,
        ));
        for b in &s.backends {
            let labels = format!("{service},backend=\"{}\"", label(&b.name));
            let bc = maps.backend_counters(b.id)?;
            packets.push((labels.clone(), bc.packets as f64));
            bytes.push((labels.clone(), bc.bytes as f64));
            active.push((
                labels.clone(),
                maps.active.get(&b.id, 0).unwrap_or(0) as f64,
            ));
            stuck.push((
                labels.clone(),
                snap.live_by_backend.get(&b.id).copied().unwrap_or(0) as f64,
            ));
            up.push((labels.clone(), if b.state == "up" { 1.0 } else { 0.0 }));
            for st in ["up", "drain", "down", "disabled"] {
                states.push((
                    format!("{labels},state=\"{st}\""),
                    if b.state == st { 1.0 } else { 0.0 },
                ));
            }
            weights.push((labels.clone(), b.weight as f64));
            if let Some(seconds) = latencies.get(&b.id) {
                check_seconds.push((labels, *seconds));
            }
        }
    }
    family(
        &mut out,
        "sticky_lb_backend_packets_total",
        "counter",
        "Packets forwarded to the backend.",
        &packets,
    );
    family(
        &mut out,
        "sticky_lb_backend_bytes_total",
        "counter",
        "Bytes forwarded to the backend.",
        &bytes,
    );
    family(
        &mut out,
        "sticky_lb_backend_active_connections",
        "gauge",
        "Open connections counted by the data path (from the SYN to the client's FIN or RST).",
        &active,
    );
    family(
        &mut out,
        "sticky_lb_backend_stick_entries",
        "gauge",
        "Clients stuck to the backend, as of the last expiry sweep.",
        &stuck,
    );
    family(
        &mut out,
        "sticky_lb_backend_up",
        "gauge",
        "1 if the backend takes new clients.",
        &up,
    );
    family(
        &mut out,
        "sticky_lb_backend_state",
        "gauge",
        "The backend's state (1 for the current one).",
        &states,
    );
    family(
        &mut out,
        "sticky_lb_backend_weight",
        "gauge",
        "The backend's weight.",
        &weights,
    );
    family(
        &mut out,
        "sticky_lb_backend_health_check_duration_seconds",
        "gauge",
        "Duration of the backend's last health check.",
        &check_seconds,
    );
    family(
        &mut out,
        "sticky_lb_service_stick_hits_total",
        "counter",
        "Packets whose client had a live stick entry.",
        &hits,
    );
    family(
        &mut out,
        "sticky_lb_service_stick_misses_total",
        "counter",
        "New connections (and unknown segments) whose client had no live stick entry.",
        &misses,
    );
    family(
        &mut out,
        "sticky_lb_service_stick_inserts_total",
        "counter",
        "Stick entries created.",
        &inserts,
    );
    family(
        &mut out,
        "sticky_lb_service_redispatches_total",
        "counter",
        "Clients moved off a failed, disabled or removed backend.",
        &redispatches,
    );
    family(
        &mut out,
        "sticky_lb_service_stick_races_lost_total",
        "counter",
        "Placements where another CPU placed the same client first (its choice was used).",
        &races,
    );
    family(
        &mut out,
        "sticky_lb_service_stick_inserts_skipped_total",
        "counter",
        "New clients placed without a stick entry because the flood guard's rate was exceeded.",
        &skipped,
    );
    family(
        &mut out,
        "sticky_lb_service_connections_untracked_total",
        "counter",
        "New connections not tracked because the connection table was full.",
        &untracked,
    );
    family(
        &mut out,
        "sticky_lb_service_stick_expired_total",
        "counter",
        "Stick entries deleted by the expiry sweep.",
        &expired,
    );
    family(
        &mut out,
        "sticky_lb_service_stick_entries",
        "gauge",
        "Stick entries of the service, as of the last sweep.",
        &entries,
    );
    family(
        &mut out,
        "sticky_lb_stick_table_capacity_entries",
        "gauge",
        "Size of the stick table (all services).",
        &[(String::new(), stick_capacity as f64)],
    );
    let counters = maps.counters()?;
    let reasons: Vec<(String, f64)> = Counter::ALL
        .iter()
        .map(|c| {
            (
                format!("reason=\"{}\"", c.name()),
                counters[*c as usize] as f64,
            )
        })
        .collect();
    family(
        &mut out,
        "sticky_lb_packets_not_forwarded_total",
        "counter",
        "Packets passed to the kernel or dropped, by reason.",
        &reasons,
    );
    family(
        &mut out,
        "sticky_lb_sweep_duration_seconds",
        "gauge",
        "Duration of the last expiry sweep.",
        &[(String::new(), snap.sweep_seconds)],
    );
    family(
        &mut out,
        "sticky_lb_sweeps_total",
        "counter",
        "Expiry sweeps completed.",
        &[(String::new(), snap.sweeps as f64)],
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_follow_the_exposition_format() {
        let mut out = String::new();
        family(
            &mut out,
            "sticky_lb_x_total",
            "counter",
            "An example.",
            &[("service=\"a\\\"b\"".into(), 3.0), (String::new(), 1.0)],
        );
        assert_eq!(
            out,
            "# HELP sticky_lb_x_total An example.\n# TYPE sticky_lb_x_total counter\nsticky_lb_x_total{service=\"a\\\"b\"} 3\nsticky_lb_x_total 1\n"
        );
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
