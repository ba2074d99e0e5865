//! Shared stick table benchmark: two sticky-lb nodes behind the ECMP rig's router share their
//! stick table through the rig's real Redis ([`EcmpRig`], [`RedisServer`]), and this measures
//! what sharing costs and how fast it is:
//!
//! 1. **Replication lag**: for each of N new clients (default 1,000, in rounds of the rig's 200
//!    client addresses with the tables and Redis emptied between rounds), one connection while
//!    the ECMP set is node 1 alone; the time from just before the client's connect to the
//!    moment its entry is in node 2's pinned stick map (polled in-process through aya, the key
//!    computed as the controller computes it). Cross-checked against node 2's own
//!    `sticky_lb_shared_replication_lag_seconds` histogram.
//! 2. **New clients per second** with sharing on: bursts of 200 new clients (one connection
//!    each, from parallel client threads) through node 1, the tables and Redis emptied between
//!    bursts; the client-side rate and the time until node 2 had every one of them.
//! 3. **Redis commands per new client**: `INFO commandstats` before and after a burst through
//!    node 1 alone and one spread over both nodes, and the controllers' own
//!    `sticky_lb_shared_redis_commands` counter.
//! 4. **Controller CPU per 1,000 new clients** over the bursts of 2.: utime+stime of each
//!    controller (`/proc/PID/stat`) and of redis-server, the per-thread `schedstat` run time
//!    as a finer figure, and the same processes' idle rate measured beforehand.
//!
//! Environment: `SLB_SHARED_XDP` (`native`, the default, or `generic`), `SLB_SHARED_SWEEP` (the
//! controllers' `sweep_interval`, e.g. `500ms`; default: the config's default, 5 s),
//! `SLB_SHARED_LAG_CLIENTS` (default 1000), `SLB_SHARED_BURSTS` (bursts of 200 new clients for
//! 2. and 4., default 20), `SLB_SHARED_THREADS` (client threads of a burst, default 16),
//! `STICKY_LB_BIN` (the sticky-lb binary; default: next to this one). Markdown to stdout,
//! progress to stderr. Needs root.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap, MapData};
use sticky_lb::dataplane::{PinDir, open_pinned};
use sticky_lb::state;
use sticky_lb_common::{Family, StickEntry, StickKey, addr, map_names};
use sticky_lb_tests::balancer::{Balancer, PeerXdp, ScratchDir, cli};
use sticky_lb_tests::ecmp::{EcmpRig, EcmpRigOptions, MAX_CLIENTS};
use sticky_lb_tests::netns::{in_netns, listed_namespaces, require_root, spawn_in_netns};
use sticky_lb_tests::redis::RedisServer;
use sticky_lb_tests::socket::connect_from;

/// The service's name in the config (one service).
const SERVICE: &str = "web";
/// Each node's metrics listener, on its own namespace's loopback.
const METRICS_PORT: u16 = 9180;
/// The stick timeout: long enough that no refresh round (every quarter timeout) falls inside
/// the run after the first sweep, so the Redis figures are those of new clients alone.
const STICK_TIMEOUT: &str = "30m";
/// One client connection: connect and read the backend's name.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one client's entry may take to reach node 2 before it counts as not learned.
const LEARN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a burst's clients may take to reach every node that should learn them.
const BURST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two looks at a stick map (the lag's resolution, with the timer slack).
const POLL: Duration = Duration::from_micros(50);
/// Pause between looks while a burst runs (the client threads need the CPUs more).
const POLL_BURST: Duration = Duration::from_micros(500);
/// Quiet time after emptying the tables (a stray flush message would show by then).
const SETTLE: Duration = Duration::from_millis(200);
/// How long a burst's CPU window goes on after node 2 had every client (the controllers' and
/// Redis's trailing work: replies to the last claims).
const CPU_TAIL: Duration = Duration::from_millis(50);
/// The idle window that gives each process's CPU rate with no new clients.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// Bound on iterating one stick map (it holds at most a few hundred of this run's entries).
const MAX_ITER: usize = 100_000;

static STOP: AtomicBool = AtomicBool::new(false);

struct Settings {
    xdp_mode: String,
    /// The controllers' `sweep_interval` (humantime); `None` keeps the default (5 s).
    sweep: Option<String>,
    lag_clients: usize,
    bursts: usize,
    threads: usize,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
            match std::env::var(name) {
                Ok(text) => text
                    .trim()
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{name}={text:?} is not a valid value")),
                Err(_) => Ok(default),
            }
        }
        let settings = Settings {
            xdp_mode: var("SLB_SHARED_XDP", "native".to_owned())?,
            sweep: std::env::var("SLB_SHARED_SWEEP")
                .ok()
                .filter(|s| !s.trim().is_empty()),
            lag_clients: var("SLB_SHARED_LAG_CLIENTS", 1000usize)?,
            bursts: var("SLB_SHARED_BURSTS", 20usize)?,
            threads: var("SLB_SHARED_THREADS", 16usize)?,
        };
        if !matches!(settings.xdp_mode.as_str(), "native" | "generic") {
            bail!("SLB_SHARED_XDP must be native or generic");
        }
        if !(1..=10_000).contains(&settings.lag_clients) || !(1..=100).contains(&settings.bursts) {
            bail!("SLB_SHARED_LAG_CLIENTS must be 1..=10000 and SLB_SHARED_BURSTS 1..=100");
        }
        if !(1..=MAX_CLIENTS).contains(&settings.threads) {
            bail!("SLB_SHARED_THREADS must be within 1..={MAX_CLIENTS}");
        }
        Ok(settings)
    }
}

fn main() {
    require_root();
    install_signal_handlers();
    if let Err(err) = run() {
        eprintln!("slb-bench-shared: {err:#}");
        std::process::exit(1);
    }
}

/// SIGINT/SIGTERM raise [`STOP`]: the run ends with an error at the next check and everything
/// is removed on the way out.
fn install_signal_handlers() {
    extern "C" fn on_signal(_: libc::c_int) {
        STOP.store(true, Ordering::Relaxed);
    }
    let handler = on_signal as extern "C" fn(libc::c_int);
    // SAFETY: installing a handler that only performs an atomic store.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

fn interrupted() -> Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn run() -> Result<()> {
    let settings = Settings::from_env()?;
    let sticky_lb = sticky_lb_tests::balancer::locate_from_bench()?;
    let started = Instant::now();
    eprintln!(
        "slb-bench-shared: sticky-lb {} ({} XDP), {} lag clients, {} bursts of {MAX_CLIENTS}, {} client threads",
        sticky_lb.display(),
        settings.xdp_mode,
        settings.lag_clients,
        settings.bursts,
        settings.threads
    );

    // Declaration order is the reverse of drop order: controllers first, then the backend
    // servers, the peers' XDP programs, the pins and state files, Redis, the scratch
    // directory, and the namespaces last.
    let rig = EcmpRig::build(
        EcmpRigOptions::new("shbench")
            .balancers(2)
            .backends(2)
            .clients(MAX_CLIENTS),
    )
    .context("building the ECMP rig")?;
    let prefix = format!("slb-{}-", rig.tag());
    let scratch = ScratchDir::new(rig.tag());
    let store = rig.start_store().context("starting redis-server")?;
    let guards: Vec<_> = (1..=2).map(|i| rig.datapath_guard(i)).collect();
    let peers: Vec<PeerXdp> = if settings.xdp_mode == "native" {
        (1..=2)
            .map(|i| rig.attach_peer_xdp(i))
            .collect::<Result<_>>()
            .context("attaching xdp_pass to the balancers' bridge ports")?
    } else {
        Vec::new()
    };
    let servers = rig
        .start_backend_servers()
        .context("starting the backends' name servers")?;
    let balancers: Vec<Balancer> = (1..=2)
        .map(|i| rig.start_balancer(i, scratch.path(), &config(&rig, i, &settings)))
        .collect::<Result<_>>()?;
    eprintln!(
        "slb-bench-shared: rig {} and both controllers up after {:.1} s",
        rig.tag(),
        started.elapsed().as_secs_f64()
    );

    let outcome = measure(&rig, &store, &balancers, &settings);

    drop(balancers);
    drop(servers);
    drop(peers);
    drop(guards);
    drop(store);
    drop(scratch);
    drop(rig);
    let left = listed_namespaces(&prefix);
    if !left.is_empty() {
        eprintln!("slb-bench-shared: namespaces left behind: {left:?}");
    }
    let report = outcome?;
    print_report(&report, &settings);
    eprintln!(
        "slb-bench-shared: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A node's config: service `web` on the rig's VIP with both backends and a long stick
/// timeout, shared as node `lbI` through the rig's Redis, metrics on the namespace's loopback.
/// The sweep keeps its default interval (5 s): each sweep walks the hash maps whole, which at
/// the rigs' usual 500 ms would be most of an idle controller's CPU.
fn config(rig: &EcmpRig, i: usize, settings: &Settings) -> String {
    let sweep = settings
        .sweep
        .as_ref()
        .map_or(String::new(), |s| format!("sweep_interval: {s}\n"));
    let mut yaml = format!(
        "interface: {}\nxdp_mode: {}\n{sweep}node: lb{i}\nshared_table:\n  redis: {}\n  load_timeout: 2s\nmetrics:\n  listen: 127.0.0.1:{METRICS_PORT}\nservices:\n  - name: {SERVICE}\n    vip: {}\n    port: {}\n    policy: ip-hash\n    stick:\n      timeout: {STICK_TIMEOUT}\n    backends:\n",
        rig.lb_dev(),
        settings.xdp_mode,
        rig.store_url(),
        rig.vip(),
        rig.service().port(),
    );
    for k in 1..=rig.backend_count() {
        yaml += &format!(
            "      - name: b{k}\n        address: {}\n",
            rig.backend_addr(k)
        );
    }
    yaml
}

// ---------------------------------------------------------------------------------------------
// The nodes as the bench sees them
// ---------------------------------------------------------------------------------------------

/// One balancer node: its namespace, controller pid, service id and pinned stick map.
struct Node {
    index: usize,
    ns: String,
    pid: u32,
    service: u32,
    stick: HashMap<MapData, StickKey, StickEntry>,
}

impl Node {
    fn open(rig: &EcmpRig, i: usize, balancer: &Balancer) -> Result<Node> {
        let ns = rig.lb_ns(i).to_owned();
        let state_path = state::path(Some(&ns), rig.lb_dev());
        let state = state::RuntimeState::read(&state_path)
            .with_context(|| format!("reading {}", state_path.display()))?;
        if state.pid != balancer.pid() {
            bail!(
                "node {i}: the state file names pid {}, the controller is {}",
                state.pid,
                balancer.pid()
            );
        }
        let service = state
            .services
            .iter()
            .find(|s| s.name == SERVICE)
            .with_context(|| format!("node {i}: no service {SERVICE} in the state file"))?
            .id;
        let pins = PinDir::new(Some(&ns), rig.lb_dev());
        let stick = open_pinned(&pins, map_names::STICK)
            .with_context(|| format!("node {i}: opening the pinned stick map"))?;
        Ok(Node {
            index: i,
            ns,
            pid: state.pid,
            service,
            stick,
        })
    }

    /// The stick key of `client` as the controller computes it (IPv4, mask /32).
    fn key(&self, client: Ipv4Addr) -> StickKey {
        let client = IpAddr::V4(client);
        StickKey {
            service: self.service,
            client: addr::masked(
                addr::words(&client),
                addr::prefix_mask(Family::Ipv4, Family::Ipv4.default_client_mask()),
            ),
        }
    }

    fn has(&self, key: &StickKey) -> bool {
        self.stick.get(key, 0).is_ok()
    }

    /// Entries of the service in this node's stick map.
    fn entries(&self) -> usize {
        self.stick
            .keys()
            .take(MAX_ITER)
            .filter_map(Result::ok)
            .filter(|k| k.service == self.service)
            .count()
    }
}

// ---------------------------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------------------------

struct Report {
    redis_version: String,
    lag: LagReport,
    bursts: BurstReport,
    redis_via_1: RedisRound,
    redis_spread: RedisRound,
    counters: Vec<(String, Vec<(&'static str, f64)>)>,
    seconds: f64,
}

fn measure(
    rig: &EcmpRig,
    store: &RedisServer,
    balancers: &[Balancer],
    settings: &Settings,
) -> Result<Report> {
    let started = Instant::now();
    let nodes: Vec<Node> = balancers
        .iter()
        .enumerate()
        .map(|(n, b)| Node::open(rig, n + 1, b))
        .collect::<Result<_>>()?;
    let (n1, n2) = (&nodes[0], &nodes[1]);
    if n1.service != n2.service {
        eprintln!(
            "slb-bench-shared: note: the service's id is {} on node 1 and {} on node 2 (keys are by name in Redis)",
            n1.service, n2.service
        );
    }
    let redis_version = store
        .command(&["INFO", "server"])?
        .lines()
        .find_map(|l| l.trim().strip_prefix("redis_version:").map(str::to_owned))
        .unwrap_or_default();

    // Both controllers connected to Redis, then a warm-up that shows node 2 learns from node 1.
    wait_for(
        "both nodes connected to Redis",
        Duration::from_secs(15),
        || {
            nodes.iter().all(|n| {
                scrape(&n.ns).is_ok_and(|t| {
                    sample(&t, "sticky_lb_shared_redis_connected") == Some(1.0)
                        && sample(&t, "sticky_lb_shared_resyncs_total").unwrap_or(0.0) >= 1.0
                })
            })
        },
    )?;
    rig.set_ecmp(&[1])?;
    let warm: Vec<Ipv4Addr> = rig.client_addrs()[..20].to_vec();
    for (src, result) in warm.iter().zip(rig.fetch_names(&warm, FETCH_TIMEOUT)) {
        result.with_context(|| format!("warm-up connection from {src}"))?;
    }
    wait_for("node 2 learning the warm-up clients", BURST_TIMEOUT, || {
        warm.iter().all(|&c| n2.has(&n2.key(c)))
    })?;
    let metrics_before: Vec<String> = nodes.iter().map(|n| scrape(&n.ns)).collect::<Result<_>>()?;

    // The processes' idle CPU rate, with empty tables.
    reset(store, &nodes)?;
    let idle = idle_rates(&nodes, store)?;
    eprintln!(
        "slb-bench-shared: idle CPU: node 1 {:.2} ms/s, node 2 {:.2} ms/s, redis {:.2} ms/s (stat)",
        idle[0].stat_ms_per_s, idle[1].stat_ms_per_s, idle[2].stat_ms_per_s
    );

    let lag = measure_lag(rig, store, &nodes, settings.lag_clients)?;
    let bursts = measure_bursts(rig, store, &nodes, settings, &idle)?;
    let redis_via_1 = redis_round(rig, store, &nodes, &[1], settings.threads)?;
    let redis_spread = redis_round(rig, store, &nodes, &[1, 2], settings.threads)?;
    rig.set_ecmp(&[1, 2])?;

    let metrics_after: Vec<String> = nodes.iter().map(|n| scrape(&n.ns)).collect::<Result<_>>()?;
    let counters = nodes
        .iter()
        .zip(metrics_before.iter().zip(&metrics_after))
        .map(|(node, (before, after))| {
            let delta = |series: &str| {
                sample(after, series).unwrap_or(f64::NAN) - sample(before, series).unwrap_or(0.0)
            };
            let names: [(&'static str, &str); 10] = [
                ("events read", "sticky_lb_shared_events_read_total"),
                ("claims won", "sticky_lb_shared_events_sent_total"),
                ("claims lost", "sticky_lb_shared_claims_lost_total"),
                ("received", "sticky_lb_shared_events_received_total"),
                ("written", "sticky_lb_shared_entries_written_total"),
                ("dropped", "sticky_lb_shared_events_dropped_total"),
                ("resyncs", "sticky_lb_shared_resyncs_total"),
                ("refreshes", "sticky_lb_shared_refreshes_total"),
                ("Redis errors", "sticky_lb_shared_redis_errors_total"),
                ("commands", "sticky_lb_shared_redis_commands_total"),
            ];
            let mut row: Vec<(&'static str, f64)> =
                names.iter().map(|(label, s)| (*label, delta(s))).collect();
            row.push((
                "ring events lost",
                reason_counter(after, "stick_events_lost")
                    - reason_counter(before, "stick_events_lost"),
            ));
            (format!("node {}", node.index), row)
        })
        .collect();

    Ok(Report {
        redis_version,
        lag,
        bursts,
        redis_via_1,
        redis_spread,
        counters,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Empties both tables (`table flush`, which each node also publishes) and Redis (FLUSHALL),
/// then waits until both stick maps and Redis are empty and stay so for [`SETTLE`].
fn reset(store: &RedisServer, nodes: &[Node]) -> Result<()> {
    interrupted()?;
    for node in nodes {
        let (code, out, err) = cli(&node.ns, &["table", "flush"]);
        if code != 0 {
            bail!("table flush on node {}: {out}{err}", node.index);
        }
    }
    store.command(&["FLUSHALL"])?;
    let empty = || {
        nodes.iter().all(|n| n.entries() == 0)
            && store.command(&["DBSIZE"]).is_ok_and(|n| n.trim() == "0")
    };
    wait_for("empty tables and Redis", Duration::from_secs(5), empty)?;
    std::thread::sleep(SETTLE);
    if !empty() {
        bail!("the tables or Redis filled again after the flush");
    }
    Ok(())
}

/// Waits (bounded) until `done`; how long it took.
fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Result<Duration> {
    let started = Instant::now();
    while !done() {
        interrupted()?;
        if started.elapsed() > within {
            bail!("{what}: not within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(started.elapsed())
}

/// One connection from `src` to the service, reading the backend's name to the end, in the
/// calling thread's namespace.
fn fetch_here(src: Ipv4Addr, service: SocketAddrV4, timeout: Duration) -> Result<String> {
    let stream = connect_from(IpAddr::V4(src), SocketAddr::V4(service), timeout)
        .with_context(|| format!("connect {src} -> {service}"))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut name = String::new();
    (&stream)
        .take(256)
        .read_to_string(&mut name)
        .with_context(|| format!("reading the answer {src} -> {service}"))?;
    let name = name.trim();
    if name.is_empty() {
        bail!("empty answer {src} -> {service}");
    }
    Ok(name.to_owned())
}

// --- 1. Replication lag ------------------------------------------------------------------------

struct LagReport {
    clients: usize,
    /// Client-to-node-2 times of the clients node 2 learned.
    lags: Vec<Duration>,
    not_learned: usize,
    not_on_node1: usize,
    failed: usize,
    first_error: Option<String>,
    /// Node 2's histogram over the same clients: count, p50, p99 (s), and the largest finite
    /// bucket bound with observations.
    metric_count: f64,
    metric_p50: Option<f64>,
    metric_p99: Option<f64>,
    metric_max_bucket: Option<f64>,
}

fn measure_lag(
    rig: &EcmpRig,
    store: &RedisServer,
    nodes: &[Node],
    clients: usize,
) -> Result<LagReport> {
    let (n1, n2) = (&nodes[0], &nodes[1]);
    rig.set_ecmp(&[1])?;
    let service = rig.service();
    let (request_tx, request_rx) = mpsc::channel::<Ipv4Addr>();
    let (answer_tx, answer_rx) = mpsc::channel::<(Instant, Result<String>)>();
    // One client thread in the client namespace for the whole run: each request is a connect
    // and a read, timed from just before the connect.
    let client = spawn_in_netns(rig.client_ns().to_owned(), move || {
        for src in request_rx {
            let t0 = Instant::now();
            let result = fetch_here(src, service, FETCH_TIMEOUT);
            if answer_tx.send((t0, result)).is_err() {
                break;
            }
        }
    });
    let histogram_before = lag_buckets(&scrape(&n2.ns)?);
    let mut report = LagReport {
        clients,
        lags: Vec::with_capacity(clients),
        not_learned: 0,
        not_on_node1: 0,
        failed: 0,
        first_error: None,
        metric_count: 0.0,
        metric_p50: None,
        metric_p99: None,
        metric_max_bucket: None,
    };
    let addrs = rig.client_addrs();
    let mut done = 0;
    let mut round = 0;
    let mut slowest: Vec<(Duration, usize, usize)> = Vec::new();
    while done < clients {
        round += 1;
        reset(store, nodes)?;
        let batch = &addrs[..(clients - done).min(addrs.len())];
        for (position, &src) in batch.iter().enumerate() {
            interrupted()?;
            let key = n2.key(src);
            request_tx.send(src).context("the client thread is gone")?;
            let deadline = Instant::now() + LEARN_TIMEOUT;
            let seen = loop {
                if n2.has(&key) {
                    break Some(Instant::now());
                }
                if Instant::now() > deadline {
                    break None;
                }
                std::thread::sleep(POLL);
            };
            let (t0, result) = answer_rx
                .recv_timeout(FETCH_TIMEOUT + Duration::from_secs(1))
                .context("no answer from the client thread")?;
            match (result, seen) {
                (Err(err), _) => {
                    report.failed += 1;
                    report.first_error.get_or_insert(format!("{err:#}"));
                }
                (Ok(_), None) => report.not_learned += 1,
                (Ok(_), Some(seen)) => {
                    let lag = seen.saturating_duration_since(t0);
                    report.lags.push(lag);
                    slowest.push((lag, round, position));
                }
            }
            if !n1.has(&n1.key(src)) {
                report.not_on_node1 += 1;
            }
        }
        done += batch.len();
        eprintln!(
            "[lag round {round}] {done}/{clients} clients; p50 so far {:.2} ms",
            quantile(&report.lags, 0.5).map_or(f64::NAN, ms)
        );
    }
    drop(request_tx);
    let _ = client.join();
    slowest.sort_by_key(|s| std::cmp::Reverse(s.0));
    eprintln!(
        "[lag] slowest (ms, round, client of the round): {}",
        slowest
            .iter()
            .take(8)
            .map(|(lag, round, n)| format!("{:.2} r{round} #{n}", ms(*lag)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    report.lags.sort();
    let histogram = lag_buckets(&scrape(&n2.ns)?);
    let delta: Vec<(f64, f64)> = histogram
        .iter()
        .map(|&(le, count)| {
            let before = histogram_before
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, c)| *c);
            (le, count - before)
        })
        .collect();
    report.metric_count = delta.last().map_or(0.0, |(_, c)| *c);
    report.metric_p50 = histogram_quantile(&delta, 0.5);
    report.metric_p99 = histogram_quantile(&delta, 0.99);
    // The smallest bound that holds every observation.
    report.metric_max_bucket = delta
        .iter()
        .find(|(_, c)| *c >= report.metric_count && report.metric_count > 0.0)
        .map(|(le, _)| *le);
    Ok(report)
}

// --- 2. and 4. Bursts of new clients ------------------------------------------------------------

/// One burst's outcome.
struct Burst {
    clients: usize,
    ok: usize,
    first_error: Option<String>,
    /// From the threads' start to the last answer.
    wall: Duration,
    /// From the threads' start until each waiting node had every client (None: not within
    /// [`BURST_TIMEOUT`]), per node in the order given.
    all_learned: Vec<Option<Duration>>,
    missing: Vec<usize>,
    /// Per client: from just before its connect to its entry in the first waiting node.
    lags: Vec<Duration>,
}

/// Connections from every address of `clients` at once (`threads` threads, each its share in
/// turn), while this thread watches the stick maps of `watch` until each holds every client.
fn burst(rig: &EcmpRig, clients: &[Ipv4Addr], threads: usize, watch: &[&Node]) -> Result<Burst> {
    interrupted()?;
    let service = rig.service();
    let client_ns = rig.client_ns();
    let per_thread = clients.len().div_ceil(threads);
    let chunks: Vec<&[Ipv4Addr]> = clients.chunks(per_thread).collect();
    let barrier = Barrier::new(chunks.len() + 1);
    type Done = (Ipv4Addr, Instant, Instant, Result<String>);
    let (start, per_client, seen) = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                let barrier = &barrier;
                scope.spawn(move || -> Vec<Done> {
                    barrier.wait();
                    in_netns(client_ns, || {
                        chunk
                            .iter()
                            .map(|&src| {
                                let t0 = Instant::now();
                                let result = fetch_here(src, service, FETCH_TIMEOUT);
                                (src, t0, Instant::now(), result)
                            })
                            .collect()
                    })
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        // Per watched node: the clients not seen yet, and when each was seen.
        let mut pending: Vec<Vec<(usize, StickKey)>> = watch
            .iter()
            .map(|node| {
                clients
                    .iter()
                    .enumerate()
                    .map(|(n, &c)| (n, node.key(c)))
                    .collect()
            })
            .collect();
        let mut seen: Vec<Vec<Option<Instant>>> = vec![vec![None; clients.len()]; watch.len()];
        while pending.iter().any(|p| !p.is_empty()) && start.elapsed() < BURST_TIMEOUT {
            if STOP.load(Ordering::Relaxed) {
                break;
            }
            for ((node, pending), seen) in watch.iter().zip(&mut pending).zip(&mut seen) {
                pending.retain(|(n, key)| {
                    if node.has(key) {
                        seen[*n] = Some(Instant::now());
                        false
                    } else {
                        true
                    }
                });
            }
            std::thread::sleep(POLL_BURST);
        }
        let per_client: Vec<Done> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect();
        (start, per_client, seen)
    });
    interrupted()?;
    let ok = per_client.iter().filter(|d| d.3.is_ok()).count();
    let first_error = per_client
        .iter()
        .find_map(|d| d.3.as_ref().err().map(|e| format!("{e:#}")));
    let last = per_client.iter().map(|d| d.2).max().unwrap_or(start);
    let index: BTreeMap<Ipv4Addr, usize> =
        clients.iter().enumerate().map(|(n, &c)| (c, n)).collect();
    let lags = per_client
        .iter()
        .filter_map(|(src, t0, _, result)| {
            result.as_ref().ok()?;
            let at = seen.first()?[*index.get(src)?]?;
            Some(at.saturating_duration_since(*t0))
        })
        .collect();
    Ok(Burst {
        clients: clients.len(),
        ok,
        first_error,
        wall: last.saturating_duration_since(start),
        all_learned: seen
            .iter()
            .map(|s| {
                s.iter()
                    .copied()
                    .collect::<Option<Vec<Instant>>>()
                    .map(|times| {
                        times
                            .into_iter()
                            .max()
                            .unwrap_or(start)
                            .saturating_duration_since(start)
                    })
            })
            .collect(),
        missing: seen
            .iter()
            .map(|s| s.iter().filter(|t| t.is_none()).count())
            .collect(),
        lags,
    })
}

struct BurstReport {
    bursts: Vec<Burst>,
    /// CPU of node 1, node 2 and redis-server over the bursts' windows.
    cpu: [CpuUse; 3],
    /// The windows' total length.
    window: Duration,
    /// CPU over the whole phase, from before the first flush to after the last burst.
    phase_cpu: [CpuUse; 3],
    phase: Duration,
    idle: [IdleRate; 3],
}

fn measure_bursts(
    rig: &EcmpRig,
    store: &RedisServer,
    nodes: &[Node],
    settings: &Settings,
    idle: &[IdleRate; 3],
) -> Result<BurstReport> {
    rig.set_ecmp(&[1])?;
    let pids = [nodes[0].pid, nodes[1].pid, store.pid()];
    let mut cpu = [CpuUse::default(); 3];
    let mut window = Duration::ZERO;
    let mut bursts = Vec::with_capacity(settings.bursts);
    let clients = rig.client_addrs();
    let phase_before: Vec<CpuSnapshot> = pids
        .iter()
        .map(|&p| cpu_snapshot(p))
        .collect::<Result<_>>()?;
    let phase_started = Instant::now();
    for round in 1..=settings.bursts {
        reset(store, nodes)?;
        let before: Vec<CpuSnapshot> = pids
            .iter()
            .map(|&p| cpu_snapshot(p))
            .collect::<Result<_>>()?;
        let opened = Instant::now();
        let b = burst(rig, clients, settings.threads, &[&nodes[1]])?;
        std::thread::sleep(CPU_TAIL);
        let after: Vec<CpuSnapshot> = pids
            .iter()
            .map(|&p| cpu_snapshot(p))
            .collect::<Result<_>>()?;
        window += opened.elapsed();
        for (n, total) in cpu.iter_mut().enumerate() {
            total.add(&before[n], &after[n]);
        }
        eprintln!(
            "[burst {round}/{}] {}/{} connections in {:.1} ms ({:.0} new clients/s); node 2 had all after {}",
            settings.bursts,
            b.ok,
            b.clients,
            ms(b.wall),
            b.ok as f64 / b.wall.as_secs_f64(),
            match b.all_learned[0] {
                Some(d) => format!("{:.1} ms", ms(d)),
                None => format!("never ({} missing)", b.missing[0]),
            }
        );
        bursts.push(b);
    }
    let phase_after: Vec<CpuSnapshot> = pids
        .iter()
        .map(|&p| cpu_snapshot(p))
        .collect::<Result<_>>()?;
    let mut phase_cpu = [CpuUse::default(); 3];
    for (n, total) in phase_cpu.iter_mut().enumerate() {
        total.add(&phase_before[n], &phase_after[n]);
    }
    Ok(BurstReport {
        bursts,
        cpu,
        window,
        phase_cpu,
        phase: phase_started.elapsed(),
        idle: *idle,
    })
}

// --- 3. Redis commands per new client --------------------------------------------------------

struct RedisRound {
    ecmp: Vec<usize>,
    clients: usize,
    ok: usize,
    missing: Vec<usize>,
    /// Calls per command (lower case, as Redis names them), and Redis's own µs, over the round.
    calls: BTreeMap<String, (f64, f64)>,
    /// The controllers' `sticky_lb_shared_redis_commands` counters' increase, per node.
    counted: Vec<f64>,
}

fn redis_round(
    rig: &EcmpRig,
    store: &RedisServer,
    nodes: &[Node],
    ecmp: &[usize],
    threads: usize,
) -> Result<RedisRound> {
    rig.set_ecmp(ecmp)?;
    reset(store, nodes)?;
    let counter = "sticky_lb_shared_redis_commands_total";
    let before_stats = wait_redis_quiet(store)?;
    let before_counted: Vec<f64> = nodes
        .iter()
        .map(|n| scrape(&n.ns).map(|t| sample(&t, counter).unwrap_or(f64::NAN)))
        .collect::<Result<_>>()?;
    let watch: Vec<&Node> = nodes.iter().collect();
    let b = burst(rig, rig.client_addrs(), threads, &watch)?;
    let after_stats = wait_redis_quiet(store)?;
    let after_counted: Vec<f64> = nodes
        .iter()
        .map(|n| scrape(&n.ns).map(|t| sample(&t, counter).unwrap_or(f64::NAN)))
        .collect::<Result<_>>()?;
    let mut calls = BTreeMap::new();
    for (name, &(c, us)) in &after_stats {
        let (c0, us0) = before_stats.get(name).copied().unwrap_or((0.0, 0.0));
        // The bench's own INFO calls are not the nodes'.
        if c > c0 && name != "info" {
            calls.insert(name.clone(), (c - c0, us - us0));
        }
    }
    eprintln!(
        "[redis, ECMP {ecmp:?}] {} new clients: {}",
        b.ok,
        calls
            .iter()
            .map(|(n, (c, _))| format!("{n} {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(RedisRound {
        ecmp: ecmp.to_vec(),
        clients: b.clients,
        ok: b.ok,
        missing: b.missing,
        calls,
        counted: after_counted
            .iter()
            .zip(&before_counted)
            .map(|(a, b)| a - b)
            .collect(),
    })
}

/// `INFO commandstats` as command -> (calls, usec).
fn commandstats(store: &RedisServer) -> Result<BTreeMap<String, (f64, f64)>> {
    let text = store.command(&["INFO", "commandstats"])?;
    let mut stats = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        let Some((name, fields)) = line
            .strip_prefix("cmdstat_")
            .and_then(|rest| rest.split_once(':'))
        else {
            continue;
        };
        let field = |key: &str| {
            fields
                .split(',')
                .find_map(|f| f.strip_prefix(key))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        stats.insert(name.to_owned(), (field("calls="), field("usec=")));
    }
    Ok(stats)
}

/// Waits (bounded) until two `INFO commandstats` 100 ms apart agree but for INFO itself: the
/// nodes have sent everything. The last reading.
fn wait_redis_quiet(store: &RedisServer) -> Result<BTreeMap<String, (f64, f64)>> {
    let strip = |mut s: BTreeMap<String, (f64, f64)>| {
        s.remove("info");
        s.into_iter()
            .map(|(k, (c, _))| (k, c))
            .collect::<BTreeMap<_, _>>()
    };
    let mut last = commandstats(store)?;
    for _ in 0..30 {
        interrupted()?;
        std::thread::sleep(Duration::from_millis(100));
        let now = commandstats(store)?;
        if strip(now.clone()) == strip(last.clone()) {
            return Ok(now);
        }
        last = now;
    }
    bail!("Redis kept receiving commands for 3 s after a round")
}

// --- CPU ----------------------------------------------------------------------------------------

/// A process's CPU time: utime+stime (clock ticks) and each thread's run time (ns).
struct CpuSnapshot {
    ticks: u64,
    threads: BTreeMap<u32, u64>,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

fn cpu_snapshot(pid: u32) -> Result<CpuSnapshot> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // After "pid (comm) ": state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("field {n} of /proc/{pid}/stat"))
    };
    let ticks = field(14)? + field(15)?;
    let mut threads = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread that ended since the listing is simply absent.
        if let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat"))
            && let Some(ns) = text.split_whitespace().next().and_then(|f| f.parse().ok())
        {
            threads.insert(tid, ns);
        }
    }
    Ok(CpuSnapshot { ticks, threads })
}

/// CPU time summed over windows.
#[derive(Clone, Copy, Debug, Default)]
struct CpuUse {
    /// utime+stime, ms (clock-tick resolution).
    stat_ms: f64,
    /// Threads' run time, ms (ns resolution; a thread that ended inside a window is missed).
    sched_ms: f64,
}

impl CpuUse {
    fn add(&mut self, before: &CpuSnapshot, after: &CpuSnapshot) {
        self.stat_ms += after.ticks.saturating_sub(before.ticks) as f64 * 1000.0 / clock_ticks();
        self.sched_ms += after
            .threads
            .iter()
            .map(|(tid, ns)| ns.saturating_sub(before.threads.get(tid).copied().unwrap_or(0)))
            .sum::<u64>() as f64
            / 1e6;
    }
}

/// A process's CPU rate with nothing to do but its timers (the sweep, every 5 s).
#[derive(Clone, Copy, Debug, Default)]
struct IdleRate {
    stat_ms_per_s: f64,
    sched_ms_per_s: f64,
}

fn idle_rates(nodes: &[Node], store: &RedisServer) -> Result<[IdleRate; 3]> {
    let pids = [nodes[0].pid, nodes[1].pid, store.pid()];
    let before: Vec<CpuSnapshot> = pids
        .iter()
        .map(|&p| cpu_snapshot(p))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    std::thread::sleep(IDLE_WINDOW);
    let after: Vec<CpuSnapshot> = pids
        .iter()
        .map(|&p| cpu_snapshot(p))
        .collect::<Result<_>>()?;
    let seconds = started.elapsed().as_secs_f64();
    let mut rates = [IdleRate::default(); 3];
    for (n, rate) in rates.iter_mut().enumerate() {
        let mut used = CpuUse::default();
        used.add(&before[n], &after[n]);
        *rate = IdleRate {
            stat_ms_per_s: used.stat_ms / seconds,
            sched_ms_per_s: used.sched_ms / seconds,
        };
    }
    Ok(rates)
}

// --- Metrics --------------------------------------------------------------------------------------

/// GET /metrics from the node's controller, inside its namespace.
fn scrape(ns: &str) -> Result<String> {
    in_netns(ns, || -> Result<String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, METRICS_PORT));
        let timeout = Duration::from_secs(2);
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: lb\r\n\r\n")?;
        let mut text = String::new();
        stream.take(8 << 20).read_to_string(&mut text)?;
        Ok(text)
    })
    .with_context(|| format!("scraping the metrics of {ns}"))
}

/// The value of `series` (name and labels exactly as printed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The data path's not-forwarded or event counter with `reason`, whatever its family's name.
fn reason_counter(text: &str, reason: &str) -> f64 {
    let label = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(&label))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// The replication-lag histogram's cumulative buckets: (upper bound s, count), +Inf last.
fn lag_buckets(text: &str) -> Vec<(f64, f64)> {
    let head = "sticky_lb_shared_replication_lag_seconds_bucket{le=\"";
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(head)?;
            let (le, rest) = rest.split_once('"')?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let value = rest.rsplit_once(' ')?.1.parse().ok()?;
            Some((le, value))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// Prometheus's `histogram_quantile`: linear within the bucket holding the rank.
fn histogram_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let width = count - lower.1;
            let within = if width > 0.0 {
                (rank - lower.1) / width
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, count);
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank quantile of sorted or unsorted durations.
fn quantile(values: &[Duration], q: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn fmt_ms(d: Option<Duration>) -> String {
    d.map_or("–".to_owned(), |d| format!("{:.2}", ms(d)))
}

fn fmt_s_as_ms(s: Option<f64>) -> String {
    s.map_or("–".to_owned(), |s| format!("{:.2}", s * 1e3))
}

fn print_report(report: &Report, settings: &Settings) {
    let lag = &report.lag;
    println!(
        "## Shared stick table: 2 sticky-lb nodes ({} XDP) behind an ECMP router, sharing through one Redis {}\n",
        settings.xdp_mode, report.redis_version
    );
    println!(
        "Rig: `EcmpRig`, 2 balancers, 2 DSR backends, {MAX_CLIENTS} client addresses; service `ip-hash`, stick timeout {STICK_TIMEOUT}, `sweep_interval` {}; one connection per new client; between rounds both nodes' tables are flushed (`sticky-lb table flush`) and Redis emptied (FLUSHALL), so every connection is a new client. Measured run: {:.1} s.\n",
        settings.sweep.as_deref().unwrap_or("5s (the default)"),
        report.seconds
    );

    println!("### 1. Replication lag (new client placed on node 1, learned by node 2)\n");
    println!("| figure | value | how measured |");
    println!("|---|---:|---|");
    println!(
        "| lag p50 ms | {} | {} clients one after another, ECMP set = node 1; from just before the client's connect() to its entry in node 2's pinned `slb_stick` map (polled every {} µs in-process, key = service id + masked client) |",
        fmt_ms(quantile(&lag.lags, 0.5)),
        lag.clients,
        POLL.as_micros()
    );
    println!(
        "| lag p99 ms | {} | same |",
        fmt_ms(quantile(&lag.lags, 0.99))
    );
    println!(
        "| lag max ms | {} | same |",
        fmt_ms(lag.lags.iter().max().copied())
    );
    println!(
        "| learned by node 2 | {} of {} | within {} s each; {} connections failed, {} entries missing on node 1 |",
        lag.lags.len(),
        lag.clients,
        LEARN_TIMEOUT.as_secs(),
        lag.failed,
        lag.not_on_node1
    );
    println!(
        "| metric count | {:.0} | increase of node 2's `sticky_lb_shared_replication_lag_seconds_count` over the same clients |",
        lag.metric_count
    );
    println!(
        "| metric p50 / p99 ms | {} / {} | the histogram's buckets (0.5, 1, 2, 5, 10 ms...), interpolated as Prometheus's `histogram_quantile`; the metric runs from the entry's creation stamp (CLOCK_MONOTONIC_COARSE, converted to wall-clock ms) to node 2's write, so it has millisecond resolution |",
        fmt_s_as_ms(lag.metric_p50),
        fmt_s_as_ms(lag.metric_p99)
    );
    println!(
        "| metric: all within | {} ms | smallest bucket bound holding every observation |",
        fmt_s_as_ms(lag.metric_max_bucket)
    );
    if let Some(err) = &lag.first_error {
        println!("\nFirst failed connection: {}", err.replace('|', "/"));
    }

    let bursts = &report.bursts;
    let total_ok: usize = bursts.bursts.iter().map(|b| b.ok).sum();
    let total_clients: usize = bursts.bursts.iter().map(|b| b.clients).sum();
    let total_wall: f64 = bursts.bursts.iter().map(|b| b.wall.as_secs_f64()).sum();
    let rates: Vec<Duration> = bursts
        .bursts
        .iter()
        .map(|b| Duration::from_secs_f64(b.wall.as_secs_f64() / b.ok.max(1) as f64))
        .collect();
    let median_rate = quantile(&rates, 0.5).map(|per| 1.0 / per.as_secs_f64());
    let learned: Vec<Duration> = bursts
        .bursts
        .iter()
        .filter_map(|b| b.all_learned[0])
        .collect();
    let never = bursts
        .bursts
        .iter()
        .filter(|b| b.all_learned[0].is_none())
        .count();
    let burst_lags: Vec<Duration> = bursts
        .bursts
        .iter()
        .flat_map(|b| b.lags.iter().copied())
        .collect();
    println!(
        "\n### 2. New clients per second with sharing on ({} bursts of {MAX_CLIENTS} new clients through node 1, {} client threads)\n",
        bursts.bursts.len(),
        settings.threads
    );
    println!("| figure | value | how measured |");
    println!("|---|---:|---|");
    println!(
        "| new clients/s | {:.0} | connections completed (connect, read the backend's name, close) over the bursts' summed wall time, client side: {total_ok} of {total_clients} |",
        total_ok as f64 / total_wall.max(1e-9)
    );
    println!(
        "| new clients/s, median burst | {} | per burst: its connections over its wall time (first thread start to last answer) |",
        median_rate.map_or("–".to_owned(), |r| format!("{r:.0}"))
    );
    println!(
        "| node 2 had all, median ms | {} | from the burst's start until node 2's stick map held all {MAX_CLIENTS} clients (polled every {} µs) |",
        fmt_ms(quantile(&learned, 0.5)),
        POLL_BURST.as_micros()
    );
    println!(
        "| node 2 had all, max ms | {} | same; bursts where node 2 missed some within {} s: {never} |",
        fmt_ms(learned.iter().max().copied()),
        BURST_TIMEOUT.as_secs()
    );
    println!(
        "| lag under load p50 / p99 / max ms | {} / {} / {} | per client, from just before its connect() to its entry in node 2's map, during the bursts |",
        fmt_ms(quantile(&burst_lags, 0.5)),
        fmt_ms(quantile(&burst_lags, 0.99)),
        fmt_ms(burst_lags.iter().max().copied())
    );
    if let Some(err) = bursts.bursts.iter().find_map(|b| b.first_error.as_ref()) {
        println!("\nFirst failed connection: {}", err.replace('|', "/"));
    }

    println!("\n### 3. Redis commands per new client\n");
    let rounds = [&report.redis_via_1, &report.redis_spread];
    let names: std::collections::BTreeSet<&String> =
        rounds.iter().flat_map(|r| r.calls.keys()).collect();
    println!(
        "| command | {} |",
        rounds
            .iter()
            .map(|r| format!(
                "ECMP {} ({} clients)",
                r.ecmp
                    .iter()
                    .map(|i| format!("node {i}"))
                    .collect::<Vec<_>>()
                    .join(" + "),
                r.ok
            ))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|---:|---:|");
    let per_client = |r: &RedisRound, v: f64| v / r.ok.max(1) as f64;
    for name in &names {
        println!(
            "| {name} | {} |",
            rounds
                .iter()
                .map(|r| format!(
                    "{:.2}",
                    per_client(r, r.calls.get(*name).map_or(0.0, |c| c.0))
                ))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    println!(
        "| **all commands** | {} |",
        rounds
            .iter()
            .map(|r| format!(
                "**{:.2}**",
                per_client(r, r.calls.values().map(|c| c.0).sum())
            ))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!(
        "| Redis µs (commandstats usec) | {} |",
        rounds
            .iter()
            .map(|r| format!("{:.1}", per_client(r, r.calls.values().map(|c| c.1).sum())))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!(
        "| controllers' `sticky_lb_shared_redis_commands` (node 1 + node 2) | {} |",
        rounds
            .iter()
            .map(|r| format!(
                "{:.2} ({})",
                per_client(r, r.counted.iter().sum()),
                r.counted
                    .iter()
                    .map(|c| format!("{c:.0}"))
                    .collect::<Vec<_>>()
                    .join(" + ")
            ))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!(
        "| learned by every node | {} |",
        rounds
            .iter()
            .map(|r| if r.missing.iter().all(|&m| m == 0) {
                "yes".to_owned()
            } else {
                format!("missing {:?} of {}", r.missing, r.clients)
            })
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!(
        "\n`INFO commandstats` calls, after minus before one burst of {MAX_CLIENTS} new clients (the tables and Redis emptied before, Redis quiet for 100 ms before each reading), divided by the clients; the bench's own INFO is left out. Redis counts the commands a Lua script runs (GET, SET, PUBLISH inside the claim script) as well as the EVALSHA; the controllers count a script once."
    );

    let cpu = &bursts.cpu;
    let phase_cpu = &bursts.phase_cpu;
    let idle = &bursts.idle;
    let window = bursts.window.as_secs_f64();
    let per_1k = |v: f64| v * 1000.0 / total_ok.max(1) as f64;
    println!(
        "\n### 4. CPU per 1,000 new clients (the bursts of 2.: {total_ok} new clients; CPU-ms per 1,000 new clients)\n"
    );
    println!(
        "| process | role | bursts' windows: utime+stime | windows: threads' schedstat | windows: schedstat less idle | whole phase, flushes included: utime+stime | whole phase: schedstat | idle ms/s (utime+stime / schedstat) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (n, (name, role)) in [
        ("sticky-lb node 1", "placed them (events, claims)"),
        ("sticky-lb node 2", "learned them (pub/sub, map writes)"),
        ("redis-server", "store"),
    ]
    .iter()
    .enumerate()
    {
        println!(
            "| {name} | {role} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} / {:.2} |",
            per_1k(cpu[n].stat_ms),
            per_1k(cpu[n].sched_ms),
            per_1k(cpu[n].sched_ms - idle[n].sched_ms_per_s * window),
            per_1k(phase_cpu[n].stat_ms),
            per_1k(phase_cpu[n].sched_ms),
            idle[n].stat_ms_per_s,
            idle[n].sched_ms_per_s,
        );
    }
    println!(
        "\nA burst's window runs from just before its first connection to {} ms after node 2 had every client (the trailing work inside); the {} windows add up to {:.2} s. The whole phase ({:.1} s) runs from before the first flush to the end of the last window: it adds the flushes between bursts (two `table flush` requests, their SCAN/DEL and messages, a FLUSHALL) and the waits. utime+stime: `/proc/PID/stat`, in clock ticks of {:.0} ms, so each window's figure is within a tick; schedstat: the run time of each thread (`/proc/PID/task/TID/schedstat`, ns; a thread that ends inside a window is missed). \"Less idle\" subtracts the process's rate in a {} s window with empty tables and no traffic (its timers, mostly the sweep, which walks the hash maps whole), times the windows' length. The data path's own work (XDP, in softirq) is in no process's figure.",
        CPU_TAIL.as_millis(),
        bursts.bursts.len(),
        window,
        bursts.phase.as_secs_f64(),
        1000.0 / clock_ticks(),
        IDLE_WINDOW.as_secs()
    );

    println!("\n### Shared-table counters over the whole run (from each node's /metrics)\n");
    if let Some((_, first)) = report.counters.first() {
        println!(
            "| node | {} |",
            first
                .iter()
                .map(|(l, _)| *l)
                .collect::<Vec<_>>()
                .join(" | ")
        );
        println!("|---|{}", "---:|".repeat(first.len()));
        for (node, row) in &report.counters {
            println!(
                "| {node} | {} |",
                row.iter()
                    .map(|(_, v)| format!("{v:.0}"))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
    }
    println!(
        "\nmachine: {}, {} CPUs, kernel {}",
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned()))
            .unwrap_or_default(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
}
