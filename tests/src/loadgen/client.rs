//! The load generator: client threads in the rig's client namespace, each with its own source
//! addresses (so balancers that hash the client address spread the load), issuing HTTP/1.1
//! requests either on a fresh connection each (`Short`) or back to back on one connection
//! (`KeepAlive`). A run is a warm-up followed by a measured window of fixed length; every thread
//! stops at the window's end or after a maximum number of requests, whichever comes first (the
//! run ends when every thread has stopped), and every socket operation has a timeout, so a run
//! can never hang. Both address families: a thread's sources are of its target's family.

use std::collections::BTreeMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::cpu::{CpuDelta, CpuTimes};
use super::quantile;
use crate::netns::spawn_in_netns;
use crate::socket;

/// Set (e.g. by a SIGINT handler) to make every running load thread stop at its next request.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// One request on a connection the client closes after the answer (the server closes first).
const CLOSE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
/// One request on a kept-alive connection.
const KEEPALIVE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
/// An answer larger than this is not from our server.
const MAX_RESPONSE: usize = 16 * 1024;
/// How long load threads may take to enter the namespace and report ready.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed request, so an instant failure (refused, unreachable) cannot spin.
const ERROR_PAUSE: Duration = Duration::from_millis(1);

/// How each request reaches the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Connect, one request with `Connection: close`, read the answer and the server's FIN.
    Short,
    /// One connection per thread, requests back to back (reconnecting after an error).
    KeepAlive,
}

/// What one load thread does: where it connects to and from which addresses (used in turn, one
/// per connection).
#[derive(Clone, Debug)]
pub struct ThreadPlan {
    /// Of the target's family.
    pub sources: Vec<IpAddr>,
    pub target: SocketAddr,
}

/// A whole run.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// Namespace the client threads run in.
    pub ns: String,
    pub mode: Mode,
    pub threads: Vec<ThreadPlan>,
    /// Load before the measurement starts (connections set up, caches and tables warm).
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// Bound on each socket operation (connect, write, each read).
    pub op_timeout: Duration,
    /// Bound on the requests one thread makes in the whole run, warm-up included. Once every
    /// thread has made its share the run ends, before the window's end if need be (then the
    /// window is the time it took): a run of a fixed count of requests within a deadline.
    pub max_requests_per_thread: u64,
}

/// The outcome of a run.
#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    /// Requests (Short: connections) completed inside the window.
    pub completed: u64,
    /// Requests that failed during the whole run (warm-up included).
    pub errors: u64,
    /// The first failure, for the report.
    pub first_error: Option<String>,
    /// Failures by kind (the step that failed and the kernel's error, see [`error_kind`]).
    pub error_kinds: BTreeMap<String, u64>,
    /// Length of the measured window (shorter than asked if every thread finished its share
    /// of requests before its end).
    pub window: Duration,
    /// Latency of every request completed inside the window, microseconds, ascending.
    pub latencies_us: Vec<u32>,
    /// Whole-machine CPU used during the window.
    pub cpu: CpuDelta,
}

impl LoadResult {
    /// Completed requests (or connections) per second.
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.window.as_secs_f64()
    }

    /// Latency at quantile `q`, milliseconds (NaN without samples).
    pub fn latency_ms(&self, q: f64) -> f64 {
        quantile(&self.latencies_us, q).map_or(f64::NAN, |us| f64::from(us) / 1000.0)
    }

    /// Whole-machine busy CPU-seconds per 1,000 completed requests (or connections).
    pub fn cpu_seconds_per_1k(&self) -> f64 {
        if self.completed == 0 {
            f64::NAN
        } else {
            self.cpu.busy_seconds * 1000.0 / self.completed as f64
        }
    }
}

/// The window every thread measures, sent once all threads are ready.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

/// What one thread brings back.
#[derive(Default)]
struct ThreadOutcome {
    completed: u64,
    errors: u64,
    first_error: Option<String>,
    error_kinds: BTreeMap<String, u64>,
    latencies_us: Vec<u32>,
}

impl ThreadOutcome {
    /// Books one request that ran from `started` to `ended`.
    fn record(&mut self, window: Window, started: Instant, ended: Instant, result: Result<()>) {
        match result {
            Ok(()) => {
                if ended >= window.start && ended < window.end {
                    self.completed += 1;
                    let us = ended.duration_since(started).as_micros();
                    self.latencies_us
                        .push(u32::try_from(us).unwrap_or(u32::MAX));
                }
            }
            Err(err) => {
                self.errors += 1;
                *self.error_kinds.entry(error_kind(&err)).or_default() += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!("{err:#}"));
                }
                std::thread::sleep(ERROR_PAUSE);
            }
        }
    }
}

/// Runs the load described by `spec` and measures it.
pub fn run(spec: &LoadSpec) -> Result<LoadResult> {
    if spec.threads.is_empty() || spec.threads.iter().any(|t| t.sources.is_empty()) {
        bail!("a load run needs threads, each with at least one source address");
    }
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    // Each thread reports here when it stops (its share done, the window over, or stopped).
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut starts = Vec::with_capacity(spec.threads.len());
    let mut handles = Vec::with_capacity(spec.threads.len());
    for plan in &spec.threads {
        let (start_tx, start_rx) = mpsc::channel::<Window>();
        let (ready_tx, done_tx, plan) = (ready_tx.clone(), done_tx.clone(), plan.clone());
        let (mode, timeout, max) = (spec.mode, spec.op_timeout, spec.max_requests_per_thread);
        handles.push(spawn_in_netns(spec.ns.clone(), move || {
            // In the namespace now: report, then wait for the common window.
            let _ = ready_tx.send(());
            drop(ready_tx);
            let Ok(window) = start_rx.recv_timeout(START_TIMEOUT) else {
                return ThreadOutcome::default();
            };
            let outcome = match mode {
                Mode::Short => short_loop(&plan, window, timeout, max),
                Mode::KeepAlive => keepalive_loop(&plan, window, timeout, max),
            };
            let _ = done_tx.send(());
            outcome
        }));
        starts.push(start_tx);
    }
    drop(ready_tx);
    drop(done_tx);

    // Bounded wait for every thread; a thread that could not enter the namespace panicked and
    // never reports, so this ends by the deadline at the latest.
    let deadline = Instant::now() + START_TIMEOUT;
    for _ in 0..handles.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if ready_rx.recv_timeout(left).is_err() {
            drop(starts); // the threads' waits fail at once and they return
            for handle in handles {
                let _ = handle.join();
            }
            bail!("load threads did not start in {}", spec.ns);
        }
    }

    let start = Instant::now() + spec.warmup;
    let window = Window {
        start,
        end: start + spec.duration,
    };
    for start_tx in &starts {
        let _ = start_tx.send(window);
    }
    sleep_until(window.start);
    let cpu_before = CpuTimes::now()?;
    // Until the window's end, or until every thread has stopped early (each made its share of
    // requests). A thread that panicked never reports: the wait then lasts the whole window.
    let mut stopped = 0;
    while stopped < handles.len() {
        let left = window.end.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(()) => stopped += 1,
            Err(_) => break,
        }
    }
    let cpu_after = CpuTimes::now()?;
    let measured = Instant::now()
        .min(window.end)
        .saturating_duration_since(window.start);

    let mut result = LoadResult {
        // Requests that end after the window are not counted, so a run cut short by the
        // threads finishing early has measured exactly the time until then.
        window: if stopped == handles.len() {
            measured
        } else {
            spec.duration
        },
        cpu: CpuDelta::between(cpu_before, cpu_after),
        ..LoadResult::default()
    };
    let mut panicked = 0;
    for handle in handles {
        match handle.join() {
            Ok(outcome) => {
                result.completed += outcome.completed;
                result.errors += outcome.errors;
                for (kind, count) in outcome.error_kinds {
                    *result.error_kinds.entry(kind).or_default() += count;
                }
                if result.first_error.is_none() {
                    result.first_error = outcome.first_error;
                }
                result.latencies_us.extend(outcome.latencies_us);
            }
            Err(_) => panicked += 1,
        }
    }
    if panicked > 0 {
        bail!("{panicked} load threads panicked");
    }
    result.latencies_us.sort_unstable();
    Ok(result)
}

fn sleep_until(when: Instant) {
    let left = when.saturating_duration_since(Instant::now());
    if !left.is_zero() {
        std::thread::sleep(left);
    }
}

/// Whether a thread should start another request.
fn keep_going(window: Window, started: u64, max: u64) -> bool {
    started < max && Instant::now() < window.end && !STOP.load(Ordering::Relaxed)
}

fn short_loop(plan: &ThreadPlan, window: Window, timeout: Duration, max: u64) -> ThreadOutcome {
    let mut outcome = ThreadOutcome::default();
    let mut started = 0u64;
    while keep_going(window, started, max) {
        let source = plan.sources[started as usize % plan.sources.len()];
        started += 1;
        let t0 = Instant::now();
        let result = short_request(source, plan.target, timeout).map(drop);
        outcome.record(window, t0, Instant::now(), result);
    }
    outcome
}

fn keepalive_loop(plan: &ThreadPlan, window: Window, timeout: Duration, max: u64) -> ThreadOutcome {
    let mut outcome = ThreadOutcome::default();
    let mut started = 0u64;
    let mut connects = 0usize;
    let mut conn: Option<HttpConn> = None;
    while keep_going(window, started, max) {
        started += 1;
        // Connection set-up is not part of a request's latency in this mode.
        if conn.is_none() {
            let source = plan.sources[connects % plan.sources.len()];
            connects += 1;
            match connect_from(source, plan.target, timeout) {
                Ok(stream) => conn = Some(HttpConn::new(stream)),
                Err(err) => {
                    let now = Instant::now();
                    let err = anyhow!(err).context(format!("connect {source} -> {}", plan.target));
                    outcome.record(window, now, now, Err(err));
                    continue;
                }
            }
        }
        let Some(live) = conn.as_mut() else { continue };
        let t0 = Instant::now();
        let result = live
            .exchange(KEEPALIVE_REQUEST)
            .map(drop)
            .map_err(anyhow::Error::from);
        if result.is_err() {
            conn = None;
        }
        outcome.record(window, t0, Instant::now(), result);
    }
    outcome
}

/// A failure's kind for counting: the step that failed (the outermost context's first word:
/// `connect`, `request`, `waiting` for the close, ...) and the kernel's error (the root cause),
/// without the addresses.
pub fn error_kind(err: &anyhow::Error) -> String {
    let step = err
        .to_string()
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned();
    format!("{step}: {}", err.root_cause())
}

/// One short connection: connect from `source`, ask with `Connection: close`, read the answer
/// and the server's FIN, close. Returns the body (the backend's name).
pub fn short_request(source: IpAddr, target: SocketAddr, timeout: Duration) -> Result<String> {
    let stream = connect_from(source, target, timeout)
        .with_context(|| format!("connect {source} -> {target}"))?;
    let mut conn = HttpConn::new(stream);
    let body = conn
        .exchange(CLOSE_REQUEST)
        .with_context(|| format!("request {source} -> {target}"))?;
    let body = String::from_utf8_lossy(body).trim().to_owned();
    conn.expect_eof()
        .with_context(|| format!("waiting for the close {source} -> {target}"))?;
    Ok(body)
}

/// Runs `short_request` for each `(source, target)` in turn on one thread inside `ns`; the
/// bodies (backend names) or errors, in order. For sanity checks, not for load.
pub fn probe_short(
    ns: &str,
    requests: &[(IpAddr, SocketAddr)],
    timeout: Duration,
) -> Vec<Result<String>> {
    let owned = requests.to_vec();
    let handle = spawn_in_netns(ns.to_owned(), move || {
        owned
            .iter()
            .map(|&(source, target)| short_request(source, target, timeout))
            .collect::<Vec<_>>()
    });
    handle.join().unwrap_or_else(|_| {
        requests
            .iter()
            .map(|_| Err(anyhow!("probe thread in {ns} panicked")))
            .collect()
    })
}

/// `count` requests on one kept-alive connection from `source` inside `ns`; the bodies.
pub fn probe_keepalive(
    ns: &str,
    source: IpAddr,
    target: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Result<Vec<String>> {
    let handle = spawn_in_netns(ns.to_owned(), move || -> Result<Vec<String>> {
        let stream = connect_from(source, target, timeout)
            .with_context(|| format!("connect {source} -> {target}"))?;
        let mut conn = HttpConn::new(stream);
        (0..count)
            .map(|i| {
                let body = conn
                    .exchange(KEEPALIVE_REQUEST)
                    .with_context(|| format!("keep-alive request {i} {source} -> {target}"))?;
                Ok(String::from_utf8_lossy(body).trim().to_owned())
            })
            .collect()
    });
    handle
        .join()
        .unwrap_or_else(|_| Err(anyhow!("probe thread in {ns} panicked")))
}

/// A client connection with its receive buffer.
struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` holding data.
    filled: usize,
    /// Bytes at the front of `buf` that belong to the previous answer.
    consumed: usize,
}

impl HttpConn {
    fn new(stream: TcpStream) -> HttpConn {
        HttpConn {
            stream,
            buf: vec![0; MAX_RESPONSE],
            filled: 0,
            consumed: 0,
        }
    }

    /// Sends `request` and reads one complete `200` answer; returns its body.
    fn exchange(&mut self, request: &[u8]) -> io::Result<&[u8]> {
        // Drop the previous answer, keep anything that came after it.
        self.buf.copy_within(self.consumed..self.filled, 0);
        self.filled -= self.consumed;
        self.consumed = 0;
        self.stream.write_all(request)?;
        let (head_end, body_len) = loop {
            if let Some(head_end) = find_head_end(&self.buf[..self.filled]) {
                break (head_end, parse_head(&self.buf[..head_end])?);
            }
            self.fill()?;
        };
        let end = head_end + body_len;
        if end > self.buf.len() {
            return Err(invalid("answer larger than expected"));
        }
        while self.filled < end {
            self.fill()?;
        }
        self.consumed = end;
        Ok(&self.buf[head_end..end])
    }

    /// Reads until the server's FIN; any further data is an error.
    fn expect_eof(&mut self) -> io::Result<()> {
        if self.filled > self.consumed {
            return Err(invalid("data after the answer"));
        }
        match self.stream.read(&mut self.buf[..]) {
            Ok(0) => Ok(()),
            Ok(_) => Err(invalid("data after the answer")),
            Err(err) => Err(err),
        }
    }

    /// One read into the free part of the buffer; EOF is an error here (mid-answer).
    fn fill(&mut self) -> io::Result<()> {
        if self.filled == self.buf.len() {
            return Err(invalid("answer too large"));
        }
        loop {
            match self.stream.read(&mut self.buf[self.filled..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "closed mid-answer",
                    ));
                }
                Ok(n) => {
                    self.filled += n;
                    return Ok(());
                }
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, what.to_owned())
}

fn find_head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

/// Checks the status is 200 and returns the Content-Length.
fn parse_head(head: &[u8]) -> io::Result<usize> {
    let text = std::str::from_utf8(head).map_err(|_| invalid("answer head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200 ") {
        return Err(invalid(&format!("unexpected status line {status:?}")));
    }
    lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .ok_or_else(|| invalid("answer without Content-Length"))
}

/// A blocking TCP connection from `source` (any port) to `target`; `timeout` bounds the connect
/// and every later read and write.
pub fn connect_from(
    source: IpAddr,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    // Leaves `timeout` on as the write timeout (SO_SNDTIMEO, which also bounded the connect).
    let stream = socket::connect_from(source, target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    // Requests are single small writes each waiting for an answer: no reason to let Nagle
    // hold any of them back.
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_need_status_200_and_a_length() {
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n").unwrap(),
            3
        );
        assert!(parse_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    }
}
