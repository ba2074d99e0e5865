//! The HTTP benchmark's backends: the same answers as [`super::server`] (`GET /`: `200`, the
//! backend's name as the body and in `X-Backend`; anything else `404`; keep-alive unless asked
//! to close), but every backend's listener and connections on one event-loop thread (a tokio
//! current-thread runtime), each listener bound inside its own backend namespace.
//!
//! Why not the thread-per-connection server: a balancer keeps pools of connections to the
//! backends, and a blocked thread per pooled connection means a context switch for every
//! request and dozens of runnable threads fighting the load generator for its CPU, which shows
//! up as milliseconds of latency that belong to neither balancer. One thread that answers
//! whatever is ready costs a fraction of that.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use super::server::{
    BACKLOG, HEAD_LIMIT, SERVER_MAX_LIFETIME, find_head_end, response, wants_close,
};
use crate::netns::in_netns;

/// Name of the server's thread (what [`super::cpu::own_threads_seconds`] finds it by).
pub const SERVER_THREAD: &str = "http backends";

/// What one backend has served.
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    connections: AtomicU64,
}

/// A backend's two `200` answers, built once: keep-alive, and `Connection: close`.
type Answers = (Arc<[u8]>, Arc<[u8]>);

/// One backend: namespace, address to listen on, name it answers with.
#[derive(Clone, Debug)]
pub struct BackendSpec {
    pub ns: String,
    pub bind: SocketAddr,
    pub name: String,
}

/// The running servers; dropping it stops them and closes every connection.
pub struct EventLoopBackends {
    names: Vec<String>,
    counters: Arc<Vec<Counters>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoopBackends {
    /// Binds every backend's listener inside its namespace and starts the thread serving them.
    pub fn start(backends: &[BackendSpec]) -> Result<EventLoopBackends> {
        let mut listeners = Vec::with_capacity(backends.len());
        for backend in backends {
            // The socket keeps the namespace it was created in; the thread serves it from
            // wherever it runs.
            let listener = in_netns(&backend.ns, || TcpListener::bind(backend.bind))
                .with_context(|| format!("binding {} in {}", backend.bind, backend.ns))?;
            // A deeper backlog than std's for connection bursts; listen again only changes it.
            // SAFETY: valid listening socket.
            unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) };
            listener.set_nonblocking(true)?;
            listeners.push(listener);
        }
        let counters: Arc<Vec<Counters>> =
            Arc::new(backends.iter().map(|_| Counters::default()).collect());
        let answers: Vec<Answers> = backends
            .iter()
            .map(|b| {
                (
                    Arc::from(response(200, &b.name, false)),
                    Arc::from(response(200, &b.name, true)),
                )
            })
            .collect();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread_counters = counters.clone();
        let thread = std::thread::Builder::new()
            .name(SERVER_THREAD.to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err.into()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    for (i, (listener, (ok, ok_close))) in
                        listeners.into_iter().zip(answers).enumerate()
                    {
                        let listener = match tokio::net::TcpListener::from_std(listener) {
                            Ok(listener) => listener,
                            Err(err) => {
                                let _ = ready_tx.send(Err(err.into()));
                                return;
                            }
                        };
                        tokio::spawn(accept_loop(
                            listener,
                            thread_counters.clone(),
                            i,
                            ok,
                            ok_close,
                        ));
                    }
                    let _ = ready_tx.send(Ok(()));
                    // Until stopped (or the safety net); returning drops every task with the
                    // runtime, which closes every socket.
                    let _ = tokio::time::timeout(SERVER_MAX_LIFETIME, stop_rx).await;
                });
            })
            .context("spawning the backends' thread")?;
        let mut server = EventLoopBackends {
            names: backends.iter().map(|b| b.name.clone()).collect(),
            counters,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(server),
            Ok(Err(err)) => Err(err.context("starting the backends")),
            Err(_) => {
                server.shutdown();
                Err(anyhow!("the backends' thread did not start"))
            }
        }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Requests backend `i` (in start order) has answered.
    pub fn requests(&self, i: usize) -> u64 {
        self.counters[i].requests.load(Ordering::Relaxed)
    }

    /// Connections backend `i` has accepted.
    pub fn connections(&self, i: usize) -> u64 {
        self.counters[i].connections.load(Ordering::Relaxed)
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for EventLoopBackends {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    counters: Arc<Vec<Counters>>,
    i: usize,
    ok: Arc<[u8]>,
    ok_close: Arc<[u8]>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                counters[i].connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(
                    stream,
                    counters.clone(),
                    i,
                    ok.clone(),
                    ok_close.clone(),
                ));
            }
            // EMFILE and the like: back off a little instead of spinning.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

/// Serves one connection until the client closes it or asks for `close`; answers to
/// pipelined requests go out in one write.
async fn serve(
    mut stream: tokio::net::TcpStream,
    counters: Arc<Vec<Counters>>,
    i: usize,
    ok: Arc<[u8]>,
    ok_close: Arc<[u8]>,
) {
    if stream.set_nodelay(true).is_err() {
        return;
    }
    let mut buf = vec![0u8; HEAD_LIMIT];
    let mut filled = 0;
    let mut out = Vec::with_capacity(ok.len());
    loop {
        out.clear();
        let mut close = false;
        while let Some(end) = find_head_end(&buf[..filled]) {
            let head = &buf[..end];
            close = wants_close(head);
            if !head.starts_with(b"GET / ") {
                out.extend_from_slice(&response(404, "not found", close));
            } else if close {
                out.extend_from_slice(&ok_close);
            } else {
                out.extend_from_slice(&ok);
            }
            counters[i].requests.fetch_add(1, Ordering::Relaxed);
            buf.copy_within(end..filled, 0);
            filled -= end;
            if close {
                break;
            }
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
        // Closing after the answer: TIME_WAIT stays on this side. A head larger than the
        // buffer closes the connection too.
        if close || filled == buf.len() {
            return;
        }
        match stream.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => filled += n,
        }
    }
}
