//! `mode: http` services: sticky-lb terminates the client's HTTP (and TLS) itself, next to the
//! XDP path, and places every request on its own, by a sealed cookie or a session token where
//! `stick` says so (what XDP cannot do: it never sees a request).

pub mod token;
