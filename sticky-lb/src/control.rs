//! The control socket: a Unix socket at `/run/sticky-lb/[<netns>/]<interface>.sock` (mode 0600,
//! so only root reaches it) on which the running controller takes operator commands, one JSON
//! request per line, one JSON reply per line. `sticky-lb backend ...` is its client.
//!
//! Requests are handed to the controller's main loop, which owns the data path; a malformed or
//! oversized request gets an error reply and changes nothing.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;
/// The most tokens `table show --service S` lists (a listing stops there).
pub const TOKEN_LIST_LIMIT: usize = 100_000;

/// What an operator can ask.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", tag = "command")]
pub enum Request {
    /// Change one backend's administrative state or weight.
    Backend {
        service: String,
        backend: String,
        action: BackendAction,
    },
    /// Add a backend to a service (kept across reloads with `runtime_changes: keep`).
    BackendAdd {
        service: String,
        backend: String,
        address: std::net::IpAddr,
        weight: u32,
        mac: Option<String>,
        /// NAT: the port the backend listens on, when not the service's.
        #[serde(default)]
        port: Option<u16>,
    },
    /// Remove a backend as `backend_removal` says (drain, or at once).
    BackendRemove { service: String, backend: String },
    /// A backend change (`backend`, `backend-add`, `backend-remove`) for every node sharing
    /// the stick table: applied here, and published through the shared table to the others.
    AllNodes { request: Box<Request> },
    /// The stick entries of one client address (in every service, or one).
    TableGet {
        client: std::net::IpAddr,
        service: Option<String>,
    },
    /// Stick a client to a backend (`SERVICE/BACKEND`).
    TableSet {
        client: std::net::IpAddr,
        service: String,
        backend: String,
    },
    /// Forget a client (in every service, or one): its next connection is placed anew.
    TableDelete {
        client: std::net::IpAddr,
        service: Option<String>,
    },
    /// Forget every client (of every service, or one). Without a service, the tokens of every
    /// `stick.token` service go too; a named token service is [`Request::TokenFlush`].
    TableFlush { service: Option<String> },
    /// `run --take-over`: send the listening sockets of the `mode: http` services with the
    /// reply (SCM_RIGHTS), then stop without detaching, so the new process serves them.
    HandOver,
    /// The tokens of a `stick.token` service as the shared store holds them: at most `limit`,
    /// sorted by token (`table show --service S`).
    TokenList { service: String, limit: usize },
    /// One token of a `stick.token` service (`table get TOKEN --service S`).
    TokenGet { service: String, token: String },
    /// Forget one token: its next request is placed anew, on every node (`table delete`).
    TokenDelete { service: String, token: String },
    /// Forget a token service's tokens: every one, or only those placed on `backend` (an
    /// evacuation, `table flush --service S --backend B`).
    TokenFlush {
        service: String,
        backend: Option<String>,
    },
    /// Counters of the data path.
    Stats,
    /// Re-read the config file and apply the difference.
    Reload,
    /// Detach the data path, remove its pinned state and stop the controller.
    Detach,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", tag = "action", content = "value")]
pub enum BackendAction {
    /// No new clients; stuck clients stay until their entries expire, open connections until
    /// they close.
    Drain,
    /// Back to normal (up if its health checks pass).
    Enable,
    /// Out of service like a failed backend (stuck clients move), without regard to checks.
    Disable,
    /// New relative share of new clients; 0 drains.
    Weight(u32),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    /// One line (or a few) for people.
    pub message: String,
    /// Structured result for `--json` (table rows, counters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// Descriptors sent after the reply's line ([`Request::HandOver`]); never serialized.
    #[serde(skip)]
    pub fds: Fds,
}

/// Descriptors a reply carries (shared, so a reply stays cheap to clone).
#[derive(Clone, Default)]
pub struct Fds(pub Option<std::sync::Arc<Vec<std::os::fd::OwnedFd>>>);

impl std::fmt::Debug for Fds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} fd(s)", self.0.as_ref().map_or(0, |v| v.len()))
    }
}

impl Reply {
    pub fn ok(message: impl Into<String>) -> Reply {
        Reply {
            ok: true,
            message: message.into(),
            data: None,
            fds: Fds::default(),
        }
    }

    pub fn with_data(message: impl Into<String>, data: serde_json::Value) -> Reply {
        Reply {
            ok: true,
            message: message.into(),
            data: Some(data),
            fds: Fds::default(),
        }
    }

    pub fn error(message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            message: message.into(),
            data: None,
            fds: Fds::default(),
        }
    }
}

/// What `table get KEY` (or, with `delete`, `table delete KEY`) asks for: a token when
/// `service` names a `mode: http` service (`http`), otherwise the stick entries of client
/// address KEY. Errors (one line): a KEY that is not an address where an address is needed.
pub fn keyed_request(
    key: &str,
    service: Option<String>,
    http: bool,
    delete: bool,
) -> Result<Request, String> {
    if let (true, Some(service)) = (http, service.clone()) {
        let token = key.to_string();
        return Ok(match delete {
            true => Request::TokenDelete { service, token },
            false => Request::TokenGet { service, token },
        });
    }
    let client: std::net::IpAddr = key.parse().map_err(|_| {
        format!(
            "'{key}' is not a client address (a token needs --service naming a mode: http service with stick.token)"
        )
    })?;
    Ok(match delete {
        true => Request::TableDelete { client, service },
        false => Request::TableGet { client, service },
    })
}

/// What `table flush [--service S] [--backend B]` asks for; `http`: S is a `mode: http`
/// service. Errors (one line): `--backend` without a token service to evacuate.
pub fn flush_request(
    service: Option<String>,
    backend: Option<String>,
    http: bool,
) -> Result<Request, String> {
    match (service, backend, http) {
        (Some(service), backend, true) => Ok(Request::TokenFlush { service, backend }),
        (service, None, _) => Ok(Request::TableFlush { service }),
        (None, Some(_), _) => Err("--backend needs --service naming a token service".into()),
        (Some(service), Some(_), false) => Err(format!(
            "--backend evacuates the tokens of a stick.token service; {service} keeps its clients in the stick table (`table delete CLIENT` forgets one)"
        )),
    }
}

/// A request on its way to the controller, with the channel for its reply.
pub type Envelope = (Request, oneshot::Sender<Reply>);

pub fn socket_path(netns: Option<&str>, interface: &str) -> PathBuf {
    crate::state::path(netns, interface).with_extension("sock")
}

/// Binds the socket (replacing a stale one) and serves it until the returned handle is dropped.
pub fn serve(path: &Path, requests: mpsc::Sender<Envelope>) -> Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        crate::state::create_run_dir(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // The socket's mode already keeps others out; checking the peer's uid as well means
            // a loosened mode or a passed fd still cannot command the data path.
            let peer_is_root = stream.peer_cred().map(|c| c.uid() == 0).unwrap_or(false);
            let requests = requests.clone();
            tokio::spawn(async move {
                let raw = std::os::fd::AsRawFd::as_raw_fd(&stream);
                let (read, mut write) = stream.into_split();
                if !peer_is_root {
                    let text = serde_json::to_string(&Reply::error("permission denied: root only"))
                        .unwrap_or_default();
                    let _ = write.write_all(format!("{text}\n").as_bytes()).await;
                    return;
                }
                // Read at most MAX_REQUEST bytes: an endless line cannot exhaust memory.
                let mut lines = tokio::io::BufReader::new(read.take(MAX_REQUEST as u64)).lines();
                let reply =
                    match tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await {
                        Ok(Ok(Some(line))) => match serde_json::from_str::<Request>(&line) {
                            Ok(request) => {
                                let (tx, rx) = oneshot::channel();
                                if requests.send((request, tx)).await.is_err() {
                                    Reply::error("the controller is shutting down")
                                } else {
                                    rx.await.unwrap_or_else(|_| Reply::error("no reply"))
                                }
                            }
                            Err(e) => Reply::error(format!("malformed request: {e}")),
                        },
                        Ok(Ok(None)) => return,
                        Ok(Err(e)) => Reply::error(format!("unreadable request: {e}")),
                        Err(_) => Reply::error("no request within 5 s"),
                    };
                let mut text = serde_json::to_string(&reply).unwrap_or_default();
                text.push('\n');
                if write.write_all(text.as_bytes()).await.is_ok()
                    && let Some(fds) = &reply.fds.0
                {
                    let raw_fds: Vec<_> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
                    // `write` (and so the socket) lives until this returns.
                    if let Err(e) = send_fds(raw, &raw_fds) {
                        tracing::warn!("handing the listening sockets over: {e}");
                    }
                }
            });
        }
    }))
}

/// Sends one request to a running controller and returns its reply (the CLI side).
pub fn call(path: &Path, request: &Request) -> Result<Reply> {
    let mut stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "no sticky-lb controller is running here ({} missing)",
                path.display()
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            bail!(
                "permission denied on {} (the control socket is root's)",
                path.display()
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            bail!(
                "no sticky-lb controller is running here (stale {})",
                path.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
    };
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .context("reading the controller's reply")?;
    serde_json::from_str(&reply).context("malformed reply from the controller")
}

/// Descriptors one reply carries, at most (listening sockets: one per `mode: http` service).
pub const MAX_FDS: usize = 64;

/// Sends `fds` on the unix stream `socket` as one SCM_RIGHTS message with a one-byte payload.
///
/// Errors: the kernel's (`sendmsg(2)`), or more than [`MAX_FDS`] descriptors.
pub fn send_fds(socket: RawFd, fds: &[RawFd]) -> std::io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(std::io::Error::other("too many descriptors"));
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
fn recv_fds(socket: &std::os::unix::net::UnixStream) -> std::io::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space =
        unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
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
            "the controller closed before sending the descriptors",
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
        return Err(std::io::Error::other("descriptors were cut off in transit"));
    }
    Ok(fds)
}

/// [`call`] for a request whose reply carries descriptors ([`Request::HandOver`]): the reply
/// and the descriptors that follow its line. `None` when no controller runs at `path`.
pub fn call_with_fds(path: &Path, request: &Request) -> Result<Option<(Reply, Vec<OwnedFd>)>> {
    let mut stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
    };
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    // Byte by byte up to the newline: the descriptors ride on the byte after it, which a
    // buffered read would swallow without its control message.
    let mut text = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        std::io::Read::read_exact(&mut stream, &mut byte)
            .context("reading the controller's reply")?;
        text.push(byte[0]);
    }
    let reply: Reply =
        serde_json::from_slice(&text).context("malformed reply from the controller")?;
    if !reply.ok {
        return Ok(Some((reply, Vec::new())));
    }
    let fds = recv_fds(&stream).context("receiving descriptors")?;
    Ok(Some((reply, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_json_form() {
        let request = Request::Backend {
            service: "web".into(),
            backend: "b1".into(),
            action: BackendAction::Weight(3),
        };
        let json = serde_json::to_string(&request).unwrap();
        assert_eq!(
            json,
            r#"{"command":"backend","service":"web","backend":"b1","action":{"action":"weight","value":3}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), request);
        let drain =
            r#"{"command":"backend","service":"web","backend":"b1","action":{"action":"drain"}}"#;
        assert!(serde_json::from_str::<Request>(drain).is_ok());
    }

    #[test]
    fn client_addresses_are_strings_of_either_family() {
        // The form clients before IPv6 sent: still read.
        let v4 = r#"{"command":"table-get","client":"198.18.1.7","service":null}"#;
        assert_eq!(
            serde_json::from_str::<Request>(v4).unwrap(),
            Request::TableGet {
                client: [198, 18, 1, 7].into(),
                service: None
            }
        );
        let v6 = Request::TableDelete {
            client: "2001:db8:1:2::7".parse().unwrap(),
            service: Some("web".into()),
        };
        let json = serde_json::to_string(&v6).unwrap();
        assert_eq!(
            json,
            r#"{"command":"table-delete","client":"2001:db8:1:2::7","service":"web"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), v6);
    }

    #[test]
    fn token_requests_have_a_stable_json_form() {
        let flush = Request::TokenFlush {
            service: "web".into(),
            backend: Some("b1".into()),
        };
        let json = serde_json::to_string(&flush).unwrap();
        assert_eq!(
            json,
            r#"{"command":"token-flush","service":"web","backend":"b1"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), flush);
        let get = r#"{"command":"token-get","service":"web","token":"AbC-_"}"#;
        assert_eq!(
            serde_json::from_str::<Request>(get).unwrap(),
            Request::TokenGet {
                service: "web".into(),
                token: "AbC-_".into()
            }
        );
    }

    #[test]
    fn a_key_is_a_token_of_an_http_service_and_an_address_otherwise() {
        let web = || Some("web".to_string());
        assert_eq!(
            keyed_request("198.18.1.7", web(), true, false),
            Ok(Request::TokenGet {
                service: "web".into(),
                token: "198.18.1.7".into()
            })
        );
        assert_eq!(
            keyed_request("tok", web(), true, true),
            Ok(Request::TokenDelete {
                service: "web".into(),
                token: "tok".into()
            })
        );
        assert_eq!(
            keyed_request("2001:db8::7", None, false, true),
            Ok(Request::TableDelete {
                client: "2001:db8::7".parse().unwrap(),
                service: None
            })
        );
        assert_eq!(
            keyed_request("198.18.1.7", web(), false, false),
            Ok(Request::TableGet {
                client: [198, 18, 1, 7].into(),
                service: web()
            })
        );
        let e = keyed_request("AbCd", None, false, false).unwrap_err();
        assert!(
            e.contains("not a client address") && e.contains("--service"),
            "{e}"
        );
    }

    #[test]
    fn a_flush_with_a_backend_evacuates_a_token_service_only() {
        let web = || Some("web".to_string());
        assert_eq!(
            flush_request(web(), Some("b1".into()), true),
            Ok(Request::TokenFlush {
                service: "web".into(),
                backend: Some("b1".into())
            })
        );
        assert_eq!(
            flush_request(web(), None, true),
            Ok(Request::TokenFlush {
                service: "web".into(),
                backend: None
            })
        );
        assert_eq!(
            flush_request(web(), None, false),
            Ok(Request::TableFlush { service: web() })
        );
        assert_eq!(
            flush_request(None, None, false),
            Ok(Request::TableFlush { service: None })
        );
        assert!(flush_request(None, Some("b1".into()), false).is_err());
        assert!(flush_request(web(), Some("b1".into()), false).is_err());
    }

    #[tokio::test]
    async fn malformed_and_oversized_requests_get_an_error_reply() {
        let dir = std::env::temp_dir().join(format!("slb-control-{}", std::process::id()));
        let path = dir.join("t.sock");
        let (tx, mut rx) = mpsc::channel::<Envelope>(4);
        let server = serve(&path, tx).unwrap();
        tokio::spawn(async move {
            while let Some((_, reply)) = rx.recv().await {
                let _ = reply.send(Reply::ok("done"));
            }
        });
        let path2 = path.clone();
        let replies = tokio::task::spawn_blocking(move || {
            let raw = |text: &[u8]| -> String {
                let mut s = std::os::unix::net::UnixStream::connect(&path2).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = s.write_all(text);
                let mut reply = String::new();
                let _ = BufReader::new(s).read_line(&mut reply);
                reply
            };
            let good = call(
                &path2,
                &Request::Backend {
                    service: "s".into(),
                    backend: "b".into(),
                    action: BackendAction::Drain,
                },
            )
            .unwrap();
            (
                raw(b"{not json}\n"),
                raw(&vec![b'x'; MAX_REQUEST + 10]),
                good,
            )
        })
        .await
        .unwrap();
        assert!(replies.0.contains("malformed request"), "{}", replies.0);
        assert!(replies.1.contains("\"ok\":false"), "{}", replies.1);
        assert!(replies.2.ok);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        server.abort();
        let _ = std::fs::remove_dir_all(dir);
    }
}
