//! The settings of `mode: http` services: the proxy (`http:`) and the two request-level
//! persistence methods (`stick.cookie`, `stick.token`).

use super::units::{duration, opt_duration};
use serde::Deserialize;
use std::{path::PathBuf, time::Duration};

/// `mode`: what the balancer does with a service's connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceMode {
    /// Layer 4 (IPVS, HAProxy `mode tcp`): the XDP program places each connection and forwards
    /// its packets; the balancer never reads the stream.
    #[default]
    Tcp,
    /// Layer 7 (HAProxy `mode http`): the XDP program passes the VIP:port to the host, where
    /// sticky-lb terminates HTTP/1.1 and HTTP/2 (and TLS, if configured) and places each
    /// request on its own, by cookie or token when `stick` says so.
    Http,
}

impl ServiceMode {
    pub fn name(self) -> &'static str {
        match self {
            ServiceMode::Tcp => "tcp",
            ServiceMode::Http => "http",
        }
    }
}

/// `http:` of a `mode: http` service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// TLS termination: clients speak HTTPS (HTTP/2 offered by ALPN) to the VIP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Add `X-Forwarded-For`, `X-Forwarded-Proto` and `Forwarded` (RFC 7239) to each request,
    /// so backends see the client's address. Default true.
    #[serde(default = "yes")]
    pub forwarded: bool,
    /// Open every backend connection with a PROXY protocol v2 header naming the client
    /// (HAProxy `send-proxy-v2`). Default false: the backend must expect it.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// `http1` (default) or `http2` (HTTP/2 over cleartext, prior knowledge) to the backends.
    #[serde(default)]
    pub backend_protocol: BackendProtocol,
    /// Time a backend has to connect and send a response's headers; then 504 (or, before
    /// anything was sent, the next backend under `on_failure: redispatch`). Default 30s.
    #[serde(default = "default_response_timeout", deserialize_with = "duration")]
    pub response_timeout: Duration,
    /// Idle keep-alive connections kept per backend (entries). Default 64.
    #[serde(default = "default_pool_idle")]
    pub pool_idle: usize,
    /// How long an idle backend connection is kept. Default 60s.
    #[serde(default = "default_pool_idle_timeout", deserialize_with = "duration")]
    pub pool_idle_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            tls: None,
            forwarded: true,
            proxy_protocol: false,
            backend_protocol: BackendProtocol::default(),
            response_timeout: default_response_timeout(),
            pool_idle: default_pool_idle(),
            pool_idle_timeout: default_pool_idle_timeout(),
        }
    }
}

/// `http.tls`: PEM files, read at start and on every reload.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain (PEM), leaf first.
    pub certificate: PathBuf,
    /// The leaf's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendProtocol {
    #[default]
    Http1,
    Http2,
}

/// `stick.on_failure` of a `mode: http` service: what a request whose cookie or token names a
/// backend that is down or disabled gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Placed again by the policy, and the cookie (or token) re-issued (HAProxy `redispatch`).
    #[default]
    Redispatch,
    /// 503 with `Retry-After`: the session is worth more than the request (the client's state
    /// lives only on that backend).
    Strict,
}

/// `stick.cookie`: the balancer inserts a cookie naming the client's backend (HAProxy
/// `cookie NAME insert`, nginx `sticky cookie`). Its value is sealed (AEAD with a key from
/// `cookie_keys`), so it neither shows the backend's address nor lets a client pick one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CookieConfig {
    /// Cookie name (an RFC 6265 token). Default `SLBID`.
    #[serde(default = "default_cookie_name")]
    pub name: String,
    /// `Max-Age` sent to the browser; unset: a session cookie (gone when the browser closes).
    #[serde(default, deserialize_with = "opt_duration")]
    pub max_age: Option<Duration>,
    #[serde(default)]
    pub domain: Option<String>,
    /// Default `/`.
    #[serde(default = "default_cookie_path")]
    pub path: String,
    #[serde(default)]
    pub secure: bool,
    /// Default true: scripts in the page have no use for it.
    #[serde(default = "yes")]
    pub httponly: bool,
    #[serde(default)]
    pub samesite: Option<SameSite>,
    /// A cookie not seen for longer counts as absent (HAProxy `maxidle`), from the last-seen
    /// time sealed in it (wall clock).
    #[serde(default, deserialize_with = "opt_duration")]
    pub max_idle: Option<Duration>,
    /// A cookie issued longer ago counts as absent (HAProxy `maxlife`).
    #[serde(default, deserialize_with = "opt_duration")]
    pub max_life: Option<Duration>,
    /// Add `Cache-Control: no-cache="Set-Cookie"` to responses that set it, so a shared cache
    /// never hands one client's cookie to another (HAProxy `nocache`).
    #[serde(default)]
    pub nocache: bool,
    /// Remove the balancer's cookie from requests before they reach the backend (HAProxy
    /// `indirect`).
    #[serde(default)]
    pub indirect: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SameSite {
    Strict,
    Lax,
    None,
}

impl SameSite {
    pub fn name(self) -> &'static str {
        match self {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
            SameSite::None => "None",
        }
    }
}

/// `stick.token`: a session token, token -> backend kept in the shared store (Redis, the
/// `shared_table`), so every balancer node routes it alike.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The balancer issues a random 128-bit token in this cookie.
    #[serde(default)]
    pub cookie: Option<String>,
    /// ... or in this response header, which the client sends back in the same request header.
    #[serde(default)]
    pub header: Option<String>,
    /// Learn the application's own session cookie of this name from the backend's response
    /// (HAProxy `stick store-response`, nginx `sticky learn`) instead of issuing one.
    #[serde(default)]
    pub learn_from_response_cookie: Option<String>,
    /// Tokens kept in each node's cache in front of the store (entries). Default 100000.
    #[serde(default = "default_token_cache")]
    pub cache: usize,
}

fn yes() -> bool {
    true
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_pool_idle() -> usize {
    64
}
fn default_pool_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_cookie_name() -> String {
    "SLBID".into()
}
fn default_cookie_path() -> String {
    "/".into()
}
fn default_token_cache() -> usize {
    100_000
}

/// Whether `name` is an RFC 7230/6265 token (what cookie and header names must be).
pub fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
