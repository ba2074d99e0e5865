//! `sticky-lb run`: bring the data path up from a config, keep it fed, take it down on a signal.

use crate::{
    config::{CheckKind, Config, HealthCheck, OnExit},
    control::{self, BackendAction, Envelope, Reply, Request},
    dataplane::{self, Attached, Dataplane, LoadOptions, PinDir, PinnedMaps},
    expiry, health, maglev, neighbour,
    state::{self, BackendRecord, RuntimeState, ServiceRecord},
};
use anyhow::{Context, Result, bail};
use log::{debug, info, warn};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
    path::Path,
    time::Duration,
};
use sticky_lb_common::{
    Backend, BackendId, BackendState, Forwarding, LAYOUT_VERSION, MAX_SERVICES, PROTO_TCP, Policy,
    Service, ServiceId, ServiceKey,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
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

/// One backend as the controller tracks it.
struct BackendSlot {
    id: BackendId,
    name: String,
    address: std::net::Ipv4Addr,
    mac: Option<[u8; 6]>,
    weight: u32,
    admin: Admin,
    /// The health checks' verdict (true while checks are off).
    healthy: bool,
    check: HealthCheck,
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
        } else if self.admin == Admin::Drain || self.weight == 0 {
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

pub struct Controller {
    config: Config,
    config_path: String,
    netns: Option<String>,
    pins: PinDir,
    dataplane: Dataplane,
    services: Vec<ServiceSlot>,
    mode: String,
}

/// Runs until SIGINT or SIGTERM. The config must already be validated.
pub async fn run(config: Config, config_path: &Path, netns: Option<String>) -> Result<()> {
    let mut controller = Controller::start(config, config_path, netns).await?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sweep_tick = tokio::time::interval(controller.config.sweep_interval);
    sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resolve_tick = tokio::time::interval(RESOLVE_RETRY);
    resolve_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let (health_tx, mut health_rx) = mpsc::channel::<health::Transition>(256);
    let checkers = controller.spawn_health_checks(health_tx);
    let (control_tx, mut control_rx) = mpsc::channel::<Envelope>(16);
    let socket = control::socket_path(controller.netns.as_deref(), &controller.config.interface);
    let server = control::serve(&socket, control_tx)?;

    let mut sweeping: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            Some(transition) = health_rx.recv() => controller.apply_health(transition)?,
            Some((request, reply)) = control_rx.recv() => {
                let answer = controller.handle(request).unwrap_or_else(|e| Reply::error(format!("{e:#}")));
                let _ = reply.send(answer);
            }
            _ = sweep_tick.tick() => {
                if let Some(handle) = &sweeping && !handle.is_finished() {
                    continue; // the last sweep is still walking a large table
                }
                sweeping = Some(tokio::task::spawn_blocking(controller.sweep_job()));
            }
            _ = resolve_tick.tick() => controller.resolve_missing_macs()?,
        }
    }
    server.abort();
    let _ = std::fs::remove_file(&socket);
    for checker in checkers {
        checker.abort();
    }
    if let Some(handle) = sweeping.take() {
        let _ = handle.await;
    }
    controller.stop()
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

impl Controller {
    async fn start(
        config: Config,
        config_path: &Path,
        netns: Option<String>,
    ) -> Result<Controller> {
        dataplane::ensure_bpffs()?;
        let pins = PinDir::new(netns.as_deref(), &config.interface);
        let state_path = state::path(netns.as_deref(), &config.interface);
        let previous = if pins.is_attached() {
            match RuntimeState::read(&state_path) {
                Ok(previous) if previous.layout_version != LAYOUT_VERSION => bail!(
                    "the data path pinned at {} uses map layout {}, this binary uses {}; \
                     run `sticky-lb detach` first (this drops the stick table)",
                    pins.path().display(),
                    previous.layout_version,
                    LAYOUT_VERSION
                ),
                Ok(previous) => {
                    info!(
                        "adopting the data path pinned at {} (stick table kept)",
                        pins.path().display()
                    );
                    Some(previous)
                }
                Err(e) => bail!(
                    "a data path is pinned at {} but its state file is unusable ({e:#}); \
                     run `sticky-lb detach` first",
                    pins.path().display()
                ),
            }
        } else {
            // Leftover map pins without a link belong to nobody: start clean.
            pins.remove()?;
            None
        };
        let ids = state::assign_ids(&config, previous.as_ref());
        let interface_mac = neighbour::interface_mac(&config.interface)?;

        // Resolve backend MACs concurrently (each may wait for ARP).
        let interface = config.interface.clone();
        let lookups: Vec<_> = config
            .services
            .iter()
            .flat_map(|s| s.backends.iter())
            .map(|b| {
                let (address, mac, interface) = (b.address, b.mac, interface.clone());
                tokio::task::spawn_blocking(move || {
                    mac.or_else(|| neighbour::resolve(address, &interface, RESOLVE_TIMEOUT))
                })
            })
            .collect();
        let mut macs = Vec::with_capacity(lookups.len());
        for lookup in lookups {
            macs.push(lookup.await?);
        }
        let mut macs = macs.into_iter();

        let mut services = Vec::new();
        for (service, (sid, bids)) in config.services.iter().zip(ids) {
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
                    let mut slot = BackendSlot {
                        id,
                        name: b.name.clone(),
                        address: b.address,
                        mac,
                        weight: b.weight,
                        admin: Admin::Enabled,
                        healthy: true,
                        check: service.health_check(j),
                        state: BackendState::Unused,
                    };
                    slot.state = slot.effective_state();
                    slot
                })
                .collect();
            let mask = if service.stick.client_mask == 0 {
                0
            } else {
                u32::MAX << (32 - service.stick.client_mask as u32)
            };
            services.push(ServiceSlot {
                key: ServiceKey {
                    vip: [u32::from_ne_bytes(service.vip.octets()), 0, 0, 0],
                    port: service.port.to_be(),
                    protocol: PROTO_TCP,
                    _pad: 0,
                },
                params: Service {
                    id: sid,
                    policy: match service.policy {
                        crate::config::Policy::IpHash => Policy::IpHash as u8,
                        crate::config::Policy::LeastConn => Policy::LeastConn as u8,
                    },
                    forwarding: Forwarding::Dsr as u8,
                    flags: 0,
                    _pad: 0,
                    ring_base: 0,
                    ring_size: 0,
                    stick_timeout_ns: service.stick.timeout.as_nanos() as u64,
                    client_mask: [u32::from_ne_bytes(mask.to_be_bytes()), 0, 0, 0],
                },
                config: service.clone(),
                backends,
            });
        }

        let options = LoadOptions {
            stick_table_size: config.stick_table_size,
            flow_table_size: config.flow_table_size,
            maglev_stride: config
                .services
                .iter()
                .map(|s| s.maglev_table_size)
                .max()
                .unwrap_or(sticky_lb_common::DEFAULT_MAGLEV_TABLE_SIZE),
            // Room for 16 services (or more if ids go higher) so a restart with a few more
            // services still reuses the pinned array.
            maglev_services: services
                .iter()
                .map(|s| s.params.id + 1)
                .max()
                .unwrap_or(1)
                .clamp(16, MAX_SERVICES),
            interface_mac,
            log_level: aya_log_level(),
        };
        let dataplane = Dataplane::load(Some(pins.clone()), options)?;
        let mut controller = Controller {
            config,
            config_path: config_path.display().to_string(),
            netns,
            pins,
            dataplane,
            services,
            mode: String::new(),
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
        controller.write_state()?;
        Ok(controller)
    }

    /// Writes backends, Maglev tables and services; clears what a previous run left that this
    /// config does not have.
    fn write_maps(&mut self, previous: Option<&RuntimeState>) -> Result<()> {
        let live_backends: Vec<BackendId> = self
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect();
        if let Some(previous) = previous {
            for old in previous.services.iter().flat_map(|s| s.backends.iter()) {
                if !live_backends.contains(&old.id) {
                    // Stuck clients of a removed backend are redispatched on their next packet.
                    self.dataplane
                        .backends
                        .set(old.id, &Backend::default(), 0)?;
                }
            }
            let live_keys: Vec<ServiceKey> = self.services.iter().map(|s| s.key).collect();
            let stale: Vec<ServiceKey> = self
                .dataplane
                .services
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| !live_keys.contains(k))
                .collect();
            for key in stale {
                self.dataplane.services.remove(&key)?;
            }
        }
        for i in 0..self.services.len() {
            for b in &self.services[i].backends {
                let entry = backend_entry(b, self.services[i].params.id);
                self.dataplane.backends.set(b.id, &entry, 0)?;
            }
            self.publish(i)?;
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

    /// Pushes backend `j` of service `i` to the data path if its effective state changed, and
    /// rebuilds the service's table. Returns whether anything changed.
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

    /// One tokio task per checked backend.
    fn spawn_health_checks(
        &self,
        events: mpsc::Sender<health::Transition>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for (i, service) in self.services.iter().enumerate() {
            for (j, b) in service.backends.iter().enumerate() {
                if b.check.kind == CheckKind::None {
                    continue;
                }
                // The backend's own address: the VIP is local on the balancer, so a check sent
                // to it would never leave this host.
                let target = SocketAddrV4::new(b.address, b.check.port);
                tasks.push(health::spawn(i, j, target, b.check.clone(), events.clone()));
            }
        }
        tasks
    }

    /// A health check changed its verdict: log it once, with the reason, and push it.
    fn apply_health(&mut self, t: health::Transition) -> Result<()> {
        let service = &self.services[t.service];
        let b = &service.backends[t.backend];
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
        self.services[t.service].backends[t.backend].healthy = t.healthy;
        self.refresh_backend(t.service, t.backend, false)?;
        Ok(())
    }

    /// An operator request from the control socket.
    fn handle(&mut self, request: Request) -> Result<Reply> {
        match request {
            Request::Backend {
                service,
                backend,
                action,
            } => {
                let Some(i) = self.services.iter().position(|s| s.config.name == service) else {
                    return Ok(Reply::error(format!("no service '{service}'")));
                };
                let Some(j) = self.services[i]
                    .backends
                    .iter()
                    .position(|b| b.name == backend)
                else {
                    return Ok(Reply::error(format!(
                        "no backend '{backend}' in service '{service}'"
                    )));
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
                let b = &self.services[i].backends[j];
                let message = format!(
                    "{service}/{backend}: {} (weight {})",
                    state_name(b.state),
                    b.weight
                );
                info!("operator: {message}");
                Ok(Reply::ok(message))
            }
        }
    }

    /// The expiry sweep as a blocking job: stick entries, then the flow table of least-conn
    /// services with its recount.
    fn sweep_job(&self) -> impl FnOnce() + Send + 'static {
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
            let stick = dataplane::open_pinned(&pins, sticky_lb_common::map_names::STICK)
                .and_then(|mut stick| expiry::sweep(&mut stick, &timeouts));
            log_sweep(&stick);
            if least_conn.is_empty() {
                return;
            }
            let flows = dataplane::open_pinned(&pins, sticky_lb_common::map_names::FLOWS).and_then(
                |mut flows| {
                    let mut active =
                        dataplane::open_pinned(&pins, sticky_lb_common::map_names::ACTIVE)?;
                    expiry::sweep_flows(
                        &mut flows,
                        &mut active,
                        &least_conn,
                        &counted,
                        flow_idle_ns,
                    )
                },
            );
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

    fn write_state(&self) -> Result<()> {
        let state = RuntimeState {
            layout_version: LAYOUT_VERSION,
            interface: self.config.interface.clone(),
            netns: self.netns.clone(),
            xdp_mode: self.mode.clone(),
            pid: std::process::id(),
            config: self.config_path.clone(),
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
                        })
                        .collect(),
                })
                .collect(),
        };
        state.write(&state::path(self.netns.as_deref(), &self.config.interface))
    }

    /// SIGINT/SIGTERM: detach and remove the pins, or leave the data path running.
    fn stop(self) -> Result<()> {
        let pins = self.pins.clone();
        let state_path = state::path(self.netns.as_deref(), &self.config.interface);
        match self.config.on_exit {
            OnExit::KeepRunning => {
                info!(
                    "leaving the data path on {} running (on_exit: keep-running); pins in {}",
                    self.config.interface,
                    pins.path().display()
                );
            }
            OnExit::Detach => {
                drop(self.dataplane);
                pins.remove()?;
                let _ = std::fs::remove_file(&state_path);
                info!(
                    "detached from {}; pinned state removed",
                    self.config.interface
                );
            }
        }
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

/// `sticky-lb detach`: removes a data path left running (`on_exit: keep-running`) or one whose
/// controller died, with its pins and state file.
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
