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

pub mod connect;
pub mod cookie;
pub mod handover;
pub mod keys;
mod proxy;
pub mod route;
pub mod server;
mod session;
pub mod stats;
pub mod tls;
pub mod token;

pub use route::{BackendView, ServiceView};

use crate::config::BackendProtocol;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use keys::Keyring;
use route::Route;
use stats::{ServiceStats, Stats};
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

/// How long a client may take to send a request's headers (HTTP/1) before its connection is
/// closed (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight may go on once a listener stops (a service removed, or the
/// controller stopping); connections still open then are cut.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections a listener queues before accepting them.
const BACKLOG: u32 = 4096;
/// Time to connect to a backend; the rest of `response_timeout` waits for its answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything a service's requests are handled with; a plan swaps it in whole.
pub(crate) struct Frontend {
    route: Route,
    client: Client<connect::Connector, proxy::UpstreamBody>,
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
    /// The listening socket (a duplicate of the accept loop's): what a hand-over passes on.
    fd: OwnedFd,
    frontend: watch::Sender<Arc<Frontend>>,
    pool: PoolSettings,
    /// Asks the accept loop to close the socket and drain.
    stop: Option<server::Stop>,
    task: JoinHandle<()>,
}

/// The listeners of every `mode: http` service, by VIP:port.
pub struct Proxy {
    listeners: BTreeMap<SocketAddr, Listener>,
    /// Sockets taken over from the previous controller, until a plan's service claims them
    /// (those no service claims close with the first commit).
    inherited: Mutex<BTreeMap<SocketAddr, std::net::TcpListener>>,
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
        Proxy::with_listeners(Vec::new())
    }

    /// A proxy that serves `listeners` (taken over from a controller that ran before) for the
    /// services that listen on their addresses, instead of binding new sockets.
    pub fn with_listeners(listeners: Vec<(SocketAddr, std::net::TcpListener)>) -> Proxy {
        Proxy {
            listeners: BTreeMap::new(),
            inherited: Mutex::new(listeners.into_iter().collect()),
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
            (true, Some(path)) => Some(
                Keyring::load(path).map_err(|e| format!("cookie_keys {}: {e}", path.display()))?,
            ),
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
            let taken = || {
                let socket = self.inherited.lock().ok()?.remove(&listen)?;
                socket.set_nonblocking(true).ok()?;
                TcpListener::from_std(socket).ok()
            };
            let socket = match existing {
                Some(_) => None,
                None => Some(taken().map_or_else(|| bind(listen), Ok).map_err(|e| {
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
                    info!(
                        "{}: listening on {listen} (mode: http)",
                        frontend.route.name()
                    );
                    let Ok(fd) = socket.as_fd().try_clone_to_owned() else {
                        warn!("{listen}: cannot duplicate the listening socket; not served");
                        continue;
                    };
                    let (tx, rx) = watch::channel(frontend);
                    let (stop, stopped) = oneshot::channel();
                    let task = tokio::spawn(server::serve(
                        "http",
                        socket,
                        stopped,
                        DRAIN_TIMEOUT,
                        move |stream, peer, drain| connection(stream, peer, rx.clone(), drain),
                    ));
                    next.insert(
                        listen,
                        Listener {
                            fd,
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
                let _ = stop.send(oneshot::channel().0);
            }
        }
        self.stats.retain(&keep);
        if let Ok(mut inherited) = self.inherited.lock() {
            inherited.clear();
        }
    }

    /// For a hand-over: every listening socket (duplicated) with its VIP:port. This proxy
    /// keeps accepting until [`Proxy::stop_accepting`]; the kernel gives each new connection to
    /// whichever process accepts first.
    pub fn hand_over(&self) -> (Vec<SocketAddr>, Vec<OwnedFd>) {
        self.listeners
            .iter()
            .filter_map(|(listen, l)| Some((*listen, l.fd.try_clone().ok()?)))
            .unzip()
    }

    /// Stops accepting on every listener; each one's task ends once its connections are done
    /// (at most [`DRAIN_TIMEOUT`]): await the handles for that.
    pub fn stop_accepting(&mut self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut self.listeners)
            .into_values()
            .map(|mut listener| {
                if let Some(stop) = listener.stop.take() {
                    let _ = stop.send(oneshot::channel().0);
                }
                listener.task
            })
            .collect()
    }

    /// The token store of `service`, if it is a `stick.token` service served now (operator
    /// commands: `table show/get/delete/flush` on it).
    pub fn token_store(&self, service: &str) -> Option<token::TokenStore> {
        self.listeners.values().find_map(|listener| {
            let frontend = listener.frontend.borrow();
            if frontend.route.name() != service {
                return None;
            }
            frontend.tokens.clone()
        })
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
/// the request's authority: the backend, and with the PROXY protocol the client connection).
fn backend_pool(settings: PoolSettings) -> Client<connect::Connector, proxy::UpstreamBody> {
    let connector = connect::Connector {
        timeout: CONNECT_TIMEOUT,
    };
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

/// Serves one client connection of a listener (TLS handshake first, if the service terminates
/// TLS); each request is handled with the frontend current when it arrives.
async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    frontend: watch::Receiver<Arc<Frontend>>,
    drain: watch::Receiver<bool>,
) {
    let tls = frontend.borrow().tls.clone();
    // What the connection is, for X-Forwarded-Proto: a reload may turn TLS on or off for
    // the listener, but a connection keeps the protocol it began with.
    let https = tls.is_some();
    let service = hyper::service::service_fn(move |request| {
        let fe = frontend.borrow().clone();
        proxy::handle(fe, request, peer, https)
    });
    let builder = server::builder(HEADER_READ_TIMEOUT);
    let result = match tls {
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(stream) => {
                server::until_drained(&builder, TokioIo::new(stream), service, drain).await
            }
            Err(e) => {
                debug!("http: TLS handshake with {peer}: {e}");
                return;
            }
        },
        None => server::until_drained(&builder, TokioIo::new(stream), service, drain).await,
    };
    if let Err(e) = result {
        debug!("http: connection from {peer}: {e}");
    }
}
