//! `plan(current, desired) -> Plan`: the next model and the map writes that take the data path
//! there. Pure: no kernel, no clock, no I/O, so every rule here is unit-tested.

use super::{
    desired::{Desired, Observed},
    ids::IdBook,
    model::{BackendSlot, ServiceSlot, params_differ, service_entry},
};
use crate::config::{BackendRemoval, CheckKind, ServiceMode};
use std::collections::BTreeSet;
use sticky_lb_common::{Backend, BackendId, BackendState, ServiceId, ServiceKey};

/// One write to the data path. Applied in the order the plan lists them: counters of new ids,
/// backend entries, tables (each swap atomic), then what went away.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Change {
    /// A backend id enters use: its packet and connection counters start at 0.
    ResetCounters(BackendId),
    WriteBackend(BackendId, Backend),
    /// Rebuild and swap in the table and parameters of `next[i]`.
    Publish(usize),
    /// Take a service's key out of the service index.
    RemoveService(ServiceKey),
    /// Mark a backend id unused: entries naming it are redispatched on their next packet.
    ClearBackend(BackendId),
}

/// The next model, the writes that get there, and what they mean.
#[derive(Clone, Debug)]
pub(super) struct Plan {
    pub next: Vec<ServiceSlot>,
    pub ids: IdBook,
    pub changes: Vec<Change>,
    pub summary: Summary,
}

/// What a plan does, for logs and replies.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Summary {
    pub services: usize,
    pub backends_added: usize,
    pub backends_changed: usize,
    pub backends_removed: usize,
    pub backends_retiring: usize,
    pub services_removed: Vec<String>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} service(s); {} backend(s) added, {} changed, {} removed, {} draining out; services removed: {}",
            self.services,
            self.backends_added,
            self.backends_changed,
            self.backends_removed,
            self.backends_retiring,
            if self.services_removed.is_empty() {
                "none".to_string()
            } else {
                self.services_removed.join(", ")
            }
        )
    }
}

/// Why no plan could be made.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum PlanError {
    NoBackendId { service: String, backend: String },
    NoServiceId { service: String, limit: u32 },
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::NoBackendId { service, backend } => write!(
                f,
                "backend {service}/{backend}: no backend id is free (every id is in use or still named by stick entries of removed backends)"
            ),
            PlanError::NoServiceId { service, limit } => write!(
                f,
                "service {service}: no service id is free (the data path has room for {limit} services)"
            ),
        }
    }
}

/// What a plan needs besides the two states.
#[derive(Clone, Copy, Debug)]
pub(super) struct Context {
    /// Services the data path's arrays have room for.
    pub service_limit: u32,
    /// CLOCK_MONOTONIC_COARSE (ns): stamps the ids this plan retires.
    pub now_ns: u64,
    /// Write every backend and publish every service even where `current` says the maps hold
    /// them already (a new process adopting pinned maps).
    pub rewrite_all: bool,
}

/// Computes the model `desired` and `observed` call for, starting from `current` (with its
/// retired ids `ids`), and the writes that get there.
pub(super) fn plan(
    current: &[ServiceSlot],
    ids: &IdBook,
    desired: &Desired,
    observed: &Observed,
    cx: Context,
) -> Result<Plan, PlanError> {
    let (service_limit, now_ns) = (cx.service_limit, cx.now_ns);
    let mut ids = ids.clone();
    let mut summary = Summary::default();
    let find_current = |name: &str| current.iter().find(|s| s.name() == name);

    // Every id the data path holds now stays out of reach of new services and backends, also
    // those this plan removes (they are retired below).
    let mut used_services: BTreeSet<ServiceId> = current.iter().map(|s| s.id()).collect();
    let mut used_backends: BTreeSet<BackendId> = current
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.id))
        .collect();
    let wanted: Vec<_> = desired
        .config
        .services
        .iter()
        .map(|s| (s, desired.backends(s)))
        .collect();

    let vips: Vec<_> = desired.config.services.iter().map(|s| s.vip).collect();
    let link = observed.link(&vips);
    let mut next = Vec::with_capacity(wanted.len());
    for (service, backends) in wanted {
        let old = find_current(&service.name);
        let sid = match old {
            Some(old) => old.id(),
            None => {
                let id = ids
                    .free_service(&used_services, service_limit)
                    .ok_or_else(|| PlanError::NoServiceId {
                        service: service.name.clone(),
                        limit: service_limit,
                    })?;
                ids.reuse_service(id);
                used_services.insert(id);
                id
            }
        };
        let mut slots = Vec::with_capacity(backends.len());
        for b in backends {
            let previous = old.and_then(|s| s.backends.iter().find(|ob| ob.name == b.name));
            let id = match previous {
                Some(p) => p.id,
                None => {
                    let id =
                        ids.free_backend(&used_backends)
                            .ok_or_else(|| PlanError::NoBackendId {
                                service: service.name.clone(),
                                backend: b.name.clone(),
                            })?;
                    used_backends.insert(id);
                    id
                }
            };
            ids.reuse_backend(id);
            // A first look at this very address is fresher than a verdict kept under the id (a
            // backend given a new address keeps its id); a backend whose checks were just
            // turned on keeps the verdict it had (up) until its checks say otherwise.
            let first = observed
                .first_verdicts
                .get(&(service.name.clone(), b.name.clone()))
                .filter(|(address, _)| *address == b.address)
                .map(|(_, verdict)| *verdict);
            let healthy = match first
                .or_else(|| observed.health.get(&id).copied())
                .or_else(|| {
                    previous
                        .filter(|p| p.address == b.address)
                        .map(|p| p.healthy)
                }) {
                _ if b.check.kind == CheckKind::None => true,
                Some(verdict) => verdict,
                None => false,
            };
            let mut slot = BackendSlot {
                id,
                name: b.name,
                address: b.address,
                port: b.port,
                mac: b.mac.or_else(|| observed.macs.get(&b.address).copied()),
                configured_mac: b.mac,
                weight: b.weight,
                admin: b.admin,
                healthy,
                check: b.check,
                from_api: b.from_api,
                retiring: false,
                retiring_since_ns: 0,
                proxied: service.mode == ServiceMode::Http,
                state: BackendState::Unused,
            };
            slot.state = slot.effective_state();
            match previous {
                None => summary.backends_added += 1,
                Some(p)
                    if p.address != slot.address
                        || p.weight != slot.weight
                        || p.check != slot.check =>
                {
                    summary.backends_changed += 1
                }
                Some(_) => {}
            }
            slots.push(slot);
        }
        // Backends no longer wanted drain out while clients are stuck to them, or go now.
        if let Some(old) = old {
            for b in &old.backends {
                if slots.iter().any(|s| s.id == b.id) {
                    continue;
                }
                let drains = desired.config.backend_removal == BackendRemoval::Drain
                    && b.state.keeps_stuck_clients()
                    && !observed.drained_out.contains(&b.id);
                if drains {
                    let mut retiring = b.clone();
                    retiring.retiring = true;
                    retiring.healthy = match observed.health.get(&b.id) {
                        _ if b.check.kind == CheckKind::None => true,
                        Some(verdict) => *verdict,
                        None => b.healthy,
                    };
                    // The neighbour table's latest answer, unless a MAC was given.
                    retiring.mac = b
                        .configured_mac
                        .or_else(|| observed.macs.get(&b.address).copied())
                        .or(b.mac);
                    if !b.retiring {
                        retiring.retiring_since_ns = now_ns;
                        summary.backends_retiring += 1;
                    }
                    retiring.state = retiring.effective_state();
                    slots.push(retiring);
                }
            }
        }
        let (key, mut params) =
            service_entry(service, sid, &link, desired.config.shared_table.is_some());
        if let Some(old) = old
            && old.key == key
        {
            // Keep what the last publish filled in, so an unchanged service compares equal.
            params.ring_base = old.params.ring_base;
            params.ring_size = old.params.ring_size;
            params.vip = old.params.vip;
            params.port = old.params.port;
            params.protocol = old.params.protocol;
        }
        next.push(ServiceSlot {
            key,
            params,
            config: service.clone(),
            backends: slots,
        });
    }
    summary.services = next.len();

    // The writes.
    let current_backends: Vec<(&BackendSlot, ServiceId)> = current
        .iter()
        .flat_map(|s| s.backends.iter().map(move |b| (b, s.id())))
        .collect();
    let mut changes = Vec::new();
    let mut writes = Vec::new();
    for s in &next {
        for b in &s.backends {
            let entry = b.entry(s.id());
            match current_backends.iter().find(|(old, _)| old.id == b.id) {
                None => {
                    changes.push(Change::ResetCounters(b.id));
                    writes.push(Change::WriteBackend(b.id, entry));
                }
                Some((old, old_sid)) if cx.rewrite_all || old.entry(*old_sid) != entry => {
                    writes.push(Change::WriteBackend(b.id, entry));
                }
                Some(_) => {}
            }
        }
    }
    changes.extend(writes);
    for (i, s) in next.iter().enumerate() {
        // A `mode: http` service stays out of the index: the XDP program passes its packets
        // to the host, where the proxy listens.
        // An adopting process cannot tell from the maps whether the last one published it
        // (the config may have switched it from tcp): it takes the key out, in case.
        if s.proxied() {
            if cx.rewrite_all {
                changes.push(Change::RemoveService(s.key));
            }
            continue;
        }
        let publish = match find_current(s.name()) {
            None => true,
            Some(old) => {
                cx.rewrite_all
                    || old.proxied()
                    || old.key != s.key
                    || params_differ(&old.params, &s.params)
                    || old.config.maglev_table_size != s.config.maglev_table_size
                    || old.config.policy != s.config.policy
                    || old.table_inputs() != s.table_inputs()
            }
        };
        if publish {
            changes.push(Change::Publish(i));
        }
    }
    let next_keys: Vec<ServiceKey> = next
        .iter()
        .filter(|s| !s.proxied())
        .map(|s| s.key)
        .collect();
    let next_ids: BTreeSet<BackendId> = next
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.id))
        .collect();
    for old in current {
        if !old.proxied() && !next_keys.contains(&old.key) {
            changes.push(Change::RemoveService(old.key));
        }
        if !next.iter().any(|s| s.name() == old.name()) {
            summary.services_removed.push(old.name().to_string());
            if !next.iter().any(|s| s.id() == old.id()) {
                ids.retire_service(old.id(), now_ns);
            }
        }
        for b in &old.backends {
            if !next_ids.contains(&b.id) {
                changes.push(Change::ClearBackend(b.id));
                ids.retire_backend(b.id, now_ns);
                summary.backends_removed += 1;
            }
        }
    }
    Ok(Plan {
        next,
        ids,
        changes,
        summary,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::{
        config::Config,
        state::{AddedBackend, BackendChange},
    };
    use std::net::{IpAddr, Ipv4Addr};
    use sticky_lb_common::{Family, addr};

    /// A config of services with backends `name@last-octet`; checks off so health is known.
    fn config(extra: &str, services: &[(&str, &[&str])]) -> Config {
        let mut text = format!("interface: lo\n{extra}services:\n");
        for (i, (name, backends)) in services.iter().enumerate() {
            text += &format!(
                "  - name: {name}\n    vip: 198.18.0.{}\n    port: 80\n    health_check: {{type: none}}\n    backends:\n",
                100 + i
            );
            for b in backends.iter() {
                let (b, octet) = b.split_once('@').unwrap();
                text += &format!("      - name: {b}\n        address: 198.18.{i}.{octet}\n");
            }
        }
        Config::parse(&text, false).unwrap()
    }

    fn observed() -> Observed {
        let mut o = Observed::default();
        for i in 0..4u8 {
            for octet in 1..=20u8 {
                o.macs.insert(
                    Ipv4Addr::new(198, 18, i, octet).into(),
                    [2, 0, 0, 0, i, octet],
                );
            }
        }
        o
    }

    fn ids_of(plan: &Plan) -> Vec<(ServiceId, Vec<(String, BackendId)>)> {
        plan.next
            .iter()
            .map(|s| {
                (
                    s.id(),
                    s.backends.iter().map(|b| (b.name.clone(), b.id)).collect(),
                )
            })
            .collect()
    }

    pub(in super::super) fn cx(now_ns: u64) -> Context {
        Context {
            service_limit: 16,
            now_ns,
            rewrite_all: false,
        }
    }

    fn step(current: &Plan, desired: &Desired, observed: &Observed, now: u64) -> Plan {
        plan(&current.next, &current.ids, desired, observed, cx(now)).unwrap()
    }

    fn first(desired: &Desired) -> Plan {
        plan(&[], &IdBook::default(), desired, &observed(), cx(1)).unwrap()
    }

    fn named(v: &[(&str, BackendId)]) -> Vec<(String, BackendId)> {
        v.iter().map(|(n, i)| (n.to_string(), *i)).collect()
    }

    #[test]
    fn a_fresh_start_numbers_services_and_backends_and_writes_everything() {
        let desired = Desired::new(
            config("", &[("web", &["a@1", "b@2"]), ("api", &["x@1"])]),
            Default::default(),
        );
        let p = first(&desired);
        assert_eq!(
            ids_of(&p),
            vec![(0, named(&[("a", 0), ("b", 1)])), (1, named(&[("x", 2)]))]
        );
        assert!(p.next.iter().flat_map(|s| &s.backends).all(|b| b.is_up()));
        let resets = p
            .changes
            .iter()
            .filter(|c| matches!(c, Change::ResetCounters(_)))
            .count();
        assert_eq!(resets, 3);
        assert!(p.changes.contains(&Change::Publish(0)));
        assert!(p.changes.contains(&Change::Publish(1)));
    }

    #[test]
    fn an_unchanged_desired_state_plans_no_write() {
        let desired = Desired::new(config("", &[("web", &["a@1", "b@2"])]), Default::default());
        let p = first(&desired);
        let again = step(&p, &desired, &observed(), 2);
        assert!(again.changes.is_empty(), "{:?}", again.changes);
    }

    /// Issue: b2 removed at once, then a restart with b5 new: b5 must not get b2's id, or b2's
    /// stuck clients (and its connections and counters) become b5's.
    #[test]
    fn a_removed_backends_id_is_not_given_to_a_new_backend() {
        let base = "backend_removal: immediate\n";
        let four = config(base, &[("web", &["b1@1", "b2@2", "b3@3", "b4@4"])]);
        let p = first(&Desired::new(four.clone(), Default::default()));
        // Remove b2 at run time.
        let mut desired = Desired::new(four, Default::default());
        desired.change("web", "b2").removed = true;
        let removed = step(&p, &desired, &observed(), 10);
        assert!(removed.changes.contains(&Change::ClearBackend(1)));
        assert_eq!(removed.ids.backends.get(&1), Some(&10));
        // Restart (the book comes back from the state file) with b5 new.
        let five = config(base, &[("web", &["b1@1", "b3@3", "b4@4", "b5@5"])]);
        let desired = Desired::new(five, desired.changes.clone());
        let restarted = step(&removed, &desired, &observed(), 20);
        assert_eq!(
            ids_of(&restarted),
            vec![(0, named(&[("b1", 0), ("b3", 2), ("b4", 3), ("b5", 4)]))]
        );
        assert!(restarted.changes.contains(&Change::ResetCounters(4)));
        // Once a sweep that started after the removal found nothing naming id 1, it is free.
        let mut ids = restarted.ids.clone();
        ids.release(15, &BTreeSet::new(), &BTreeSet::new(), &BTreeSet::new());
        let mut six = restarted.clone();
        six.ids = ids;
        let desired = Desired::new(
            config(base, &[("web", &["b1@1", "b3@3", "b4@4", "b5@5", "b6@6"])]),
            Default::default(),
        );
        let p = step(&six, &desired, &observed(), 30);
        assert_eq!(p.next[0].backends[4].id, 1);
        assert!(p.changes.contains(&Change::ResetCounters(1)));
    }

    #[test]
    fn an_api_added_backend_avoids_retired_ids_and_survives_a_reload() {
        let cfg = config("backend_removal: immediate\n", &[("web", &["a@1", "b@2"])]);
        let p = first(&Desired::new(cfg.clone(), Default::default()));
        let mut desired = Desired::new(cfg.clone(), Default::default());
        desired.change("web", "b").removed = true;
        let p = step(&p, &desired, &observed(), 5);
        desired.change("web", "c").added = Some(AddedBackend {
            address: Ipv4Addr::new(198, 18, 0, 3).into(),
            weight: 1,
            mac: None,
            port: None,
        });
        let p = step(&p, &desired, &observed(), 6);
        assert_eq!(ids_of(&p), vec![(0, named(&[("a", 0), ("c", 2)]))]);
        assert!(p.next[0].backends[1].from_api);
        // A reload of the same file keeps it (runtime_changes: keep is the default).
        let reloaded = Desired::new(cfg, desired.changes.clone());
        let p2 = step(&p, &reloaded, &observed(), 7);
        assert_eq!(ids_of(&p2), ids_of(&p));
        assert!(p2.changes.is_empty(), "{:?}", p2.changes);
    }

    #[test]
    fn runtime_changes_reset_drops_what_operators_changed() {
        let cfg = config("runtime_changes: reset\n", &[("web", &["a@1", "b@2"])]);
        let mut changes = desired::Changes::new();
        changes.entry("web".into()).or_default().insert(
            "a".into(),
            BackendChange {
                admin: Some("disabled".into()),
                ..Default::default()
            },
        );
        let desired = Desired::new(cfg, changes);
        assert!(desired.changes.is_empty());
        assert!(first(&desired).next[0].backends[0].is_up());
    }

    #[test]
    fn a_run_time_weight_survives_a_reload_unless_the_config_weight_changed() {
        let cfg = config("", &[("web", &["a@1", "b@2"])]);
        let mut desired = Desired::new(cfg.clone(), Default::default());
        desired.set_weight("web", "a", 5);
        let p = first(&desired);
        assert_eq!(p.next[0].backends[0].weight, 5);
        let same = Desired::new(cfg, desired.changes.clone());
        assert_eq!(first(&same).next[0].backends[0].weight, 5);
        let mut text = String::from(
            "interface: lo\nservices:\n  - name: web\n    vip: 198.18.0.100\n    port: 80\n    health_check: {type: none}\n    backends:\n",
        );
        text += "      - {name: a, address: 198.18.0.1, weight: 3}\n      - {name: b, address: 198.18.0.2}\n";
        let changed = Desired::new(Config::parse(&text, false).unwrap(), desired.changes);
        assert_eq!(first(&changed).next[0].backends[0].weight, 3);
    }

    #[test]
    fn a_backend_with_checks_takes_no_clients_before_its_first_verdict() {
        let text = "interface: lo\nservices:\n  - name: web\n    vip: 198.18.0.100\n    port: 80\n    backends:\n      - {name: a, address: 198.18.0.1}\n";
        let desired = Desired::new(Config::parse(text, false).unwrap(), Default::default());
        let p = first(&desired);
        assert_eq!(p.next[0].backends[0].state, BackendState::Down);
        let mut o = observed();
        o.health.insert(0, true);
        let p2 = step(&p, &desired, &o, 2);
        assert!(p2.next[0].backends[0].is_up());
        assert_eq!(
            p2.changes,
            vec![
                Change::WriteBackend(0, p2.next[0].backends[0].entry(0)),
                Change::Publish(0)
            ]
        );
    }

    /// A first look counts only for the address it looked at, and checks turned on by a
    /// reload keep the verdict a backend had (up) until they report.
    #[test]
    fn first_looks_count_for_their_address_and_new_checks_keep_the_last_verdict() {
        let p = first(&Desired::new(
            config("", &[("web", &["a@1", "b@2"])]),
            Default::default(),
        ));
        let mut o = observed();
        o.first_verdicts.insert(
            ("web".into(), "b".into()),
            (Ipv4Addr::new(198, 18, 0, 99).into(), false),
        );
        let text = "interface: lo\nservices:\n  - name: web\n    vip: 198.18.0.100\n    port: 80\n    backends:\n      - {name: a, address: 198.18.0.1}\n      - {name: b, address: 198.18.0.2}\n";
        let checks_on = Desired::new(Config::parse(text, false).unwrap(), Default::default());
        let q = step(&p, &checks_on, &o, 2);
        assert!(q.next[0].backends.iter().all(|b| b.is_up()), "{:?}", q.next);
        assert!(q.changes.is_empty(), "{:?}", q.changes);
        // The same look at b's own address decides.
        o.first_verdicts.insert(
            ("web".into(), "b".into()),
            (Ipv4Addr::new(198, 18, 0, 2).into(), false),
        );
        let r = step(&p, &checks_on, &o, 3);
        assert_eq!(r.next[0].backends[1].state, BackendState::Down);
    }

    /// A draining backend follows the neighbour table like any other: its stuck clients must
    /// reach its new MAC.
    #[test]
    fn a_retiring_backend_takes_a_new_mac() {
        let p = first(&Desired::new(
            config("", &[("web", &["a@1", "b@2"])]),
            Default::default(),
        ));
        let desired = Desired::new(config("", &[("web", &["a@1"])]), Default::default());
        let draining = step(&p, &desired, &observed(), 5);
        assert!(draining.next[0].backends[1].retiring);
        let mut o = observed();
        o.macs.insert(
            Ipv4Addr::new(198, 18, 0, 2).into(),
            [2, 0, 0, 0, 0xbe, 0xef],
        );
        let moved = step(&draining, &desired, &o, 6);
        let b = &moved.next[0].backends[1];
        assert_eq!(b.mac, Some([2, 0, 0, 0, 0xbe, 0xef]));
        assert!(moved.changes.contains(&Change::WriteBackend(1, b.entry(0))));
        assert_eq!(
            moved.summary.backends_retiring, 0,
            "counted once, when it began"
        );
        assert_eq!(b.retiring_since_ns, 5);
    }

    #[test]
    fn a_backend_left_out_of_the_config_drains_until_the_sweep_finds_it_empty() {
        let p = first(&Desired::new(
            config("", &[("web", &["a@1", "b@2"])]),
            Default::default(),
        ));
        let desired = Desired::new(config("", &[("web", &["a@1"])]), Default::default());
        let draining = step(&p, &desired, &observed(), 5);
        let b = &draining.next[0].backends[1];
        assert!(b.retiring);
        assert_eq!(b.state, BackendState::Drain);
        assert_eq!(draining.summary.backends_retiring, 1);
        assert!(!draining.changes.contains(&Change::ClearBackend(1)));
        let mut o = observed();
        o.drained_out.insert(1);
        let gone = step(&draining, &desired, &o, 6);
        assert_eq!(gone.next[0].backends.len(), 1);
        assert!(gone.changes.contains(&Change::ClearBackend(1)));
        assert!(gone.ids.backends.contains_key(&1));
    }

    #[test]
    fn a_removed_service_is_taken_out_of_the_index_and_its_backends_retired() {
        let p = first(&Desired::new(
            config("", &[("web", &["a@1"]), ("api", &["x@1"])]),
            Default::default(),
        ));
        let desired = Desired::new(config("", &[("web", &["a@1"])]), Default::default());
        let q = step(&p, &desired, &observed(), 9);
        assert!(q.changes.contains(&Change::RemoveService(p.next[1].key)));
        assert!(q.changes.contains(&Change::ClearBackend(1)));
        assert_eq!(q.summary.services_removed, vec!["api".to_string()]);
        assert_eq!(q.ids.services.get(&1), Some(&9));
        // A new service does not take the retired id while another is free.
        let desired = Desired::new(
            config("", &[("web", &["a@1"]), ("shop", &["s@1"])]),
            Default::default(),
        );
        assert_eq!(step(&q, &desired, &observed(), 10).next[1].id(), 2);
    }

    #[test]
    fn no_free_backend_id_is_an_error_naming_the_backend() {
        let p = first(&Desired::new(
            config("", &[("web", &["a@1"])]),
            Default::default(),
        ));
        let mut ids = p.ids.clone();
        for id in 1..sticky_lb_common::MAX_BACKENDS {
            ids.retire_backend(id, 1);
        }
        let desired = Desired::new(config("", &[("web", &["a@1", "b@2"])]), Default::default());
        let e = plan(&p.next, &ids, &desired, &observed(), cx(2)).unwrap_err();
        assert_eq!(
            e,
            PlanError::NoBackendId {
                service: "web".into(),
                backend: "b".into()
            }
        );
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// One IPv6 service `web` at 2001:db8::100 with backend `a` (MAC given, checks off).
    fn ipv6_config(stick: &str) -> Config {
        let text = format!(
            "interface: lo\nservices:\n  - name: web\n    vip: 2001:db8::100\n    port: 80\n{stick}    health_check: {{type: none}}\n    backends:\n      - name: a\n        address: 2001:db8:1::11\n        mac: 02:00:00:00:00:11\n"
        );
        Config::parse(&text, false).unwrap()
    }

    #[test]
    fn an_ipv6_service_is_keyed_and_masked_in_its_family() {
        let p = first(&Desired::new(ipv6_config(""), Default::default()));
        let s = &p.next[0];
        assert_eq!(s.key.family, Family::Ipv6 as u8);
        assert_eq!(s.key.vip, addr::words(&ip("2001:db8::100")));
        assert_eq!(s.params.family, Family::Ipv6 as u8);
        // No client_mask given: the IPv6 default, a /64.
        assert_eq!(s.params.client_mask, addr::prefix_mask(Family::Ipv6, 64));
        let entry = p
            .changes
            .iter()
            .find_map(|c| match c {
                Change::WriteBackend(_, entry) => Some(*entry),
                _ => None,
            })
            .unwrap();
        assert_eq!(entry.addr, addr::words(&ip("2001:db8:1::11")));
        let key = s.stick_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")).unwrap();
        assert_eq!(key.client, addr::words(&ip("2001:db8:1:2::")));
        assert_eq!(s.client_prefix(&key), "2001:db8:1:2::/64");
        // Another address of the same /64 (a rotated privacy address) has the same key.
        assert_eq!(s.stick_key(ip("2001:db8:1:2::7")).unwrap(), key);
        let whole = first(&Desired::new(
            ipv6_config("    stick: {client_mask: 128}\n"),
            Default::default(),
        ));
        let key = whole.next[0].stick_key(ip("2001:db8:1:2::7")).unwrap();
        assert_eq!(key.client, addr::words(&ip("2001:db8:1:2::7")));
        assert_eq!(whole.next[0].client_prefix(&key), "2001:db8:1:2::7");
    }

    #[test]
    fn a_client_of_the_other_family_has_no_stick_key() {
        let v6 = first(&Desired::new(ipv6_config(""), Default::default()));
        assert_eq!(
            v6.next[0].stick_key(ip("198.18.0.1")).unwrap_err(),
            "client 198.18.0.1 is IPv4 but service web is IPv6"
        );
        let v4 = first(&Desired::new(
            config("", &[("web", &["a@1"])]),
            Default::default(),
        ));
        assert_eq!(
            v4.next[0].stick_key(ip("2001:db8::1")).unwrap_err(),
            "client 2001:db8::1 is IPv6 but service web is IPv4"
        );
        // An IPv4 service keys only word 0, masked.
        let key = v4.next[0].stick_key(ip("198.18.1.77")).unwrap();
        assert_eq!(key.client, addr::words(&ip("198.18.1.77")));
        assert_eq!(v4.next[0].client_prefix(&key), "198.18.1.77");
        // An IPv4-mapped address is the IPv4 client it maps (that is how it arrives).
        assert_eq!(v4.next[0].stick_key(ip("::ffff:198.18.1.77")).unwrap(), key);
        assert_eq!(
            v6.next[0].stick_key(ip("::ffff:198.18.1.77")).unwrap_err(),
            "client 198.18.1.77 is IPv4 but service web is IPv6"
        );
    }

    #[test]
    fn a_service_moved_to_ipv6_is_published_under_its_new_key() {
        let p = first(&Desired::new(
            config("", &[("web", &["a@1"])]),
            Default::default(),
        ));
        let q = step(
            &p,
            &Desired::new(ipv6_config(""), Default::default()),
            &observed(),
            5,
        );
        assert_eq!(q.next[0].key.family, Family::Ipv6 as u8);
        assert!(q.changes.contains(&Change::RemoveService(p.next[0].key)));
        assert!(q.changes.contains(&Change::Publish(0)));
    }

    use super::super::desired;
}
