//! `sticky-lb run`: bring the data path up from a config (or adopt a pinned one), keep it fed
//! (health checks, neighbours, expiry, operator requests, reloads), take it down on a signal.
//!
//! Every change takes one path: the desired state (config + run-time changes) and what was
//! observed (MACs, health verdicts, drained-out backends) -> [`plan::plan`], pure ->
//! [`validate::validate`] against the running data path -> [`apply::apply`], which restores the
//! previous state if a write fails. Start, adoption, reload, SIGHUP, health transitions,
//! neighbour changes, sweeps and control requests all call [`Controller::reconcile`].

mod apply;
mod checks;
mod desired;
mod first_look;
mod ids;
mod instance;
mod model;
mod plan;
mod reload;
mod requests;
mod shared;
mod startup;
mod sweep;
mod table;
mod tokens;
mod validate;

pub use model::state_name;

use crate::{
    config::{Config, HealthCheck, OnExit},
    control::{self, Envelope, Reply, Request},
    dataplane::{Dataplane, PinDir, PinnedMaps, monotonic_ns},
    health, metrics, neighbour, state,
};
use anyhow::{Context as _, Result, bail};
use desired::{Desired, Observed};
use ids::IdBook;
use model::ServiceSlot;
use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};
use sticky_lb_common::{BackendId, MAX_SERVICES, ServiceId};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{info, warn};

/// How long `run --take-over` waits for the running controller to let go of its lock.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(30);
/// How often the neighbour table is read again for every backend's MAC.
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(2);

/// A running health check and what it checks, so a change restarts only changed ones.
struct Checker {
    target: SocketAddr,
    check: HealthCheck,
    task: JoinHandle<()>,
}

/// A neighbour-table answer for one backend address (`None`: no usable entry).
type NeighbourAnswer = (IpAddr, Option<[u8; 6]>);

pub struct Controller {
    config_path: PathBuf,
    netns: Option<String>,
    pins: PinDir,
    dataplane: Dataplane,
    desired: Desired,
    observed: Observed,
    /// What the data path holds now.
    services: Vec<ServiceSlot>,
    ids: IdBook,
    mode: String,
    checkers: HashMap<BackendId, Checker>,
    health_tx: mpsc::Sender<health::Transition>,
    neighbour_tx: mpsc::Sender<NeighbourAnswer>,
    /// The interface's neighbour table and link (rtnetlink).
    neighbours: Arc<neighbour::Neighbours>,
    /// Index of the interface the program is attached to (`None` while it is gone).
    attached_index: Option<u32>,
    pending_tx: mpsc::Sender<requests::Pending>,
    latencies: health::Latencies,
    metrics: Arc<Mutex<metrics::Snapshot>>,
    /// Service ids the last sweep found orphaned entries of: deleted only if the next sweep
    /// finds them orphaned again (a service added by a reload during a sweep is not an orphan).
    orphans_seen: BTreeSet<ServiceId>,
    /// Source-NAT reply entries whose connection is over, held for the backends' TIME_WAIT
    /// (the sweep's state from one pass to the next).
    nat_orphans: std::sync::Arc<std::sync::Mutex<crate::conntrack::NatOrphans>>,
    /// Set while the state file is behind (its last write failed); written again on the next
    /// change or sweep.
    state_behind: bool,
    /// Set while an observation (health, MAC, drained out) could not be applied.
    observations_behind: bool,
    /// False until the data path is attached and the control socket and metrics answer: the
    /// state file appears only then (`status`, scripts and tests wait for it).
    serving: bool,
    /// Reloads started and the last one applied (see [`requests::Pending::Reload`]).
    reloads_started: u64,
    reloads_applied: u64,
    /// The shared stick table's tasks, while `shared_table` is configured and the data path is
    /// attached.
    shared: Option<crate::shared::SharedTable>,
    /// Operator commands other nodes publish (`--all-nodes`), for the main loop.
    operator_tx: mpsc::Sender<Request>,
    /// When each shared service's keys were last refreshed (CLOCK_MONOTONIC_COARSE, ns).
    refresh_rounds: std::collections::BTreeMap<ServiceId, u64>,
    /// The listeners of the `mode: http` services.
    http: crate::http::Proxy,
    _lock: instance::Lock,
}

/// Runs until SIGINT, SIGTERM or a `detach` request. The config must already be validated.
///
/// `take_over`: a controller running on the interface hands its HTTP listening sockets over
/// and stops (see [`crate::http::handover`]); this one waits for its lock (at most
/// [`TAKE_OVER_WAIT`]) and serves the same sockets, so no connection is refused meanwhile.
pub async fn run(
    config: Config,
    config_path: &Path,
    netns: Option<String>,
    take_over: bool,
) -> Result<()> {
    // Handlers first: a SIGHUP that arrives while the controller starts (checks and neighbour
    // answers can take a second) is queued, never the default action that ends the process.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    release_sighup();
    let socket = control::socket_path(netns.as_deref(), &config.interface);
    let (listeners, lock) = if take_over {
        let listeners = crate::http::handover::take_over(&socket)?;
        if !listeners.is_empty() {
            info!(
                "took over {} listening socket(s) from the running controller",
                listeners.len()
            );
        }
        let deadline = tokio::time::Instant::now() + TAKE_OVER_WAIT;
        let lock = loop {
            match instance::Lock::acquire(netns.as_deref(), &config.interface) {
                Ok(lock) => break lock,
                Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        (listeners, lock)
    } else {
        (
            Vec::new(),
            instance::Lock::acquire(netns.as_deref(), &config.interface)?,
        )
    };
    let (health_tx, mut health_rx) = mpsc::channel::<health::Transition>(256);
    let (neighbour_tx, mut neighbour_rx) = mpsc::channel::<NeighbourAnswer>(1024);
    let (pending_tx, mut pending_rx) = mpsc::channel::<requests::Pending>(16);
    let (operator_tx, mut operator_rx) = mpsc::channel::<Request>(64);
    let (neighbour_table, mut neighbour_events) = neighbour::Neighbours::watch(&config.interface)?;
    let channels = startup::Channels {
        neighbour_table: Arc::new(neighbour_table),
        health: health_tx,
        neighbours: neighbour_tx,
        pending: pending_tx,
        operator: operator_tx,
        listeners,
    };
    // The control socket before anything is attached: if it cannot be bound, nothing is.
    // Requests wait in the channel until the main loop runs.
    let (control_tx, mut control_rx) = mpsc::channel::<Envelope>(16);
    let server = control::serve(&socket, control_tx)?;
    let mut controller = match Controller::start(config, config_path, netns, channels, lock).await {
        Ok(controller) => controller,
        Err(e) => {
            server.abort();
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    let mut sweep_tick = tokio::time::interval(controller.config().sweep_interval);
    sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut neighbour_tick = tokio::time::interval(NEIGHBOUR_REFRESH);
    neighbour_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut metrics_server = controller.start_metrics();
    // The state file last: once it is there, `status`, the control socket and metrics answer.
    controller.serving = true;
    controller.save_state();
    startup::notify_ready();
    let (sweep_tx, mut sweep_rx) = mpsc::channel::<sweep::Swept>(4);
    let mut sweeping: Option<JoinHandle<()>> = None;
    let mut detach = false;
    let mut handed_over = false;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                info!("SIGHUP: reloading {}", controller.config_path.display());
                controller.begin_reload(None);
            }
            Some(transition) = health_rx.recv() => controller.apply_health(transition),
            Some((address, mac)) = neighbour_rx.recv() => controller.apply_neighbour(address, mac),
            Some(event) = neighbour_events.recv() => controller.apply_neighbour_event(event),
            Some((request, reply)) = control_rx.recv() => match request {
                Request::Detach => {
                    let _ = reply.send(Reply::ok(format!("detaching from {}", controller.config().interface)));
                    detach = true;
                    break;
                }
                Request::HandOver => {
                    let (addresses, fds) = controller.http.hand_over();
                    info!("handing {} listening socket(s) over to a new controller; stopping", addresses.len());
                    let mut answer = Reply::with_data(
                        format!("handing {} listening socket(s) over", addresses.len()),
                        serde_json::json!({ "listeners": addresses }),
                    );
                    answer.fds = control::Fds(Some(Arc::new(fds)));
                    let _ = reply.send(answer);
                    handed_over = true;
                    break;
                }
                request => controller.handle(request, reply),
            },
            Some(pending) = pending_rx.recv() => {
                if let Some(reload) = controller.finish(pending) {
                    if reload.applied {
                        metrics_server = controller.restart_metrics(metrics_server).await;
                    }
                    reload.answer();
                }
            }
            Some(report) = sweep_rx.recv() => controller.after_sweep(report),
            Some(request) = operator_rx.recv() => controller.handle_remote(request),
            _ = sweep_tick.tick() => {
                if let Some(handle) = &sweeping && !handle.is_finished() {
                    continue; // the last sweep is still walking a large table
                }
                sweeping = Some(tokio::task::spawn_blocking(controller.sweep_job(sweep_tx.clone())));
            }
            _ = neighbour_tick.tick() => {
                if neighbour_events.is_closed() {
                    // The rtnetlink connection failed: watch again (next tick if this fails).
                    match neighbour::Neighbours::watch(&controller.config().interface) {
                        Ok((table, events)) => {
                            warn!("neighbour watch restarted");
                            controller.neighbours = Arc::new(table);
                            neighbour_events = events;
                        }
                        Err(e) => warn!("neighbour watch: {e:#}"),
                    }
                }
                controller.refresh_neighbours();
                if controller.observations_behind {
                    controller.reconcile_observed("retry");
                }
            }
        }
    }
    startup::notify_stopping();
    server.abort();
    let _ = std::fs::remove_file(&socket);
    if let Some(m) = metrics_server {
        m.shutdown().await;
    }
    for checker in controller.checkers.values() {
        checker.task.abort();
    }
    if let Some(handle) = sweeping.take() {
        let _ = handle.await;
    }
    if let Some(shared) = controller.shared.take() {
        shared.stop();
    }
    // Requests in flight finish after the lock is released, so a new controller taking over
    // starts without waiting for them.
    let draining = controller.http.stop_accepting();
    let stopped = controller.stop(detach, handed_over);
    for listener in draining {
        let _ = listener.await;
    }
    stopped
}

impl Controller {
    fn config(&self) -> &Config {
        &self.desired.config
    }

    /// Warns about each IPv6 VIP the interface holds as a preferred address (see vip_address.rs:
    /// the balancer's health checks would leave from it). At attach and after a reload.
    fn warn_about_preferred_vips(&self) {
        let vips: Vec<std::net::Ipv6Addr> = self
            .services
            .iter()
            .filter_map(|s| match s.config.vip {
                IpAddr::V6(vip) => Some(vip),
                IpAddr::V4(_) => None,
            })
            .collect();
        crate::vip_address::warn_if_preferred(&self.config().interface, &vips);
    }

    fn limits(&self) -> validate::Limits {
        validate::Limits {
            maglev_stride: self.dataplane.options().maglev_stride,
            maglev_services: self.dataplane.options().maglev_services,
        }
    }

    /// The one path from a desired state to the data path: plan, validate, apply; then record
    /// the new state. On any error nothing changed (or the previous state was restored) and the
    /// error says which step refused.
    fn reconcile(&mut self, desired: Desired) -> Result<plan::Summary, String> {
        self.reconcile_with(desired, false)
    }

    fn reconcile_with(
        &mut self,
        desired: Desired,
        rewrite_all: bool,
    ) -> Result<plan::Summary, String> {
        let result = self.plan_validate_apply(desired, rewrite_all);
        // First looks belong to the one change they were taken for, applied or refused: a
        // refused reload's look must not decide a later, unrelated change.
        self.observed.first_verdicts.clear();
        result
    }

    fn plan_validate_apply(
        &mut self,
        desired: Desired,
        rewrite_all: bool,
    ) -> Result<plan::Summary, String> {
        let limits = self.limits();
        let cx = plan::Context {
            service_limit: limits.maglev_services.min(MAX_SERVICES),
            now_ns: monotonic_ns(),
            rewrite_all,
        };
        let mut plan = plan::plan(&self.services, &self.ids, &desired, &self.observed, cx)
            .map_err(|e| e.to_string())?;
        let index = self
            .dataplane
            .service_index()
            .map_err(|e| format!("reading the service index: {e:#}"))?;
        validate::validate(&plan, limits, &index)?;
        // Listeners, TLS files and cookie keys first: a plan they refuse changes nothing.
        let token_store =
            desired
                .config
                .shared_table
                .as_ref()
                .map(|t| crate::http::TokenStoreSettings {
                    redis: t.redis.clone(),
                    key_prefix: t.key_prefix.clone(),
                    node: shared::node_name(desired.config.node.as_deref()),
                });
        let staged = self.http.stage(
            &http_views(&plan.next),
            desired.config.cookie_keys.as_deref(),
            token_store,
        )?;
        apply::apply(&mut self.dataplane, &self.services, &mut plan).map_err(|e| e.to_string())?;
        self.http.commit(staged);
        let summary = plan.summary.clone();
        self.services = plan.next;
        self.ids = plan.ids;
        self.desired = desired;
        let present: BTreeSet<BackendId> = self.backend_ids();
        self.observed.drained_out.retain(|id| present.contains(id));
        self.observed.health.retain(|id, _| present.contains(id));
        // First verdicts now belong to ids.
        for s in &self.services {
            for b in &s.backends {
                let name = (s.name().to_string(), b.name.clone());
                if let Some((address, verdict)) = self.observed.first_verdicts.remove(&name)
                    && address == b.address
                {
                    self.observed.health.insert(b.id, verdict);
                }
            }
        }
        self.sync_checkers();
        self.sync_shared();
        for s in &self.services {
            if !s.backends.iter().any(|b| b.is_up()) {
                warn!(
                    "service {}: no backend is up; its new clients are dropped",
                    s.name()
                );
            }
        }
        self.save_state();
        Ok(summary)
    }

    /// Reconciles with the current desired state after an observation changed; logs a refusal.
    /// A refusal is retried on the next neighbour tick (every 2 s): the checker that reported
    /// a verdict reports only changes, so nobody else would bring it in.
    fn reconcile_observed(&mut self, what: &str) {
        match self.reconcile(self.desired.clone()) {
            Ok(_) => self.observations_behind = false,
            Err(e) => {
                warn!("{what}: not applied, the previous state keeps serving (retried): {e}");
                self.observations_behind = true;
            }
        }
    }

    fn backend_ids(&self) -> BTreeSet<BackendId> {
        self.services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect()
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
        let Some(i) = self.services.iter().position(|s| s.name() == service) else {
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

    fn runtime_state(&self) -> state::RuntimeState {
        state::RuntimeState {
            interface: self.config().interface.clone(),
            netns: self.netns.clone(),
            xdp_mode: self.mode.clone(),
            pid: std::process::id(),
            config: self.config_path.display().to_string(),
            maglev_stride: self.dataplane.options().maglev_stride,
            maglev_services: self.dataplane.options().maglev_services,
            services: self.services.iter().map(startup::service_record).collect(),
            retired_backends: self.ids.backends.clone(),
            retired_services: self.ids.services.clone(),
            runtime_changes: self.desired.changes.clone(),
        }
    }

    /// Writes the state file. A failure is logged and retried on the next change or sweep; it
    /// never stops the controller (the data path already holds the change).
    fn save_state(&mut self) {
        let state = self.runtime_state();
        if let Ok(mut m) = self.metrics.lock() {
            m.state = Some(state.clone());
        }
        if !self.serving {
            return;
        }
        let path = state::path(self.netns.as_deref(), &self.config().interface);
        match state.write(&path) {
            Ok(()) => {
                if self.state_behind {
                    info!("state file {} written again", path.display());
                }
                self.state_behind = false;
            }
            Err(e) => {
                if !self.state_behind {
                    warn!(
                        "state file not written ({e:#}): the data path is current, but `status` and the next controller see the state before this change until a write succeeds"
                    );
                }
                self.state_behind = true;
            }
        }
    }

    fn start_metrics(&self) -> Option<metrics::MetricsServer> {
        let m = self.config().metrics.as_ref()?;
        match metrics::MetricsServer::start(
            m.listen,
            self.pins.clone(),
            self.metrics.clone(),
            self.config().stick_table_size,
        ) {
            Ok(server) => {
                info!("metrics on http://{}/metrics", server.listen());
                Some(server)
            }
            Err(e) => {
                warn!("metrics are off: {e:#}");
                None
            }
        }
    }

    /// After a reload: keeps the listener if its address is unchanged; otherwise closes the old
    /// one before binding the new one (the same port may be reused).
    async fn restart_metrics(
        &self,
        running: Option<metrics::MetricsServer>,
    ) -> Option<metrics::MetricsServer> {
        let wanted = self.config().metrics.as_ref().map(|m| m.listen);
        match running {
            Some(server) if Some(server.listen()) == wanted => Some(server),
            Some(server) => {
                server.shutdown().await;
                self.start_metrics()
            }
            None => self.start_metrics(),
        }
    }

    /// SIGINT/SIGTERM: leave the data path running (the default) or detach and remove the pins.
    /// A `detach` request always detaches; a hand-over never does.
    fn stop(self, detach: bool, handed_over: bool) -> Result<()> {
        let pins = self.pins.clone();
        let interface = self.config().interface.clone();
        let state_path = state::path(self.netns.as_deref(), &interface);
        if handed_over {
            info!("handed over: the data path on {interface} stays for the new controller");
            return Ok(());
        }
        if self.config().on_exit == OnExit::KeepRunning && !detach {
            info!(
                "leaving the data path on {interface} running (on_exit: keep-running); pins in {}",
                pins.path().display()
            );
            return Ok(());
        }
        drop(self.dataplane);
        pins.remove()?;
        let _ = std::fs::remove_file(&state_path);
        info!("detached from {interface}; pinned state removed");
        Ok(())
    }
}

/// Blocks SIGHUP in the calling thread, and so in every thread it starts: call it first thing
/// in `main`, before the runtime's threads exist. [`run`] unblocks it in its own thread once its
/// handler is installed, and a SIGHUP that arrived meanwhile is delivered then.
pub fn hold_sighup() {
    set_sighup_blocked(true);
}

fn release_sighup() {
    set_sighup_blocked(false);
}

fn set_sighup_blocked(blocked: bool) {
    // SAFETY: sigset operations on a local set; pthread_sigmask changes only this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let how = if blocked {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// `sticky-lb detach` with no controller running: removes a data path left running
/// (`on_exit: keep-running`) or one whose controller died, with its pins and state file.
pub fn detach(netns: Option<&str>, interface: &str) -> Result<()> {
    let pins = PinDir::new(netns, interface);
    if !pins.path().exists() {
        bail!("no sticky-lb data path is pinned for {interface}");
    }
    if let Some(pid) = instance::holder(netns, interface) {
        bail!(
            "a sticky-lb controller (pid {pid}) runs on {interface}: ask it (`sticky-lb detach` reaches it through its control socket)"
        );
    }
    let _ = PinnedMaps::open(&pins).context("opening the pinned maps")?;
    pins.remove()?;
    let _ = std::fs::remove_file(state::path(netns, interface));
    Ok(())
}

/// The `mode: http` services of a model, as the proxy takes them.
fn http_views(services: &[ServiceSlot]) -> Vec<crate::http::ServiceView> {
    services
        .iter()
        .filter(|s| s.proxied())
        .map(|s| crate::http::ServiceView {
            config: s.config.clone(),
            backends: s
                .backends
                .iter()
                .map(|b| crate::http::BackendView {
                    name: b.name.clone(),
                    address: SocketAddr::new(b.address, b.port),
                    weight: b.weight,
                    state: b.state,
                    retry_after_secs: (b.check.interval * b.check.rise).as_secs().max(1),
                })
                .collect(),
        })
        .collect()
}
