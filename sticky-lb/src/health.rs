//! Health checks: one tokio task per backend, so a slow or silent backend never delays another's
//! check. A task reports only transitions (up -> down after `fall` consecutive failures, down ->
//! up after `rise` consecutive successes), with the reason, to the controller, which rebuilds the
//! service's Maglev table and swaps it in.
//!
//! Checks go to the backend's own address, IPv4 or IPv6, through the kernel's TCP stack: an IPv6
//! backend's check also keeps its NDP entry in use, as an IPv4 backend's keeps its ARP entry.

use crate::config::{CheckKind, HealthCheck, status_matches};
use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use sticky_lb_common::BackendId;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};

/// Why a check failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Refused,
    Timeout,
    /// The connection was reset or closed before an answer.
    Reset,
    /// HTTP answered with a status outside the expected class.
    BadStatus(u16),
    /// HTTP answered something that is not an HTTP status line.
    NotHttp,
    Unreachable(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused => write!(f, "connection refused"),
            Failure::Timeout => write!(f, "timeout"),
            Failure::Reset => write!(f, "connection reset before an answer"),
            Failure::BadStatus(code) => write!(f, "bad status {code}"),
            Failure::NotHttp => write!(f, "answer is not HTTP"),
            Failure::Unreachable(e) => write!(f, "{e}"),
        }
    }
}

/// A backend's health as a task reports it.
#[derive(Debug, Clone)]
pub struct Transition {
    pub backend: BackendId,
    pub healthy: bool,
    /// The last check's result: why it went down, or how long the check that brought it up took.
    pub reason: String,
}

/// Rise/fall hysteresis: the state changes only after `rise` successes or `fall` failures in a
/// row, so a flapping backend cannot change state faster than that.
#[derive(Debug, Clone)]
pub struct Tracker {
    healthy: bool,
    streak: u32,
    /// No verdict yet: the first result decides (a new backend is not up before it passes a
    /// check, nor held down for `rise` intervals after it does).
    pending: bool,
}

impl Tracker {
    /// Backends start healthy (HAProxy's default): `fall` failures take one down.
    pub fn new() -> Tracker {
        Tracker::starting(true)
    }

    /// A tracker that starts from a known verdict (a checker restarted by a reload).
    pub fn starting(healthy: bool) -> Tracker {
        Tracker {
            healthy,
            streak: 0,
            pending: false,
        }
    }

    /// A tracker with no verdict: the first result is reported as the verdict.
    pub fn pending() -> Tracker {
        Tracker {
            healthy: false,
            streak: 0,
            pending: true,
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Records one result; returns the new state if it changed.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if self.pending {
            self.pending = false;
            self.healthy = ok;
            return Some(ok);
        }
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.healthy { fall } else { rise };
        if self.streak >= needed {
            self.healthy = ok;
            self.streak = 0;
            return Some(ok);
        }
        None
    }
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new()
    }
}

/// One check of `addr` (IPv4 or IPv6), bounded by `check.timeout`; `Ok` carries its latency.
///
/// A TCP check passes once the connection is established. An HTTP check then sends
/// `GET {check.path}` with `Host: {addr}` (an IPv6 address in brackets, `[2001:db8::11]:8080`)
/// and passes if the status code matches `check.expect`.
pub async fn probe(addr: SocketAddr, check: &HealthCheck) -> Result<Duration, Failure> {
    let started = Instant::now();
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Failure::Refused,
            std::io::ErrorKind::ConnectionReset => Failure::Reset,
            _ => Failure::Unreachable(e.to_string()),
        })?;
        if check.kind == CheckKind::Http {
            let request = format!(
                "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: sticky-lb-check\r\nConnection: close\r\n\r\n",
                check.path,
                host_header(addr)
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|_| Failure::Reset)?;
            // The status line is all we need: "HTTP/1.x NNN ...".
            let mut head = [0u8; 12];
            let mut got = 0;
            while got < head.len() {
                match stream.read(&mut head[got..]).await {
                    Ok(0) | Err(_) => return Err(Failure::Reset),
                    Ok(n) => got += n,
                }
            }
            if !head.starts_with(b"HTTP/1.") || head[8] != b' ' {
                return Err(Failure::NotHttp);
            }
            let code = std::str::from_utf8(&head[9..12])
                .ok()
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or(Failure::NotHttp)?;
            if !status_matches(&check.expect, code) {
                return Err(Failure::BadStatus(code));
            }
        }
        Ok(())
    };
    match tokio::time::timeout(check.timeout, attempt).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(failure)) => Err(failure),
        Err(_) => Err(Failure::Timeout),
    }
}

/// The Host header's value for a check of `addr`: the address and port as a URI authority
/// (RFC 9110 7.2), so an IPv6 address goes in brackets. The port is always there: the check's
/// port is rarely 80. An IPv6 zone (scope id) is left out, as it means nothing to the server.
fn host_header(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(addr) => format!("{}:{}", addr.ip(), addr.port()),
        SocketAddr::V6(addr) => format!("[{}]:{}", addr.ip(), addr.port()),
    }
}

/// Last check latency per backend, in seconds (for metrics).
pub type Latencies = Arc<Mutex<HashMap<BackendId, f64>>>;

/// Starts checking one backend at `addr` (IPv4 or IPv6) every `check.interval` (the first check
/// at once), starting from the verdict `healthy` (`None`: the first check decides); transitions
/// go to `events`, each check's latency to `latencies`.
pub fn spawn(
    backend: BackendId,
    addr: SocketAddr,
    check: HealthCheck,
    healthy: Option<bool>,
    events: mpsc::Sender<Transition>,
    latencies: Latencies,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tracker = healthy.map_or_else(Tracker::pending, Tracker::starting);
        let mut tick = tokio::time::interval(check.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let started = Instant::now();
            let result = probe(addr, &check).await;
            if let Ok(mut latencies) = latencies.lock() {
                latencies.insert(backend, started.elapsed().as_secs_f64());
            }
            if let Some(healthy) = tracker.observe(result.is_ok(), check.rise, check.fall) {
                let reason = match &result {
                    Ok(latency) => format!("check passed in {} ms", latency.as_millis()),
                    Err(failure) => failure.to_string(),
                };
                let transition = Transition {
                    backend,
                    healthy,
                    reason,
                };
                if events.send(transition).await.is_err() {
                    return; // the controller is gone
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut t = Tracker::new();
        assert_eq!(t.observe(false, 2, 3), None);
        assert_eq!(t.observe(false, 2, 3), None);
        assert_eq!(t.observe(false, 2, 3), Some(false));
        assert_eq!(t.observe(true, 2, 3), None);
        assert_eq!(t.observe(true, 2, 3), Some(true));
        assert!(t.healthy());
    }

    #[test]
    fn a_pending_tracker_takes_the_first_result_as_its_verdict() {
        let mut t = Tracker::pending();
        assert_eq!(t.observe(false, 2, 3), Some(false));
        assert_eq!(t.observe(true, 2, 3), None);
        assert_eq!(t.observe(true, 2, 3), Some(true));
        let mut t = Tracker::pending();
        assert_eq!(t.observe(true, 2, 3), Some(true));
    }

    #[test]
    fn flapping_never_changes_state_when_rise_and_fall_exceed_one() {
        let mut t = Tracker::new();
        for i in 0..100 {
            assert_eq!(t.observe(i % 2 == 0, 2, 2), None, "check {i}");
        }
        assert!(t.healthy());
        // A success in a failure streak resets it.
        let mut t = Tracker::new();
        for ok in [false, false, true, false, false, true] {
            assert_eq!(t.observe(ok, 2, 3), None);
        }
    }

    fn check(kind: CheckKind, expect: &str) -> HealthCheck {
        HealthCheck {
            kind,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(300),
            rise: 1,
            fall: 1,
            port: 0,
            path: "/".into(),
            expect: expect.into(),
        }
    }

    /// A server on 127.0.0.1 that answers each connection with `reply` (or resets if `None`).
    async fn server(reply: Option<&'static [u8]>) -> SocketAddr {
        server_on("127.0.0.1:0", reply, None).await
    }

    /// A server on `bind` that answers each connection with `reply` (or resets if `None`),
    /// sending each request's head to `requests` if given.
    async fn server_on(
        bind: &str,
        reply: Option<&'static [u8]>,
        requests: Option<mpsc::UnboundedSender<String>>,
    ) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                match reply {
                    Some(reply) => {
                        let mut buf = [0u8; 512];
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if let Some(requests) = &requests {
                            let _ = requests.send(String::from_utf8_lossy(&buf[..n]).into());
                        }
                        let _ = stream.write_all(reply).await;
                    }
                    None => {
                        // SO_LINGER 0 makes close send an RST: the "accepts then resets" case.
                        #[allow(deprecated)]
                        let _ = stream.set_linger(Some(Duration::ZERO));
                        drop(stream);
                    }
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn probes_report_the_reason() {
        let ok = server(Some(b"HTTP/1.1 200 OK\r\n\r\n")).await;
        let error = server(Some(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")).await;
        let garbage = server(Some(b"SSH-2.0-OpenSSH_9.2\r\n")).await;
        let reset = server(None).await;
        assert!(probe(ok, &check(CheckKind::Http, "2xx")).await.is_ok());
        assert!(probe(ok, &check(CheckKind::Tcp, "2xx")).await.is_ok());
        assert_eq!(
            probe(error, &check(CheckKind::Http, "2xx")).await,
            Err(Failure::BadStatus(500))
        );
        assert!(probe(error, &check(CheckKind::Http, "5xx")).await.is_ok());
        assert_eq!(
            probe(garbage, &check(CheckKind::Http, "2xx")).await,
            Err(Failure::NotHttp)
        );
        assert_eq!(
            probe(reset, &check(CheckKind::Http, "2xx")).await,
            Err(Failure::Reset)
        );
        // Nothing listens on the port the reset server's listener is not using: port 1 on
        // loopback is refused.
        let refused = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 1));
        assert_eq!(
            probe(refused, &check(CheckKind::Tcp, "2xx")).await,
            Err(Failure::Refused)
        );
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out() {
        // Accepts (the kernel completes the handshake) but never writes.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        assert_eq!(
            probe(addr, &check(CheckKind::Http, "2xx")).await,
            Err(Failure::Timeout)
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(listener);
    }

    /// Whether this host can listen on [::1] (IPv6 may be off, as in a container).
    async fn ipv6_loopback() -> bool {
        let usable = tokio::net::TcpListener::bind("[::1]:0").await.is_ok();
        if !usable {
            eprintln!("no IPv6 loopback here: skipped");
        }
        usable
    }

    #[tokio::test]
    async fn ipv6_probes_report_the_reason() {
        if !ipv6_loopback().await {
            return;
        }
        let ok = server_on("[::1]:0", Some(b"HTTP/1.1 200 OK\r\n\r\n"), None).await;
        let error = server_on("[::1]:0", Some(b"HTTP/1.1 503 Busy\r\n\r\n"), None).await;
        let reset = server_on("[::1]:0", None, None).await;
        assert!(ok.is_ipv6());
        assert!(probe(ok, &check(CheckKind::Tcp, "2xx")).await.is_ok());
        assert!(probe(ok, &check(CheckKind::Http, "2xx")).await.is_ok());
        assert_eq!(
            probe(error, &check(CheckKind::Http, "2xx")).await,
            Err(Failure::BadStatus(503))
        );
        assert_eq!(
            probe(reset, &check(CheckKind::Http, "2xx")).await,
            Err(Failure::Reset)
        );
        let refused = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 1));
        assert_eq!(
            probe(refused, &check(CheckKind::Tcp, "2xx")).await,
            Err(Failure::Refused)
        );
    }

    #[tokio::test]
    async fn the_http_check_names_the_host_with_its_port_and_brackets_for_ipv6() {
        if ipv6_loopback().await {
            let (requests, mut received) = mpsc::unbounded_channel();
            let reply = Some(&b"HTTP/1.1 204 No Content\r\n\r\n"[..]);
            let addr = server_on("[::1]:0", reply, Some(requests)).await;
            let mut http = check(CheckKind::Http, "2xx");
            http.path = "/healthz".into();
            assert!(probe(addr, &http).await.is_ok());
            let request = received.recv().await.unwrap();
            let expected = format!("GET /healthz HTTP/1.0\r\nHost: [::1]:{}\r\n", addr.port());
            assert!(request.starts_with(&expected), "{request:?}");
        }
        let v4 = SocketAddr::from(([198, 18, 0, 11], 8080));
        assert_eq!(host_header(v4), "198.18.0.11:8080");
        let v6: SocketAddr = "[2001:db8::11]:8080".parse().unwrap();
        assert_eq!(host_header(v6), "[2001:db8::11]:8080");
        // A zone is the balancer's business, not the server's.
        let scoped: SocketAddr = "[fe80::11%7]:80".parse().unwrap();
        assert_eq!(host_header(scoped), "[fe80::11]:80");
    }
}
