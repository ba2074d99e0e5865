//! The periodic sweep: expired stick entries and connections that are over, then what follows
//! from them: backends that drained out leave (through the reconcile path), retired ids that
//! nothing names any more are released, metrics.

use super::Controller;
use crate::{conntrack, dataplane, dataplane::monotonic_ns, expiry};
use std::collections::{BTreeMap, BTreeSet};
use sticky_lb_common::{BackendId, SERVICE_NO_STICK, ServiceId, map_names};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// What one sweep found, for the main loop.
pub(super) struct Swept {
    /// When the sweep started (CLOCK_MONOTONIC_COARSE, ns): ids retired before it and not
    /// named by anything it saw are free.
    started_ns: u64,
    stick: expiry::SweepReport,
    /// `None` if the connection table could not be swept this time.
    connections: Option<conntrack::SweepReport>,
}

impl Controller {
    /// After a sweep: retiring backends with no client stuck to them and no connection open on
    /// them leave; retired ids nothing names are released; metrics are refreshed.
    pub(super) fn after_sweep(&mut self, swept: Swept) {
        if let Ok(mut m) = self.metrics.lock() {
            m.record_sweep(&swept.stick);
        }
        self.refresh_shared(&swept.stick.used);
        self.orphans_seen = swept.stick.orphan_services.clone();
        let Some(connections) = &swept.connections else {
            return; // without the connection table nothing can be judged drained or unnamed
        };
        let stuck = |id: &BackendId| swept.stick.live_by_backend.get(id).copied().unwrap_or(0);
        let open = |id: &BackendId| connections.open_by_backend.get(id).copied().unwrap_or(0);
        let named: BTreeSet<BackendId> = swept
            .stick
            .live_by_backend
            .keys()
            .chain(connections.open_by_backend.keys())
            .chain(&swept.stick.named_by_orphans)
            .copied()
            .collect();
        let live_services: BTreeSet<ServiceId> = self.services.iter().map(|s| s.id()).collect();
        let released = self.ids.release(
            swept.started_ns,
            &named,
            &live_services,
            &swept.stick.orphan_services,
        );
        if !released.is_empty() {
            debug!("backend ids free again (nothing names them): {released:?}");
        }
        let mut drained = Vec::new();
        for s in &self.services {
            // A sweep that started before the backend began to retire may have passed entries
            // made since: only a later one can say it drained out.
            for b in s
                .backends
                .iter()
                .filter(|b| b.retiring && b.retiring_since_ns < swept.started_ns)
            {
                if stuck(&b.id) == 0 && open(&b.id) == 0 {
                    drained.push(format!("{}/{}", s.name(), b.name));
                    self.observed.drained_out.insert(b.id);
                }
            }
        }
        if drained.is_empty() {
            if !released.is_empty() || self.state_behind {
                self.save_state();
            }
            return;
        }
        match self.reconcile(self.desired.clone()) {
            Ok(_) => {
                for name in &drained {
                    info!(
                        backend = %name,
                        reason = "drained out",
                        "backend {name} drained out: no client is stuck to it and no connection is open on it any more; removed"
                    );
                }
            }
            Err(e) => warn!(
                "backend(s) {} drained out but could not be removed: {e}",
                drained.join(", ")
            ),
        }
    }

    /// The expiry sweep as a blocking job: stick entries, then the connection table. Its report
    /// goes back to the main loop.
    pub(super) fn sweep_job(
        &mut self,
        reports: mpsc::Sender<Swept>,
    ) -> impl FnOnce() + Send + 'static {
        let pins = self.pins.clone();
        let used_since = self.refresh_due();
        // A service with `stick: {mode: none}` keeps no entries: any left from before it was
        // configured so are deleted (timeout 0), so none places a client.
        let timeouts: BTreeMap<ServiceId, u64> = self
            .services
            .iter()
            .map(|s| {
                let timeout = if s.params.flags & SERVICE_NO_STICK != 0 {
                    0
                } else {
                    s.params.stick_timeout_ns
                };
                (s.id(), timeout)
            })
            .collect();
        let confirmed_orphans: BTreeSet<ServiceId> = self
            .orphans_seen
            .iter()
            .filter(|id| !timeouts.contains_key(id))
            .copied()
            .collect();
        let expirer = self.dataplane.expirer();
        let nat_orphans = self.nat_orphans.clone();
        let config = self.config();
        let expiry = conntrack::Expiry {
            opening_timeout_ns: config.flow_opening_timeout.as_nanos() as u64,
            idle_timeout_ns: config.flow_idle_timeout.as_nanos() as u64,
            closing_timeout_ns: config.flow_closing_timeout.as_nanos() as u64,
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
            let started_ns = monotonic_ns();
            let stick = dataplane::open_pinned(&pins, map_names::STICK).and_then(|mut stick| {
                expiry::sweep_noting_use(&mut stick, &timeouts, &confirmed_orphans, &used_since)
            });
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
            // Ports of full-NAT connections over for the backends' TIME_WAIT are free again.
            let freed = dataplane::open_pinned(&pins, map_names::NAT).and_then(|mut nat| {
                let flows = dataplane::open_pinned(&pins, map_names::FLOWS)?;
                let mut orphans = nat_orphans
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                conntrack::free_nat_ports(&mut nat, &flows, &mut orphans, monotonic_ns())
            });
            match freed {
                Ok(0) => {}
                Ok(n) => debug!(
                    "NAT sweep: {n} source-NAT ports free again (their connections ended over 65 s ago)"
                ),
                Err(e) => warn!("NAT sweep failed: {e:#}"),
            }
            let _ = reports.blocking_send(Swept {
                started_ns,
                stick,
                connections,
            });
        }
    }
}

fn log_sweep(result: &anyhow::Result<expiry::SweepReport>) {
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
