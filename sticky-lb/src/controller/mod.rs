//! `sticky-lb run`: bring the data path up from a config (or adopt a pinned one), keep it fed
//! (health checks, expiry, operator requests, reloads), take it down on a signal.

mod checks;
mod reload;
mod requests;
mod sweep;

use crate::{
    config::{
        BackendConfig, BackendRemoval, CheckKind, Config, HealthCheck, OnExit, RuntimeChanges,
    },
    control::{self, BackendAction, Envelope, Reply, Request},
    dataplane::{self, Attached, Dataplane, LoadOptions, PinDir, PinnedMaps, monotonic_ns},
    expiry, health, maglev, metrics, neighbour,
    state::{self, BackendRecord, RuntimeState, ServiceRecord},
};
use anyhow::{Context, Result, bail};
use log::{debug, info, warn};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};
use sticky_lb_common::{
    Backend, BackendId, BackendState, Forwarding, LAYOUT_VERSION, MAX_SERVICES, PROTO_TCP, Policy,
    Service, ServiceId, ServiceKey, StickEntry, StickKey, map_names,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};

/// How long `run` waits for a backend's MAC before starting without it (it keeps trying).
const RESOLVE_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often backends with no MAC yet are probed again.
const RESOLVE_RETRY: Duration = Duration::from_secs(2);

/// What the operator has said about a backend (the control socket); health is separate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admin {
    Enabled,
    Drain,
    Disabled,
}

impl Admin {
    fn name(self) -> &'static str {
        match self {
            Admin::Enabled => "enabled",
            Admin::Drain => "drain",
            Admin::Disabled => "disabled",
        }
    }

    fn parse(name: &str) -> Admin {
        match name {
            "drain" => Admin::Drain,
            "disabled" => Admin::Disabled,
            _ => Admin::Enabled,
        }
    }
}

/// One backend as the controller tracks it.
#[derive(Clone, Debug)]
struct BackendSlot {
    id: BackendId,
    name: String,
    address: Ipv4Addr,
    mac: Option<[u8; 6]>,
    weight: u32,
    admin: Admin,
    /// The health checks' verdict (true while checks are off).
    healthy: bool,
    check: HealthCheck,
    /// Added with `backend add` rather than from the config.
    from_api: bool,
    /// No longer configured: draining until no stick entry names it, then removed.
    retiring: bool,
    /// What the data path was last told.
    state: BackendState,
}

impl BackendSlot {
    /// The data-path state that follows from MAC, operator and health: disabled and failed
    /// backends lose their stuck clients, drained ones (or weight 0, IPVS's quiescent) keep them
    /// but take no new ones.
    fn effective_state(&self) -> BackendState {
        if self.admin == Admin::Disabled {
            BackendState::Disabled
        } else if self.mac.is_none() || !self.healthy {
            BackendState::Down
        } else if self.admin == Admin::Drain || self.weight == 0 || self.retiring {
            BackendState::Drain
        } else {
            BackendState::Up
        }
    }
}

/// One service as the controller tracks it.
struct ServiceSlot {
    key: ServiceKey,
    params: Service,
    config: crate::config::ServiceConfig,
    backends: Vec<BackendSlot>,
}

/// A running health check and what it checks, so a reload restarts only changed ones.
struct Checker {
    target: SocketAddrV4,
    check: HealthCheck,
    task: JoinHandle<()>,
}

pub struct Controller {
    config: Config,
    config_path: PathBuf,
    netns: Option<String>,
    pins: PinDir,
    dataplane: Dataplane,
    services: Vec<ServiceSlot>,
    mode: String,
    checkers: HashMap<BackendId, Checker>,
    /// Ids of backends removed while this controller ran: stick entries may still name them, so
    /// new backends avoid them while other ids are free.
    retired_ids: BTreeSet<BackendId>,
    health_tx: mpsc::Sender<health::Transition>,
    latencies: health::Latencies,
    metrics: Arc<Mutex<metrics::Snapshot>>,
}

/// Runs until SIGINT, SIGTERM or a `detach` request. The config must already be validated.
pub async fn run(config: Config, config_path: &Path, netns: Option<String>) -> Result<()> {
    let (health_tx, mut health_rx) = mpsc::channel::<health::Transition>(256);
    let mut controller = Controller::start(config, config_path, netns, health_tx).await?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sweep_tick = tokio::time::interval(controller.config.sweep_interval);
    sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resolve_tick = tokio::time::interval(RESOLVE_RETRY);
    resolve_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let (control_tx, mut control_rx) = mpsc::channel::<Envelope>(16);
    let socket = control::socket_path(controller.netns.as_deref(), &controller.config.interface);
    let server = control::serve(&socket, control_tx)?;
    let mut metrics_server = controller.start_metrics()?;
    let (sweep_tx, mut sweep_rx) = mpsc::channel::<sweep::Swept>(4);
    let mut sweeping: Option<JoinHandle<()>> = None;
    let mut detach = false;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                match controller.reload().await {
                    Ok(summary) => info!("reload (SIGHUP): {summary}"),
                    Err(e) => warn!("reload (SIGHUP) refused, nothing changed: {e:#}"),
                }
                metrics_server = controller.restart_metrics(metrics_server)?;
            }
            Some(transition) = health_rx.recv() => controller.apply_health(transition)?,
            Some((request, reply)) = control_rx.recv() => {
                let is_detach = request == Request::Detach;
                let is_reload = request == Request::Reload;
                let answer = controller.handle(request).await.unwrap_or_else(|e| Reply::error(format!("{e:#}")));
                let ok = answer.ok;
                let _ = reply.send(answer);
                if is_reload && ok {
                    metrics_server = controller.restart_metrics(metrics_server)?;
                }
                if is_detach && ok {
                    detach = true;
                    break;
                }
            }
            Some(report) = sweep_rx.recv() => controller.after_sweep(report)?,
            _ = sweep_tick.tick() => {
                if let Some(handle) = &sweeping && !handle.is_finished() {
                    continue; // the last sweep is still walking a large table
                }
                sweeping = Some(tokio::task::spawn_blocking(controller.sweep_job(sweep_tx.clone())));
            }
            _ = resolve_tick.tick() => controller.resolve_missing_macs()?,
        }
    }
    server.abort();
    let _ = std::fs::remove_file(&socket);
    if let Some(m) = metrics_server {
        m.abort();
    }
    for checker in controller.checkers.values() {
        checker.task.abort();
    }
    if let Some(handle) = sweeping.take() {
        let _ = handle.await;
    }
    controller.stop(detach)
}

/// The service key and parameters a service config gives (ring fields are filled on publish).
fn service_entry(service: &crate::config::ServiceConfig, id: ServiceId) -> (ServiceKey, Service) {
    let mask = u32::MAX << (32 - service.stick.client_mask as u32);
    let key = ServiceKey {
        vip: [u32::from_ne_bytes(service.vip.octets()), 0, 0, 0],
        port: service.port.to_be(),
        protocol: PROTO_TCP,
        _pad: 0,
    };
    let params = Service {
        id,
        policy: match service.policy {
            crate::config::Policy::IpHash => Policy::IpHash as u8,
            crate::config::Policy::LeastConn => Policy::LeastConn as u8,
        },
        forwarding: Forwarding::Dsr as u8,
        stick_timeout_ns: service.stick.timeout.as_nanos() as u64,
        insert_interval_ns: match service.stick.insert_rate_limit {
            0 => 0,
            rate => 1_000_000_000 / rate,
        },
        client_mask: [u32::from_ne_bytes(mask.to_be_bytes()), 0, 0, 0],
        // Address, ring base and size are filled in when the service is published.
        ..Default::default()
    };
    (key, params)
}

/// Resolves the MACs of backends that have none configured, concurrently (each may wait for
/// ARP), in the order given.
async fn resolve_macs(
    interface: &str,
    backends: Vec<(Ipv4Addr, Option<[u8; 6]>)>,
) -> Result<Vec<Option<[u8; 6]>>> {
    let lookups: Vec<_> = backends
        .into_iter()
        .map(|(address, mac)| {
            let interface = interface.to_string();
            tokio::task::spawn_blocking(move || {
                mac.or_else(|| neighbour::resolve(address, &interface, RESOLVE_TIMEOUT))
            })
        })
        .collect();
    let mut macs = Vec::with_capacity(lookups.len());
    for lookup in lookups {
        macs.push(lookup.await?);
    }
    Ok(macs)
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

impl Controller {
    async fn start(
        config: Config,
        config_path: &Path,
        netns: Option<String>,
        health_tx: mpsc::Sender<health::Transition>,
    ) -> Result<Controller> {
        dataplane::ensure_bpffs()?;
        let pins = PinDir::new(netns.as_deref(), &config.interface);
        let state_path = state::path(netns.as_deref(), &config.interface);
        // Everything that could refuse an adoption is checked before the kernel is touched.
        let previous = if pins.is_attached() {
            match pinned_layout(&pins)? {
                Some(layout) if layout != LAYOUT_VERSION => bail!(
                    "the data path pinned at {} uses map layout {layout}, this binary uses {LAYOUT_VERSION}: \
                     it cannot adopt it; nothing was changed (`sticky-lb detach` removes it, with its stick table)",
                    pins.path().display()
                ),
                _ => {}
            }
            match RuntimeState::read(&state_path) {
                Ok(previous) => {
                    info!(
                        "adopting the data path pinned at {} (stick table kept)",
                        pins.path().display()
                    );
                    Some(previous)
                }
                Err(e) => bail!(
                    "a data path is pinned at {} but its state file is unusable ({e:#}); \
                     nothing was changed (`sticky-lb detach` removes it)",
                    pins.path().display()
                ),
            }
        } else {
            // Leftover map pins without a link belong to nobody: start clean.
            pins.remove()?;
            None
        };
        // Backends added at run time come back with a restart, as with a reload.
        let mut config = config;
        let mut api_backends: BTreeSet<(String, String)> = BTreeSet::new();
        if let (Some(previous), RuntimeChanges::Keep) = (previous.as_ref(), config.runtime_changes)
        {
            for service in &mut config.services {
                let Some(old) = previous.services.iter().find(|s| s.name == service.name) else {
                    continue;
                };
                for b in old.backends.iter().filter(|b| b.from_api && !b.retiring) {
                    if !service.backends.iter().any(|nb| nb.name == b.name) {
                        api_backends.insert((service.name.clone(), b.name.clone()));
                        service.backends.push(BackendConfig {
                            name: b.name.clone(),
                            address: b.address,
                            mac: b
                                .mac
                                .as_deref()
                                .and_then(|m| crate::config::parse_mac(m).ok()),
                            weight: b.weight,
                            health_check: Default::default(),
                        });
                    }
                }
            }
        }
        let ids = state::assign_ids(&config, previous.as_ref());
        let interface_mac = neighbour::interface_mac(&config.interface)?;
        let wanted: Vec<(Ipv4Addr, Option<[u8; 6]>)> = config
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| (b.address, b.mac)))
            .collect();
        let mut macs = resolve_macs(&config.interface, wanted).await?.into_iter();

        let mut services = Vec::new();
        for (service, (sid, bids)) in config.services.iter().zip(ids) {
            let old = previous
                .as_ref()
                .and_then(|p| p.services.iter().find(|s| s.name == service.name));
            let backends = service
                .backends
                .iter()
                .zip(bids)
                .enumerate()
                .map(|(j, (b, id))| {
                    let mac = macs.next().flatten();
                    if mac.is_none() {
                        warn!(
                            "backend {}/{} ({}): no MAC address (no ARP answer); it takes no clients until it answers",
                            service.name, b.name, b.address
                        );
                    }
                    // A restart keeps what the operator set at run time, as a reload would.
                    let admin = match config.runtime_changes {
                        RuntimeChanges::Keep => old
                            .and_then(|s| s.backends.iter().find(|ob| ob.id == id))
                            .map(|ob| Admin::parse(&ob.admin))
                            .unwrap_or(Admin::Enabled),
                        RuntimeChanges::Reset => Admin::Enabled,
                    };
                    let mut slot = BackendSlot {
                        id,
                        name: b.name.clone(),
                        address: b.address,
                        mac,
                        weight: b.weight,
                        admin,
                        healthy: true,
                        check: service.health_check(j),
                        from_api: api_backends.contains(&(service.name.clone(), b.name.clone())),
                        retiring: false,
                        state: BackendState::Unused,
                    };
                    slot.state = slot.effective_state();
                    slot
                })
                .collect();
            let (key, params) = service_entry(service, sid);
            services.push(ServiceSlot {
                key,
                params,
                config: service.clone(),
                backends,
            });
        }

        let largest_table = config
            .services
            .iter()
            .map(|s| s.maglev_table_size)
            .max()
            .unwrap_or(sticky_lb_common::DEFAULT_MAGLEV_TABLE_SIZE);
        let highest_id = services.iter().map(|s| s.params.id + 1).max().unwrap_or(1);
        // The Maglev array's shape is fixed when it is created; later controllers of the same
        // pins keep it (a restart may change tables only within it).
        let (maglev_stride, maglev_services) = match previous.as_ref() {
            Some(p) if p.maglev_stride > 0 => (p.maglev_stride, p.maglev_services),
            // Room for 16 services (or more if ids go higher) so a later config with a few more
            // services still fits the pinned array.
            _ => (largest_table, highest_id.clamp(16, MAX_SERVICES)),
        };
        if largest_table > maglev_stride || highest_id > maglev_services {
            bail!(
                "the pinned data path has room for {maglev_services} services with tables of {maglev_stride} slots; \
                 this config needs more: nothing was changed (`sticky-lb detach` first, which drops the stick table)"
            );
        }
        let options = LoadOptions {
            stick_table_size: config.stick_table_size,
            flow_table_size: config.flow_table_size,
            maglev_stride,
            maglev_services,
            interface_mac,
            log_level: aya_log_level(),
        };
        let mut dataplane = Dataplane::load(Some(pins.clone()), options)?;
        dataplane.write_layout(LAYOUT_VERSION)?;
        let latencies: health::Latencies = Arc::default();
        let mut controller = Controller {
            config,
            config_path: config_path.to_path_buf(),
            netns,
            pins,
            dataplane,
            services,
            mode: String::new(),
            checkers: HashMap::new(),
            retired_ids: BTreeSet::new(),
            health_tx,
            latencies: latencies.clone(),
            metrics: Arc::new(Mutex::new(metrics::Snapshot::new(latencies))),
        };
        controller.write_maps(previous.as_ref())?;
        if let Some(logger) = controller.dataplane.take_logger() {
            spawn_logger(logger);
        }
        let attached = controller
            .dataplane
            .attach(&controller.config.interface, controller.config.xdp_mode)?;
        controller.mode = match attached {
            Attached::Native => "native".into(),
            Attached::Generic => "generic".into(),
            Attached::Replaced => previous
                .map(|p| p.xdp_mode)
                .unwrap_or_else(|| "unknown".into()),
        };
        info!(
            "sticky-lb attached to {} in {} mode ({}): {} service(s), {} backend(s)",
            controller.config.interface,
            controller.mode,
            if attached == Attached::Replaced {
                "program replaced in the pinned link"
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
        crate::offload::warn_if_rx_vlan_offload(&controller.config.interface);
        controller.sync_checkers();
        controller.write_state()?;
        Ok(controller)
    }

    /// Writes backends, tables and services; clears what a previous run left that this config
    /// does not have.
    fn write_maps(&mut self, previous: Option<&RuntimeState>) -> Result<()> {
        let live: BTreeSet<BackendId> = self.backend_ids();
        if let Some(previous) = previous {
            for old in previous.services.iter().flat_map(|s| s.backends.iter()) {
                if !live.contains(&old.id) {
                    // Stuck clients of a removed backend are redispatched on their next packet.
                    self.dataplane.backends.set(old.id, &Backend::UNUSED, 0)?;
                }
            }
        }
        self.remove_stale_services()?;
        for i in 0..self.services.len() {
            for b in &self.services[i].backends {
                let entry = backend_entry(b, self.services[i].params.id);
                self.dataplane.backends.set(b.id, &entry, 0)?;
            }
            self.publish(i)?;
        }
        Ok(())
    }

    fn backend_ids(&self) -> BTreeSet<BackendId> {
        self.services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect()
    }

    /// Deletes service entries no current service has.
    fn remove_stale_services(&mut self) -> Result<()> {
        let live: Vec<ServiceKey> = self.services.iter().map(|s| s.key).collect();
        for key in self.dataplane.service_keys()? {
            if !live.contains(&key) {
                self.dataplane.remove_service(&key)?;
            }
        }
        Ok(())
    }

    /// Rebuilds service `i`'s table from its up backends and swaps it in: a Maglev table for
    /// `ip-hash`, the list of candidates for `least-conn`.
    fn publish(&mut self, i: usize) -> Result<()> {
        let service = &mut self.services[i];
        let up: Vec<&BackendSlot> = service
            .backends
            .iter()
            .filter(|b| b.state == BackendState::Up)
            .collect();
        if up.is_empty() {
            warn!(
                "service {}: no backend is up; its new clients are dropped",
                service.config.name
            );
        }
        let slots: Vec<BackendId> = match service.config.policy {
            crate::config::Policy::IpHash => {
                let members: Vec<maglev::Member<'_>> = up
                    .iter()
                    .map(|b| maglev::Member {
                        id: b.id,
                        name: &b.name,
                        weight: b.weight,
                    })
                    .collect();
                maglev::Table::build(service.config.maglev_table_size, &members)
                    .slots()
                    .to_vec()
            }
            crate::config::Policy::LeastConn => up.iter().map(|b| b.id).collect(),
        };
        let key = service.key;
        let mut params = service.params;
        self.dataplane.publish_service(&key, &mut params, &slots)?;
        self.services[i].params = params;
        Ok(())
    }

    /// Where backend `id` is: (service index, backend index).
    fn find(&self, id: BackendId) -> Option<(usize, usize)> {
        self.services
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.backends.iter().position(|b| b.id == id).map(|j| (i, j)))
    }

    /// Backend by `service`/`backend` name.
    fn find_named(&self, service: &str, backend: &str) -> Result<(usize, usize), Reply> {
        let Some(i) = self.services.iter().position(|s| s.config.name == service) else {
            return Err(Reply::error(format!("no service '{service}'")));
        };
        match self.services[i]
            .backends
            .iter()
            .position(|b| b.name == backend)
        {
            Some(j) => Ok((i, j)),
            None => Err(Reply::error(format!(
                "no backend '{backend}' in service '{service}'"
            ))),
        }
    }

    /// Pushes backend `j` of service `i` to the data path if its effective state changed (or
    /// `force_table`), and rebuilds the service's table.
    fn refresh_backend(&mut self, i: usize, j: usize, force_table: bool) -> Result<bool> {
        let sid = self.services[i].params.id;
        let b = &mut self.services[i].backends[j];
        let state = b.effective_state();
        if state == b.state && !force_table {
            return Ok(false);
        }
        b.state = state;
        let entry = backend_entry(b, sid);
        self.dataplane.backends.set(b.id, &entry, 0)?;
        self.publish(i)?;
        self.write_state()?;
        Ok(true)
    }

    fn runtime_state(&self) -> RuntimeState {
        RuntimeState {
            interface: self.config.interface.clone(),
            netns: self.netns.clone(),
            xdp_mode: self.mode.clone(),
            pid: std::process::id(),
            config: self.config_path.display().to_string(),
            maglev_stride: self.dataplane.options().maglev_stride,
            maglev_services: self.dataplane.options().maglev_services,
            services: self
                .services
                .iter()
                .map(|s| ServiceRecord {
                    id: s.params.id,
                    name: s.config.name.clone(),
                    vip: s.config.vip,
                    port: s.config.port,
                    policy: match s.config.policy {
                        crate::config::Policy::IpHash => "ip-hash".into(),
                        crate::config::Policy::LeastConn => "least-conn".into(),
                    },
                    forwarding: "dsr".into(),
                    stick_timeout_ms: s.config.stick.timeout.as_millis() as u64,
                    client_mask: s.config.stick.client_mask,
                    maglev_table_size: s.config.maglev_table_size,
                    backends: s
                        .backends
                        .iter()
                        .map(|b| BackendRecord {
                            id: b.id,
                            name: b.name.clone(),
                            address: b.address,
                            mac: state::mac_string(b.mac),
                            weight: b.weight,
                            state: state_name(b.state).into(),
                            admin: b.admin.name().into(),
                            from_api: b.from_api,
                            retiring: b.retiring,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn write_state(&self) -> Result<()> {
        let state = self.runtime_state();
        if let Ok(mut m) = self.metrics.lock() {
            m.state = Some(state.clone());
        }
        state.write(&state::path(self.netns.as_deref(), &self.config.interface))
    }

    fn start_metrics(&self) -> Result<Option<JoinHandle<()>>> {
        match &self.config.metrics {
            Some(m) => {
                let handle = metrics::serve(
                    m.listen,
                    self.pins.clone(),
                    self.metrics.clone(),
                    self.config.stick_table_size,
                )?;
                info!("metrics on http://{}/metrics", m.listen);
                Ok(Some(handle))
            }
            None => Ok(None),
        }
    }

    /// After a reload the metrics listener may have moved (or been turned on or off).
    fn restart_metrics(&self, running: Option<JoinHandle<()>>) -> Result<Option<JoinHandle<()>>> {
        if let Some(handle) = running {
            handle.abort();
        }
        self.start_metrics()
    }

    /// SIGINT/SIGTERM: detach and remove the pins, or leave the data path running.
    /// A `detach` request always detaches.
    fn stop(self, detach: bool) -> Result<()> {
        let pins = self.pins.clone();
        let state_path = state::path(self.netns.as_deref(), &self.config.interface);
        if self.config.on_exit == OnExit::KeepRunning && !detach {
            info!(
                "leaving the data path on {} running (on_exit: keep-running); pins in {}",
                self.config.interface,
                pins.path().display()
            );
            return Ok(());
        }
        drop(self.dataplane);
        pins.remove()?;
        let _ = std::fs::remove_file(&state_path);
        info!(
            "detached from {}; pinned state removed",
            self.config.interface
        );
        Ok(())
    }
}

fn backend_entry(b: &BackendSlot, service: ServiceId) -> Backend {
    Backend {
        addr: [u32::from_ne_bytes(b.address.octets()), 0, 0, 0],
        mac: b.mac.unwrap_or([0; 6]),
        state: b.state as u8,
        _pad: 0,
        service,
        weight: b.weight,
    }
}

pub fn state_name(state: BackendState) -> &'static str {
    match state {
        BackendState::Unused => "unused",
        BackendState::Up => "up",
        BackendState::Drain => "drain",
        BackendState::Down => "down",
        BackendState::Disabled => "disabled",
    }
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

/// `sticky-lb detach` with no controller running: removes a data path left running
/// (`on_exit: keep-running`) or one whose controller died, with its pins and state file.
pub fn detach(netns: Option<&str>, interface: &str) -> Result<()> {
    let pins = PinDir::new(netns, interface);
    if !pins.path().exists() {
        bail!("no sticky-lb data path is pinned for {interface}");
    }
    let _ = PinnedMaps::open(&pins).context("opening the pinned maps")?;
    pins.remove()?;
    let _ = std::fs::remove_file(state::path(netns, interface));
    Ok(())
}
