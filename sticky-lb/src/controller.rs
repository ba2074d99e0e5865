//! `sticky-lb run`: bring the data path up from a config (or adopt a pinned one), keep it fed
//! (health checks, expiry, operator requests, reloads), take it down on a signal.

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
    let (sweep_tx, mut sweep_rx) = mpsc::channel::<expiry::SweepReport>(4);
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
                    self.dataplane
                        .backends
                        .set(old.id, &Backend::default(), 0)?;
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

    /// Starts checks for new backends, restarts changed ones, stops those of removed backends.
    fn sync_checkers(&mut self) {
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
    fn apply_health(&mut self, t: health::Transition) -> Result<()> {
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

    /// An operator request from the control socket.
    async fn handle(&mut self, request: Request) -> Result<Reply> {
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

    async fn add_backend(
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
    fn remove_backend(&mut self, i: usize, j: usize, how: BackendRemoval) -> Result<String> {
        let name = format!(
            "{}/{}",
            self.services[i].config.name, self.services[i].backends[j].name
        );
        match how {
            BackendRemoval::Drain => {
                self.services[i].backends[j].retiring = true;
                self.refresh_backend(i, j, true)?;
                Ok(format!(
                    "{name} drains: removed once no client is stuck to it"
                ))
            }
            BackendRemoval::Immediate => {
                let b = self.services[i].backends.remove(j);
                self.retired_ids.insert(b.id);
                if let Some(checker) = self.checkers.remove(&b.id) {
                    checker.task.abort();
                }
                // Its stuck clients find no backend and are redispatched on their next packet.
                self.dataplane.backends.set(b.id, &Backend::default(), 0)?;
                self.publish(i)?;
                self.write_state()?;
                Ok(format!("{name} removed"))
            }
        }
    }

    fn table_get(&self, client: Ipv4Addr, service: Option<&str>) -> Result<Reply> {
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

    fn table_set(&mut self, client: Ipv4Addr, service: &str, backend: &str) -> Result<Reply> {
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
        maps.stick.insert(
            &key,
            &StickEntry {
                backend: b.id,
                _pad: 0,
                last_seen_ns: now,
                created_ns: now,
            },
            0,
        )?;
        let message = format!("{service} {client} -> {backend}");
        info!("operator: table set {message}");
        Ok(Reply::ok(message))
    }

    /// Deletes the entries of one client, or all entries, of one service or all.
    fn table_delete(&mut self, client: Option<Ipv4Addr>, service: Option<&str>) -> Result<Reply> {
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

    fn stats(&self) -> Result<Reply> {
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
                "{}: hits {} misses {} inserts {} redispatches {}",
                s["name"].as_str().unwrap_or(""),
                s["stick_hits"],
                s["stick_misses"],
                s["stick_inserts"],
                s["redispatches"]
            ));
        }
        Ok(Reply::with_data(
            lines.join("\n"),
            serde_json::json!({"counters": global, "services": services}),
        ))
    }

    /// Re-reads the config, validates it completely, and applies the difference. On any error
    /// nothing has changed.
    async fn reload(&mut self) -> Result<String> {
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
            self.dataplane.backends.set(*id, &Backend::default(), 0)?;
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

    /// After a sweep: retire drained-out backends no client is stuck to, and refresh metrics.
    fn after_sweep(&mut self, report: expiry::SweepReport) -> Result<()> {
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
    fn sweep_job(
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

    /// Probes backends that have no MAC yet; brings up those that answered.
    fn resolve_missing_macs(&mut self) -> Result<()> {
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

    fn runtime_state(&self) -> RuntimeState {
        RuntimeState {
            layout_version: LAYOUT_VERSION,
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

/// The weight the config gave backend `name` of the old service (to tell run-time weights).
fn configured_weight(old: Option<&ServiceSlot>, name: &str) -> u32 {
    old.and_then(|s| s.config.backends.iter().find(|b| b.name == name))
        .map(|b| b.weight)
        .unwrap_or(0)
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
