//! `mode: http` services: sticky-lb terminates the client's HTTP (and TLS) itself, next to the
//! XDP path, and places every request on its own, by a sealed cookie or a session token where
//! `stick` says so (what XDP cannot do: it never sees a request). The XDP program passes such a
//! service's VIP:port to the host (the service is not in its index), where [`Proxy`] listens.
//!
//! The controller drives it through the same plan as the data path: after a plan validated,
//! [`Proxy::stage`] binds the listeners the plan adds and reads TLS files and cookie keys (any
//! error refuses the plan before anything changed); once the maps are written,
//! [`Proxy::commit`] swaps each listener's [`Frontend`] (its route, pool, keys, TLS) in whole.
//!
//! - `route`: the backends a request may go to and the policy's pick;
//! - `session`: which backend a request's cookie or token names, and what the response adds;
//! - `proxy`: the exchange with the backend, headers, upgrades;
//! - `cookie`, `keys`: the sealed persistence cookie and the key file;
//! - `token`: the token -> backend store in Redis (`stick.token`);
//! - `tls`: certificates; `stats`: the counters the metrics endpoint exports.

pub mod cookie;
pub mod keys;
mod proxy;
pub mod route;
mod session;
pub mod stats;
pub mod tls;
pub mod token;

pub use route::{BackendView, ServiceView};

use crate::config::BackendProtocol;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use keys::Keyring;
use route::Route;
use stats::{ServiceStats, Stats};
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::Duration,
};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{oneshot, watch},
    task::{JoinHandle, JoinSet},
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

/// How long a client may take to send a request's headers (HTTP/1) before its connection is
/// closed (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight may go on once a listener stops (a service removed, or the
/// controller stopping); connections still open then are cut.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (usually no file descriptors left), so it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Connections a listener queues before accepting them.
const BACKLOG: u32 = 4096;
/// Time to connect to a backend; the rest of `response_timeout` waits for its answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything a service's requests are handled with; a plan swaps it in whole.
pub(crate) struct Frontend {
    route: Route,
    client: Client<HttpConnector, proxy::UpstreamBody>,
    keys: Option<Keyring>,
    /// The token store, for a `stick.token` service.
    tokens: Option<token::TokenStore>,
    stats: Arc<ServiceStats>,
    tls: Option<TlsAcceptor>,
}

/// What a backend pool is built with: a listener keeps its pool (and its idle connections)
/// while these stay the same.
#[derive(Clone, Copy, Debug, PartialEq)]
struct PoolSettings {
    protocol: BackendProtocol,
    idle: usize,
    idle_timeout: Duration,
}

struct Listener {
    frontend: watch::Sender<Arc<Frontend>>,
    pool: PoolSettings,
    /// Asks the accept loop to close the socket and drain.
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// The listeners of every `mode: http` service, by VIP:port.
pub struct Proxy {
    listeners: BTreeMap<SocketAddr, Listener>,
    stats: Arc<Stats>,
    /// The token store while a service uses tokens, with what it was made of.
    tokens: Option<(TokenStoreSettings, token::TokenStore)>,
}

/// Where the token store is: the shared table's Redis and key prefix, and this node's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenStoreSettings {
    pub redis: String,
    pub key_prefix: String,
    pub node: String,
}

/// One service's next frontend, and its socket when the plan adds the listener.
struct StagedService {
    listen: SocketAddr,
    frontend: Arc<Frontend>,
    pool: PoolSettings,
    socket: Option<TcpListener>,
}

/// A plan's HTTP part, ready to take over: new listeners bound, TLS files and cookie keys read.
/// Dropped without [`Proxy::commit`], it changes nothing (its sockets close).
pub struct Staged {
    services: Vec<StagedService>,
    tokens: Option<(TokenStoreSettings, token::TokenStore)>,
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy::new()
    }
}

impl Proxy {
    pub fn new() -> Proxy {
        Proxy {
            listeners: BTreeMap::new(),
            stats: Arc::new(Stats::default()),
            tokens: None,
        }
    }

    /// The counters, for the metrics endpoint.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Prepares `services` (every `mode: http` service of the next plan) without changing what
    /// serves: binds the listeners not open yet (SO_REUSEPORT, so a second process can take
    /// over), reads each TLS certificate and key, and the cookie key file at `cookie_keys` if
    /// a service seals cookies. Must run on the runtime.
    ///
    /// Errors (one line, naming the service): a listener that cannot be bound (the VIP is not
    /// an address of this host, the port is taken), a TLS file or the key file that does not
    /// load.
    pub fn stage(
        &self,
        services: &[ServiceView],
        cookie_keys: Option<&Path>,
        token_store: Option<TokenStoreSettings>,
    ) -> Result<Staged, String> {
        let token_entries: usize = services
            .iter()
            .filter_map(|s| s.config.stick.token.as_ref().map(|t| t.cache))
            .sum();
        let tokens = match (token_entries > 0, token_store) {
            (true, Some(settings)) => match &self.tokens {
                Some((running, store)) if *running == settings => Some((settings, store.clone())),
                _ => {
                    let store = token::TokenStore::new(
                        &settings.redis,
                        &settings.key_prefix,
                        &settings.node,
                        token_entries,
                        self.stats.tokens.clone(),
                    )
                    .map_err(|e| format!("the token store: {e:#}"))?;
                    Some((settings, store))
                }
            },
            (true, None) => return Err("stick.token needs shared_table".into()),
            (false, _) => None,
        };
        let needs_keys = services.iter().any(|s| s.config.stick.cookie.is_some());
        let keys = match (needs_keys, cookie_keys) {
            (true, Some(path)) => Some(Keyring::load(path).map_err(|e| {
                format!("cookie_keys {}: {e}", path.display())
            })?),
            (true, None) => return Err("stick.cookie needs cookie_keys".into()),
            (false, _) => None,
        };
        let mut staged = Vec::with_capacity(services.len());
        for view in services {
            let listen = view.listen();
            let http = view.http();
            let tls = match &http.tls {
                Some(files) => Some(TlsAcceptor::from(
                    tls::server_config(files)
                        .map_err(|e| format!("service {}: http.tls: {e:#}", view.name()))?,
                )),
                None => None,
            };
            let pool = PoolSettings {
                protocol: http.backend_protocol,
                idle: http.pool_idle,
                idle_timeout: http.pool_idle_timeout,
            };
            let existing = self.listeners.get(&listen);
            let client = match existing {
                Some(l) if l.pool == pool => l.frontend.borrow().client.clone(),
                _ => backend_pool(pool),
            };
            let socket = match existing {
                Some(_) => None,
                None => Some(bind(listen).map_err(|e| {
                    format!(
                        "service {}: cannot listen on {listen}: {e} (a mode: http service's vip must be an address of this host)",
                        view.name()
                    )
                })?),
            };
            let stats = self.stats.clone();
            let name = view.name().to_string();
            let route = Route::build(view, |backend| stats.backend(&name, backend));
            staged.push(StagedService {
                listen,
                frontend: Arc::new(Frontend {
                    route,
                    client,
                    keys: view.config.stick.cookie.as_ref().and(keys.clone()),
                    tokens: view
                        .config
                        .stick
                        .token
                        .as_ref()
                        .and(tokens.as_ref().map(|(_, store)| store.clone())),
                    stats: self.stats.service(view.name()),
                    tls,
                }),
                pool,
                socket,
            });
        }
        Ok(Staged {
            services: staged,
            tokens,
        })
    }

    /// Puts `staged` in service: each kept listener's frontend is swapped (requests in flight
    /// finish with the one they started with), new listeners start accepting, and listeners
    /// no service names any more stop accepting and drain in the background (bounded by
    /// [`DRAIN_TIMEOUT`]).
    pub fn commit(&mut self, staged: Staged) {
        let keep: Vec<(String, Vec<String>)> = staged
            .services
            .iter()
            .map(|s| {
                (
                    s.frontend.route.name().to_string(),
                    s.frontend
                        .route
                        .backends
                        .iter()
                        .map(|b| b.name().to_string())
                        .collect(),
                )
            })
            .collect();
        let mut next = BTreeMap::new();
        self.tokens = staged.tokens;
        for service in staged.services {
            let StagedService {
                listen,
                frontend,
                pool,
                socket,
            } = service;
            match (self.listeners.remove(&listen), socket) {
                (Some(mut listener), _) => {
                    listener.frontend.send_replace(frontend);
                    listener.pool = pool;
                    next.insert(listen, listener);
                }
                (None, Some(socket)) => {
                    info!("{}: listening on {listen} (mode: http)", frontend.route.name());
                    let (tx, rx) = watch::channel(frontend);
                    let (stop, stopped) = oneshot::channel();
                    let task = tokio::spawn(serve(socket, rx, stopped));
                    next.insert(
                        listen,
                        Listener {
                            frontend: tx,
                            pool,
                            stop: Some(stop),
                            task,
                        },
                    );
                }
                (None, None) => warn!("{listen}: staged without a socket; not served"),
            }
        }
        for (listen, mut listener) in std::mem::replace(&mut self.listeners, next) {
            info!("{listen}: no longer served; draining its connections");
            if let Some(stop) = listener.stop.take() {
                let _ = stop.send(());
            }
        }
        self.stats.retain(&keep);
    }

    /// Stops every listener and waits until their connections are done (at most
    /// [`DRAIN_TIMEOUT`]).
    pub async fn shutdown(&mut self) {
        let listeners = std::mem::take(&mut self.listeners);
        let mut tasks = Vec::new();
        for (_, mut listener) in listeners {
            if let Some(stop) = listener.stop.take() {
                let _ = stop.send(());
            }
            tasks.push(listener.task);
        }
        for task in tasks {
            let _ = task.await;
        }
    }

    /// The VIP:ports served now.
    pub fn listening(&self) -> Vec<SocketAddr> {
        self.listeners.keys().copied().collect()
    }
}

/// A listening socket on `listen` with SO_REUSEADDR and SO_REUSEPORT: a new sticky-lb process
/// binds the same VIP:port while the old one still serves, and the kernel spreads new
/// connections over both until the old one closes its socket (a restart without refused
/// connections).
fn bind(listen: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match listen {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(listen)?;
    socket.listen(BACKLOG)
}

/// A pool of keep-alive connections to the backends (one pool per service, keyed inside by
/// backend address).
fn backend_pool(settings: PoolSettings) -> Client<HttpConnector, proxy::UpstreamBody> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector.enforce_http(true);
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(settings.idle_timeout)
        .pool_max_idle_per_host(settings.idle)
        .http2_only(settings.protocol == BackendProtocol::Http2)
        // A request is retried on a new connection when an idle pooled one turns out closed.
        .retry_canceled_requests(true)
        .set_host(false);
    builder.build(connector)
}

/// Accepts until `stopped`, then closes the socket and lets the connections finish (bounded).
async fn serve(
    listener: TcpListener,
    frontend: watch::Receiver<Arc<Frontend>>,
    mut stopped: oneshot::Receiver<()>,
) {
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let watcher = graceful.watcher();
                    let frontend = frontend.clone();
                    connections.spawn(connection(stream, peer, frontend, watcher));
                }
                Err(e) => {
                    warn!("http: accepting a connection: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
    connections.shutdown().await;
}

/// Serves one client connection (TLS handshake first, if the service terminates TLS), HTTP/1.1
/// or HTTP/2 by the client's preface; each request is handled with the frontend current when
/// it arrives.
async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    frontend: watch::Receiver<Arc<Frontend>>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let tls = frontend.borrow().tls.clone();
    // What the connection is, for X-Forwarded-Proto: a reload may turn TLS on or off for
    // the listener, but a connection keeps the protocol it began with.
    let https = tls.is_some();
    let service = hyper::service::service_fn(move |request| {
        let fe = frontend.borrow().clone();
        proxy::handle(fe, request, peer, https)
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let result = match tls {
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(stream) => {
                watcher
                    .watch(
                        builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .into_owned(),
                    )
                    .await
            }
            Err(e) => {
                debug!("http: TLS handshake with {peer}: {e}");
                return;
            }
        },
        None => {
            watcher
                .watch(
                    builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned(),
                )
                .await
        }
    };
    if let Err(e) = result {
        debug!("http: connection from {peer}: {e}");
    }
}
