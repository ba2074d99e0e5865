//! The periodic sweep: expired stick entries and connections that are over, then what follows
//! from them (backends that drained out, metrics).

use super::*;
use crate::conntrack;

/// What one sweep found, for the main loop.
pub(super) struct Swept {
    stick: expiry::SweepReport,
    /// `None` if the connection table could not be swept this time.
    connections: Option<conntrack::SweepReport>,
}

impl Controller {
    /// After a sweep: retire drained-out backends (no client stuck to them and no connection open
    /// on them any more), and refresh metrics.
    pub(super) fn after_sweep(&mut self, swept: Swept) -> Result<()> {
        let mut finished = Vec::new();
        if let Some(connections) = &swept.connections {
            for (i, s) in self.services.iter().enumerate() {
                for (j, b) in s.backends.iter().enumerate() {
                    let stuck = swept.stick.live_by_backend.get(&b.id).copied().unwrap_or(0);
                    let open = connections.open_by_backend.get(&b.id).copied().unwrap_or(0);
                    if b.retiring && stuck == 0 && open == 0 {
                        finished.push((i, j, format!("{}/{}", s.config.name, b.name)));
                    }
                }
            }
        }
        for (i, j, name) in finished.into_iter().rev() {
            self.remove_backend(i, j, BackendRemoval::Immediate)?;
            info!(
                "backend {name} drained out: no client is stuck to it and no connection is open on it any more; removed"
            );
        }
        if let Ok(mut m) = self.metrics.lock() {
            m.record_sweep(&swept.stick);
        }
        Ok(())
    }

    /// The expiry sweep as a blocking job: stick entries, then the connection table. Its report
    /// goes back to the main loop.
    pub(super) fn sweep_job(&self, reports: mpsc::Sender<Swept>) -> impl FnOnce() + Send + 'static {
        let pins = self.pins.clone();
        let timeouts: BTreeMap<ServiceId, u64> = self
            .services
            .iter()
            .map(|s| (s.params.id, s.params.stick_timeout_ns))
            .collect();
        let expirer = self.dataplane.expirer();
        let expiry = conntrack::Expiry {
            opening_timeout_ns: self.config.flow_opening_timeout.as_nanos() as u64,
            idle_timeout_ns: self.config.flow_idle_timeout.as_nanos() as u64,
            closing_timeout_ns: self.config.flow_closing_timeout.as_nanos() as u64,
            services: timeouts.keys().copied().collect(),
            serving: self
                .services
                .iter()
                .flat_map(|s| &s.backends)
                .filter(|b| b.state.keeps_stuck_clients())
                .map(|b| b.id)
                .collect(),
        };
        move || {
            let stick = dataplane::open_pinned(&pins, map_names::STICK)
                .and_then(|mut stick| expiry::sweep(&mut stick, &timeouts));
            log_sweep(&stick);
            let Ok(stick) = stick else {
                return;
            };
            let connections = dataplane::open_pinned(&pins, map_names::FLOWS)
                .and_then(|flows| conntrack::sweep(&flows, &expirer?, &expiry));
            let connections = match connections {
                Ok(r) => {
                    if r.expired > 0 {
                        info!(
                            "connection sweep: {} of {} connections ended (idle, closed, or their backend stopped serving; {} of them still counted), {} kept (used again, or their backend serves again)",
                            r.expired, r.scanned, r.uncounted, r.kept
                        );
                    } else {
                        debug!("connection sweep: {} connections, none over", r.scanned);
                    }
                    Some(r)
                }
                Err(e) => {
                    warn!("connection sweep failed: {e:#}");
                    None
                }
            };
            let _ = reports.blocking_send(Swept { stick, connections });
        }
    }
}

fn log_sweep(result: &Result<expiry::SweepReport>) {
    match result {
        Ok(r) if r.expired + r.orphaned > 0 => info!(
            "expiry sweep: {} of {} stick entries expired ({} of removed services), {} refreshed meanwhile, {} ms",
            r.expired + r.orphaned,
            r.scanned,
            r.orphaned,
            r.refreshed,
            r.duration_ms
        ),
        Ok(r) => debug!(
            "expiry sweep: {} entries, none expired, {} ms",
            r.scanned, r.duration_ms
        ),
        Err(e) => warn!("expiry sweep failed: {e:#}"),
    }
}
