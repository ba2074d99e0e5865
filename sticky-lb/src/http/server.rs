//! The HTTP server both the proxy's listeners and the metrics endpoint run: an accept loop that
//! stops on request and drains its connections (bounded), and one connection served by hyper's
//! auto builder (HTTP/1.1 or HTTP/2 by the client's preface, upgrades allowed) until it ends or
//! is drained.

use hyper_util::{
    rt::{TokioExecutor, TokioTimer},
    server::conn::auto,
};
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, oneshot, watch},
    task::JoinSet,
};
use tracing::warn;

/// Pause after a failed accept (usually no file descriptors left), so it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a connection accepted just before a stop may take to send its first request
/// before it is closed.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// Asks a running [`serve`] to stop; it answers on the enclosed sender once its listening
/// socket is closed (the address can be bound again).
pub type Stop = oneshot::Sender<oneshot::Sender<()>>;

/// Accepts on `listener` and runs `connection(stream, peer, drain)` for each connection until
/// asked to stop on `stopped` (or its sender is dropped); then closes the socket, says so, sets
/// `drain`, and waits for the connections to end, at most `drain_timeout`, before cutting the
/// rest. `name` prefixes the log lines.
pub async fn serve<F, C>(
    name: &'static str,
    listener: TcpListener,
    mut stopped: oneshot::Receiver<oneshot::Sender<()>>,
    drain_timeout: Duration,
    connection: F,
) where
    F: Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> C,
    C: Future<Output = ()> + Send + 'static,
{
    let (draining, drain) = watch::channel(false);
    let mut connections = JoinSet::new();
    let closed = loop {
        tokio::select! {
            stop = &mut stopped => break stop.ok(),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(connection(stream, peer, drain.clone()));
                }
                Err(e) => {
                    warn!("{name}: accepting a connection: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            // Reaps finished connections, whose results the set would otherwise keep.
            Some(_) = connections.join_next() => {}
        }
    };
    drop(listener);
    if let Some(closed) = closed {
        let _ = closed.send(());
    }
    let _ = draining.send(true);
    let _ = tokio::time::timeout(drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.shutdown().await;
}

/// The connection builder: HTTP/1.1 and HTTP/2, HTTP/1 request heads bounded by
/// `header_read_timeout` (slowloris).
pub fn builder(header_read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
}

/// Serves `io` with `service` until the connection ends. Once `drain` turns true it is shut
/// down gracefully (the request in flight answered, then closed; HTTP/2: GOAWAY), but not
/// before its first request arrived (at most [`FIRST_REQUEST_GRACE`]): a client whose
/// connection was accepted just before a stop has sent, or is sending, one, and closing under
/// it would reset it.
///
/// Errors: the connection's (I/O, protocol), for the caller's debug log.
pub async fn until_drained<I, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    mut drain: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let first_request = Arc::new(Notify::new());
    let arrived = first_request.clone();
    let service = FirstRequest {
        inner: service,
        arrived,
    };
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let mut had_request = false;
    let mut shutting_down = false;
    let mut draining = false;
    let grace = tokio::time::sleep(Duration::MAX);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            result = conn.as_mut() => return result,
            _ = first_request.notified(), if !had_request => {
                had_request = true;
                if draining && !shutting_down {
                    shutting_down = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            changed = drain.changed(), if !draining => {
                if changed.is_err() || *drain.borrow() {
                    draining = true;
                    if had_request {
                        shutting_down = true;
                        conn.as_mut().graceful_shutdown();
                    } else {
                        grace.as_mut().reset(tokio::time::Instant::now() + FIRST_REQUEST_GRACE);
                    }
                }
            }
            _ = &mut grace, if draining && !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// A service that says when its first request arrives.
struct FirstRequest<S> {
    inner: S,
    arrived: Arc<Notify>,
}

impl<S, R> hyper::service::Service<R> for FirstRequest<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, request: R) -> Self::Future {
        // A permit is stored if nobody waits yet: the arrival is never missed.
        self.arrived.notify_one();
        self.inner.call(request)
    }
}
