//! `sticky-lb run`: bring the data path up from a config, keep it fed, take it down on a signal.

use crate::{
    config::{Config, OnExit},
    dataplane::{self, Attached, Dataplane, LoadOptions, PinDir, PinnedMaps},
    expiry, maglev, neighbour,
    state::{self, BackendRecord, RuntimeState, ServiceRecord},
};
use anyhow::{Context, Result, bail};
use log::{debug, info, warn};
use std::{collections::BTreeMap, path::Path, time::Duration};
use sticky_lb_common::{
    Backend, BackendId, BackendState, Forwarding, LAYOUT_VERSION, MAX_SERVICES, PROTO_TCP, Policy,
    Service, ServiceId, ServiceKey,
};
use tokio::signal::unix::{SignalKind, signal};

/// How long `run` waits for a backend's MAC before starting without it (it keeps trying).
const RESOLVE_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often backends with no MAC yet are probed again.
const RESOLVE_RETRY: Duration = Duration::from_secs(2);

/// One backend as the controller tracks it.
struct BackendSlot {
    id: BackendId,
    name: String,
    address: std::net::Ipv4Addr,
    mac: Option<[u8; 6]>,
    weight: u32,
    state: BackendState,
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
    let stick_path = controller.pins.map(sticky_lb_common::map_names::STICK);
    let timeouts: BTreeMap<ServiceId, u64> = controller
        .services
        .iter()
        .map(|s| (s.params.id, s.params.stick_timeout_ns))
        .collect();
    let mut sweeping: Option<tokio::task::JoinHandle<Result<expiry::SweepReport>>> = None;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sweep_tick.tick() => {
                if let Some(handle) = &sweeping && !handle.is_finished() {
                    continue; // the last sweep is still walking a large table
                }
                let path = stick_path.clone();
                let timeouts = timeouts.clone();
                sweeping = Some(tokio::task::spawn_blocking(move || {
                    let report = aya::maps::MapData::from_pin(&path)
                        .map_err(anyhow::Error::from)
                        .and_then(|data| Ok(aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(data)?)?))
                        .and_then(|mut stick| expiry::sweep(&mut stick, &timeouts));
                    log_sweep(&report);
                    report
                }));
            }
            _ = resolve_tick.tick() => controller.resolve_missing_macs()?,
        }
    }
    if let Some(handle) = sweeping.take() {
        let _ = handle.await?;
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
        Ok(r) => debug!("expiry sweep: {} entries, none expired, {} ms", r.scanned, r.duration_ms),
        Err(e) => warn!("expiry sweep failed: {e:#}"),
    }
}

impl Controller {
    async fn start(config: Config, config_path: &Path, netns: Option<String>) -> Result<Controller> {
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
                .map(|(b, id)| {
                    let mac = macs.next().flatten();
                    if mac.is_none() {
                        warn!(
                            "backend {}/{} ({}): no MAC address (no ARP answer); it takes no clients until it answers",
                            service.name, b.name, b.address
                        );
                    }
                    BackendSlot {
                        id,
                        name: b.name.clone(),
                        address: b.address,
                        mac,
                        weight: b.weight,
                        state: initial_state(mac.is_some(), b.weight),
                    }
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
                    policy: Policy::IpHash as u8,
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
                .max(16)
                .min(MAX_SERVICES),
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
            Attached::Replaced => previous.map(|p| p.xdp_mode).unwrap_or_else(|| "unknown".into()),
        };
        info!(
            "sticky-lb attached to {} in {} mode ({}): {} service(s), {} backend(s)",
            controller.config.interface,
            controller.mode,
            if attached == Attached::Replaced { "program replaced in the pinned link" } else { "new link" },
            controller.services.len(),
            controller.services.iter().map(|s| s.backends.len()).sum::<usize>()
        );
        controller.write_state()?;
        Ok(controller)
    }

    /// Writes backends, Maglev tables and services; clears what a previous run left that this
    /// config does not have.
    fn write_maps(&mut self, previous: Option<&RuntimeState>) -> Result<()> {
        let live_backends: Vec<BackendId> =
            self.services.iter().flat_map(|s| s.backends.iter().map(|b| b.id)).collect();
        if let Some(previous) = previous {
            for old in previous.services.iter().flat_map(|s| s.backends.iter()) {
                if !live_backends.contains(&old.id) {
                    // Stuck clients of a removed backend are redispatched on their next packet.
                    self.dataplane.backends.set(old.id, &Backend::default(), 0)?;
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

    /// Rebuilds service `i`'s Maglev table from its eligible backends and swaps it in.
    fn publish(&mut self, i: usize) -> Result<()> {
        let service = &mut self.services[i];
        let members: Vec<maglev::Member<'_>> = service
            .backends
            .iter()
            .filter(|b| b.state == BackendState::Up)
            .map(|b| maglev::Member {
                id: b.id,
                name: &b.name,
                weight: b.weight,
            })
            .collect();
        let table = maglev::Table::build(service.config.maglev_table_size, &members);
        if members.is_empty() {
            warn!("service {}: no backend is up; its packets are dropped", service.config.name);
        }
        let key = service.key;
        let mut params = service.params;
        self.dataplane.publish_service(&key, &mut params, &table)?;
        self.services[i].params = params;
        Ok(())
    }

    /// Probes backends that have no MAC yet; brings up those that answered.
    fn resolve_missing_macs(&mut self) -> Result<()> {
        let interface = self.config.interface.clone();
        let mut changed = false;
        for i in 0..self.services.len() {
            let sid = self.services[i].params.id;
            let mut service_changed = false;
            for b in self.services[i].backends.iter_mut().filter(|b| b.mac.is_none()) {
                // Zero wait: the probe's answer is picked up on the next tick.
                if let Some(mac) = neighbour::resolve(b.address, &interface, Duration::ZERO) {
                    info!("backend {} ({}) answered ARP: up", b.name, b.address);
                    b.mac = Some(mac);
                    b.state = initial_state(true, b.weight);
                    self.dataplane.backends.set(b.id, &backend_entry(b, sid), 0)?;
                    service_changed = true;
                }
            }
            if service_changed {
                self.publish(i)?;
                changed = true;
            }
        }
        if changed {
            self.write_state()?;
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
                    policy: "ip-hash".into(),
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
                info!("detached from {}; pinned state removed", self.config.interface);
            }
        }
        Ok(())
    }
}

fn initial_state(has_mac: bool, weight: u32) -> BackendState {
    match (has_mac, weight) {
        (false, _) => BackendState::Down,
        // Weight 0 is IPVS's quiescent backend: no new clients, stuck ones stay.
        (true, 0) => BackendState::Drain,
        (true, _) => BackendState::Up,
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
            let Ok(mut guard) = logger.readable_mut().await else { return };
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
