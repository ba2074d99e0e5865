//! Health checks and neighbour probing as the controller runs them: one checker task per
//! backend (restarted only when its check changes), transitions applied to the data path.

use super::*;

impl Controller {
    /// Starts checks for new backends, restarts changed ones, stops those of removed backends.
    pub(super) fn sync_checkers(&mut self) {
        let mut wanted: HashMap<BackendId, (SocketAddrV4, HealthCheck, bool)> = HashMap::new();
        for service in &self.services {
            for b in &service.backends {
                if b.check.kind != CheckKind::None {
                    // The backend's own address: the VIP is local on the balancer, so a check
                    // sent to it would never leave this host.
                    wanted.insert(
                        b.id,
                        (
                            SocketAddrV4::new(b.address, b.check.port),
                            b.check.clone(),
                            b.healthy,
                        ),
                    );
                }
            }
        }
        self.checkers.retain(|id, checker| {
            let keep = wanted
                .get(id)
                .is_some_and(|(t, c, _)| *t == checker.target && *c == checker.check);
            if !keep {
                checker.task.abort();
            }
            keep
        });
        for (id, (target, check, healthy)) in wanted {
            if self.checkers.contains_key(&id) {
                continue;
            }
            let task = health::spawn(
                id,
                target,
                check.clone(),
                healthy,
                self.health_tx.clone(),
                self.latencies.clone(),
            );
            self.checkers.insert(
                id,
                Checker {
                    target,
                    check,
                    task,
                },
            );
        }
        // A backend whose checks were turned off counts as healthy.
        for service in &mut self.services {
            for b in &mut service.backends {
                if b.check.kind == CheckKind::None {
                    b.healthy = true;
                }
            }
        }
    }

    /// A health check changed its verdict: log it once, with the reason, and push it.
    pub(super) fn apply_health(&mut self, t: health::Transition) -> Result<()> {
        let Some((i, j)) = self.find(t.backend) else {
            return Ok(()); // removed since the check ran
        };
        let service = &self.services[i];
        let b = &service.backends[j];
        if t.healthy {
            info!(
                "backend {}/{} ({}) is UP: {} ({} passed checks)",
                service.config.name, b.name, b.address, t.reason, b.check.rise
            );
        } else {
            warn!(
                "backend {}/{} ({}) is DOWN: {} ({} failed checks); its clients are redispatched",
                service.config.name, b.name, b.address, t.reason, b.check.fall
            );
        }
        self.services[i].backends[j].healthy = t.healthy;
        self.refresh_backend(i, j, false)?;
        Ok(())
    }

    /// Probes backends that have no MAC yet; brings up those that answered.
    pub(super) fn resolve_missing_macs(&mut self) -> Result<()> {
        let interface = self.config.interface.clone();
        for i in 0..self.services.len() {
            for j in 0..self.services[i].backends.len() {
                let b = &mut self.services[i].backends[j];
                if b.mac.is_some() {
                    continue;
                }
                // Zero wait: the probe's answer is picked up on the next tick.
                if let Some(mac) = neighbour::resolve(b.address, &interface, Duration::ZERO) {
                    info!("backend {} ({}) answered ARP", b.name, b.address);
                    b.mac = Some(mac);
                    self.refresh_backend(i, j, false)?;
                }
            }
        }
        Ok(())
    }
}
