//! `mode: http` services: sticky-lb terminates the client's HTTP (and TLS) itself, next to the
//! XDP path, and places every request on its own, by a sealed cookie or a session token where
//! `stick` says so (what XDP cannot do: it never sees a request).
//!
//! - `keys`: the cookie-sealing keys (`cookie_keys`), with ids so that keys rotate;
//! - `cookie`: the sealed persistence cookie and the `Cookie` / `Set-Cookie` headers;
//! - `tls`: PEM certificate and key files -> a rustls server config (ALPN h2, http/1.1).

pub mod cookie;
pub mod keys;
pub mod tls;
