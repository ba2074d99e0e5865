//! The HTTP benchmark's load generator: keep-alive HTTP/1.1 connections driven by one tokio
//! thread in the rig's client namespace (epoll, like `wrk`: one thread drives every connection,
//! so the client side costs little CPU next to the balancer under test), each connection from
//! its own client address, one request at a time per connection.
//!
//! Two kinds of traffic ([`Traffic`]): new clients (no cookie, so the balancer places every
//! request and sets its cookie) and returning clients (every request carries a cookie learned
//! from that balancer, [`learn_sessions`], and must be answered by the backend the cookie
//! named: the backends name themselves in an `X-Backend` header). A run is a warm-up followed
//! by a measured window; every connection stops at the window's end or after a maximum number
//! of requests, whichever comes first, and every socket operation has a timeout, so a run can
//! never hang.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::client::STOP;
use super::quantile;
use crate::netns::enter_netns;

/// An answer larger than this is not from our backends.
const MAX_RESPONSE: usize = 16 * 1024;
/// How long the load thread may take to enter the namespace and start its runtime.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed request, so an instant failure (refused, reset) cannot spin.
const ERROR_PAUSE: Duration = Duration::from_millis(1);
/// Name of the load thread (what [`super::cpu::own_threads_seconds`] finds it by).
pub const LOAD_THREAD: &str = "http load";

/// A client's session with one balancer: the cookie it was given and the backend that answered
/// the request that set it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// `NAME=VALUE`, as sent back in `Cookie`.
    pub cookie: String,
    /// The `X-Backend` of the answer that set it.
    pub backend: String,
}

/// What the requests carry.
#[derive(Clone, Debug)]
pub enum Traffic {
    /// No cookie: every request is a new client's, placed by the balancer's policy and answered
    /// with `Set-Cookie`.
    NewClient,
    /// Every request carries one of these sessions' cookies (connection `i` takes sessions `i`,
    /// `i + connections`, ... in turn) and must reach its backend.
    Returning(Arc<Vec<Session>>),
}

/// A whole run.
#[derive(Clone, Debug)]
pub struct HttpLoadSpec {
    /// Namespace the load thread runs in.
    pub ns: String,
    /// The balancer's address (VIP:port).
    pub target: SocketAddr,
    /// Source addresses, one per connection in turn (of the target's family).
    pub sources: Vec<IpAddr>,
    /// Keep-alive connections, each with one request in flight.
    pub connections: usize,
    /// The balancer's cookie (in `Set-Cookie` answers).
    pub cookie_name: String,
    pub traffic: Traffic,
    /// Load before the measurement starts (pools to the backends filled, caches warm).
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// Bound on each request (connect, write, whole answer).
    pub op_timeout: Duration,
    /// Bound on the requests of one connection in the whole run, warm-up included.
    pub max_requests_per_connection: u64,
}

/// The outcome of a run.
#[derive(Clone, Debug, Default)]
pub struct HttpLoadResult {
    /// Requests answered inside the window.
    pub completed: u64,
    /// Length of the measured window (shorter than asked if every connection made its share
    /// of requests before its end).
    pub window: Duration,
    /// Latency of every request answered inside the window, microseconds, ascending.
    pub latencies_us: Vec<u32>,
    /// Requests answered over the whole run (warm-up included).
    pub answered: u64,
    /// Failed requests over the whole run, the first one's text, and all by kind.
    pub errors: u64,
    pub first_error: Option<String>,
    pub error_kinds: BTreeMap<String, u64>,
    /// Returning clients answered by a backend other than their cookie's (whole run).
    pub misrouted: u64,
    /// Answers (whole run) that set the balancer's cookie.
    pub set_cookies: u64,
    /// Answers (whole run) by backend (`X-Backend`).
    pub by_backend: BTreeMap<String, u64>,
}

impl HttpLoadResult {
    /// Requests answered per second of the window.
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.window.as_secs_f64()
    }

    /// Latency at quantile `q`, milliseconds (NaN without samples).
    pub fn latency_ms(&self, q: f64) -> f64 {
        quantile(&self.latencies_us, q).map_or(f64::NAN, |us| f64::from(us) / 1000.0)
    }
}

/// The measured window, fixed before any connection starts.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

/// Runs `spec`; `sample` is called on this thread at the window's start and at its end (e.g.
/// the balancer's CPU time), and both samples are returned with the result.
pub fn run<S>(
    spec: &HttpLoadSpec,
    mut sample: impl FnMut() -> Result<S>,
) -> Result<(HttpLoadResult, S, S)> {
    if spec.connections == 0 || spec.sources.is_empty() {
        bail!("an HTTP load run needs connections and source addresses");
    }
    if let Traffic::Returning(sessions) = &spec.traffic
        && sessions.is_empty()
    {
        bail!("returning-client traffic needs sessions");
    }
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (start_tx, start_rx) = mpsc::channel::<Window>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    // The thread lives on until the end of the window has been sampled: its own CPU time (see
    // LOAD_THREAD) is gone from /proc once it has ended.
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let owned = spec.clone();
    let handle = std::thread::Builder::new()
        .name(LOAD_THREAD.to_owned())
        .spawn(move || -> Result<HttpLoadResult> {
            enter_netns(&owned.ns)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let _ = ready_tx.send(());
            let window = start_rx
                .recv_timeout(START_TIMEOUT)
                .map_err(|_| anyhow!("no start signal"))?;
            let result = runtime.block_on(drive(Arc::new(owned), window));
            let _ = done_tx.send(());
            let _ = release_rx.recv_timeout(START_TIMEOUT);
            Ok(result)
        })
        .context("spawning the load thread")?;
    if ready_rx.recv_timeout(START_TIMEOUT).is_err() {
        drop(start_tx);
        return Err(match handle.join() {
            Ok(Err(err)) => err.context("the load thread did not start"),
            _ => anyhow!("the load thread did not start in {}", spec.ns),
        });
    }
    let start = Instant::now() + spec.warmup;
    let window = Window {
        start,
        end: start + spec.duration,
    };
    let _ = start_tx.send(window);
    std::thread::sleep(window.start.saturating_duration_since(Instant::now()));
    let before = sample()?;
    // Until the window's end, or until the load thread is done early (every connection made
    // its share of requests).
    let early = done_rx
        .recv_timeout(window.end.saturating_duration_since(Instant::now()))
        .is_ok();
    let after = sample();
    drop(release_tx);
    let after = after?;
    let measured = Instant::now()
        .min(window.end)
        .saturating_duration_since(window.start);
    let mut result = handle
        .join()
        .map_err(|_| anyhow!("the load thread panicked"))??;
    result.window = if early { measured } else { spec.duration };
    Ok((result, before, after))
}

/// Every connection's loop on this thread's runtime; their outcomes summed.
async fn drive(spec: Arc<HttpLoadSpec>, window: Window) -> HttpLoadResult {
    let tasks: Vec<_> = (0..spec.connections)
        .map(|i| tokio::spawn(connection_loop(spec.clone(), i, window)))
        .collect();
    let mut total = HttpLoadResult::default();
    for task in tasks {
        let Ok(outcome) = task.await else {
            total.errors += 1;
            total
                .first_error
                .get_or_insert_with(|| "a connection task panicked".into());
            continue;
        };
        total.completed += outcome.completed;
        total.answered += outcome.answered;
        total.errors += outcome.errors;
        total.misrouted += outcome.misrouted;
        total.set_cookies += outcome.set_cookies;
        total.latencies_us.extend(outcome.latencies_us);
        if total.first_error.is_none() {
            total.first_error = outcome.first_error;
        }
        for (kind, n) in outcome.error_kinds {
            *total.error_kinds.entry(kind).or_default() += n;
        }
        for (backend, n) in outcome.by_backend {
            *total.by_backend.entry(backend).or_default() += n;
        }
    }
    total.latencies_us.sort_unstable();
    total
}

/// One connection's requests: reconnects after a failure; stops at the window's end, after its
/// share of requests, or when [`STOP`] is raised.
async fn connection_loop(spec: Arc<HttpLoadSpec>, index: usize, window: Window) -> HttpLoadResult {
    let mut outcome = HttpLoadResult::default();
    let source = spec.sources[index % spec.sources.len()];
    let mut conn: Option<Conn> = None;
    let mut started = 0u64;
    let mut request = Vec::with_capacity(512);
    while started < spec.max_requests_per_connection
        && Instant::now() < window.end
        && !STOP.load(Ordering::Relaxed)
    {
        let session = match &spec.traffic {
            Traffic::NewClient => None,
            Traffic::Returning(sessions) => {
                let n = index as u64 + started * spec.connections as u64;
                Some(&sessions[(n % sessions.len() as u64) as usize])
            }
        };
        started += 1;
        write_request(&mut request, session.map(|s| s.cookie.as_str()));
        let t0 = Instant::now();
        let answer = tokio::time::timeout(spec.op_timeout, async {
            if conn.is_none() {
                conn = Some(Conn::connect(source, spec.target).await?);
            }
            let live = conn.as_mut().expect("connected above");
            live.exchange(&request, &spec.cookie_name).await
        })
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")));
        let ended = Instant::now();
        match answer {
            Ok(answer) => {
                outcome.answered += 1;
                if ended >= window.start && ended < window.end {
                    outcome.completed += 1;
                    let us = ended.duration_since(t0).as_micros();
                    outcome
                        .latencies_us
                        .push(u32::try_from(us).unwrap_or(u32::MAX));
                }
                if answer.set_cookie.is_some() {
                    outcome.set_cookies += 1;
                }
                if session.is_some_and(|s| s.backend != answer.backend) {
                    outcome.misrouted += 1;
                }
                *outcome.by_backend.entry(answer.backend).or_default() += 1;
                if answer.close {
                    conn = None;
                }
            }
            Err(err) => {
                conn = None;
                outcome.errors += 1;
                *outcome
                    .error_kinds
                    .entry(format!("{:?}: {err}", err.kind()))
                    .or_default() += 1;
                outcome
                    .first_error
                    .get_or_insert_with(|| format!("{source} -> {}: {err}", spec.target));
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    outcome
}

/// `GET /` with the cookie, if any, into `buf`.
fn write_request(buf: &mut Vec<u8>, cookie: Option<&str>) {
    buf.clear();
    buf.extend_from_slice(b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: slb-bench-http\r\n");
    if let Some(cookie) = cookie {
        buf.extend_from_slice(b"Cookie: ");
        buf.extend_from_slice(cookie.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    buf.extend_from_slice(b"\r\n");
}

/// `count` new-client requests over `connections` concurrent connections inside `ns`, keeping
/// each answer's cookie (`NAME=VALUE` of the `Set-Cookie` named `cookie_name`) and backend: the
/// sessions returning-client traffic then replays. Answers without that cookie are left out; a
/// failed request fails the whole call (it is a check that the balancer works, too). `timeout`
/// bounds each request.
pub fn learn_sessions(
    ns: &str,
    target: SocketAddr,
    sources: &[IpAddr],
    connections: usize,
    count: usize,
    cookie_name: &str,
    timeout: Duration,
) -> Result<Vec<Session>> {
    if connections == 0 || sources.is_empty() {
        bail!("learning sessions needs connections and source addresses");
    }
    let (ns, sources, cookie_name) = (ns.to_owned(), sources.to_vec(), cookie_name.to_owned());
    let handle = std::thread::Builder::new()
        .name(LOAD_THREAD.to_owned())
        .spawn(move || -> Result<Vec<Session>> {
            enter_netns(&ns)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let cookie_name = Arc::new(cookie_name);
                let tasks: Vec<_> = (0..connections)
                    .map(|i| {
                        let source = sources[i % sources.len()];
                        let cookie_name = cookie_name.clone();
                        // This connection's share of `count`.
                        let share = count / connections + usize::from(i < count % connections);
                        tokio::spawn(async move {
                            learn_on_one_connection(source, target, share, &cookie_name, timeout)
                                .await
                                .map_err(|err| anyhow!("{source} -> {target}: {err}"))
                        })
                    })
                    .collect();
                let mut sessions = Vec::with_capacity(count);
                for task in tasks {
                    sessions.extend(task.await.context("a learning task panicked")??);
                }
                Ok(sessions)
            })
        })
        .context("spawning the load thread")?;
    handle
        .join()
        .map_err(|_| anyhow!("the learning thread panicked"))?
}

/// `count` requests in turn on one connection (reconnecting if the balancer closes it), each
/// bounded by `timeout`.
async fn learn_on_one_connection(
    source: IpAddr,
    target: SocketAddr,
    count: usize,
    cookie_name: &str,
    timeout: Duration,
) -> io::Result<Vec<Session>> {
    let mut sessions = Vec::with_capacity(count);
    let mut request = Vec::new();
    write_request(&mut request, None);
    let mut conn: Option<Conn> = None;
    for _ in 0..count {
        let answer = tokio::time::timeout(timeout, async {
            if conn.is_none() {
                conn = Some(Conn::connect(source, target).await?);
            }
            let live = conn.as_mut().expect("connected above");
            live.exchange(&request, cookie_name).await
        })
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))?;
        if answer.close {
            conn = None;
        }
        if let Some(cookie) = answer.set_cookie {
            sessions.push(Session {
                cookie,
                backend: answer.backend,
            });
        }
    }
    Ok(sessions)
}

/// What the load generator keeps of an answer.
struct Answer {
    /// `X-Backend`, or the body (our backends write their name there too).
    backend: String,
    /// `NAME=VALUE` of the balancer's `Set-Cookie`, if it set one.
    set_cookie: Option<String>,
    /// The server asked to close the connection.
    close: bool,
}

/// A client connection with its receive buffer.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` holding data.
    filled: usize,
}

impl Conn {
    /// Connects from `source` (any port).
    async fn connect(source: IpAddr, target: SocketAddr) -> io::Result<Conn> {
        let socket = match target {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(source, 0))?;
        // Each request is one small write waiting for its answer: Nagle could only delay it.
        socket.set_nodelay(true)?;
        let stream = socket.connect(target).await?;
        Ok(Conn {
            stream,
            buf: vec![0; MAX_RESPONSE],
            filled: 0,
        })
    }

    /// Sends `request` and reads one complete `200` answer with a `Content-Length`.
    async fn exchange(&mut self, request: &[u8], cookie_name: &str) -> io::Result<Answer> {
        if self.filled > 0 {
            // One request at a time: nothing may come before its answer.
            return Err(invalid("data before the request"));
        }
        self.stream.write_all(request).await?;
        let (head_end, head) = loop {
            if let Some(end) = find_head_end(&self.buf[..self.filled]) {
                break (end, parse_head(&self.buf[..end], cookie_name)?);
            }
            self.fill().await?;
        };
        let end = head_end + head.content_length;
        if end > self.buf.len() {
            return Err(invalid("answer larger than expected"));
        }
        while self.filled < end {
            self.fill().await?;
        }
        let backend = head.backend.unwrap_or_else(|| {
            String::from_utf8_lossy(&self.buf[head_end..end])
                .trim()
                .to_owned()
        });
        self.buf.copy_within(end..self.filled, 0);
        self.filled -= end;
        Ok(Answer {
            backend,
            set_cookie: head.set_cookie,
            close: head.close,
        })
    }

    /// One read into the free part of the buffer; EOF is an error here (mid-answer).
    async fn fill(&mut self) -> io::Result<()> {
        if self.filled == self.buf.len() {
            return Err(invalid("answer too large"));
        }
        match self.stream.read(&mut self.buf[self.filled..]).await? {
            0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed mid-answer",
            )),
            n => {
                self.filled += n;
                Ok(())
            }
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

fn find_head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

/// What the load generator reads from an answer's head.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    content_length: usize,
    backend: Option<String>,
    set_cookie: Option<String>,
    close: bool,
}

/// Checks the status is 200 and a body length is given (no chunked bodies: our backends send
/// a length, and every proxy here passes it on); picks out `X-Backend`, the `Set-Cookie` named
/// `cookie_name` (its `NAME=VALUE`, attributes dropped) and `Connection: close`.
fn parse_head(head: &[u8], cookie_name: &str) -> io::Result<Head> {
    let text = std::str::from_utf8(head).map_err(|_| invalid("answer head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200 ") {
        return Err(invalid(&format!("unexpected status line {status:?}")));
    }
    let mut content_length = None;
    let mut backend = None;
    let mut set_cookie = None;
    let mut close = false;
    for (name, value) in lines.filter_map(|l| l.split_once(':')) {
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse().map_err(|_| invalid("bad Content-Length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid(&format!("unexpected Transfer-Encoding {value:?}")));
        } else if name.eq_ignore_ascii_case("x-backend") {
            backend = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("connection") {
            close |= value.to_ascii_lowercase().contains("close");
        } else if name.eq_ignore_ascii_case("set-cookie") {
            let pair = value.split(';').next().unwrap_or_default().trim();
            if pair
                .split_once('=')
                .is_some_and(|(n, v)| n.trim() == cookie_name && !v.is_empty())
            {
                set_cookie = Some(pair.to_owned());
            }
        }
    }
    Ok(Head {
        content_length: content_length.ok_or_else(|| invalid("answer without Content-Length"))?,
        backend,
        set_cookie,
        close,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_give_backend_cookie_and_length() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nSet-Cookie: other=1\r\nset-cookie: SRV=b2; path=/\r\nX-Backend: b2\r\n\r\n";
        assert_eq!(
            parse_head(head, "SRV").unwrap(),
            Head {
                content_length: 3,
                backend: Some("b2".into()),
                set_cookie: Some("SRV=b2".into()),
                close: false,
            }
        );
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let parsed = parse_head(head, "SRV").unwrap();
        assert!(parsed.close && parsed.set_cookie.is_none() && parsed.backend.is_none());
    }

    #[test]
    fn heads_without_200_or_length_are_errors() {
        assert!(
            parse_head(
                b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n",
                "S"
            )
            .is_err()
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n", "S").is_err());
        assert!(
            parse_head(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                "S"
            )
            .is_err()
        );
    }

    #[test]
    fn requests_carry_the_cookie() {
        let mut buf = Vec::new();
        write_request(&mut buf, Some("SRV=b1"));
        let text = String::from_utf8(buf.clone()).unwrap();
        assert!(text.starts_with("GET / HTTP/1.1\r\n"));
        assert!(text.contains("\r\nCookie: SRV=b1\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
        write_request(&mut buf, None);
        assert!(!String::from_utf8(buf).unwrap().contains("Cookie"));
    }
}
