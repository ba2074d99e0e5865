//! Restarts and upgrades without refused connections (HAProxy's `expose-fd listeners` with
//! `-x`, nginx's binary upgrade): `sticky-lb run --take-over` asks the running controller for
//! its listening sockets over the control socket, which passes them as file descriptors
//! (SCM_RIGHTS, unix(7)) and stops; the new process serves the very same sockets. A connection
//! that arrives meanwhile waits in the socket's accept queue for whichever process accepts
//! first; nothing is ever closed and re-bound, so none is refused. The old process lets its
//! requests in flight finish (at most [`super::DRAIN_TIMEOUT`]) after it let go of the lock.

use anyhow::{Context, Result, bail};
use std::{
    io::{Read, Write},
    net::SocketAddr,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::Path,
    time::Duration,
};

/// Listening sockets handed over, at most (one per `mode: http` service).
pub const MAX_LISTENERS: usize = 64;

/// Sends `fds` on the unix stream `socket` as one SCM_RIGHTS message with a one-byte payload.
///
/// Errors: the kernel's (`sendmsg(2)`), or more than [`MAX_LISTENERS`] descriptors.
pub fn send_fds(socket: RawFd, fds: &[RawFd]) -> std::io::Result<()> {
    if fds.len() > MAX_LISTENERS {
        return Err(std::io::Error::other("too many listening sockets"));
    }
    let mut byte = [b'F'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    if !fds.is_empty() {
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = space as _;
        // SAFETY: the control buffer is CMSG_SPACE(payload) bytes, room for one header and
        // `payload` bytes of descriptors.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&message);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(header),
                payload,
            );
        }
    }
    loop {
        // SAFETY: a valid socket and the message built above.
        let sent = unsafe { libc::sendmsg(socket, &message, libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => continue,
            // The control socket is nonblocking under tokio; one byte waits for room.
            std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
            _ => return Err(e),
        }
    }
}

/// Receives one SCM_RIGHTS message (as [`send_fds`] sends) from `socket`: the descriptors, owned.
fn recv_fds(socket: &UnixStream) -> std::io::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space =
        unsafe { libc::CMSG_SPACE((MAX_LISTENERS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: plain data; the buffers outlive recvmsg.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = space as _;
    // SAFETY: a valid socket; MSG_CMSG_CLOEXEC so the descriptors never leak into children.
    let got = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut message, libc::MSG_CMSG_CLOEXEC) };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if got == 0 {
        return Err(std::io::Error::other(
            "the controller closed before sending the sockets",
        ));
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote within `msg_controllen`.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header);
                let bytes = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    if message.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other(
            "listening sockets were cut off in transit",
        ));
    }
    Ok(fds)
}

/// Asks the controller on the control socket `path` for its listening sockets
/// ([`crate::control::Request::HandOver`]). Returns each with the VIP:port it listens on; none
/// when no controller runs there. The old controller stops once it has sent them.
///
/// Errors: the controller refused or failed, or what arrived does not match its reply.
pub fn take_over(path: &Path) -> Result<Vec<(SocketAddr, std::net::TcpListener)>> {
    let mut stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
    };
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(&crate::control::Request::HandOver)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    // Byte by byte up to the newline: the descriptors ride on the byte after it, which a
    // buffered read would swallow without its control message.
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        stream
            .read_exact(&mut byte)
            .context("reading the running controller's reply")?;
        reply.push(byte[0]);
    }
    let reply: crate::control::Reply =
        serde_json::from_slice(&reply).context("malformed reply from the running controller")?;
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
    let fds = recv_fds(&stream).context("receiving the listening sockets")?;
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
