//! TCP connections from a chosen source address, shared by the rig's test clients
//! ([`crate::rig`]) and the benchmark's load generator ([`crate::loadgen::client`]).
//!
//! std cannot bind a socket before connecting it, hence libc.

use std::io::{self, ErrorKind};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A blocking TCP connection from `source` (any port) to `target`, connected within `timeout`.
///
/// `timeout` is set as SO_SNDTIMEO before connecting, so it bounds the connect and stays on the
/// returned stream as its write timeout; no read timeout is set. A zero `timeout` would mean
/// "no timeout at all" to the kernel, so it fails at once with [`ErrorKind::TimedOut`] instead.
///
/// Errors of the set-up steps (socket, option, bind) name the step; connect errors are the
/// kernel's own (refused, unreachable, ...), or `TimedOut` when `timeout` ran out. `source` and
/// `target` must be of one family (IPv4 or IPv6); otherwise it fails with
/// [`ErrorKind::InvalidInput`] before making a socket.
pub fn connect_from(
    source: IpAddr,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    connect_bound(SocketAddr::new(source, 0), target, timeout)
}

/// [`connect_from`] with a fixed source port, bound with SO_REUSEADDR so a port whose last
/// connection has just closed can be taken again (as a client reusing its port does).
pub fn connect_from_port(
    source: SocketAddr,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    connect_bound(source, target, timeout)
}

/// Connects from `source` (port 0: chosen at connect time) to `target` within `timeout`.
fn connect_bound(
    source: SocketAddr,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let port = source.port();
    let source = source.ip();
    if source.is_ipv4() != target.is_ipv4() {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!("source {source} and target {target} are of different families"),
        ));
    }
    if timeout.is_zero() {
        return Err(io::Error::new(ErrorKind::TimedOut, "connect timed out"));
    }
    let domain = if source.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned by `fd` right away.
    let raw = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(step_error("socket", io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    // Pick the source port at connect time rather than bind time: a port then only has to be
    // unique per 4-tuple, not per source address, so thousands of short connections from one
    // address do not exhaust the ephemeral range (each port could otherwise be used only once
    // at a time per source address). The option is an IP-level one for IPv6 sockets too.
    let one: libc::c_int = 1;
    if port == 0 {
        set_option(&fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, &one)
            .map_err(|err| step_error("setsockopt IP_BIND_ADDRESS_NO_PORT", err))?;
    } else {
        set_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one)
            .map_err(|err| step_error("setsockopt SO_REUSEADDR", err))?;
    }

    let mut tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    if tv.tv_sec == 0 && tv.tv_usec == 0 {
        // Below a microsecond: rounded up (as std does), since a zero timeval means "wait
        // forever" to the kernel.
        tv.tv_usec = 1;
    }
    // On Linux SO_SNDTIMEO also bounds a blocking connect.
    set_option(&fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv)
        .map_err(|err| step_error("setsockopt SO_SNDTIMEO", err))?;

    with_sockaddr(&fd, SocketAddr::new(source, port), libc::bind)
        .map_err(|err| step_error(&format!("bind {source}"), err))?;
    if let Err(err) = with_sockaddr(&fd, target, libc::connect) {
        // A connect that ran into SO_SNDTIMEO reports EINPROGRESS.
        if err.raw_os_error() == Some(libc::EINPROGRESS) {
            return Err(io::Error::new(ErrorKind::TimedOut, "connect timed out"));
        }
        return Err(err);
    }
    Ok(TcpStream::from(fd))
}

/// The signature bind(2) and connect(2) share.
type AddrCall =
    unsafe extern "C" fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int;

/// Calls `call` (bind or connect) on `fd` with `addr` as a sockaddr_in or sockaddr_in6.
fn with_sockaddr(fd: &OwnedFd, addr: SocketAddr, call: AddrCall) -> io::Result<()> {
    let rc = match addr {
        SocketAddr::V4(v4) => {
            let sa = sockaddr_in(v4);
            // SAFETY: valid fd, a sockaddr_in of the size passed, borrowed for the whole call.
            unsafe {
                call(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
        }
        SocketAddr::V6(v6) => {
            let sa = sockaddr_in6(v6);
            // SAFETY: valid fd, a sockaddr_in6 of the size passed, borrowed for the whole call.
            unsafe {
                call(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_in6).cast(),
                    size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// setsockopt(2) with `value` as the option value. Only for the plain C types
/// the option `level`/`name` takes (c_int, timeval, linger, ...): the kernel
/// reads `value` as that type.
pub(crate) fn set_option<T>(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: valid fd; the kernel reads at most `size_of::<T>()` bytes of
    // `value`, which is borrowed for the whole call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `err` with the failed set-up step in front; its kind is kept so callers can still match on it.
fn step_error(step: &str, err: io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("{step}: {err}"))
}

fn sockaddr_in(addr: std::net::SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn sockaddr_in6(addr: std::net::SocketAddrV6) -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: addr.port().to_be(),
        sin6_flowinfo: addr.flowinfo().to_be(),
        sin6_addr: libc::in6_addr {
            s6_addr: addr.ip().octets(),
        },
        sin6_scope_id: addr.scope_id(),
    }
}
