//! Restarts and upgrades without refused connections (HAProxy's `expose-fd listeners` with
//! `-x`, nginx's binary upgrade): `sticky-lb run --take-over` asks the running controller for
//! its listening sockets over the control socket, which passes them as file descriptors
//! (SCM_RIGHTS, unix(7)) and stops; the new process serves the very same sockets. A connection
//! that arrives meanwhile waits in the socket's accept queue for whichever process accepts
//! first; nothing is ever closed and re-bound, so none is refused. The old process lets its
//! requests in flight finish (at most [`super::DRAIN_TIMEOUT`]) after it let go of the lock.

use anyhow::{Context, Result, bail};
use std::{net::SocketAddr, path::Path};

/// Asks the controller on the control socket `path` for its listening sockets
/// ([`crate::control::Request::HandOver`]). Returns each with the VIP:port it listens on; none
/// when no controller runs there. The old controller stops once it has sent them.
///
/// Errors: the controller refused or failed, or what arrived does not match its reply.
pub fn take_over(path: &Path) -> Result<Vec<(SocketAddr, std::net::TcpListener)>> {
    let Some((reply, fds)) =
        crate::control::call_with_fds(path, &crate::control::Request::HandOver)?
    else {
        return Ok(Vec::new());
    };
    if !reply.ok {
        bail!(
            "the running controller refused to hand over: {}",
            reply.message
        );
    }
    let addresses: Vec<SocketAddr> = reply
        .data
        .as_ref()
        .and_then(|d| d.get("listeners"))
        .map(|l| serde_json::from_value(l.clone()))
        .transpose()
        .context("the running controller's listener list")?
        .unwrap_or_default();
    if fds.len() != addresses.len() {
        bail!(
            "the running controller named {} listeners but sent {} sockets",
            addresses.len(),
            fds.len()
        );
    }
    Ok(addresses
        .into_iter()
        .zip(fds)
        .map(|(address, fd)| (address, std::net::TcpListener::from(fd)))
        .collect())
}
