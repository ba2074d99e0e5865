//! HTTP benchmark: cookie persistence in HAProxy, nginx and sticky-lb (`mode: http`), side by
//! side on the same backends and the same load, in one rig and one run: requests per second, p50
//! and p99 latency, and the balancer's own CPU-seconds per 1,000 requests, for new clients (no
//! cookie: the balancer places each request and sets its cookie) and returning clients (each
//! request carries a cookie the balancer set, and must reach the backend it names: every
//! misrouted answer is counted).
//!
//! One rig (3 backends, 64 client addresses) and one set of backend HTTP servers (one
//! event-loop thread serving a listener in each backend namespace; they name themselves in
//! `X-Backend`) serve every balancer. A round starts each balancer in turn (the
//! order rotates from round to round), learns a set of its cookies from new-client requests,
//! measures new-client and then returning-client traffic over the same keep-alive connections
//! count, and stops it completely before the next one. Every figure is the median over the
//! rounds.
//!
//! CPU: with two or more CPUs (and unless `SLB_BENCH_PIN=0`), every balancer is restricted to
//! the last CPU this process may use (every thread of every process of it: HAProxy runs one
//! thread, nginx one worker, sticky-lb its runtime's threads), and the load generator and the
//! backends to the others. So each balancer gets the same single CPU whatever its thread
//! settings, and competes with nothing else of the benchmark for it. The balancer's CPU time is
//! its processes' utime + stime (`/proc/PID/stat`) over the measured window.
//!
//! A balancer that cannot be started or does not answer (e.g. a sticky-lb built without the
//! HTTP proxy) is reported as not measured, with the reason, and the others are measured all
//! the same.
//!
//! Environment: `SLB_BENCH_RUNS` (rounds, default 5), `SLB_BENCH_SECONDS` (measured seconds per
//! traffic type, default 3), `SLB_BENCH_CONNECTIONS` (keep-alive connections, default 32),
//! `SLB_BENCH_SESSIONS` (cookies learned per balancer for returning clients, default 1000),
//! `SLB_BENCH_HTTP_KINDS` (comma-separated: `haproxy,nginx,sticky-lb`, the default),
//! `SLB_BENCH_PIN` (0: no CPU pinning), `STICKY_LB_BIN` (the sticky-lb binary; default: next
//! to this one).
//! Markdown to stdout, progress to stderr, JSON to target/bench/http.json.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sticky_lb_tests::{
    balancer::ScratchDir,
    loadgen::{
        balancers::PORT,
        client,
        cpu::{self, CpuDelta, CpuTimes},
        event_server::{BackendSpec, EventLoopBackends, SERVER_THREAD},
        http_balancers::{self, COOKIE, HttpKind, RunningProxy},
        http_client::{self, HttpLoadResult, HttpLoadSpec, LOAD_THREAD, Session, Traffic},
        median,
    },
    netns::{require_root, unique_tag},
    rig::{Rig, RigOptions},
};

const BACKENDS: usize = 3;
const CLIENT_ADDRESSES: usize = 64;
/// Load before each measured window (pools to the backends fill up).
const WARMUP: Duration = Duration::from_millis(500);
/// Bound on each request.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on requests per connection per second of run (far above what the rig does).
const MAX_REQUESTS_PER_CONNECTION_SECOND: f64 = 100_000.0;
/// Concurrent connections while learning cookies.
const LEARN_CONNECTIONS: usize = 8;
/// How long a started balancer may take to answer its first requests.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// CPUs busy with other work above which the report says the machine was not quiet.
const NOISY_OTHERS: f64 = 0.25;
/// Quiet time between two measurements.
const SETTLE: Duration = Duration::from_millis(300);

/// Settings from the environment.
struct Settings {
    runs: usize,
    seconds: f64,
    connections: usize,
    sessions: usize,
    kinds: Vec<HttpKind>,
    pin: bool,
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
        let kinds = match std::env::var("SLB_BENCH_HTTP_KINDS") {
            Err(_) => HttpKind::ALL.to_vec(),
            Ok(text) => {
                let mut kinds = Vec::new();
                for key in text.split(',').map(str::trim).filter(|k| !k.is_empty()) {
                    let kind = HttpKind::from_key(key).with_context(|| {
                        format!("SLB_BENCH_HTTP_KINDS: unknown balancer {key:?} (known: haproxy, nginx, sticky-lb)")
                    })?;
                    if !kinds.contains(&kind) {
                        kinds.push(kind);
                    }
                }
                kinds
            }
        };
        let settings = Settings {
            runs: var("SLB_BENCH_RUNS", 5usize)?,
            seconds: var("SLB_BENCH_SECONDS", 3.0f64)?,
            connections: var("SLB_BENCH_CONNECTIONS", 32usize)?,
            sessions: var("SLB_BENCH_SESSIONS", 1000usize)?,
            kinds,
            pin: var("SLB_BENCH_PIN", 1u8)? != 0,
        };
        if settings.runs == 0 || !(0.1..=600.0).contains(&settings.seconds) {
            bail!("SLB_BENCH_RUNS must be at least 1 and SLB_BENCH_SECONDS within 0.1..=600");
        }
        if !(1..=1000).contains(&settings.connections) {
            bail!("SLB_BENCH_CONNECTIONS must be within 1..=1000");
        }
        if !(LEARN_CONNECTIONS..=100_000).contains(&settings.sessions) {
            bail!("SLB_BENCH_SESSIONS must be within {LEARN_CONNECTIONS}..=100000");
        }
        if settings.kinds.is_empty() {
            bail!("SLB_BENCH_HTTP_KINDS names no balancer");
        }
        Ok(settings)
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }
}

/// Who runs where.
#[derive(Clone, Debug)]
struct Placement {
    /// The balancer's CPUs; `None`: no pinning.
    balancer: Option<Vec<usize>>,
    /// The load generator's and the backends' (this process's).
    rest: Option<Vec<usize>>,
}

impl Placement {
    fn describe(&self) -> String {
        match (&self.balancer, &self.rest) {
            (Some(b), Some(r)) => format!(
                "each balancer pinned to CPU {} (every thread of it), load generator and backends to CPU {}",
                list(b),
                list(r)
            ),
            _ => "no CPU pinning: balancer, load generator and backends share every CPU".into(),
        }
    }
}

fn list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// CPU readings at one instant.
#[derive(Clone, Copy)]
struct Sample {
    balancer: f64,
    backends: f64,
    load: f64,
    machine: CpuTimes,
}

impl Sample {
    fn now(proxy: &RunningProxy) -> Result<Sample> {
        Ok(Sample {
            balancer: proxy.cpu_seconds()?,
            backends: cpu::own_threads_seconds(SERVER_THREAD)?,
            load: cpu::own_threads_seconds(LOAD_THREAD)?,
            machine: CpuTimes::now()?,
        })
    }
}

/// One traffic type's figures from one measurement.
#[derive(Clone, Debug)]
struct Figures {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// The balancer's CPU-seconds per 1,000 requests answered in the window.
    cpu_per_1k: f64,
    /// The balancer's CPU-seconds per second of window (1.0: one CPU busy all the time).
    balancer_load: f64,
    backends_cpu_per_1k: f64,
    backends_load: f64,
    load_cpu_per_1k: f64,
    machine_utilisation: f64,
    /// CPUs busy with anything but the balancer, the backends and the load generator (kernel
    /// threads such as ksoftirqd, and whatever else runs on the machine), over the window.
    others_load: f64,
    completed: u64,
    answered: u64,
    errors: u64,
    first_error: Option<String>,
    misrouted: u64,
    set_cookies: u64,
    by_backend: BTreeMap<String, u64>,
}

impl Figures {
    fn new(r: &HttpLoadResult, before: &Sample, after: &Sample) -> Figures {
        let window = r.window.as_secs_f64();
        let per_1k = |seconds: f64| {
            if r.completed == 0 {
                f64::NAN
            } else {
                seconds * 1000.0 / r.completed as f64
            }
        };
        let balancer = after.balancer - before.balancer;
        let backends = after.backends - before.backends;
        let load = after.load - before.load;
        let machine = CpuDelta::between(before.machine, after.machine);
        Figures {
            rate: r.rate(),
            p50_ms: r.latency_ms(0.50),
            p99_ms: r.latency_ms(0.99),
            cpu_per_1k: per_1k(balancer),
            balancer_load: balancer / window,
            backends_cpu_per_1k: per_1k(backends),
            backends_load: backends / window,
            load_cpu_per_1k: per_1k(load),
            machine_utilisation: machine.utilisation,
            others_load: ((machine.busy_seconds - balancer - backends - load) / window).max(0.0),
            completed: r.completed,
            answered: r.answered,
            errors: r.errors,
            first_error: r.first_error.clone(),
            misrouted: r.misrouted,
            set_cookies: r.set_cookies,
            by_backend: r.by_backend.clone(),
        }
    }

    fn json(&self) -> Value {
        json!({
            "rate_per_s": self.rate,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "balancer_cpu_s_per_1k": self.cpu_per_1k,
            "balancer_cpus_busy": self.balancer_load,
            "backends_cpu_s_per_1k": self.backends_cpu_per_1k,
            "backends_cpus_busy": self.backends_load,
            "load_generator_cpu_s_per_1k": self.load_cpu_per_1k,
            "machine_utilisation": self.machine_utilisation,
            "others_cpus_busy": self.others_load,
            "completed_in_window": self.completed,
            "answered": self.answered,
            "errors": self.errors,
            "first_error": self.first_error,
            "misrouted": self.misrouted,
            "set_cookie_answers": self.set_cookies,
            "by_backend": self.by_backend,
        })
    }
}

/// One balancer's measurement in one round.
struct Measurement {
    round: usize,
    /// Cookies learned, distinct values among them, and their backends.
    sessions: usize,
    distinct_cookies: usize,
    learned_spread: BTreeMap<String, usize>,
    new_clients: Figures,
    returning: Figures,
}

/// Everything measured for one balancer.
struct Row {
    kind: HttpKind,
    measurements: Vec<Measurement>,
    failures: Vec<(usize, String)>,
    /// Set when the balancer could not be started: it is not tried again.
    not_measured: Option<String>,
}

fn main() {
    require_root();
    install_signal_handlers();
    if let Err(err) = run() {
        eprintln!("slb-bench-http: {err:#}");
        std::process::exit(1);
    }
}

/// SIGINT/SIGTERM only raise the load generator's stop flag: the run then ends with an error at
/// the next check and every namespace and process is removed on the way out.
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
    // Before any other thread exists (it may set STICKY_LB_BIN for the balancer module).
    let sticky_lb = sticky_lb_tests::balancer::locate_from_bench();
    let mut rows: Vec<Row> = settings
        .kinds
        .iter()
        .map(|&kind| Row {
            kind,
            measurements: Vec::new(),
            failures: Vec::new(),
            not_measured: None,
        })
        .collect();
    if let Err(err) = &sticky_lb
        && let Some(row) = rows.iter_mut().find(|r| r.kind == HttpKind::StickyLb)
    {
        row.not_measured = Some(format!("{err:#}"));
    }
    let machine = machine();
    let placement = place(settings.pin)?;
    if let Some(rest) = &placement.rest {
        // Every thread started from here on (backends, load generator) inherits it.
        cpu::pin_current_thread(rest)?;
    }
    eprintln!(
        "slb-bench-http: {} rounds x {} s per traffic type, {} connections, balancers {}; {}",
        settings.runs,
        settings.seconds,
        settings.connections,
        settings
            .kinds
            .iter()
            .map(|k| k.key())
            .collect::<Vec<_>>()
            .join(","),
        placement.describe(),
    );

    let tag = unique_tag("http");
    // Declaration order is the reverse of drop order: the rig (namespaces) goes last, after the
    // servers and the scratch directory; balancers live inside `measure` and go first.
    let rig = Rig::build(
        RigOptions::new(&tag)
            .backends(BACKENDS)
            .clients(CLIENT_ADDRESSES),
    )
    .context("building the rig")?;
    let scratch = ScratchDir::new(&tag);
    let servers = EventLoopBackends::start(
        &(1..=BACKENDS)
            .map(|k| BackendSpec {
                ns: rig.backend_ns(k).to_owned(),
                bind: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT).into(),
                name: format!("b{k}"),
            })
            .collect::<Vec<_>>(),
    )?;
    eprintln!("slb-bench-http: rig {} ready", rig.tag());

    let started = Instant::now();
    for round in 0..settings.runs {
        for i in 0..rows.len() {
            // Rotate the order so each balancer runs early in some rounds and late in others.
            let count = rows.len();
            let row = &mut rows[(i + round) % count];
            interrupted()?;
            if row.not_measured.is_some() {
                continue;
            }
            let progress = format!("[round {}/{}] {}", round + 1, settings.runs, row.kind.key());
            eprintln!("{progress}: starting");
            match measure(row.kind, round, &rig, scratch.path(), &settings, &placement)? {
                Outcome::Measured(m) => {
                    eprintln!(
                        "{progress}: new clients {:.0} req/s (p50 {:.3} ms, p99 {:.3} ms, {:.4} CPU-s/1k, {} errors); returning {:.0} req/s (p50 {:.3} ms, p99 {:.3} ms, {:.4} CPU-s/1k, {} errors, {} misrouted)",
                        m.new_clients.rate,
                        m.new_clients.p50_ms,
                        m.new_clients.p99_ms,
                        m.new_clients.cpu_per_1k,
                        m.new_clients.errors,
                        m.returning.rate,
                        m.returning.p50_ms,
                        m.returning.p99_ms,
                        m.returning.cpu_per_1k,
                        m.returning.errors,
                        m.returning.misrouted,
                    );
                    row.measurements.push(*m);
                }
                Outcome::NotStarted(err) => {
                    interrupted()?;
                    eprintln!("{progress}: not measured: {err:#}");
                    row.not_measured = Some(format!("{err:#}"));
                }
                Outcome::Failed(err) => {
                    interrupted()?;
                    eprintln!("{progress}: FAILED: {err:#}");
                    row.failures.push((round, format!("{err:#}")));
                }
            }
            std::thread::sleep(SETTLE);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let served: Vec<Value> = servers
        .names()
        .iter()
        .enumerate()
        .map(|(i, name)| json!({"name": name, "connections": servers.connections(i), "requests": servers.requests(i)}))
        .collect();

    print_report(&rows, &machine, &settings, &placement);
    let json = json!({
        "machine": machine,
        "settings": {
            "runs": settings.runs,
            "seconds": settings.seconds,
            "warmup_seconds": WARMUP.as_secs_f64(),
            "connections": settings.connections,
            "sessions": settings.sessions,
            "client_addresses": CLIENT_ADDRESSES,
            "backends": BACKENDS,
            "placement": placement.describe(),
        },
        "balancers": rows.iter().map(row_json).collect::<Vec<_>>(),
        "backend_servers": served,
        "seconds": seconds,
    });
    // tests/ -> the workspace root's target/bench, like the other benchmarks.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("http.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    eprintln!("slb-bench-http: wrote {} ({seconds:.0} s)", path.display());
    drop(servers);
    Ok(())
}

/// The balancer on the last CPU this process may use, everything else on the others; no
/// pinning with one CPU or when asked not to.
fn place(pin: bool) -> Result<Placement> {
    let cpus = cpu::allowed_cpus()?;
    if !pin || cpus.len() < 2 {
        return Ok(Placement {
            balancer: None,
            rest: None,
        });
    }
    let (last, rest) = cpus.split_last().expect("two or more");
    Ok(Placement {
        balancer: Some(vec![*last]),
        rest: Some(rest.to_vec()),
    })
}

/// How one balancer's round went.
enum Outcome {
    Measured(Box<Measurement>),
    /// It could not be started (or never answered): not tried again.
    NotStarted(anyhow::Error),
    /// It ran, but a measurement failed.
    Failed(anyhow::Error),
}

/// Starts `kind`, learns its cookies, measures both traffic types, stops it (checking it is
/// gone). The error is fatal: the balancer could not be removed, so the rig is in no state to
/// measure the next one.
fn measure(
    kind: HttpKind,
    round: usize,
    rig: &Rig,
    scratch: &std::path::Path,
    settings: &Settings,
    placement: &Placement,
) -> Result<Outcome> {
    let proxy = match http_balancers::start(kind, rig, scratch) {
        Ok(proxy) => proxy,
        // Whatever was set up before the failure was removed when `start` dropped it.
        Err(err) => return Ok(Outcome::NotStarted(err)),
    };
    let outcome = measure_running(&proxy, round, rig, settings, placement);
    proxy.stop()?;
    Ok(outcome)
}

fn measure_running(
    proxy: &RunningProxy,
    round: usize,
    rig: &Rig,
    settings: &Settings,
    placement: &Placement,
) -> Outcome {
    if let Some(cpus) = &placement.balancer
        && let Err(err) = proxy.pin(cpus)
    {
        return Outcome::Failed(err.context("pinning the balancer"));
    }
    let target = SocketAddr::new(rig.vip().into(), PORT);
    let sources: Vec<IpAddr> = rig.client_addrs().iter().map(|&a| a.into()).collect();
    // The first requests may fail while a freshly started balancer settles (ARP, pools).
    let deadline = Instant::now() + READY_TIMEOUT;
    let sessions = loop {
        match http_client::learn_sessions(
            rig.client_ns(),
            target,
            &sources,
            LEARN_CONNECTIONS,
            settings.sessions,
            COOKIE,
            OP_TIMEOUT,
        ) {
            Ok(sessions) => break sessions,
            Err(err) if Instant::now() > deadline || interrupted().is_err() => {
                return Outcome::NotStarted(err.context("learning cookies (new-client requests)"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    if sessions.len() < settings.sessions {
        return Outcome::NotStarted(anyhow::anyhow!(
            "only {} of {} new-client answers set the {COOKIE} cookie",
            sessions.len(),
            settings.sessions
        ));
    }
    let mut learned_spread = BTreeMap::new();
    for session in &sessions {
        *learned_spread.entry(session.backend.clone()).or_default() += 1;
    }
    let distinct_cookies = {
        let mut values: Vec<&str> = sessions.iter().map(|s| s.cookie.as_str()).collect();
        values.sort_unstable();
        values.dedup();
        values.len()
    };
    let session_count = sessions.len();
    let sessions: Arc<Vec<Session>> = Arc::new(sessions);
    let max =
        ((WARMUP.as_secs_f64() + settings.seconds) * MAX_REQUESTS_PER_CONNECTION_SECOND) as u64;
    let spec = |traffic| HttpLoadSpec {
        ns: rig.client_ns().to_owned(),
        target,
        sources: sources.clone(),
        connections: settings.connections,
        cookie_name: COOKIE.to_owned(),
        traffic,
        warmup: WARMUP,
        duration: settings.duration(),
        op_timeout: OP_TIMEOUT,
        max_requests_per_connection: max,
    };
    let mut figures = Vec::with_capacity(2);
    for traffic in [Traffic::NewClient, Traffic::Returning(sessions)] {
        if let Err(err) = interrupted() {
            return Outcome::Failed(err);
        }
        match http_client::run(&spec(traffic), || Sample::now(proxy)) {
            Ok((result, before, after)) => figures.push(Figures::new(&result, &before, &after)),
            Err(err) => return Outcome::Failed(err),
        }
        std::thread::sleep(SETTLE);
    }
    let returning = figures.pop().expect("two runs");
    let new_clients = figures.pop().expect("two runs");
    Outcome::Measured(Box::new(Measurement {
        round,
        sessions: session_count,
        distinct_cookies,
        learned_spread,
        new_clients,
        returning,
    }))
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn med(row: &Row, value: impl Fn(&Measurement) -> f64) -> Option<f64> {
    median(row.measurements.iter().map(value))
}

fn fmt(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "–".to_owned(),
    }
}

/// Why a row has no figures, fit for a markdown table cell.
fn cell(text: &str) -> String {
    let text = text.replace('|', "/").replace('\n', " ");
    if text.chars().count() > 300 {
        format!("{}…", text.chars().take(300).collect::<String>())
    } else {
        text
    }
}

type Pick = fn(&Measurement) -> &Figures;

fn print_report(rows: &[Row], machine: &Value, settings: &Settings, placement: &Placement) {
    println!(
        "## HTTP cookie persistence: {} keep-alive connections from {} client addresses, {} backends, median of {} rounds of {} s per traffic type\n",
        settings.connections, CLIENT_ADDRESSES, BACKENDS, settings.runs, settings.seconds
    );
    println!("{}.\n", capitalise(&placement.describe()));
    let tables: [(&str, Pick, bool); 2] = [
        (
            "New clients: no cookie, so the balancer places every request and sets its cookie",
            |m| &m.new_clients,
            false,
        ),
        (
            "Returning clients: every request carries a cookie this balancer set, and must reach the backend it names",
            |m| &m.returning,
            true,
        ),
    ];
    for (title, pick, returning) in tables {
        println!("### {title}\n");
        println!(
            "| balancer | req/s | p50 ms | p99 ms | CPU-s per 1k req | balancer CPU busy | answers with Set-Cookie | misrouted | failed requests |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in rows {
            if row.measurements.is_empty() {
                let why = row
                    .not_measured
                    .as_deref()
                    .or(row.failures.first().map(|(_, e)| e.as_str()))
                    .unwrap_or("not run");
                println!(
                    "| {} | not measured ({}) | | | | | | | |",
                    row.kind.label(),
                    cell(why)
                );
                continue;
            }
            let sum = |count: fn(&Figures) -> u64| -> u64 {
                row.measurements.iter().map(|m| count(pick(m))).sum()
            };
            let answered = sum(|f| f.answered);
            println!(
                "| {} | {} | {} | {} | {} | {}% | {} of {answered} | {} | {} |",
                row.kind.label(),
                fmt(med(row, |m| pick(m).rate), 0),
                fmt(med(row, |m| pick(m).p50_ms), 3),
                fmt(med(row, |m| pick(m).p99_ms), 3),
                fmt(med(row, |m| pick(m).cpu_per_1k), 4),
                fmt(med(row, |m| pick(m).balancer_load * 100.0), 0),
                sum(|f| f.set_cookies),
                // New clients name no backend: nothing to check.
                if returning {
                    sum(|f| f.misrouted).to_string()
                } else {
                    "–".to_owned()
                },
                sum(|f| f.errors),
            );
        }
        println!();
    }

    println!(
        "### Target: sticky-lb's requests per CPU-second at least HAProxy's, p99 within 1.5x of HAProxy's\n"
    );
    let find = |kind| {
        rows.iter()
            .find(|r| r.kind == kind && !r.measurements.is_empty())
    };
    match (find(HttpKind::StickyLb), find(HttpKind::Haproxy)) {
        (Some(sticky), Some(haproxy)) => {
            let mut all_met = true;
            for (name, pick) in [
                ("new clients", (|m| &m.new_clients) as Pick),
                ("returning clients", |m| &m.returning),
            ] {
                let per_cpu = |row| med(row, |m| 1000.0 / pick(m).cpu_per_1k);
                let p99 = |row| med(row, |m| pick(m).p99_ms);
                let (Some(s_cpu), Some(h_cpu), Some(s_p99), Some(h_p99)) =
                    (per_cpu(sticky), per_cpu(haproxy), p99(sticky), p99(haproxy))
                else {
                    println!("- {name}: no figures");
                    all_met = false;
                    continue;
                };
                let met = s_cpu >= h_cpu && s_p99 <= 1.5 * h_p99;
                all_met &= met;
                println!(
                    "- {name}: {} — sticky-lb {s_cpu:.0} req/CPU-s vs HAProxy {h_cpu:.0} ({:.2}x), p99 {s_p99:.3} ms vs {h_p99:.3} ms ({:.2}x)",
                    if met { "met" } else { "not met" },
                    s_cpu / h_cpu,
                    s_p99 / h_p99,
                );
            }
            println!("\n**Target {}.**", if all_met { "met" } else { "not met" });
        }
        (None, _) => {
            let why = rows
                .iter()
                .find(|r| r.kind == HttpKind::StickyLb)
                .and_then(|r| {
                    r.not_measured
                        .clone()
                        .or(r.failures.first().map(|(_, e)| e.clone()))
                })
                .unwrap_or_else(|| "not asked for (SLB_BENCH_HTTP_KINDS)".into());
            println!(
                "sticky-lb: not measured ({}): target not assessed.",
                cell(&why)
            );
        }
        (Some(_), None) => println!("HAProxy: not measured: target not assessed."),
    }

    println!("\n### Where the CPU went (median CPU-seconds per 1,000 requests, and CPUs busy)\n");
    println!(
        "| balancer | traffic | balancer | backends (3) | load generator | backends CPUs busy | whole machine busy | CPUs busy with anything else (kernel work outside these processes, other processes) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for row in rows.iter().filter(|r| !r.measurements.is_empty()) {
        for (name, pick) in [
            ("new", (|m| &m.new_clients) as Pick),
            ("returning", |m| &m.returning),
        ] {
            println!(
                "| {} | {name} | {} | {} | {} | {} | {}% | {} |",
                row.kind.key(),
                fmt(med(row, |m| pick(m).cpu_per_1k), 4),
                fmt(med(row, |m| pick(m).backends_cpu_per_1k), 4),
                fmt(med(row, |m| pick(m).load_cpu_per_1k), 4),
                fmt(med(row, |m| pick(m).backends_load), 2),
                fmt(med(row, |m| pick(m).machine_utilisation * 100.0), 0),
                fmt(med(row, |m| pick(m).others_load), 2),
            );
        }
    }

    println!();
    println!(
        "CPU-s per 1k req is the balancer's own CPU time (utime + stime of all its processes and threads, from /proc/PID/stat) over the measured window, per 1,000 requests answered in it; balancer CPU busy is the same time over the window's length (100% = one CPU). Latency is from the request's write to its answer's last byte, on a keep-alive connection, one request in flight per connection. Softirq work is charged to the task it interrupts (unless the kernel accounts IRQ time apart): on veth pairs that is mostly the sender, so a balancer's figure includes delivering the packets it sends to the clients' and backends' sockets, and not the delivery of the packets sent to it. The same holds for all three."
    );
    println!(
        "HAProxy: `balance roundrobin`, `cookie SRV insert indirect nocache`, `nbthread 1`, `http-reuse safe`, `option forwardfor`. nginx: `worker_processes 1`; open-source nginx has no cookie insertion, so it hashes (`hash ... consistent`) the SRV cookie, or for a request without one its `$request_id`, which it sets as the SRV cookie (`map` + `add_header`, with `Cache-Control: no-cache=\"Set-Cookie\"`); `keepalive 64` to the backends, `proxy_http_version 1.1`, X-Forwarded-For. sticky-lb: `mode: http`, `policy: least-conn`, `stick.cookie {{name: SRV, indirect: true, nocache: true}}` (AES-256-GCM sealed), `pool_idle: 64`, `forwarded: true`, its runtime's worker threads on the one CPU. No health checks anywhere; nothing logged per request."
    );
    println!(
        "Returning clients replay {} cookies learned per balancer in each round from as many new-client requests; a misrouted answer is one whose X-Backend is not the backend that answered the request that set its cookie. The counts (answers with Set-Cookie, misrouted, failed requests) are over all rounds, warm-ups included; a returning client's answer with Set-Cookie is a cookie issued again.",
        settings.sessions
    );
    let mut notes = Vec::new();
    let busiest_others = rows
        .iter()
        .flat_map(|r| &r.measurements)
        .flat_map(|m| [m.new_clients.others_load, m.returning.others_load])
        .fold(0.0f64, f64::max);
    if busiest_others > NOISY_OTHERS {
        notes.push(format!(
            "the machine was not quiet: up to {busiest_others:.2} CPUs were busy with other work during a window (more than {NOISY_OTHERS}); such windows disturb rates and latency tails more than CPU-s per 1k"
        ));
    }
    for row in rows {
        for (round, err) in &row.failures {
            notes.push(format!(
                "{}: round {} failed: {}",
                row.kind.key(),
                round + 1,
                cell(err)
            ));
        }
        let errors: Vec<&Figures> = row
            .measurements
            .iter()
            .flat_map(|m| [&m.new_clients, &m.returning])
            .filter(|f| f.errors > 0)
            .collect();
        if let Some(first) = errors.first() {
            notes.push(format!(
                "{}: {} failed requests over all rounds (first: {})",
                row.kind.key(),
                errors.iter().map(|f| f.errors).sum::<u64>(),
                cell(first.first_error.as_deref().unwrap_or(""))
            ));
        }
        if let Some(m) = row.measurements.first() {
            notes.push(format!(
                "{}: round {} learned {} cookies ({} distinct values) from backends {:?}; new clients reached {:?}",
                row.kind.key(),
                m.round + 1,
                m.sessions,
                m.distinct_cookies,
                m.learned_spread,
                m.new_clients.by_backend,
            ));
        }
    }
    if !notes.is_empty() {
        println!();
        for note in notes {
            println!("- {note}");
        }
    }
    println!(
        "\nmachine: {}, {} CPUs, kernel {}; {}; {}",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["haproxy"].as_str().unwrap_or("?"),
        machine["nginx"].as_str().unwrap_or("?"),
    );
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn row_json(row: &Row) -> Value {
    let traffic = |pick: Pick| {
        json!({
            "rate_per_s": med(row, |m| pick(m).rate),
            "p50_ms": med(row, |m| pick(m).p50_ms),
            "p99_ms": med(row, |m| pick(m).p99_ms),
            "balancer_cpu_s_per_1k": med(row, |m| pick(m).cpu_per_1k),
            "balancer_cpus_busy": med(row, |m| pick(m).balancer_load),
            "backends_cpu_s_per_1k": med(row, |m| pick(m).backends_cpu_per_1k),
            "misrouted": row.measurements.iter().map(|m| pick(m).misrouted).sum::<u64>(),
            "errors": row.measurements.iter().map(|m| pick(m).errors).sum::<u64>(),
        })
    };
    json!({
        "key": row.kind.key(),
        "label": row.kind.label(),
        "not_measured": row.not_measured,
        "rounds_ok": row.measurements.len(),
        "failures": row.failures.iter().map(|(round, e)| json!({"round": round + 1, "error": e})).collect::<Vec<_>>(),
        "new_clients": traffic(|m| &m.new_clients),
        "returning_clients": traffic(|m| &m.returning),
        "per_round": row.measurements.iter().map(|m| json!({
            "round": m.round + 1,
            "sessions": m.sessions,
            "distinct_cookies": m.distinct_cookies,
            "learned_spread": m.learned_spread,
            "new_clients": m.new_clients.json(),
            "returning_clients": m.returning.json(),
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
    // `nginx -v` prints to stderr, `haproxy -v` to stdout.
    let first_line = |program: &str, arg: &str| {
        std::process::Command::new(program)
            .arg(arg)
            .output()
            .map(|out| {
                let text = [out.stdout, out.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default()
    };
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel,
        "haproxy": first_line("haproxy", "-v"),
        "nginx": first_line("nginx", "-v"),
    })
}
