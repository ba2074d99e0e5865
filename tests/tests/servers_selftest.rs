//! Checks the rig's test servers themselves, without the balancer: the hold
//! server keeps connections open and counts them, and the HTTP server answers
//! (or refuses to) as told, switching behaviour at run time. Needs root.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use sticky_lb_tests::netns::{in_netns, listed_namespaces, require_root, unique_tag};
use sticky_lb_tests::rig::{
    HoldServer, HttpBehaviour, HttpServer, Rig, RigOptions, open_held_many,
};

const TIMEOUT: Duration = Duration::from_secs(3);
/// How long a counter may take to catch up with what the client did.
const SETTLE: Duration = Duration::from_secs(2);

#[test]
fn hold_and_http_servers_behave() {
    require_root();
    let rig =
        Rig::build(RigOptions::new(&unique_tag("srv")).backends(1).clients(3)).expect("build rig");
    let prefix = format!("slb-{}-", rig.tag());

    check_hold_server(&rig);
    check_http_server(&rig);

    drop(rig);
    let left = listed_namespaces(&prefix);
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

fn check_hold_server(rig: &Rig) {
    let server = HoldServer::start(
        rig.backend_ns(1),
        SocketAddrV4::new([0, 0, 0, 0].into(), 7000),
        "held-1",
    )
    .expect("start hold server");
    let dst = SocketAddrV4::new(rig.backend_addr(1), 7000);
    let requests = vec![(rig.client_addrs()[0], dst); 50];

    let mut held = Vec::with_capacity(requests.len());
    for (i, result) in open_held_many(rig.client_ns(), &requests, TIMEOUT)
        .into_iter()
        .enumerate()
    {
        let (connection, name) =
            result.unwrap_or_else(|err| panic!("held connection {i}: {err:#}"));
        assert_eq!(name, "held-1", "connection {i}");
        held.push(connection);
    }
    wait_for("50 held connections", || server.open_connections() == 50);
    assert_eq!(server.accepted(), 50);

    // Closing 20 from the client side frees exactly those on the server.
    held.truncate(30);
    wait_for("30 held connections", || server.open_connections() == 30);
    assert_eq!(server.accepted(), 50);

    // Stopping closes the rest from the server side: the clients see EOF.
    server.stop();
    let mut probe = held[0].stream();
    probe.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert_eq!(probe.read(&mut [0u8; 16]).expect("read after stop"), 0);
}

fn check_http_server(rig: &Rig) {
    let server = HttpServer::start(
        rig.backend_ns(1),
        SocketAddrV4::new([0, 0, 0, 0].into(), 7080),
        HttpBehaviour::Status(200),
    )
    .expect("start HTTP server");
    let dst = SocketAddrV4::new(rig.backend_addr(1), 7080);
    let status = |expected: &str| {
        let reply = request(rig, dst, TIMEOUT).expect("HTTP request");
        let line = String::from_utf8_lossy(&reply);
        assert!(
            line.starts_with(expected),
            "expected {expected:?}, got {line:?}"
        );
    };

    status("HTTP/1.0 200 ");
    server.set_behaviour(HttpBehaviour::Status(500));
    status("HTTP/1.0 500 ");
    server.set_behaviour(HttpBehaviour::Alternate(200, 503));
    status("HTTP/1.0 200 ");
    status("HTTP/1.0 503 ");
    status("HTTP/1.0 200 ");

    // Depending on whether the RST beats the request out, the write or the
    // read sees it; a plain EOF is accepted too.
    server.set_behaviour(HttpBehaviour::Reset);
    match request(rig, dst, TIMEOUT) {
        Ok(reply) => assert!(reply.is_empty(), "reset got a reply: {reply:?}"),
        Err(err) => assert!(
            matches!(
                err.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
            ),
            "reset: {err}"
        ),
    }

    server.set_behaviour(HttpBehaviour::Silent);
    assert_eq!(server.behaviour(), HttpBehaviour::Silent);
    let started = Instant::now();
    let silent = request(rig, dst, Duration::from_millis(300));
    let err = silent.expect_err("a silent server answered");
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "silent: {err}"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    // The silent connection was closed by `request`; the server lets go too.
    wait_for("no open HTTP connections", || {
        server.open_connections() == 0
    });

    assert_eq!(server.requests(), 7);
}

/// Sends `GET / HTTP/1.0` from the client namespace and reads the reply to
/// EOF (at most 4 KiB), with `read_timeout` per read.
fn request(rig: &Rig, dst: SocketAddrV4, read_timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut stream = in_netns(rig.client_ns(), || {
        TcpStream::connect_timeout(&dst.into(), TIMEOUT)
    })?;
    stream.set_read_timeout(Some(read_timeout))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut reply = Vec::new();
    (&mut stream).take(4096).read_to_end(&mut reply)?;
    Ok(reply)
}

/// Polls `condition` every 10 ms for up to [`SETTLE`]; panics if it never holds.
fn wait_for(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + SETTLE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
