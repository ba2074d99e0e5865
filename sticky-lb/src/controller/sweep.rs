//! The periodic sweep: expired stick entries and idle flows, then what follows from them
//! (backends that drained out, metrics).

use super::*;

impl Controller {
    /// After a sweep: retire drained-out backends no client is stuck to, and refresh metrics.
    pub(super) fn after_sweep(&mut self, report: expiry::SweepReport) -> Result<()> {
        let mut finished = Vec::new();
        for (i, s) in self.services.iter().enumerate() {
            for (j, b) in s.backends.iter().enumerate() {
                if b.retiring && report.live_by_backend.get(&b.id).copied().unwrap_or(0) == 0 {
                    finished.push((i, j, format!("{}/{}", s.config.name, b.name)));
                }
            }
        }
        for (i, j, name) in finished.into_iter().rev() {
            self.remove_backend(i, j, BackendRemoval::Immediate)?;
            info!("backend {name} drained out: no client is stuck to it any more; removed");
        }
        if let Ok(mut m) = self.metrics.lock() {
            m.record_sweep(&report);
        }
        Ok(())
    }

    /// The expiry sweep as a blocking job: stick entries, then the flow table of least-conn
    /// services with its recount. Its report goes back to the main loop.
    pub(super) fn sweep_job(
        &self,
        reports: mpsc::Sender<expiry::SweepReport>,
    ) -> impl FnOnce() + Send + 'static {
        let pins = self.pins.clone();
        let timeouts: BTreeMap<ServiceId, u64> = self
            .services
            .iter()
            .map(|s| (s.params.id, s.params.stick_timeout_ns))
            .collect();
        let least_conn: BTreeSet<ServiceId> = self
            .services
            .iter()
            .filter(|s| s.config.policy == crate::config::Policy::LeastConn)
            .map(|s| s.params.id)
            .collect();
        let counted: BTreeSet<BackendId> = self
            .services
            .iter()
            .filter(|s| least_conn.contains(&s.params.id))
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect();
        let flow_idle_ns = self.config.flow_idle_timeout.as_nanos() as u64;
        move || {
            let stick = dataplane::open_pinned(&pins, map_names::STICK)
                .and_then(|mut stick| expiry::sweep(&mut stick, &timeouts));
            log_sweep(&stick);
            if let Ok(report) = stick {
                let _ = reports.blocking_send(report);
            }
            if least_conn.is_empty() {
                return;
            }
            let flows = dataplane::open_pinned(&pins, map_names::FLOWS).and_then(|mut flows| {
                let mut active = dataplane::open_pinned(&pins, map_names::ACTIVE)?;
                expiry::sweep_flows(&mut flows, &mut active, &least_conn, &counted, flow_idle_ns)
            });
            match flows {
                Ok(r) if r.expired > 0 => info!(
                    "flow sweep: {} of {} connections idle past {:?} stopped counting",
                    r.expired,
                    r.scanned,
                    Duration::from_nanos(flow_idle_ns)
                ),
                Ok(r) => debug!(
                    "flow sweep: {} connections, active {:?}",
                    r.scanned, r.active
                ),
                Err(e) => warn!("flow sweep failed: {e:#}"),
            }
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
