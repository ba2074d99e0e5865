//! Reload: re-read the config, validate it completely, apply the difference.

use super::*;

impl Controller {
    /// Re-reads the config, validates it completely, and applies the difference. On any error
    /// nothing has changed.
    pub(super) async fn reload(&mut self) -> Result<String> {
        let new = Config::load(&self.config_path, true)
            .map_err(|e| anyhow::anyhow!("config error: {e}"))?;
        // Changes that need new maps or a new attachment cannot be applied to a running one.
        if new.interface != self.config.interface {
            bail!(
                "interface changed ({} -> {}): restart the controller",
                self.config.interface,
                new.interface
            );
        }
        if new.stick_table_size != self.config.stick_table_size
            || new.flow_table_size != self.config.flow_table_size
        {
            bail!(
                "stick_table_size or flow_table_size changed: map sizes are fixed while running (`sticky-lb detach`, then run)"
            );
        }
        let stride = self.dataplane.options().maglev_stride;
        if let Some(s) = new.services.iter().find(|s| s.maglev_table_size > stride) {
            bail!(
                "service {}: maglev_table_size {} exceeds the running data path's {stride}",
                s.name,
                s.maglev_table_size
            );
        }
        if new.xdp_mode != self.config.xdp_mode {
            warn!(
                "xdp_mode changes apply only when the program is attached anew; keeping {}",
                self.mode
            );
        }
        // Backends added at run time stay, with `runtime_changes: keep`.
        let mut new = new;
        if new.runtime_changes == RuntimeChanges::Keep {
            for service in &mut new.services {
                if let Some(old) = self.services.iter().find(|s| s.config.name == service.name) {
                    for b in old.backends.iter().filter(|b| b.from_api && !b.retiring) {
                        if !service.backends.iter().any(|nb| nb.name == b.name) {
                            service.backends.push(BackendConfig {
                                name: b.name.clone(),
                                address: b.address,
                                mac: b.mac,
                                weight: b.weight,
                                health_check: Default::default(),
                            });
                        }
                    }
                }
            }
        }
        let current = self.runtime_state();
        let ids = state::assign_ids(&new, Some(&current));
        if let Some(id) = ids
            .iter()
            .map(|(sid, _)| *sid)
            .find(|sid| *sid >= self.dataplane.options().maglev_services)
        {
            bail!("service id {id} does not fit the running data path's Maglev array");
        }
        // New backends' MACs (the rest keep theirs unless their address changed).
        let mut wanted = Vec::new();
        for (service, (_, bids)) in new.services.iter().zip(&ids) {
            for (b, id) in service.backends.iter().zip(bids) {
                let known = self
                    .find(*id)
                    .map(|(i, j)| &self.services[i].backends[j])
                    .filter(|old| old.address == b.address)
                    .and_then(|old| old.mac);
                wanted.push((b.address, b.mac.or(known)));
            }
        }
        let mut macs = resolve_macs(&new.interface, wanted).await?.into_iter();

        // Build the new service list, carrying state over from the current one.
        let mut services = Vec::new();
        let (mut added, mut changed) = (0, 0);
        for (service, (sid, bids)) in new.services.iter().zip(&ids) {
            let old = self.services.iter().find(|s| s.config.name == service.name);
            let mut backends = Vec::new();
            for (j, (b, id)) in service.backends.iter().zip(bids).enumerate() {
                let mac = macs.next().flatten();
                let previous = old.and_then(|s| s.backends.iter().find(|ob| ob.id == *id));
                let keep = new.runtime_changes == RuntimeChanges::Keep;
                let from_api = previous.is_some_and(|p| p.from_api) && keep;
                let check = if from_api {
                    previous.map(|p| p.check.clone()).unwrap()
                } else {
                    service.health_check(j)
                };
                let mut slot = BackendSlot {
                    id: *id,
                    name: b.name.clone(),
                    address: b.address,
                    mac,
                    // A weight set at run time survives unless the config's own weight changed.
                    weight: match previous {
                        Some(p)
                            if keep
                                && p.weight != configured_weight(old, &p.name)
                                && b.weight == configured_weight(old, &p.name) =>
                        {
                            p.weight
                        }
                        _ => b.weight,
                    },
                    admin: if keep {
                        previous.map(|p| p.admin).unwrap_or(Admin::Enabled)
                    } else {
                        Admin::Enabled
                    },
                    healthy: previous.map(|p| p.healthy).unwrap_or(true),
                    check,
                    from_api,
                    retiring: false,
                    state: previous.map(|p| p.state).unwrap_or(BackendState::Unused),
                };
                if previous.is_none() {
                    added += 1;
                } else if previous.is_some_and(|p| {
                    p.address != slot.address || p.weight != slot.weight || p.check != slot.check
                }) {
                    changed += 1;
                }
                slot.state = slot.effective_state();
                backends.push(slot);
            }
            // Backends that left the config: drained until their clients are gone, or removed.
            if let Some(old) = old {
                let kept: BTreeSet<BackendId> = backends.iter().map(|b| b.id).collect();
                for b in old.backends.iter().filter(|b| !kept.contains(&b.id)) {
                    if new.backend_removal == BackendRemoval::Drain && b.state.keeps_stuck_clients()
                    {
                        let mut retiring = b.clone();
                        retiring.retiring = true;
                        retiring.state = retiring.effective_state();
                        backends.push(retiring);
                    }
                }
            }
            let (key, params) = service_entry(service, *sid);
            services.push(ServiceSlot {
                key,
                params,
                config: service.clone(),
                backends,
            });
        }
        let removed_services: Vec<String> = self
            .services
            .iter()
            .filter(|s| !new.services.iter().any(|n| n.name == s.config.name))
            .map(|s| s.config.name.clone())
            .collect();
        let old_ids = self.backend_ids();

        // Apply: backends first, then tables and service entries, then clean up.
        let new_service_count = services.len();
        self.config = new;
        self.services = services;
        let live = self.backend_ids();
        for i in 0..self.services.len() {
            for b in &self.services[i].backends {
                let entry = backend_entry(b, self.services[i].params.id);
                self.dataplane.backends.set(b.id, &entry, 0)?;
            }
            self.publish(i)?;
        }
        let mut removed_backends = 0;
        for id in old_ids.difference(&live) {
            self.dataplane.backends.set(*id, &Backend::UNUSED, 0)?;
            self.retired_ids.insert(*id);
            removed_backends += 1;
        }
        self.remove_stale_services()?;
        self.sync_checkers();
        self.write_state()?;
        let retiring: usize = self
            .services
            .iter()
            .map(|s| s.backends.iter().filter(|b| b.retiring).count())
            .sum();
        Ok(format!(
            "{new_service_count} service(s); {added} backend(s) added, {changed} changed, {removed_backends} removed, {retiring} draining out; services removed: {}",
            if removed_services.is_empty() {
                "none".to_string()
            } else {
                removed_services.join(", ")
            }
        ))
    }
}

/// The weight the config gave backend `name` of the old service (to tell run-time weights).
fn configured_weight(old: Option<&ServiceSlot>, name: &str) -> u32 {
    old.and_then(|s| s.config.backends.iter().find(|b| b.name == name))
        .map(|b| b.weight)
        .unwrap_or(0)
}
