//! Operator requests from the control socket: backend changes, the stick table, counters.

use super::*;

impl Controller {
    /// An operator request from the control socket.
    pub(super) async fn handle(&mut self, request: Request) -> Result<Reply> {
        match request {
            Request::Backend {
                service,
                backend,
                action,
            } => {
                let (i, j) = match self.find_named(&service, &backend) {
                    Ok(found) => found,
                    Err(reply) => return Ok(reply),
                };
                let b = &mut self.services[i].backends[j];
                let mut table_changes = false;
                match action {
                    BackendAction::Drain => b.admin = Admin::Drain,
                    BackendAction::Enable => b.admin = Admin::Enabled,
                    BackendAction::Disable => b.admin = Admin::Disabled,
                    BackendAction::Weight(weight) => {
                        if weight > 1_000_000 {
                            return Ok(Reply::error("weight must be at most 1000000"));
                        }
                        // A new weight reshapes the table even when the state stays up.
                        table_changes = b.weight != weight && b.state == BackendState::Up;
                        b.weight = weight;
                    }
                }
                self.refresh_backend(i, j, table_changes)?;
                self.write_state()?;
                let b = &self.services[i].backends[j];
                let message = format!(
                    "{service}/{backend}: {} (weight {})",
                    state_name(b.state),
                    b.weight
                );
                info!("operator: {message}");
                Ok(Reply::ok(message))
            }
            Request::BackendAdd {
                service,
                backend,
                address,
                weight,
                mac,
            } => {
                self.add_backend(&service, &backend, address, weight, mac.as_deref())
                    .await
            }
            Request::BackendRemove { service, backend } => {
                let (i, j) = match self.find_named(&service, &backend) {
                    Ok(found) => found,
                    Err(reply) => return Ok(reply),
                };
                let message = self.remove_backend(i, j, self.config.backend_removal)?;
                info!("operator: {message}");
                Ok(Reply::ok(message))
            }
            Request::TableGet { client, service } => self.table_get(client, service.as_deref()),
            Request::TableSet {
                client,
                service,
                backend,
            } => self.table_set(client, &service, &backend),
            Request::TableDelete { client, service } => {
                self.table_delete(Some(client), service.as_deref())
            }
            Request::TableFlush { service } => self.table_delete(None, service.as_deref()),
            Request::Stats => self.stats(),
            Request::Reload => match self.reload().await {
                Ok(summary) => {
                    info!("reload: {summary}");
                    Ok(Reply::ok(format!("reloaded: {summary}")))
                }
                Err(e) => {
                    warn!("reload refused, nothing changed: {e:#}");
                    Ok(Reply::error(format!(
                        "reload refused, nothing changed: {e:#}"
                    )))
                }
            },
            Request::Detach => Ok(Reply::ok(format!(
                "detaching from {}",
                self.config.interface
            ))),
        }
    }

    pub(super) async fn add_backend(
        &mut self,
        service: &str,
        backend: &str,
        address: Ipv4Addr,
        weight: u32,
        mac: Option<&str>,
    ) -> Result<Reply> {
        let Some(i) = self.services.iter().position(|s| s.config.name == service) else {
            return Ok(Reply::error(format!("no service '{service}'")));
        };
        let s = &self.services[i];
        if let Some(existing) = s
            .backends
            .iter()
            .find(|b| b.name == backend || b.address == address)
        {
            return Ok(Reply::error(format!(
                "service '{service}' already has backend '{}' ({})",
                existing.name, existing.address
            )));
        }
        if backend.is_empty() || weight > 1_000_000 {
            return Ok(Reply::error(
                "a backend needs a name and a weight of at most 1000000",
            ));
        }
        if s.config.policy == crate::config::Policy::LeastConn
            && s.backends.len() >= sticky_lb_common::MAX_LEAST_CONN_BACKENDS as usize
        {
            return Ok(Reply::error("least-conn services take at most 32 backends"));
        }
        let mac = match mac.map(crate::config::parse_mac).transpose() {
            Ok(mac) => mac,
            Err(e) => return Ok(Reply::error(e)),
        };
        let used = self.backend_ids();
        // Prefer an id no stick entry can still name (not used since this controller started).
        let free = |avoid_retired: bool| {
            (0..sticky_lb_common::MAX_BACKENDS)
                .find(|id| !used.contains(id) && !(avoid_retired && self.retired_ids.contains(id)))
        };
        let Some(id) = free(true).or_else(|| free(false)) else {
            return Ok(Reply::error("no free backend id"));
        };
        let mac = resolve_macs(&self.config.interface, vec![(address, mac)])
            .await?
            .pop()
            .flatten();
        let check = self.services[i].config.service_health_check();
        let mut slot = BackendSlot {
            id,
            name: backend.to_string(),
            address,
            mac,
            weight,
            admin: Admin::Enabled,
            healthy: true,
            check,
            from_api: true,
            retiring: false,
            state: BackendState::Unused,
        };
        slot.state = slot.effective_state();
        let sid = self.services[i].params.id;
        self.dataplane
            .backends
            .set(id, &backend_entry(&slot, sid), 0)?;
        self.services[i].backends.push(slot);
        self.publish(i)?;
        self.sync_checkers();
        self.write_state()?;
        let state = self.services[i]
            .backends
            .last()
            .map(|b| b.state)
            .unwrap_or(BackendState::Unused);
        let message = format!(
            "{service}/{backend} added ({address}, weight {weight}): {}",
            state_name(state)
        );
        info!("operator: {message}");
        Ok(Reply::ok(message))
    }

    /// Takes backend `j` of service `i` out, by draining it until no client is stuck to it, or
    /// at once.
    pub(super) fn remove_backend(
        &mut self,
        i: usize,
        j: usize,
        how: BackendRemoval,
    ) -> Result<String> {
        let name = format!(
            "{}/{}",
            self.services[i].config.name, self.services[i].backends[j].name
        );
        match how {
            BackendRemoval::Drain => {
                self.services[i].backends[j].retiring = true;
                self.refresh_backend(i, j, true)?;
                Ok(format!(
                    "{name} drains: removed once no client is stuck to it and no connection is open on it"
                ))
            }
            BackendRemoval::Immediate => {
                let b = self.services[i].backends.remove(j);
                self.retired_ids.insert(b.id);
                if let Some(checker) = self.checkers.remove(&b.id) {
                    checker.task.abort();
                }
                // Its stuck clients find no backend and are redispatched on their next packet.
                self.dataplane.backends.set(b.id, &Backend::UNUSED, 0)?;
                self.publish(i)?;
                self.write_state()?;
                Ok(format!("{name} removed"))
            }
        }
    }

    pub(super) fn table_get(&self, client: Ipv4Addr, service: Option<&str>) -> Result<Reply> {
        let maps = PinnedMaps::open(&self.pins)?;
        let now = monotonic_ns();
        let mut rows = Vec::new();
        for s in self
            .services
            .iter()
            .filter(|s| service.is_none_or(|name| s.config.name == name))
        {
            let key = StickKey {
                service: s.params.id,
                client: [
                    u32::from_ne_bytes(client.octets()) & s.params.client_mask[0],
                    0,
                    0,
                    0,
                ],
            };
            if let Ok(entry) = maps.stick.get(&key, 0) {
                let backend = s.backends.iter().find(|b| b.id == entry.backend);
                rows.push(serde_json::json!({
                    "service": s.config.name,
                    "client": Ipv4Addr::from(key.client[0].to_ne_bytes()).to_string(),
                    "backend": backend.map(|b| b.name.clone()).unwrap_or_else(|| format!("#{}", entry.backend)),
                    "backend_address": backend.map(|b| b.address.to_string()),
                    "idle_ms": now.saturating_sub(entry.last_seen_ns) / 1_000_000,
                    "age_ms": now.saturating_sub(entry.created_ns) / 1_000_000,
                }));
            }
        }
        if let Some(name) = service
            && !self.services.iter().any(|s| s.config.name == name)
        {
            return Ok(Reply::error(format!("no service '{name}'")));
        }
        let message = if rows.is_empty() {
            format!("{client}: no stick entry")
        } else {
            rows.iter()
                .map(|r| {
                    format!(
                        "{} {} -> {} (idle {} ms)",
                        r["service"].as_str().unwrap_or(""),
                        r["client"].as_str().unwrap_or(""),
                        r["backend"].as_str().unwrap_or(""),
                        r["idle_ms"]
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        Ok(Reply::with_data(message, serde_json::Value::Array(rows)))
    }

    pub(super) fn table_set(
        &mut self,
        client: Ipv4Addr,
        service: &str,
        backend: &str,
    ) -> Result<Reply> {
        let (i, j) = match self.find_named(service, backend) {
            Ok(found) => found,
            Err(reply) => return Ok(reply),
        };
        let s = &self.services[i];
        let b = &s.backends[j];
        if !b.state.keeps_stuck_clients() {
            return Ok(Reply::error(format!(
                "{service}/{backend} is {}: it would not keep the client",
                state_name(b.state)
            )));
        }
        let mut maps = PinnedMaps::open(&self.pins)?;
        let key = StickKey {
            service: s.params.id,
            client: [
                u32::from_ne_bytes(client.octets()) & s.params.client_mask[0],
                0,
                0,
                0,
            ],
        };
        let now = monotonic_ns();
        maps.stick.insert(&key, &StickEntry::placed(b.id, now), 0)?;
        let message = format!("{service} {client} -> {backend}");
        info!("operator: table set {message}");
        Ok(Reply::ok(message))
    }

    /// Deletes the entries of one client, or all entries, of one service or all.
    pub(super) fn table_delete(
        &mut self,
        client: Option<Ipv4Addr>,
        service: Option<&str>,
    ) -> Result<Reply> {
        if let Some(name) = service
            && !self.services.iter().any(|s| s.config.name == name)
        {
            return Ok(Reply::error(format!("no service '{name}'")));
        }
        let ids: BTreeMap<ServiceId, u32> = self
            .services
            .iter()
            .filter(|s| service.is_none_or(|name| s.config.name == name))
            .map(|s| (s.params.id, s.params.client_mask[0]))
            .collect();
        let mut maps = PinnedMaps::open(&self.pins)?;
        let keys: Vec<StickKey> = crate::batch::lookup_all(&maps.stick, 8192)?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| match (ids.get(&k.service), client) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(mask), Some(c)) => k.client[0] == u32::from_ne_bytes(c.octets()) & mask,
            })
            .collect();
        let mut deleted = 0;
        for key in keys {
            if maps.stick.remove(&key).is_ok() {
                deleted += 1;
            }
        }
        let message = format!(
            "{deleted} stick entr{} deleted",
            if deleted == 1 { "y" } else { "ies" }
        );
        info!(
            "operator: table {}: {message}",
            if client.is_some() { "delete" } else { "flush" }
        );
        Ok(Reply::with_data(
            message,
            serde_json::json!({ "deleted": deleted }),
        ))
    }

    pub(super) fn stats(&self) -> Result<Reply> {
        let maps = PinnedMaps::open(&self.pins)?;
        let counters = maps.counters()?;
        let mut services = Vec::new();
        for s in &self.services {
            let c = maps.service_counters(s.params.id)?;
            let mut backends = Vec::new();
            for b in &s.backends {
                let bc = maps.backend_counters(b.id)?;
                backends.push(
                    serde_json::json!({"name": b.name, "packets": bc.packets, "bytes": bc.bytes}),
                );
            }
            services.push(serde_json::json!({
                "name": s.config.name,
                "stick_hits": c.stick_hits,
                "stick_misses": c.stick_misses,
                "stick_inserts": c.stick_inserts,
                "redispatches": c.redispatches,
                "races_lost": c.races_lost,
                "inserts_skipped": c.inserts_skipped,
                "connections_untracked": c.flows_untracked,
                "backends": backends,
            }));
        }
        let global: serde_json::Map<String, serde_json::Value> = sticky_lb_common::Counter::ALL
            .iter()
            .map(|c| (c.name().to_string(), counters[*c as usize].into()))
            .collect();
        let mut lines = vec![
            global
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join("  "),
        ];
        for s in &services {
            lines.push(format!(
                "{}: hits {} misses {} inserts {} redispatches {} races_lost {} inserts_skipped {} connections_untracked {}",
                s["name"].as_str().unwrap_or(""),
                s["stick_hits"],
                s["stick_misses"],
                s["stick_inserts"],
                s["redispatches"],
                s["races_lost"],
                s["inserts_skipped"],
                s["connections_untracked"]
            ));
        }
        Ok(Reply::with_data(
            lines.join("\n"),
            serde_json::json!({"counters": global, "services": services}),
        ))
    }
}
