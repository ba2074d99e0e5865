//! Connections to backends for the pool: plain TCP, or TCP opened with a PROXY protocol v2
//! header (HAProxy's "The PROXY protocol", versions 1 and 2, section 2.2) naming the client,
//! for backends that must see the client's address (`http.proxy_protocol`).
//!
//! A PROXY header describes one client connection, so a backend connection that carries one
//! may only ever serve that client connection again (HAProxy makes such connections private).
//! The pool keys its idle connections by the request URI's authority: for a proxied service the
//! authority names the backend *and* the client connection (see [`authority`]), so a pooled
//! connection is reused only by the client connection it was opened for.

use hyper_util::rt::TokioIo;
use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

/// The PROXY protocol v2 signature (12 bytes).
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const VERSION_PROXY: u8 = 0x21;
/// Address family and transport: TCP over IPv4, TCP over IPv6.
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;

/// The PROXY v2 header for a client connection from `client` to `destination` (the VIP:port).
/// Addresses and ports in network byte order; a mixed pair (an IPv4-mapped client, say) is
/// written as IPv6.
pub fn header_v2(client: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut header = Vec::with_capacity(16 + 36);
    header.extend_from_slice(&SIGNATURE);
    header.push(VERSION_PROXY);
    match (client.ip(), destination.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            header.push(TCP4);
            header.extend_from_slice(&12u16.to_be_bytes());
            header.extend_from_slice(&src.octets());
            header.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            header.push(TCP6);
            header.extend_from_slice(&36u16.to_be_bytes());
            header.extend_from_slice(&v6(src).octets());
            header.extend_from_slice(&v6(dst).octets());
        }
    }
    header.extend_from_slice(&client.port().to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    header
}

/// The authority of a request to `backend`: the backend itself, or, with the PROXY protocol,
/// the backend and the client connection (`client`, to `vip`) encoded as host labels of the
/// reserved `.invalid` domain (RFC 6761), which [`Connector`] decodes. Never sent: the request
/// keeps the client's `Host`.
pub fn authority(backend: SocketAddr, proxied: Option<(SocketAddr, SocketAddr)>) -> String {
    match proxied {
        None => backend.to_string(),
        Some((client, vip)) => format!(
            "{}.{}.{}.{}.{}.invalid:{}",
            hex(backend.ip()),
            hex(client.ip()),
            client.port(),
            hex(vip.ip()),
            vip.port(),
            backend.port()
        ),
    }
}

fn hex(address: IpAddr) -> String {
    let bytes = match address {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<IpAddr> {
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect();
    match bytes?.as_slice() {
        b if b.len() == 4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        b if b.len() == 16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

/// What [`authority`] encoded: the backend, and the client connection if proxied.
fn decode(host: &str, port: u16) -> Option<(SocketAddr, Option<(SocketAddr, SocketAddr)>)> {
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Some((SocketAddr::new(ip, port), None));
    }
    let labels: Vec<&str> = host.strip_suffix(".invalid")?.split('.').collect();
    let [backend, client, client_port, vip, vip_port] = labels[..] else {
        return None;
    };
    Some((
        SocketAddr::new(unhex(backend)?, port),
        Some((
            SocketAddr::new(unhex(client)?, client_port.parse().ok()?),
            SocketAddr::new(unhex(vip)?, vip_port.parse().ok()?),
        )),
    ))
}

/// Opens backend connections for the pool (a `tower` service from URI to connection): TCP with
/// no delay, bounded by `timeout`, and the PROXY v2 header first when the authority carries a
/// client connection.
#[derive(Clone, Debug)]
pub struct Connector {
    pub timeout: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let timeout = self.timeout;
        Box::pin(async move {
            let target = uri
                .host()
                .zip(uri.port_u16())
                .and_then(|(host, port)| decode(host, port))
                .ok_or_else(|| format!("not a backend address: {uri}"))?;
            let (backend, proxied) = target;
            let mut stream = tokio::time::timeout(timeout, TcpStream::connect(backend))
                .await
                .map_err(|_| format!("connecting to {backend}: timed out"))??;
            stream.set_nodelay(true)?;
            if let Some((client, vip)) = proxied {
                stream.write_all(&header_v2(client, vip)).await?;
            }
            Ok(TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_header_of_an_ipv4_client_is_byte_exact() {
        let header = header_v2(
            "198.18.1.7:40000".parse().unwrap(),
            "198.18.0.100:80".parse().unwrap(),
        );
        let mut expected = SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0, 12]);
        expected.extend_from_slice(&[198, 18, 1, 7, 198, 18, 0, 100]);
        expected.extend_from_slice(&[0x9c, 0x40, 0, 80]);
        assert_eq!(header, expected);
    }

    #[test]
    fn v2_header_of_an_ipv6_client_carries_36_address_bytes() {
        let header = header_v2(
            "[2001:db8:1:1::1]:443".parse().unwrap(),
            "[2001:db8::100]:80".parse().unwrap(),
        );
        assert_eq!(header.len(), 16 + 36);
        assert_eq!(&header[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(&header[16..18], &[0x20, 0x01]);
        assert_eq!(&header[48..52], &[1, 187, 0, 80]);
    }

    #[test]
    fn authorities_decode_to_what_they_encode() {
        let backend: SocketAddr = "198.18.0.11:8080".parse().unwrap();
        assert_eq!(decode("198.18.0.11", 8080), Some((backend, None)));
        let client: SocketAddr = "[2001:db8:1:1::9]:51000".parse().unwrap();
        let vip: SocketAddr = "[2001:db8::100]:80".parse().unwrap();
        let b6: SocketAddr = "[2001:db8::11]:8080".parse().unwrap();
        let uri: http::Uri = format!("http://{}/x", authority(b6, Some((client, vip))))
            .parse()
            .unwrap();
        assert_eq!(
            decode(uri.host().unwrap(), uri.port_u16().unwrap()),
            Some((b6, Some((client, vip))))
        );
        // Two client connections of one address never share a pool key.
        let other: SocketAddr = "[2001:db8:1:1::9]:51001".parse().unwrap();
        assert_ne!(
            authority(b6, Some((client, vip))),
            authority(b6, Some((other, vip)))
        );
        assert_eq!(decode("nonsense.invalid", 80), None);
    }
}
