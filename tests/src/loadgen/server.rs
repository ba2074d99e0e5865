//! A small multi-threaded HTTP/1.1 server for the backends of the end-to-end benchmark.
//!
//! `GET /` gets `200` with the server's name as the body and in an `X-Backend` header (so a
//! client, or a proxy's log, can tell which backend answered); anything else gets `404`. Keep-alive is the HTTP/1.1 default; `Connection: close`
//! (or HTTP/1.0) makes the server close right after its answer, so the TIME_WAIT state stays on
//! the server side and the load generator never runs out of ports.
//!
//! A fixed pool of worker threads blocks in `accept` on one listener (the kernel wakes exactly
//! one per connection) and each serves its connection to the end: no thread is spawned per
//! connection, which would cost more CPU than the balancers under test.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::in_netns;

/// How often a worker waiting for the next request looks at the stop flag.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// A stalled client cannot hold a worker's write for longer than this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Safety net: one connection is served at most this long (a run lasts seconds).
const CONNECTION_MAX_LIFETIME: Duration = Duration::from_secs(120);
/// Safety net: a server nobody stops ends by itself.
pub(crate) const SERVER_MAX_LIFETIME: Duration = Duration::from_secs(4 * 3600);
/// A request head must fit in this; a longer one closes the connection.
pub(crate) const HEAD_LIMIT: usize = 4096;
/// Listen backlog: bursts of short connections from many client threads.
pub(crate) const BACKLOG: libc::c_int = 1024;

/// Shared by the handle and the workers.
struct Shared {
    stop: AtomicBool,
    requests: AtomicU64,
    connections: AtomicU64,
}

/// A running server; dropping it stops every worker and closes its connections.
pub struct HttpBackend {
    name: String,
    listener: Arc<TcpListener>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl HttpBackend {
    /// Listens on `bind` inside namespace `ns` and starts `workers` threads. `workers` bounds the
    /// keep-alive connections served at once: give it more than the client's concurrency.
    pub fn start(
        ns: &str,
        bind: impl Into<SocketAddr>,
        name: &str,
        workers: usize,
    ) -> Result<HttpBackend> {
        let bind = bind.into();
        // The socket keeps the namespace it was created in, so only the bind happens there; the
        // workers accept from wherever they run.
        let listener = in_netns(ns, || TcpListener::bind(bind))
            .with_context(|| format!("binding {bind} in {ns}"))?;
        // std listens with a small backlog; a deeper one absorbs connection bursts. Calling
        // listen again on a listening socket only changes the backlog.
        // SAFETY: valid listening socket.
        unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) };
        let listener = Arc::new(listener);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let ok = Arc::new(response(200, name, false));
        let ok_close = Arc::new(response(200, name, true));
        let mut server = HttpBackend {
            name: name.to_owned(),
            listener: listener.clone(),
            shared: shared.clone(),
            workers: Vec::with_capacity(workers),
        };
        for i in 0..workers {
            let (listener, shared) = (listener.clone(), shared.clone());
            let (ok, ok_close) = (ok.clone(), ok_close.clone());
            let worker = std::thread::Builder::new()
                .name(format!("http {name} {i}"))
                // Workers need little stack; hundreds of them should not reserve much memory.
                .stack_size(128 * 1024)
                .spawn(move || accept_loop(&listener, &shared, &ok, &ok_close))
                .context("spawning an HTTP worker")?;
            server.workers.push(worker);
        }
        Ok(server)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Stops the workers and waits for them (Drop does the same).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // shutdown(2) on a listening socket wakes every thread blocked in accept with EINVAL
        // (Linux), which is how a blocking accept pool is stopped without polling.
        // SAFETY: valid socket; the Arc keeps it open until the workers are gone.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for worker in self.workers.drain(..) {
            // Workers in a keep-alive read notice the flag within IDLE_POLL.
            let _ = worker.join();
        }
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The full answer, built once: status line, headers, body.
pub(crate) fn response(status: u16, name: &str, close: bool) -> Vec<u8> {
    let body = format!("{name}\n");
    let reason = if status == 200 { "OK" } else { "Not Found" };
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Backend: {name}\r\n{connection}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn accept_loop(listener: &TcpListener, shared: &Shared, ok: &[u8], ok_close: &[u8]) {
    let started = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) && started.elapsed() < SERVER_MAX_LIFETIME {
        match listener.accept() {
            Ok((stream, _)) => {
                shared.connections.fetch_add(1, Ordering::Relaxed);
                serve(stream, shared, ok, ok_close);
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            // After shutdown(2) accept fails with EINVAL: the stop flag ends the loop.
            Err(_) if shared.stop.load(Ordering::Relaxed) => break,
            // ECONNABORTED, EMFILE...: back off a little instead of spinning.
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Serves one connection until the client closes it, asks for `close`, or the server stops.
fn serve(mut stream: TcpStream, shared: &Shared, ok: &[u8], ok_close: &[u8]) {
    // One write per answer, and no Nagle delay when a client pipelines.
    let setup = stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(IDLE_POLL)))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)));
    if setup.is_err() {
        return;
    }
    let started = Instant::now();
    let mut buf = vec![0u8; HEAD_LIMIT];
    let mut filled = 0;
    loop {
        // Answer every complete head in the buffer (a client may pipeline).
        while let Some(end) = find_head_end(&buf[..filled]) {
            let head = &buf[..end];
            let close = wants_close(head);
            let answer: Vec<u8>;
            let bytes = if !head.starts_with(b"GET / ") {
                answer = response(404, "not found", close);
                &answer[..]
            } else if close {
                ok_close
            } else {
                ok
            };
            if stream.write_all(bytes).is_err() {
                return;
            }
            shared.requests.fetch_add(1, Ordering::Relaxed);
            if close {
                // Dropping the stream sends our FIN first: TIME_WAIT stays here.
                return;
            }
            buf.copy_within(end..filled, 0);
            filled -= end;
        }
        if filled == buf.len()
            || shared.stop.load(Ordering::Relaxed)
            || started.elapsed() > CONNECTION_MAX_LIFETIME
        {
            return;
        }
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return,
            Ok(n) => filled += n,
            Err(err)
                if matches!(
                    err.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// Length of the request head (through the blank line), if complete.
pub(crate) fn find_head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

/// HTTP/1.0 closes unless it asks for keep-alive; HTTP/1.1 keeps alive unless it asks to close.
pub(crate) fn wants_close(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let mut lines = text.split("\r\n");
    let http10 = lines.next().is_some_and(|l| l.ends_with("http/1.0"));
    let connection = lines
        .filter_map(|l| l.strip_prefix("connection:"))
        .map(str::trim)
        .last();
    match connection {
        Some(value) if value.contains("close") => true,
        Some(value) if value.contains("keep-alive") => false,
        _ => http10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_header_decides() {
        assert!(!wants_close(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(wants_close(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(wants_close(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(!wants_close(
            b"GET / HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n"
        ));
    }

    #[test]
    fn heads_end_at_the_blank_line() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nGET"), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn responses_carry_their_length() {
        let r = String::from_utf8(response(200, "b1", true)).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(r.contains("Content-Length: 3\r\n"));
        assert!(r.contains("Connection: close\r\n"));
        assert!(r.contains("X-Backend: b1\r\n"));
        assert!(r.ends_with("\r\n\r\nb1\n"));
    }
}
