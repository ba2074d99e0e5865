//! Start and adoption: check what is pinned, take over the previous run's model and run-time
//! changes, observe the backends once (neighbour table, one round of health checks), load the
//! program over the pinned maps, reconcile, attach, and tell systemd.

use super::{
    Controller, NeighbourAnswer,
    desired::{Changes, Desired, Observed},
    first_look::{first_look, new_backends},
    ids::IdBook,
    instance,
    model::{Admin, BackendSlot, Link, ServiceSlot, service_entry, state_name},
};
use crate::shared::SharedTable;
use crate::{
    config::{Config, Forwarding, ServiceConfig},
    dataplane::{self, Attached, Dataplane, LoadOptions, PinDir, monotonic_ns},
    health, metrics,
    neighbour::{self, Neighbours},
    state::{self, AddedBackend, BackendChange, BackendRecord, RuntimeState, ServiceRecord},
};
use anyhow::{Result, bail};
use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    sync::{Arc, Mutex},
};
use sticky_lb_common::{
    BackendState, Family, LAYOUT_VERSION, MAX_BACKENDS, MAX_SERVICES, addr, map_names,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Where the controller's background work reports to the main loop.
pub(super) struct Channels {
    /// The interface's neighbour table (rtnetlink), watched by the main loop.
    pub neighbour_table: Arc<Neighbours>,
    pub health: mpsc::Sender<health::Transition>,
    pub neighbours: mpsc::Sender<NeighbourAnswer>,
    pub pending: mpsc::Sender<super::requests::Pending>,
    pub operator: mpsc::Sender<crate::control::Request>,
    /// Listening sockets taken over from the controller that ran before (`run --take-over`).
    pub listeners: Vec<(std::net::SocketAddr, std::net::TcpListener)>,
}

impl Controller {
    pub(super) async fn start(
        config: Config,
        config_path: &Path,
        netns: Option<String>,
        channels: Channels,
        lock: instance::Lock,
    ) -> Result<Controller> {
        dataplane::ensure_bpffs()?;
        let pins = PinDir::new(netns.as_deref(), &config.interface);
        let state_path = state::path(netns.as_deref(), &config.interface);
        // Everything that could refuse an adoption is checked before the kernel is touched.
        let previous = adoptable(&pins, &state_path)?;
        let desired = Desired::new(
            config,
            previous.as_ref().map(runtime_changes).unwrap_or_default(),
        );
        let config = &desired.config;
        let largest_table = config
            .services
            .iter()
            .map(|s| s.maglev_table_size)
            .max()
            .unwrap_or(sticky_lb_common::DEFAULT_MAGLEV_TABLE_SIZE);
        // The Maglev array's shape is fixed when it is created; later controllers of the same
        // pins keep it. Room for 16 services (or as many as configured) so a later config with
        // a few more still fits.
        let (maglev_stride, maglev_services) = match previous.as_ref() {
            Some(p) if p.maglev_stride > 0 => (p.maglev_stride, p.maglev_services),
            _ => (
                largest_table,
                (config.services.len() as u32).clamp(16, MAX_SERVICES),
            ),
        };
        let current = previous
            .as_ref()
            .map(|p| adopted_model(p, &desired))
            .unwrap_or_default();
        let mut ids = IdBook::default();
        if let Some(p) = &previous {
            ids.backends = p.retired_backends.clone();
            ids.services = p.retired_services.clone();
        }
        let observed = observe(
            &current,
            &desired,
            previous.as_ref(),
            &channels.neighbour_table,
        )
        .await;
        let options = LoadOptions {
            stick_table_size: config.stick_table_size,
            flow_table_size: config.flow_table_size,
            maglev_stride,
            maglev_services,
            interface_mac: neighbour::interface_mac(&config.interface)?,
            log_level: aya_log_level(),
        };
        let fresh = previous.is_none();
        let dataplane = Dataplane::load(Some(pins.clone()), options).inspect_err(|_| {
            if fresh {
                let _ = pins.remove();
            }
        })?;
        let latencies: health::Latencies = Arc::default();
        let http = crate::http::Proxy::with_listeners(channels.listeners);
        let mut controller = Controller {
            config_path: config_path.to_path_buf(),
            netns,
            pins: pins.clone(),
            dataplane,
            desired: desired.clone(),
            observed,
            services: current,
            ids,
            mode: String::new(),
            checkers: HashMap::new(),
            neighbours: channels.neighbour_table.clone(),
            attached_index: None,
            health_tx: channels.health,
            neighbour_tx: channels.neighbours,
            pending_tx: channels.pending,
            latencies: latencies.clone(),
            metrics: Arc::new(Mutex::new(metrics::Snapshot {
                http: Some(http.stats()),
                ..metrics::Snapshot::new(latencies)
            })),
            orphans_seen: BTreeSet::new(),
            nat_orphans: Default::default(),
            state_behind: false,
            observations_behind: false,
            serving: false,
            reloads_started: 0,
            reloads_applied: 0,
            shared: None,
            operator_tx: channels.operator,
            refresh_rounds: Default::default(),
            http,
            _lock: lock,
        };
        if let Err(e) = controller.take_over_leftovers() {
            warn!("reading what the pinned backends map holds: {e:#}");
        }
        if let Err(e) = controller.reconcile_with(desired, true) {
            if fresh {
                drop(controller.dataplane);
                let _ = pins.remove();
                bail!("{e}; nothing was attached");
            }
            bail!("{e}; the pinned data path keeps forwarding as it was");
        }
        controller.remove_unknown_services();
        controller.dataplane.write_layout(LAYOUT_VERSION)?;
        if let Some(logger) = controller.dataplane.take_logger() {
            spawn_logger(logger);
        }
        if let Some(shared) = &controller.config().shared_table {
            // What the other nodes decided, before the first packet: bounded, then attach anyway
            // (the resync once attached catches up).
            let started = std::time::Instant::now();
            match SharedTable::preload(shared, &pins, &controller.directory()).await {
                Ok(n) => info!(
                    "shared table: {n} entries loaded from Redis in {} ms",
                    started.elapsed().as_millis()
                ),
                Err(e) => warn!(
                    "shared table: loading from Redis: {e:#}; attaching with what this node has"
                ),
            }
        }
        let interface = controller.config().interface.clone();
        let attached = controller
            .dataplane
            .attach(&interface, controller.config().xdp_mode)?;
        controller.attached_index = crate::config::interface_index(&interface);
        controller.mode = match attached {
            Attached::Native => "native".into(),
            Attached::Generic => "generic".into(),
            Attached::Replaced => previous
                .map(|p| p.xdp_mode)
                .unwrap_or_else(|| "unknown".into()),
        };
        info!(
            "sticky-lb attached to {interface} in {} mode ({}): {} service(s), {} backend(s)",
            controller.mode,
            if attached == Attached::Replaced {
                "program replaced in the pinned link, stick table kept"
            } else {
                "new link"
            },
            controller.services.len(),
            controller
                .services
                .iter()
                .map(|s| s.backends.len())
                .sum::<usize>()
        );
        for s in &controller.services {
            for b in s.backends.iter().filter(|b| b.mac.is_none()) {
                warn!(
                    "backend {}/{} ({}): no MAC address (no neighbour answer); it takes no clients until it answers",
                    s.name(),
                    b.name,
                    b.address
                );
            }
        }
        crate::offload::warn_if_rx_vlan_offload(&interface);
        controller.warn_about_preferred_vips();
        controller.sync_shared();
        Ok(controller)
    }

    /// The interface came back as a new device (deleted and created again): its pinned link died
    /// with the old one. Or it has a new MAC, which the program is built with. Loads the program
    /// again over the pinned maps, rewrites every entry and table, and attaches: with a new link
    /// to a new device, by replacing the program in the pinned link on the same one.
    pub(super) fn reattach(&mut self, index: u32) -> Result<()> {
        let interface = self.config().interface.clone();
        let mut options = self.dataplane.options().clone();
        options.interface_mac = neighbour::interface_mac(&interface)?;
        if self.attached_index != Some(index) {
            // The link died with the old device; on the same device the new program replaces
            // the old one in its link atomically instead.
            let _ = std::fs::remove_file(self.pins.link());
        }
        let dataplane = Dataplane::load(Some(self.pins.clone()), options)?;
        drop(std::mem::replace(&mut self.dataplane, dataplane));
        self.reconcile_with(self.desired.clone(), true)
            .map_err(|e| anyhow::anyhow!(e))?;
        self.dataplane.write_layout(LAYOUT_VERSION)?;
        if let Some(logger) = self.dataplane.take_logger() {
            spawn_logger(logger);
        }
        self.mode = match self.dataplane.attach(&interface, self.config().xdp_mode)? {
            Attached::Native => "native".into(),
            Attached::Generic => "generic".into(),
            Attached::Replaced => self.mode.clone(),
        };
        self.attached_index = Some(index);
        self.save_state();
        Ok(())
    }

    /// Ids the pinned backends map holds that the previous state file does not know (its last
    /// write failed, or it is from a controller that died mid-change): stick entries may name
    /// them, so they are retired, never handed out, and cleared by the first plan.
    fn take_over_leftovers(&mut self) -> Result<()> {
        let known = self.backend_ids();
        let now = monotonic_ns();
        for (id, entry) in
            crate::batch::lookup_all(&self.dataplane.backends, MAX_BACKENDS as usize)?
        {
            if entry.state != BackendState::Unused as u8 && !known.contains(&id) {
                warn!("backend id {id} is in the pinned maps but not in the state file: retired");
                self.ids.retire_backend(id, now);
                self.dataplane
                    .backends
                    .set(id, &sticky_lb_common::Backend::UNUSED, 0)?;
            }
        }
        Ok(())
    }

    /// Service keys in the pinned index that neither the state file nor the config knows.
    fn remove_unknown_services(&mut self) {
        let known: Vec<_> = self.services.iter().map(|s| s.key).collect();
        match self.dataplane.service_keys() {
            Ok(keys) => {
                for key in keys.into_iter().filter(|k| !known.contains(k)) {
                    warn!("a service in the pinned index is unknown to the state file: removed");
                    if let Err(e) = self.dataplane.remove_service(&key) {
                        warn!("removing it failed: {e:#}");
                    }
                }
            }
            Err(e) => warn!("reading the pinned service index: {e:#}"),
        }
    }
}

/// The previous run's state if a data path is pinned and this binary can adopt it. Errors:
/// another map layout, or an unreadable state file (nothing is changed then). Leftover map pins
/// without a link belong to nobody and are removed.
fn adoptable(pins: &PinDir, state_path: &Path) -> Result<Option<RuntimeState>> {
    if !pins.is_attached() {
        pins.remove()?;
        return Ok(None);
    }
    if let Some(layout) = pinned_layout(pins)?
        && layout != LAYOUT_VERSION
    {
        bail!(
            "the data path pinned at {} uses map layout {layout}, this binary uses {LAYOUT_VERSION}: \
             it cannot adopt it; nothing was changed (`sticky-lb detach` removes it, with its stick table)",
            pins.path().display()
        );
    }
    match RuntimeState::read(state_path) {
        Ok(previous) => {
            info!(
                "adopting the data path pinned at {} (stick table kept)",
                pins.path().display()
            );
            Ok(Some(previous))
        }
        Err(e) => bail!(
            "a data path is pinned at {} but its state file is unusable ({e:#}); \
             nothing was changed (`sticky-lb detach` removes it)",
            pins.path().display()
        ),
    }
}

/// Reads the layout version of pinned maps, if any are pinned.
fn pinned_layout(pins: &PinDir) -> Result<Option<u32>> {
    if !pins.map(map_names::META).exists() {
        return Ok(None);
    }
    let meta: aya::maps::Array<aya::maps::MapData, u32> =
        dataplane::open_pinned(pins, map_names::META)?;
    Ok(Some(meta.get(&0, 0)?))
}

/// The run-time changes of the previous run; state files from before they were recorded carry
/// them in the backend records.
fn runtime_changes(previous: &RuntimeState) -> Changes {
    if !previous.runtime_changes.is_empty() {
        return previous.runtime_changes.clone();
    }
    let mut changes = Changes::new();
    for s in &previous.services {
        for b in s.backends.iter().filter(|b| !b.retiring) {
            let change = BackendChange {
                admin: (b.admin != "enabled").then(|| b.admin.clone()),
                added: b.from_api.then(|| AddedBackend {
                    address: b.address,
                    weight: b.weight,
                    mac: b.mac.clone(),
                    port: b.port,
                }),
                ..Default::default()
            };
            if change != BackendChange::default() {
                changes
                    .entry(s.name.clone())
                    .or_default()
                    .insert(b.name.clone(), change);
            }
        }
    }
    changes
}

/// The previous run's model, as its state file records it: what the pinned maps hold.
fn adopted_model(previous: &RuntimeState, desired: &Desired) -> Vec<ServiceSlot> {
    let now_ns = monotonic_ns();
    previous
        .services
        .iter()
        .map(|record| {
            let config = desired
                .config
                .services
                .iter()
                .find(|s| s.name == record.name)
                .cloned()
                .unwrap_or_else(|| departed_service(record));
            let (mut key, mut params) = service_entry(
                &config,
                record.id,
                &Link::default(),
                desired.config.shared_table.is_some(),
            );
            // The key the index holds is the recorded one (the config's VIP may have changed).
            key.vip = addr::words(&record.vip);
            key.port = record.port.to_be();
            key.family = Family::of(&record.vip) as u8;
            params.vip = key.vip;
            params.port = key.port;
            params.family = key.family;
            let backends = record
                .backends
                .iter()
                .map(|b| adopted_backend(b, &config, now_ns))
                .collect();
            ServiceSlot {
                key,
                params,
                config,
                backends,
            }
        })
        .collect()
}

/// A backend as the previous run's state file records it. A retiring one counts as retiring
/// since `now_ns`: only a sweep of this run can find it drained out.
fn adopted_backend(b: &BackendRecord, config: &ServiceConfig, now_ns: u64) -> BackendSlot {
    let configured = config.backends.iter().position(|c| c.name == b.name);
    let check = configured
        .map(|i| config.health_check(i))
        .unwrap_or_else(|| config.service_health_check(b.port));
    let state = [
        BackendState::Up,
        BackendState::Drain,
        BackendState::Down,
        BackendState::Disabled,
    ]
    .into_iter()
    .find(|s| state_name(*s) == b.state)
    .unwrap_or(BackendState::Down);
    BackendSlot {
        id: b.id,
        name: b.name.clone(),
        address: b.address,
        port: configured
            .map(|i| config.backend_port(config.backends[i].port))
            .unwrap_or_else(|| config.backend_port(b.port)),
        mac: b
            .mac
            .as_deref()
            .and_then(|m| crate::config::parse_mac(m).ok()),
        configured_mac: configured.and_then(|i| config.backends[i].mac),
        weight: b.weight,
        admin: Admin::parse(&b.admin),
        healthy: b.healthy.unwrap_or(state != BackendState::Down),
        check,
        from_api: b.from_api,
        retiring: b.retiring,
        retiring_since_ns: now_ns,
        proxied: config.mode == crate::config::ServiceMode::Http,
        state,
    }
}

/// A service the previous run had and the config no longer has: only its name, key and
/// backends matter (the first plan takes it out), so its other fields are the defaults.
fn departed_service(record: &ServiceRecord) -> ServiceConfig {
    let yaml = format!(
        "{{name: {:?}, mode: {}, vip: {:?}, port: {}, maglev_table_size: {}, health_check: {{type: none}}, backends: []}}",
        record.name,
        record.mode,
        record.vip.to_string(),
        record.port,
        record.maglev_table_size
    );
    serde_yaml::from_str(&yaml).expect("a service with only defaults parses")
}

/// What a start knows before its first plan: every backend's MAC (bounded wait), and a health
/// verdict for each backend with checks: from the previous run where it had one (adoption keeps
/// verdicts), else from one round of checks now (bounded by each check's timeout), so a backend
/// dead at start never receives a client.
async fn observe(
    current: &[ServiceSlot],
    desired: &Desired,
    previous: Option<&RuntimeState>,
    neighbours: &Arc<Neighbours>,
) -> Observed {
    let mut observed = Observed::default();
    observed.read_interface(&desired.config.interface);
    for s in current {
        for b in &s.backends {
            if let Some(mac) = b.mac {
                observed.macs.insert(b.address, mac);
            }
            if previous.is_some() {
                observed.health.insert(b.id, b.healthy);
            }
            // An adopted tunnel backend keeps its pinned MAC; its next hop is looked up again so
            // the neighbour watch follows the right neighbour.
            if s.config.forwarding == Forwarding::Tunnel
                && let Ok(hop) = neighbours.next_hop(b.address).await
            {
                observed.next_hops.insert(b.address, hop);
            }
        }
    }
    // Backends the previous run did not have (all of them on a fresh start).
    for look in first_look(neighbours.clone(), new_backends(current, desired)).await {
        observed.record(&look);
    }
    observed
}

/// What a service's mode sends from, as `status` shows it: a tunnel's source prefix, source
/// NAT's address (the one resolved, for `source_nat: true`) and ports.
fn forwarding_detail(s: &ServiceSlot) -> Option<String> {
    if let Some(tunnel) = &s.config.tunnel {
        return Some(format!("source {}", tunnel.source));
    }
    let nat = s.config.source_nat()?;
    let address = addr::from_words(s.family(), s.params.nat_source);
    Some(format!(
        "source NAT {address} ports {}-{}",
        nat.ports.0, nat.ports.1
    ))
}

/// The state-file record of one service.
pub(super) fn service_record(s: &ServiceSlot) -> ServiceRecord {
    ServiceRecord {
        id: s.id(),
        name: s.name().to_string(),
        vip: addr::from_words(s.family(), s.key.vip),
        port: u16::from_be(s.key.port),
        mode: s.config.mode.name().into(),
        policy: match s.config.policy {
            crate::config::Policy::IpHash => "ip-hash".into(),
            crate::config::Policy::LeastConn => "least-conn".into(),
        },
        forwarding: s.config.forwarding.name().into(),
        forwarding_detail: forwarding_detail(s),
        stick_timeout_ms: s.config.stick.timeout.as_millis() as u64,
        client_mask: s.config.client_mask(),
        maglev_table_size: s.config.maglev_table_size,
        backends: s
            .backends
            .iter()
            .map(|b| BackendRecord {
                id: b.id,
                name: b.name.clone(),
                address: b.address,
                port: Some(b.port),
                mac: state::mac_string(b.mac),
                weight: b.weight,
                state: state_name(b.state).into(),
                admin: b.admin.name().into(),
                from_api: b.from_api,
                retiring: b.retiring,
                healthy: Some(b.healthy),
            })
            .collect(),
    }
}

/// systemd (`Type=notify`): the data path is attached and the controller serves.
pub(super) fn notify_ready() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
}

/// systemd: a reload started (answered by [`notify_ready`] when it is over).
pub(super) fn notify_reloading() {
    let usec = monotonic_us();
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Reloading,
        sd_notify::NotifyState::MonotonicUsec(usec),
    ]);
}

pub(super) fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// CLOCK_MONOTONIC in µs, as systemd wants it with RELOADING=1.
fn monotonic_us() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as i128 * 1_000_000 + ts.tv_nsec as i128 / 1000
}

/// aya-log level matching the process's log filter; with the default (info) the program's
/// debug lines are compiled out by the verifier.
fn aya_log_level() -> u8 {
    match log::max_level() {
        log::LevelFilter::Off => 0,
        log::LevelFilter::Error => 1,
        log::LevelFilter::Warn => 2,
        log::LevelFilter::Info => 3,
        log::LevelFilter::Debug => 4,
        log::LevelFilter::Trace => 5,
    }
}

fn spawn_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its map fd and flushing neither closes nor replaces it.
    let Ok(mut logger) = (unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }) else {
        return;
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_departed_ipv6_service_keeps_its_address() {
        let record = ServiceRecord {
            id: 3,
            name: "web6".into(),
            vip: "2001:db8::100".parse().unwrap(),
            port: 443,
            mode: "tcp".into(),
            policy: "ip-hash".into(),
            forwarding: "dsr".into(),
            forwarding_detail: None,
            stick_timeout_ms: 1000,
            client_mask: 64,
            maglev_table_size: 65537,
            backends: Vec::new(),
        };
        let config = departed_service(&record);
        assert_eq!(config.vip, record.vip);
        assert_eq!(config.family(), Family::Ipv6);
    }
}
