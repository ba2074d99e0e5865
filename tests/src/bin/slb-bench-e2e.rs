//! End-to-end benchmark: short TCP connections per second, keep-alive requests per second, p50
//! and p99 latency, and whole-machine CPU-seconds per 1,000 connections (or requests), through
//! sticky-lb (DSR in native and generic XDP, NAT and full NAT in native XDP), nftables DNAT
//! (with SNAT, and alone with the backends' route back via the balancer), nftables netdev L2
//! DSR, HAProxy, and no balancer at all, in one rig and one run. A section of its own puts
//! sticky-lb's NAT and full NAT next to the nftables set-ups that translate the same way.
//!
//! One rig (3 backends, 256 client addresses) and one set of backend HTTP servers serve every
//! balancer. A round starts each balancer in turn (the order rotates from round to round, so a
//! slow drift of the machine does not always hit the same one), checks it end to end, measures
//! short connections and then keep-alive requests, and tears it down completely before the next
//! one. Every figure is the median over the rounds; every ratio to "none" is taken within a round
//! and then the median of those ratios is reported.
//!
//! Then, unless `SLB_BENCH_PPS=0`, a packet-rate run: BPF_PROG_TEST_RUN's XDP live-frames mode
//! sends SYNs from the 256 client addresses through the running sticky-lb program and through a
//! two-instruction XDP_TX program on the same interface.
//!
//! Environment: `SLB_BENCH_RUNS` (rounds, default 5), `SLB_BENCH_SECONDS` (measured seconds per
//! mode, default 3), `SLB_BENCH_THREADS` (client threads, default 32), `SLB_BENCH_PPS` (0 skips
//! the packet-rate run), `SLB_BENCH_E2E` (0 skips the end-to-end part), `SLB_BENCH_KINDS`
//! (comma-separated keys of the balancers to measure, e.g. `sticky-lb-nat,nft-nat`; `none`, the
//! ceiling, is always measured; default all), `STICKY_LB_BIN` (the sticky-lb binary; default:
//! next to this one).
//! Markdown to stdout, progress to stderr, JSON to target/bench/e2e.json.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sticky_lb_tests::{
    balancer::ScratchDir,
    loadgen::{
        balancers::{self, BackendRole, Backends, Kind, PORT},
        client::{self, LoadResult, LoadSpec, Mode, ThreadPlan},
        command::{self, in_ns},
        live_frames, median,
        server::HttpBackend,
    },
    netns::{in_netns, require_root, unique_tag},
    packet::Frame,
    rig::{Rig, RigOptions},
};

const BACKENDS: usize = 3;
const CLIENT_ADDRESSES: usize = 256;
/// Worker threads per backend server: above the client concurrency, so even if a hash sends
/// every kept-alive connection to one backend, each still gets a worker.
const SERVER_WORKERS: usize = 64;
/// Load before each measured window.
const WARMUP: Duration = Duration::from_millis(500);
/// Bound on each socket operation of the load generator.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on requests per client thread per second of run (far above what the rig does).
const MAX_REQUESTS_PER_THREAD_SECOND: f64 = 100_000.0;
/// Short requests of the sanity check, from as many client addresses.
const SANITY_PROBES: usize = 24;
/// Quiet time between two measurements (TIME_WAIT timers, softirq backlog).
const SETTLE: Duration = Duration::from_millis(500);
/// Packet-rate run: frames per run (spread over the client addresses), batch size, deadline.
const PPS_FRAMES: u32 = 1 << 20;
const PPS_BATCH: u32 = 64;
const PPS_RUN_DEADLINE: Duration = Duration::from_secs(30);
/// Frames per source address in the delivery check before the rate runs.
const PPS_CHECK_PER_SOURCE: u32 = 16;
/// A port nothing listens on: backends answer the live frames' SYNs with a cheap RST.
const PPS_PORT: u16 = 9;

/// Settings from the environment.
struct Settings {
    runs: usize,
    seconds: f64,
    threads: usize,
    pps: bool,
    e2e: bool,
    /// The balancers measured, in [`Kind::ALL`]'s order; `none` always among them.
    kinds: Vec<Kind>,
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
            runs: var("SLB_BENCH_RUNS", 5usize)?,
            seconds: var("SLB_BENCH_SECONDS", 3.0f64)?,
            threads: var("SLB_BENCH_THREADS", 32usize)?,
            pps: var("SLB_BENCH_PPS", 1u8)? != 0,
            e2e: var("SLB_BENCH_E2E", 1u8)? != 0,
            kinds: kinds_from_env()?,
        };
        if settings.runs == 0 || !(0.1..=600.0).contains(&settings.seconds) {
            bail!("SLB_BENCH_RUNS must be at least 1 and SLB_BENCH_SECONDS within 0.1..=600");
        }
        if !(1..=CLIENT_ADDRESSES).contains(&settings.threads) {
            bail!("SLB_BENCH_THREADS must be within 1..={CLIENT_ADDRESSES}");
        }
        Ok(settings)
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }
}

/// `SLB_BENCH_KINDS`: the balancers asked for, plus `none` (every ratio needs it).
fn kinds_from_env() -> Result<Vec<Kind>> {
    let Ok(text) = std::env::var("SLB_BENCH_KINDS") else {
        return Ok(Kind::ALL.to_vec());
    };
    let mut asked = vec![Kind::Direct];
    for key in text.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        let Some(kind) = Kind::from_key(key) else {
            let known: Vec<&str> = Kind::ALL.iter().map(|k| k.key()).collect();
            bail!(
                "SLB_BENCH_KINDS: unknown balancer {key:?} (known: {})",
                known.join(", ")
            );
        };
        asked.push(kind);
    }
    Ok(Kind::ALL
        .into_iter()
        .filter(|kind| asked.contains(kind))
        .collect())
}

/// One mode's figures from one measurement.
#[derive(Clone, Debug)]
struct Figures {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_per_1k: f64,
    utilisation: f64,
    completed: u64,
    errors: u64,
    first_error: Option<String>,
}

impl From<&LoadResult> for Figures {
    fn from(r: &LoadResult) -> Figures {
        Figures {
            rate: r.rate(),
            p50_ms: r.latency_ms(0.50),
            p99_ms: r.latency_ms(0.99),
            cpu_per_1k: r.cpu_seconds_per_1k(),
            utilisation: r.cpu.utilisation,
            completed: r.completed,
            errors: r.errors,
            first_error: r.first_error.clone(),
        }
    }
}

impl Figures {
    fn json(&self) -> Value {
        json!({
            "rate_per_s": self.rate,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "cpu_s_per_1k": self.cpu_per_1k,
            "cpu_utilisation": self.utilisation,
            "completed": self.completed,
            "errors": self.errors,
            "first_error": self.first_error,
        })
    }
}

/// One balancer's measurement in one round.
struct Measurement {
    round: usize,
    spread: BTreeMap<String, usize>,
    short: Figures,
    keepalive: Figures,
}

/// Everything measured for one balancer.
struct Row {
    kind: Kind,
    measurements: Vec<Measurement>,
    failures: Vec<(usize, String)>,
}

fn main() {
    require_root();
    install_signal_handlers();
    if let Err(err) = run() {
        eprintln!("slb-bench-e2e: {err:#}");
        std::process::exit(1);
    }
}

/// SIGINT/SIGTERM only raise the load generator's stop flag: the run then ends with an error at
/// the next check and every namespace, process and table is removed on the way out.
fn install_signal_handlers() {
    extern "C" fn on_signal(_: libc::c_int) {
        // An atomic store is async-signal-safe.
        client::STOP.store(true, Ordering::Relaxed);
    }
    let handler = on_signal as extern "C" fn(libc::c_int);
    // SAFETY: installing a handler that only performs an atomic store.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

fn interrupted() -> Result<()> {
    if client::STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn run() -> Result<()> {
    let settings = Settings::from_env()?;
    let sticky_lb = sticky_lb_tests::balancer::locate_from_bench()?;
    let machine = machine();
    eprintln!(
        "slb-bench-e2e: {} rounds x {} s per mode, {} client threads, sticky-lb {}, balancers {}",
        settings.runs,
        settings.seconds,
        settings.threads,
        sticky_lb.display(),
        settings
            .kinds
            .iter()
            .map(|k| k.key())
            .collect::<Vec<_>>()
            .join(",")
    );

    let tag = unique_tag("e2e");
    // Declaration order is the reverse of drop order: the rig (namespaces) goes last, after the
    // servers and the scratch directory; balancers live inside `measure` and go first.
    let rig = Rig::build(
        RigOptions::new(&tag)
            .backends(BACKENDS)
            .clients(CLIENT_ADDRESSES),
    )
    .context("building the rig")?;
    let scratch = ScratchDir::new(&tag);
    let servers = (1..=BACKENDS)
        .map(|k| {
            HttpBackend::start(
                rig.backend_ns(k),
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
                &format!("b{k}"),
                SERVER_WORKERS,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    eprintln!("slb-bench-e2e: rig {} ready", rig.tag());

    // The backends' state for the balancer being measured (DSR as the rig built them, or NAT).
    let mut backends = Backends::new();
    let mut rows: Vec<Row> = settings
        .kinds
        .iter()
        .map(|&kind| Row {
            kind,
            measurements: Vec::new(),
            failures: Vec::new(),
        })
        .collect();
    let started = Instant::now();
    let rounds = if settings.e2e { settings.runs } else { 0 };
    for round in 0..rounds {
        for i in 0..rows.len() {
            // Rotate the order so each balancer runs early in some rounds and late in others.
            let count = rows.len();
            let row = &mut rows[(i + round) % count];
            interrupted()?;
            // Fatal if it fails: the backends would be in no known state for anything else.
            backends
                .prepare(&rig, row.kind.backend_role())
                .with_context(|| format!("preparing the backends for {}", row.kind.key()))?;
            eprintln!(
                "[round {}/{}] {}: starting",
                round + 1,
                settings.runs,
                row.kind.key()
            );
            match measure(row.kind, round, &rig, scratch.path(), &settings)? {
                Ok(m) => {
                    eprintln!(
                        "[round {}/{}] {}: short {:.0} conn/s (p50 {:.2} ms, p99 {:.2} ms, {:.3} CPU-s/1k, {} errors); keep-alive {:.0} req/s (p50 {:.3} ms, p99 {:.3} ms, {:.3} CPU-s/1k, {} errors); backends {:?}",
                        round + 1,
                        settings.runs,
                        row.kind.key(),
                        m.short.rate,
                        m.short.p50_ms,
                        m.short.p99_ms,
                        m.short.cpu_per_1k,
                        m.short.errors,
                        m.keepalive.rate,
                        m.keepalive.p50_ms,
                        m.keepalive.p99_ms,
                        m.keepalive.cpu_per_1k,
                        m.keepalive.errors,
                        m.spread,
                    );
                    row.measurements.push(m);
                }
                Err(err) => {
                    interrupted()?;
                    eprintln!(
                        "[round {}/{}] {}: FAILED: {err:#}",
                        round + 1,
                        settings.runs,
                        row.kind.key()
                    );
                    row.failures.push((round, format!("{err:#}")));
                }
            }
            std::thread::sleep(SETTLE);
        }
    }
    let e2e_seconds = started.elapsed().as_secs_f64();
    let served: Vec<(String, u64, u64)> = servers
        .iter()
        .map(|s| (s.name().to_owned(), s.connections(), s.requests()))
        .collect();

    let pps = if settings.pps {
        interrupted()?;
        // The packet-rate run forwards by DSR.
        backends.prepare(&rig, BackendRole::Dsr)?;
        match packet_rate(&rig, scratch.path(), settings.runs) {
            Ok(report) => Some(Ok(report)),
            Err(err) => {
                interrupted()?;
                eprintln!("packet rate: FAILED: {err:#}");
                Some(Err(format!("{err:#}")))
            }
        }
    } else {
        None
    };

    print_report(&rows, pps.as_ref(), &machine, &settings);
    let json = json!({
        "machine": machine,
        "settings": {
            "runs": settings.runs,
            "seconds": settings.seconds,
            "warmup_seconds": WARMUP.as_secs_f64(),
            "client_threads": settings.threads,
            "client_addresses": CLIENT_ADDRESSES,
            "backends": BACKENDS,
            "server_workers_per_backend": SERVER_WORKERS,
        },
        "balancers": rows.iter().map(|row| row_json(row, &rows)).collect::<Vec<_>>(),
        "backend_servers": served.iter().map(|(name, conns, reqs)| json!({"name": name, "connections": conns, "requests": reqs})).collect::<Vec<_>>(),
        "end_to_end_seconds": e2e_seconds,
        "packet_rate": match &pps {
            None => json!({"skipped": "SLB_BENCH_PPS=0"}),
            Some(Err(err)) => json!({"failed": err}),
            Some(Ok(report)) => report.json(),
        },
    });
    // tests/ -> the workspace root's target/bench, like slb-bench.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("e2e.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    eprintln!("slb-bench-e2e: wrote {}", path.display());
    drop(servers);
    Ok(())
}

/// Starts `kind`, checks it, measures both modes, stops it (checking it is gone). The outer
/// error is fatal: the balancer could not be removed, so the rig is in no state to measure the
/// next one. The inner error only fails this balancer's round.
fn measure(
    kind: Kind,
    round: usize,
    rig: &Rig,
    scratch: &std::path::Path,
    settings: &Settings,
) -> Result<Result<Measurement>> {
    let running = match balancers::start(kind, rig, scratch) {
        Ok(running) => running,
        // Whatever was set up before the failure was removed when `start` dropped it.
        Err(err) => return Ok(Err(err)),
    };
    let outcome = (|| -> Result<Measurement> {
        let spread = balancers::sanity(kind, rig, SANITY_PROBES)?;
        let short = client::run(&load_spec(kind, Mode::Short, rig, settings))?;
        std::thread::sleep(SETTLE);
        let keepalive = client::run(&load_spec(kind, Mode::KeepAlive, rig, settings))?;
        for (mode, result) in [("short", &short), ("keep-alive", &keepalive)] {
            if result.completed == 0 {
                bail!(
                    "{mode}: nothing completed; first error: {}",
                    result.first_error.as_deref().unwrap_or("none")
                );
            }
        }
        Ok(Measurement {
            round,
            spread,
            short: Figures::from(&short),
            keepalive: Figures::from(&keepalive),
        })
    })();
    // Stopped and checked on success and failure alike.
    running.stop()?;
    Ok(outcome)
}

/// Thread `t` gets client addresses t, t + threads, t + 2 * threads, ... (used in turn), and
/// without a balancer one backend, round-robin by thread.
fn load_spec(kind: Kind, mode: Mode, rig: &Rig, settings: &Settings) -> LoadSpec {
    let clients = rig.client_addrs();
    let threads = (0..settings.threads)
        .map(|t| ThreadPlan {
            sources: clients
                .iter()
                .skip(t)
                .step_by(settings.threads)
                .map(|&a| IpAddr::from(a))
                .collect(),
            target: kind.target(rig, t),
        })
        .collect();
    let seconds = WARMUP.as_secs_f64() + settings.seconds;
    LoadSpec {
        ns: rig.client_ns().to_owned(),
        mode,
        threads,
        warmup: WARMUP,
        duration: settings.duration(),
        op_timeout: OP_TIMEOUT,
        max_requests_per_thread: (seconds * MAX_REQUESTS_PER_THREAD_SECOND) as u64,
    }
}

// ---------------------------------------------------------------------------------------------
// Packet rate (XDP live frames)
// ---------------------------------------------------------------------------------------------

/// One program's packet-rate runs.
struct PpsProgram {
    name: &'static str,
    /// Kernel-measured nanoseconds per frame, one per run.
    ns_per_frame: Vec<f64>,
    /// Frames per wall-clock second of the whole run (syscalls included), one per run.
    wall_pps: Vec<f64>,
    /// Share of the frames that reached the peer's XDP sink, one per run.
    reached: Vec<f64>,
    /// Share of the frames of the delivery check that arrived at the backends.
    delivered: f64,
    retval: u32,
}

impl PpsProgram {
    fn new(name: &'static str) -> PpsProgram {
        PpsProgram {
            name,
            ns_per_frame: Vec::new(),
            wall_pps: Vec::new(),
            reached: Vec::new(),
            delivered: f64::NAN,
            retval: 0,
        }
    }

    fn json(&self) -> Value {
        json!({
            "program": self.name,
            "ns_per_frame_median": median(self.ns_per_frame.iter().copied()),
            "mpps_median": median(self.ns_per_frame.iter().map(|ns| 1e3 / ns)),
            "wall_mpps_median": median(self.wall_pps.iter().map(|pps| pps / 1e6)),
            "reached_peer_median": median(self.reached.iter().copied()),
            "delivered_to_backends_in_check": self.delivered,
            "last_retval": self.retval,
            "ns_per_frame_runs": self.ns_per_frame,
        })
    }
}

struct PpsReport {
    frames_per_run: u32,
    noop: PpsProgram,
    sticky: PpsProgram,
}

impl PpsReport {
    fn json(&self) -> Value {
        json!({
            "mode": "BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES, ingress lb0 (sticky-lb running native), XDP_DROP sink on the veth peer",
            "frames_per_run": self.frames_per_run,
            "batch_size": PPS_BATCH,
            "sources": CLIENT_ADDRESSES,
            "xdp_tx_noop": self.noop.json(),
            "sticky_lb": self.sticky.json(),
            "rate_ratio_sticky_to_noop_median": ratios(&self.sticky.ns_per_frame, &self.noop.ns_per_frame, |s, n| n / s),
        })
    }
}

/// Median over runs of `f(a[i], b[i])`.
fn ratios(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> Option<f64> {
    median(a.iter().zip(b).map(|(&a, &b)| f(a, b)))
}

/// One pass of live frames: each frame `per_source` times, as received on `ifindex` of the
/// balancer namespace. Returns (frames sent, kernel ns per frame, wall seconds, last retval).
fn live_pass(
    rig: &Rig,
    program: &impl AsFd,
    ifindex: u32,
    frames: &[Vec<u8>],
    per_source: u32,
) -> Result<(u64, f64, f64, u32)> {
    let started = Instant::now();
    // The kernel resolves the ingress ifindex in the calling thread's namespace.
    let (sent, weighted_ns, retval) = in_netns(rig.lb_ns(), || -> Result<(u64, f64, u32)> {
        let (mut sent, mut weighted_ns, mut retval) = (0u64, 0.0, 0);
        for (i, frame) in frames.iter().enumerate() {
            // Bounded by the frame count, and by time should the machine crawl.
            if started.elapsed() > PPS_RUN_DEADLINE || client::STOP.load(Ordering::Relaxed) {
                break;
            }
            let r = live_frames::run_live(program, ifindex, frame, per_source, PPS_BATCH)
                .with_context(|| {
                    format!("frame {i}, repeat {per_source}, {sent} frames sent before")
                })?;
            sent += u64::from(per_source);
            weighted_ns += r.per_frame.as_nanos() as f64 * f64::from(per_source);
            retval = r.retval;
        }
        Ok((sent, weighted_ns, retval))
    })?;
    if sent == 0 {
        bail!("no frames sent");
    }
    Ok((
        sent,
        weighted_ns / sent as f64,
        started.elapsed().as_secs_f64(),
        retval,
    ))
}

/// Live-frames SYNs from every client address to VIP:[`PPS_PORT`] through the program of a
/// running native sticky-lb, and through an XDP_TX no-op, alternating run by run. First a small
/// delivery check with the usual XDP_PASS peer (frames must arrive at the backends), then the
/// rate runs with an XDP_DROP sink on the peer.
fn packet_rate(rig: &Rig, scratch: &std::path::Path, runs: usize) -> Result<PpsReport> {
    eprintln!("packet rate: starting sticky-lb (native) with a service on port {PPS_PORT}");
    let mut running = balancers::start_sticky_with_ports(rig, scratch, true, &[PORT, PPS_PORT])?;
    balancers::sanity(Kind::StickyNative, rig, SANITY_PROBES)?;
    let link = sticky_lb::dataplane::PinDir::new(Some(rig.lb_ns()), rig.lb_dev()).link();
    let sticky_prog = live_frames::program_of_pinned_link(&link)?;
    let noop_prog = live_frames::load_xdp_action(live_frames::XDP_TX, "xdp_tx_noop")?;
    let sink_prog = live_frames::load_xdp_action(live_frames::XDP_DROP, "xdp_drop_sink")?;
    let lb_ifindex = ifindex(rig.lb_ns(), rig.lb_dev())?;
    let (bridge_ns, peer_dev) = rig.bridge_peer_of_lb();
    let peer_ifindex = ifindex(bridge_ns, peer_dev)?;

    let clients = rig.client_addrs();
    let per_source = PPS_FRAMES / clients.len() as u32;
    // sticky-lb gets what a client sends; the no-op gets frames already rewritten the way
    // sticky-lb would (backend MAC, balancer's source MAC), spread over the backends alike.
    let frame = |i: usize, to_backend: bool| {
        let mut f = Frame::tcp_syn(clients[i], rig.vip(), PPS_PORT);
        if to_backend {
            f.dst_mac = rig.backend_mac(i % rig.backend_count() + 1);
            f.src_mac = rig.lb_mac();
        } else {
            f.dst_mac = rig.lb_mac();
            f.src_mac = rig.client_mac();
        }
        f.build()
    };
    let sticky_frames: Vec<Vec<u8>> = (0..clients.len()).map(|i| frame(i, false)).collect();
    let noop_frames: Vec<Vec<u8>> = (0..clients.len()).map(|i| frame(i, true)).collect();
    let mut noop = PpsProgram::new("XDP_TX no-op");
    let mut sticky = PpsProgram::new("sticky-lb");

    // Delivery check: a few frames per source through the real path to the backends.
    for (program, fd, frames) in [
        (&mut noop, noop_prog.as_fd(), &noop_frames),
        (&mut sticky, sticky_prog.as_fd(), &sticky_frames),
    ] {
        let before = backend_rx_packets(rig)?;
        let (sent, ..) = live_pass(rig, &fd, lb_ifindex, frames, PPS_CHECK_PER_SOURCE)?;
        // Frames still crossing the bridge arrive within milliseconds.
        std::thread::sleep(Duration::from_millis(300));
        let arrived = backend_rx_packets(rig)?.saturating_sub(before);
        program.delivered = arrived as f64 / sent as f64;
        eprintln!(
            "packet rate: {} delivery check: {arrived} of {sent} frames reached the backends",
            program.name
        );
    }

    // Rate runs: the peer drops every frame in its XDP hook, so only the sending side is timed.
    running.detach_peer_xdp();
    let sink = in_netns(bridge_ns, || {
        live_frames::attach_xdp_native(&sink_prog, peer_ifindex)
    })?;
    for run in 0..runs {
        for (program, fd, frames) in [
            (&mut noop, noop_prog.as_fd(), &noop_frames),
            (&mut sticky, sticky_prog.as_fd(), &sticky_frames),
        ] {
            interrupted()?;
            let before = peer_xdp_packets(bridge_ns, peer_dev)?;
            let (sent, ns, wall, retval) = live_pass(rig, &fd, lb_ifindex, frames, per_source)?;
            std::thread::sleep(Duration::from_millis(50));
            let reached =
                peer_xdp_packets(bridge_ns, peer_dev)?.saturating_sub(before) as f64 / sent as f64;
            eprintln!(
                "[pps run {}/{runs}] {}: {ns:.1} ns/frame ({:.2} Mpps kernel time, {:.2} Mpps wall), {:.1}% reached the peer, retval {retval}",
                run + 1,
                program.name,
                1e3 / ns,
                sent as f64 / wall / 1e6,
                reached * 100.0
            );
            program.ns_per_frame.push(ns);
            program.wall_pps.push(sent as f64 / wall);
            program.reached.push(reached);
            program.retval = retval;
        }
    }
    drop(sink);
    running.stop()?;
    Ok(PpsReport {
        frames_per_run: per_source * clients.len() as u32,
        noop,
        sticky,
    })
}

/// The ifindex of `dev` in namespace `ns`.
fn ifindex(ns: &str, dev: &str) -> Result<u32> {
    let out = in_ns(ns, &["ip", "-j", "link", "show", "dev", dev], None)?;
    let index = serde_json::from_str::<Value>(&out)?[0]["ifindex"]
        .as_u64()
        .with_context(|| format!("no ifindex for {dev} in {ns}"))?;
    Ok(index as u32)
}

/// Frames the veth `dev` has run through its XDP program so far (all queues).
fn peer_xdp_packets(ns: &str, dev: &str) -> Result<u64> {
    let out = in_ns(ns, &["ethtool", "-S", dev], None)?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter(|(name, _)| name.starts_with("rx_queue_") && name.ends_with("_xdp_packets"))
        .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
        .sum())
}

/// Frames received by all backends' eth0 so far.
fn backend_rx_packets(rig: &Rig) -> Result<u64> {
    let mut total = 0;
    for k in 1..=rig.backend_count() {
        let out = in_ns(
            rig.backend_ns(k),
            &["ip", "-j", "-s", "link", "show", "dev", "eth0"],
            None,
        )?;
        let v: Value = serde_json::from_str(&out)?;
        total += v[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .context("no rx packet count")?;
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// Per-round ratio `row / base` of `value` (base: "none", or an nftables peer), then the
/// median over the rounds both have.
fn ratio_to(row: &Row, base: &Row, value: impl Fn(&Measurement) -> f64) -> Option<f64> {
    let base: BTreeMap<usize, f64> = base
        .measurements
        .iter()
        .map(|m| (m.round, value(m)))
        .collect();
    median(
        row.measurements
            .iter()
            .filter_map(|m| base.get(&m.round).map(|b| value(m) / b)),
    )
}

fn med(row: &Row, value: impl Fn(&Measurement) -> f64) -> Option<f64> {
    median(row.measurements.iter().map(value))
}

fn fmt(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "–".to_owned(),
    }
}

fn print_report(
    rows: &[Row],
    pps: Option<&Result<PpsReport, String>>,
    machine: &Value,
    settings: &Settings,
) {
    let none = find_row(rows, Kind::Direct).expect("the none row");
    if settings.e2e {
        println!(
            "## End to end: {} client threads over {} client addresses, {} backends, median of {} rounds of {} s per mode\n",
            settings.threads, CLIENT_ADDRESSES, BACKENDS, settings.runs, settings.seconds
        );
        println!(
            "| balancer | short conn/s | × none | p50 ms | p99 ms | CPU-s / 1k conn | keep-alive req/s | × none | p50 ms | p99 ms | CPU-s / 1k req |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in rows {
            if row.measurements.is_empty() {
                println!(
                    "| {} | failed: {} | | | | | | | | | |",
                    row.kind.label(),
                    failure_cell(row)
                );
                continue;
            }
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row.kind.label(),
                fmt(med(row, |m| m.short.rate), 0),
                fmt(ratio_to(row, none, |m| m.short.rate), 2),
                fmt(med(row, |m| m.short.p50_ms), 2),
                fmt(med(row, |m| m.short.p99_ms), 2),
                fmt(med(row, |m| m.short.cpu_per_1k), 3),
                fmt(med(row, |m| m.keepalive.rate), 0),
                fmt(ratio_to(row, none, |m| m.keepalive.rate), 2),
                fmt(med(row, |m| m.keepalive.p50_ms), 3),
                fmt(med(row, |m| m.keepalive.p99_ms), 3),
                fmt(med(row, |m| m.keepalive.cpu_per_1k), 3),
            );
        }
        println!();
        println!(
            "CPU-s per 1k is whole-machine busy time (user+nice+system+irq+softirq+steal from /proc/stat) over the measured window, load generator and backends included. × none is the ratio to no balancer within the same round, median over rounds."
        );
        let mut notes = Vec::new();
        for row in rows {
            if !row.failures.is_empty() {
                notes.push(format!(
                    "{}: {} of {} rounds failed (first: {})",
                    row.kind.key(),
                    row.failures.len(),
                    settings.runs,
                    row.failures[0].1
                ));
            }
            let errors: u64 = row
                .measurements
                .iter()
                .map(|m| m.short.errors + m.keepalive.errors)
                .sum();
            if errors > 0 {
                let first = row
                    .measurements
                    .iter()
                    .find_map(|m| {
                        m.short
                            .first_error
                            .clone()
                            .or(m.keepalive.first_error.clone())
                    })
                    .unwrap_or_default();
                notes.push(format!(
                    "{}: {errors} failed requests over all rounds (first: {first})",
                    row.kind.key()
                ));
            }
        }
        if !notes.is_empty() {
            println!();
            for note in notes {
                println!("- {note}");
            }
        }
        print_nat_section(rows, none, settings);
    } else {
        println!("## End to end: skipped (SLB_BENCH_E2E=0)");
    }

    match pps {
        None => {}
        Some(Err(err)) => println!("\n## Packet rate (XDP live frames)\n\nfailed: {err}"),
        Some(Ok(report)) => {
            println!(
                "\n## Packet rate (BPF_PROG_TEST_RUN, XDP live frames, ingress lb0, {} frames per run, batch {PPS_BATCH}, median of {} runs)\n",
                report.frames_per_run, settings.runs
            );
            println!(
                "| program | ns / frame | Mpps | × no-op rate | reached the peer | delivered to backends (check) |"
            );
            println!("|---|---:|---:|---:|---:|---:|");
            for p in [&report.noop, &report.sticky] {
                println!(
                    "| {} | {} | {} | {} | {}% | {}% |",
                    p.name,
                    fmt(median(p.ns_per_frame.iter().copied()), 1),
                    fmt(median(p.ns_per_frame.iter().map(|ns| 1e3 / ns)), 2),
                    fmt(
                        ratios(&p.ns_per_frame, &report.noop.ns_per_frame, |p, n| n / p),
                        2
                    ),
                    fmt(median(p.reached.iter().map(|r| r * 100.0)), 1),
                    fmt(Some(p.delivered * 100.0), 1),
                );
            }
            println!(
                "\nns / frame is the kernel's own timing of the live-frames run: the program, the XDP transmit into lb0's veth peer and the peer's XDP_DROP sink (softirq on the same CPU). Mpps = 1000 / ns. Wall-clock rates (in the JSON) also count each call's set-up, which the kernel's timing leaves out; they are not comparable between the programs. The delivery check sent {PPS_CHECK_PER_SOURCE} frames per source with the normal XDP_PASS peer and counted them at the backends' eth0."
            );
        }
    }
    println!(
        "\nmachine: {}, {} CPUs, kernel {}; {}; {}",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["haproxy"].as_str().unwrap_or("?"),
        machine["nft"].as_str().unwrap_or("?"),
    );
}

fn find_row(rows: &[Row], kind: Kind) -> Option<&Row> {
    rows.iter().find(|r| r.kind == kind)
}

/// NAT side by side: the ceiling, then each of sticky-lb's NAT modes next to the nftables
/// set-up that translates the same way, on the same backends (in the same state), clients and
/// windows. The ratios are taken within each round, then the median over rounds.
fn print_nat_section(rows: &[Row], none: &Row, settings: &Settings) {
    let pairs: Vec<(&Row, Option<&Row>)> = [Kind::StickyNat, Kind::StickyFullNat]
        .into_iter()
        .filter_map(|kind| find_row(rows, kind))
        .map(|row| (row, row.kind.nft_peer().and_then(|p| find_row(rows, p))))
        .collect();
    let lone_peers: Vec<&Row> = [Kind::NftNat, Kind::NftDnat]
        .into_iter()
        .filter_map(|kind| find_row(rows, kind))
        .filter(|peer| {
            !pairs
                .iter()
                .any(|(_, p)| p.is_some_and(|p| p.kind == peer.kind))
        })
        .collect();
    if pairs.is_empty() && lone_peers.is_empty() {
        return;
    }
    println!(
        "\n## NAT side by side: sticky-lb (native XDP) and nftables, unmodified backends, median of {} rounds of {} s per mode\n",
        settings.runs, settings.seconds
    );
    println!(
        "| balancer | backends | short conn/s | × none | × nft | CPU-ms / conn | × none | × nft | p99 ms | keep-alive req/s | × none | × nft | CPU-ms / req |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let line = |row: &Row, peer: Option<&Row>| {
        if row.measurements.is_empty() {
            println!(
                "| {} | | failed: {} | | | | | | | | | | |",
                row.kind.label(),
                failure_cell(row)
            );
            return;
        }
        let to_peer = |value: fn(&Measurement) -> f64, decimals| {
            peer.map_or("".to_owned(), |p| fmt(ratio_to(row, p, value), decimals))
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.kind.label(),
            match row.kind.backend_role() {
                BackendRole::Dsr => "VIP on lo",
                BackendRole::Nat => "route back via the balancer",
                BackendRole::FullNat => "unmodified",
            },
            fmt(med(row, |m| m.short.rate), 0),
            fmt(ratio_to(row, none, |m| m.short.rate), 2),
            to_peer(|m| m.short.rate, 2),
            fmt(med(row, |m| m.short.cpu_per_1k), 3),
            fmt(ratio_to(row, none, |m| m.short.cpu_per_1k), 2),
            to_peer(|m| m.short.cpu_per_1k, 2),
            fmt(med(row, |m| m.short.p99_ms), 2),
            fmt(med(row, |m| m.keepalive.rate), 0),
            fmt(ratio_to(row, none, |m| m.keepalive.rate), 2),
            to_peer(|m| m.keepalive.rate, 2),
            fmt(med(row, |m| m.keepalive.cpu_per_1k), 3),
        );
    };
    line(none, None);
    for (row, peer) in &pairs {
        line(row, *peer);
        if let Some(peer) = peer {
            line(peer, None);
        }
    }
    for peer in lone_peers {
        line(peer, None);
    }
    println!(
        "\nNAT: the balancer rewrites the destination (VIP:80 to a backend), the backends route their answers to the clients via the balancer, which translates them back (sticky-lb in XDP, nftables in conntrack). Full NAT: the source becomes the balancer's address too (sticky-lb: a port of its own per backend; nftables: SNAT), so the backends need no route. Backends in both: no VIP on lo. × nft is sticky-lb over the nftables set-up of the same kind (DNAT for NAT, DNAT + SNAT for full NAT), within each round, median over rounds. CPU-ms per connection (= CPU-s per 1k) is the whole machine's busy time over the window (load generator and backends included); with all CPUs busy it mostly mirrors the rate, so compare it between rows rather than read it as the balancer's own cost."
    );
}

fn row_json(row: &Row, rows: &[Row]) -> Value {
    let none = find_row(rows, Kind::Direct).expect("the none row");
    let peer = row.kind.nft_peer().and_then(|kind| find_row(rows, kind));
    let mode = |figures: fn(&Measurement) -> &Figures| {
        json!({
            "rate_per_s": med(row, |m| figures(m).rate),
            "rate_ratio_to_nft_peer": peer.and_then(|p| ratio_to(row, p, |m| figures(m).rate)),
            "cpu_per_1k_ratio_to_nft_peer": peer.and_then(|p| ratio_to(row, p, |m| figures(m).cpu_per_1k)),
            "rate_ratio_to_none": ratio_to(row, none, |m| figures(m).rate),
            "cpu_per_1k_ratio_to_none": ratio_to(row, none, |m| figures(m).cpu_per_1k),
            "p50_ms": med(row, |m| figures(m).p50_ms),
            "p99_ms": med(row, |m| figures(m).p99_ms),
            "cpu_s_per_1k": med(row, |m| figures(m).cpu_per_1k),
            "cpu_utilisation": med(row, |m| figures(m).utilisation),
        })
    };
    json!({
        "key": row.kind.key(),
        "label": row.kind.label(),
        "nft_peer": row.kind.nft_peer().map(|k| k.key()),
        "backends": format!("{:?}", row.kind.backend_role()),
        "rounds_ok": row.measurements.len(),
        "failures": row.failures.iter().map(|(round, e)| json!({"round": round + 1, "error": e})).collect::<Vec<_>>(),
        "short": mode(|m| &m.short),
        "keepalive": mode(|m| &m.keepalive),
        "per_round": row.measurements.iter().map(|m| json!({
            "round": m.round + 1,
            "sanity_spread": m.spread,
            "short": m.short.json(),
            "keepalive": m.keepalive.json(),
        })).collect::<Vec<_>>(),
    })
}

/// The machine the figures come from.
fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let first_line = |program: &str, arg: &str| {
        command::run(std::process::Command::new(program).arg(arg), None)
            .map(|out| out.lines().next().unwrap_or("").trim().to_owned())
            .unwrap_or_default()
    };
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel,
        "haproxy": first_line("haproxy", "-v"),
        "nft": first_line("nft", "--version"),
    })
}

/// Why a row has no measurements, fit for a markdown table cell.
fn failure_cell(row: &Row) -> String {
    let why = row
        .failures
        .first()
        .map(|(_, e)| e.as_str())
        .unwrap_or("not run");
    why.replace('|', "/").replace('\n', " ")
}
