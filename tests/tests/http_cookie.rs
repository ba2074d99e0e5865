//! `mode: http` with `stick.cookie` end to end in the netns rig: sticky-lb terminates HTTP on
//! the VIP (the XDP program passes it to the host), inserts a sealed cookie naming the
//! client's backend, and routes every request by it: curl with a cookie jar, a hyper client
//! over one HTTP/1.1 or HTTP/2 connection, forged and stale cookies, key rotation, drain,
//! failover both ways, `strict`, WebSocket-style upgrades. Needs root.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use sticky_lb::http::{
    cookie::{self, Session},
    keys::Keyring,
};
use sticky_lb_tests::{
    scenario::{Mode, Setup},
    web::{
        WebBackend, WebClient, curl, curl_backend, http_config, metric, start_backends,
        test_secret, write_keys,
    },
};

const COOKIE: &str = "SLBID";

/// The rig, its web backends, and a balancer serving `service` lines (plus cookie settings)
/// with the key file holding key 1.
fn start(tag: &str, backends: usize, cookie: &str, service: &str) -> (Setup, Vec<WebBackend>) {
    let mut s = Setup::new(tag, Mode::Generic, backends, 4);
    let web = start_backends(&s);
    let keys = write_keys(s.scratch.path(), "keys.yaml", &[(1, &test_secret(1))]);
    let config = http_config(
        &s,
        &format!("cookie_keys: {}\n", keys.display()),
        &format!(
            "    policy: least-conn\n    stick:\n      cookie:\n        name: {COOKIE}\n{cookie}{service}"
        ),
    );
    s.start(&config);
    for k in 1..=backends {
        s.wait_state(&format!("b{k}"), "up", Duration::from_secs(10));
    }
    (s, web)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The cookie jar's value of the balancer's cookie.
fn jar_value(jar: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(jar).ok()?.lines().find_map(|line| {
        let fields: Vec<&str> = line.split('\t').collect();
        (fields.len() == 7 && fields[5] == COOKIE).then(|| fields[6].to_string())
    })
}

fn client(s: &Setup, k: usize) -> IpAddr {
    s.clients()[k]
}

/// curl with a cookie jar, as a returning visitor: the first answer sets the cookie (with the
/// configured attributes: Path, HttpOnly, SameSite, no address in clear), the next nine carry
/// it and reach the same backend without a new Set-Cookie. Eight more jars from the same
/// client address (visitors behind one NAT) are spread over the backends, which address
/// stickiness cannot do.
#[test]
fn a_cookie_jar_keeps_one_backend_and_visitors_behind_one_address_spread() {
    let (s, _web) = start(
        "hck-jar",
        3,
        "        samesite: Lax\n        nocache: true\n",
        "",
    );
    let jar = s.scratch.path().join("jar-1");
    let jar_arg = jar.to_str().unwrap();
    let url = format!("http://{}/", s.vip());
    let first = curl(&s, client(&s, 0), &["-c", jar_arg, "-b", jar_arg, &url]);
    let backend = curl_backend(&first).unwrap_or_else(|| panic!("no backend answered:\n{first}"));
    let set_cookie = first
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no Set-Cookie on the first answer:\n{first}"))
        .to_string();
    eprintln!("first answer from {backend}; {set_cookie}");
    for attribute in ["Path=/", "HttpOnly", "SameSite=Lax"] {
        assert!(set_cookie.contains(attribute), "{attribute}: {set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "{set_cookie}");
    assert!(
        first
            .to_ascii_lowercase()
            .contains("cache-control: no-cache=\"set-cookie\""),
        "nocache: {first}"
    );
    let value = jar_value(&jar).expect("the cookie is in the jar");
    for k in 1..=3 {
        let address = s.backend_addr(k).to_string();
        assert!(!value.contains(&address) && !value.contains(&format!("b{k}")));
    }
    for i in 0..9 {
        let again = curl(&s, client(&s, 0), &["-c", jar_arg, "-b", jar_arg, &url]);
        assert_eq!(
            curl_backend(&again).as_deref(),
            Some(backend.as_str()),
            "request {i}"
        );
        assert!(
            !again.to_ascii_lowercase().contains("set-cookie"),
            "no new cookie without max_idle: {again}"
        );
    }
    // Visitors behind one address, each with a jar of its own.
    let mut seen = BTreeSet::new();
    for v in 0..8 {
        let jar = s.scratch.path().join(format!("visitor-{v}"));
        let jar = jar.to_str().unwrap();
        let out = curl(&s, client(&s, 1), &["-c", jar, "-b", jar, &url]);
        let first = curl_backend(&out).expect("an answer");
        for _ in 0..3 {
            let out = curl(&s, client(&s, 1), &["-c", jar, "-b", jar, &url]);
            assert_eq!(curl_backend(&out).as_deref(), Some(first.as_str()));
        }
        seen.insert(first);
    }
    eprintln!("8 visitors behind one address went to {seen:?}");
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(
        metric(
            &s,
            "sticky_lb_http_responses_total{service=\"web\",class=\"2xx\"}"
        ),
        42.0
    );
    let stats: serde_json::Value = serde_json::from_str(&s.cli_ok(&["stats", "--json"])).unwrap();
    let web = &stats["services"][0];
    assert_eq!(web["mode"], "http", "{stats}");
    assert_eq!(web["responses"]["2xx"], 42, "{stats}");
    assert_eq!(web["sessions_new"], 9, "1 + 8 visitors: {stats}");
}

/// One connection, many sessions: requests on one HTTP/1.1 keep-alive connection, and on one
/// HTTP/2 connection, carrying the cookies of different backends alternately, each reach the
/// backend their own cookie names.
#[test]
fn each_request_on_one_connection_is_routed_by_its_own_cookie() {
    let (s, _web) = start("hck-perreq", 3, "", "");
    for http2 in [false, true] {
        let mut cookies = Vec::new();
        // Three new sessions (least-conn takes turns): one per backend.
        let mut c = WebClient::connect(s.rig.client_ns(), client(&s, 0), s.vip(), http2).unwrap();
        for _ in 0..3 {
            let reply = c.get("/", &[]).unwrap();
            assert_eq!(reply.status, 200);
            let value = reply.cookie(COOKIE).expect("a new session gets a cookie");
            cookies.push((reply.backend().to_string(), value));
        }
        let backends: BTreeSet<&str> = cookies.iter().map(|(b, _)| b.as_str()).collect();
        assert_eq!(backends.len(), 3, "{cookies:?}");
        for round in 0..5 {
            for (backend, value) in &cookies {
                let reply = c
                    .get("/", &[("cookie", &format!("theme=dark; {COOKIE}={value}"))])
                    .unwrap();
                assert_eq!(reply.backend(), backend, "round {round}, http2 {http2}");
                assert!(reply.cookie(COOKIE).is_none());
            }
        }
    }
}

/// Every way a cookie can be wrong counts as absent, by reason, and the client is placed
/// anew: a tampered byte, a key the balancer does not have, another service's cookie, a cookie
/// idle or alive for too long (sealed by the test with the balancer's key and old times),
/// garbage. A good one still routes.
#[test]
fn forged_foreign_and_stale_cookies_count_as_absent_by_reason() {
    let (s, _web) = start(
        "hck-forged",
        3,
        "        max_idle: 1h\n        max_life: 1d\n",
        "",
    );
    let keys = Keyring::parse(&format!(
        "keys:\n  - id: 1\n    secret: {}\n",
        test_secret(1)
    ))
    .unwrap();
    let foreign = Keyring::parse(&format!(
        "keys:\n  - id: 9\n    secret: {}\n",
        test_secret(9)
    ))
    .unwrap();
    let t = now();
    let sealed = |keys: &Keyring, service: &str, issued: u64, last_seen: u64| {
        cookie::seal(
            keys,
            &Session {
                service: service.into(),
                backend: "b2".into(),
                issued,
                last_seen,
            },
        )
        .unwrap()
    };
    let good = sealed(&keys, "web", t - 60, t - 60);
    let mut tampered = good.clone().into_bytes();
    let last = tampered.len() - 3;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let cases = [
        ("tampered", tampered),
        ("unknown_key", sealed(&foreign, "web", t, t)),
        ("other_service", sealed(&keys, "shop", t, t)),
        (
            "idle_expired",
            sealed(&keys, "web", t - 3 * 3600, t - 2 * 3600),
        ),
        ("life_expired", sealed(&keys, "web", t - 3 * 86_400, t - 60)),
        ("malformed", "not-a-cookie".to_string()),
    ];
    let mut c = WebClient::connect(s.rig.client_ns(), client(&s, 0), s.vip(), false).unwrap();
    for (reason, value) in &cases {
        let sample = format!(
            "sticky_lb_http_sessions_rejected_total{{service=\"web\",reason=\"{reason}\"}}"
        );
        let before = metric(&s, &sample);
        let reply = c
            .get("/", &[("cookie", &format!("{COOKIE}={value}"))])
            .unwrap();
        assert_eq!(reply.status, 200);
        assert!(
            reply.cookie(COOKIE).is_some(),
            "{reason}: the client is placed anew and gets a cookie"
        );
        assert_eq!(metric(&s, &sample), before + 1.0, "{reason}");
    }
    // The good one goes to b2 every time.
    for _ in 0..6 {
        let reply = c
            .get("/", &[("cookie", &format!("{COOKIE}={good}"))])
            .unwrap();
        assert_eq!(reply.backend(), "b2");
    }
}

/// `max_idle`: a cookie is re-issued only when its last-seen time is older than a quarter of
/// it (not on every response), and the re-issued one names the same backend.
#[test]
fn a_stale_last_seen_is_refreshed_and_a_fresh_one_is_not() {
    let (s, _web) = start("hck-refresh", 2, "        max_idle: 1h\n", "");
    let keys = Keyring::parse(&format!(
        "keys:\n  - id: 1\n    secret: {}\n",
        test_secret(1)
    ))
    .unwrap();
    let t = now();
    let with = |last_seen: u64| {
        cookie::seal(
            &keys,
            &Session {
                service: "web".into(),
                backend: "b1".into(),
                issued: t - 7200,
                last_seen,
            },
        )
        .unwrap()
    };
    let mut c = WebClient::connect(s.rig.client_ns(), client(&s, 0), s.vip(), false).unwrap();
    let fresh = c
        .get("/", &[("cookie", &format!("{COOKIE}={}", with(t - 60)))])
        .unwrap();
    assert_eq!(fresh.backend(), "b1");
    assert!(
        fresh.cookie(COOKIE).is_none(),
        "seen a minute ago: no refresh"
    );
    let stale = c
        .get("/", &[("cookie", &format!("{COOKIE}={}", with(t - 1800)))])
        .unwrap();
    assert_eq!(stale.backend(), "b1");
    let refreshed = stale
        .cookie(COOKIE)
        .expect("seen 30 min ago (> 1h/4): refreshed");
    let opened = cookie::open(
        &keys,
        &refreshed,
        "web",
        t + 1,
        cookie::Limits {
            max_idle: None,
            max_life: None,
        },
    )
    .unwrap();
    assert_eq!(opened.backend, "b1");
    assert_eq!(opened.issued, t - 7200, "the session keeps its issue time");
    assert!(opened.last_seen >= t);
}

/// Key rotation: a cookie sealed with key 1 keeps routing after a reload to [key 2, key 1]
/// (new cookies are sealed with key 2), and stops counting once key 1 is removed.
#[test]
fn keys_rotate_without_losing_sessions() {
    let (s, _web) = start("hck-rotate", 3, "", "");
    let url = format!("http://{}/", s.vip());
    let jar = s.scratch.path().join("jar");
    let jar = jar.to_str().unwrap();
    let first = curl(&s, client(&s, 0), &["-c", jar, "-b", jar, &url]);
    let backend = curl_backend(&first).unwrap();
    let old = jar_value(std::path::Path::new(jar)).unwrap();
    write_keys(
        s.scratch.path(),
        "keys.yaml",
        &[(2, &test_secret(2)), (1, &test_secret(1))],
    );
    s.cli_ok(&["reload"]);
    for _ in 0..3 {
        let out = curl(&s, client(&s, 0), &["-b", &format!("{COOKIE}={old}"), &url]);
        assert_eq!(
            curl_backend(&out).as_deref(),
            Some(backend.as_str()),
            "{out}"
        );
    }
    let ring = Keyring::parse(&format!(
        "keys:\n  - id: 2\n    secret: {}\n  - id: 1\n    secret: {}\n",
        test_secret(2),
        test_secret(1)
    ))
    .unwrap();
    let other_jar = s.scratch.path().join("jar-new");
    let other_jar = other_jar.to_str().unwrap();
    curl(&s, client(&s, 1), &["-c", other_jar, "-b", other_jar, &url]);
    let new = jar_value(std::path::Path::new(other_jar)).unwrap();
    assert!(
        cookie::sealed_with_primary(&ring, &new),
        "new cookies are sealed with key 2"
    );
    write_keys(s.scratch.path(), "keys.yaml", &[(2, &test_secret(2))]);
    s.cli_ok(&["reload"]);
    let sample = "sticky_lb_http_sessions_rejected_total{service=\"web\",reason=\"unknown_key\"}";
    let before = metric(&s, sample);
    let out = curl(&s, client(&s, 0), &["-b", &format!("{COOKIE}={old}"), &url]);
    assert!(
        out.to_ascii_lowercase().contains("set-cookie"),
        "placed anew: {out}"
    );
    assert_eq!(metric(&s, sample), before + 1.0);
}

/// Drain keeps cookie holders and sends new visitors elsewhere; a failed backend's holders
/// move once (new cookie) and stay where they moved, also after it is back; new visitors reach
/// it again.
#[test]
fn drain_keeps_holders_and_failover_moves_them_once() {
    let (s, mut web) = start("hck-failover", 3, "", "");
    let mut c = WebClient::connect(s.rig.client_ns(), client(&s, 0), s.vip(), false).unwrap();
    let mut on_b1 = None;
    for _ in 0..3 {
        let reply = c.get("/", &[]).unwrap();
        if reply.backend() == "b1" {
            on_b1 = reply.cookie(COOKIE);
        }
    }
    let on_b1 = on_b1.expect("a session on b1");
    let with = |value: &str| format!("{COOKIE}={value}");
    s.cli_ok(&["backend", "drain", "web/b1"]);
    for _ in 0..5 {
        assert_eq!(
            c.get("/", &[("cookie", &with(&on_b1))]).unwrap().backend(),
            "b1"
        );
        assert_ne!(
            c.get("/", &[]).unwrap().backend(),
            "b1",
            "no new visitor on a draining backend"
        );
    }
    s.cli_ok(&["backend", "enable", "web/b1"]);
    // b1 dies: its holder moves once, with a new cookie, and stays.
    web[0].stop();
    s.wait_state("b1", "down", Duration::from_secs(10));
    let moved = c.get("/", &[("cookie", &with(&on_b1))]).unwrap();
    assert_eq!(moved.status, 200);
    assert_ne!(moved.backend(), "b1");
    let new_value = moved.cookie(COOKIE).expect("re-placed: a new cookie");
    let new_backend = moved.backend().to_string();
    web[0] = WebBackend::start(
        s.rig.backend_ns(1),
        std::net::SocketAddr::new(s.backend_addr(1), sticky_lb_tests::web::BACKEND_PORT),
        "b1",
    )
    .unwrap();
    s.wait_state("b1", "up", Duration::from_secs(10));
    for _ in 0..5 {
        let reply = c.get("/", &[("cookie", &with(&new_value))]).unwrap();
        assert_eq!(reply.backend(), new_backend, "stays where it moved");
    }
    let mut reached_b1 = false;
    for _ in 0..6 {
        reached_b1 |= c.get("/", &[]).unwrap().backend() == "b1";
    }
    assert!(reached_b1, "new visitors reach b1 again");
}

/// `on_failure: strict`: while the session's backend is down its requests get 503 with
/// Retry-After (the session is not moved), and once it is back they reach it again.
#[test]
fn strict_answers_503_while_the_sessions_backend_is_down() {
    let (s, mut web) = start("hck-strict", 2, "", "      on_failure: strict\n");
    let mut c = WebClient::connect(s.rig.client_ns(), client(&s, 0), s.vip(), false).unwrap();
    let mut on_b1 = None;
    for _ in 0..2 {
        let reply = c.get("/", &[]).unwrap();
        if reply.backend() == "b1" {
            on_b1 = reply.cookie(COOKIE);
        }
    }
    let value = format!("{COOKIE}={}", on_b1.expect("a session on b1"));
    web[0].stop();
    s.wait_state("b1", "down", Duration::from_secs(10));
    let refused = c.get("/", &[("cookie", &value)]).unwrap();
    assert_eq!(refused.status, 503);
    let retry: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "{retry}");
    assert!(
        refused.cookie(COOKIE).is_none(),
        "strict never moves the session"
    );
    assert_eq!(
        c.get("/", &[]).unwrap().backend(),
        "b2",
        "new visitors are served"
    );
    web[0] = WebBackend::start(
        s.rig.backend_ns(1),
        std::net::SocketAddr::new(s.backend_addr(1), sticky_lb_tests::web::BACKEND_PORT),
        "b1",
    )
    .unwrap();
    s.wait_state("b1", "up", Duration::from_secs(10));
    assert_eq!(c.get("/", &[("cookie", &value)]).unwrap().backend(), "b1");
}

/// The backend sees the client in X-Forwarded-For and Forwarded, never the balancer's cookie
/// with `indirect` (the application's own cookies pass), and an upgraded connection is relayed
/// byte for byte both ways.
#[test]
fn forwarded_headers_indirect_and_upgrades() {
    let (s, _web) = start("hck-headers", 2, "        indirect: true\n", "");
    let me = client(&s, 2);
    let mut c = WebClient::connect(s.rig.client_ns(), me, s.vip(), false).unwrap();
    let first = c.get("/", &[]).unwrap();
    let value = first.cookie(COOKIE).unwrap();
    let reply = c
        .get(
            "/",
            &[("cookie", &format!("app=1; {COOKIE}={value}; theme=dark"))],
        )
        .unwrap();
    assert_eq!(
        reply.received("x-forwarded-for").as_deref(),
        Some(me.to_string().as_str())
    );
    assert_eq!(
        reply.received("forwarded"),
        Some(format!("for={me};proto=http"))
    );
    assert_eq!(reply.received("x-forwarded-proto").as_deref(), Some("http"));
    let seen = reply.received("cookie").unwrap_or_default();
    assert!(
        seen.contains("app=1") && seen.contains("theme=dark"),
        "{seen}"
    );
    assert!(!seen.contains(COOKIE), "indirect: {seen}");

    // An upgrade, over a raw connection.
    let mut stream = sticky_lb_tests::netns::in_netns(s.rig.client_ns(), || {
        sticky_lb_tests::socket::connect_from(me, s.vip(), Duration::from_secs(3))
    })
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET /chat HTTP/1.1\r\nHost: shop\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nCookie: {COOKIE}={value}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-backend: ".to_string().as_str())
    );
    assert!(
        head.contains(first.backend()),
        "the upgrade goes to the session's backend: {head}"
    );
    for message in ["hello", "a longer message over the relay", "bye"] {
        stream.write_all(message.as_bytes()).unwrap();
        let mut echo = vec![0u8; message.len()];
        stream.read_exact(&mut echo).unwrap();
        assert_eq!(echo, message.as_bytes());
    }
    assert_eq!(
        metric(&s, "sticky_lb_http_upgrades_total{service=\"web\"}"),
        1.0
    );
}

/// `http.proxy_protocol`: every backend connection opens with a PROXY v2 header naming the
/// client connection (its address and port), and a pooled connection is reused only by the
/// client connection it was opened for (two client connections from one address are named
/// with their own ports).
#[test]
fn proxy_protocol_v2_names_each_client_connection_to_the_backend() {
    let mut s = Setup::new("hck-proxyv2", Mode::Generic, 1, 4);
    let _web = WebBackend::start_proxied(
        s.rig.backend_ns(1),
        std::net::SocketAddr::new(s.backend_addr(1), sticky_lb_tests::web::BACKEND_PORT),
        "b1",
    )
    .unwrap();
    let keys = write_keys(s.scratch.path(), "keys.yaml", &[(1, &test_secret(1))]);
    let config = http_config(
        &s,
        &format!("cookie_keys: {}\n", keys.display()),
        "    http:\n      proxy_protocol: true\n    stick:\n      cookie: {}\n",
    );
    s.start(&config);
    s.wait_state("b1", "up", Duration::from_secs(10));
    let me = client(&s, 0);
    let mut seen = BTreeSet::new();
    for _ in 0..2 {
        let mut c = WebClient::connect(s.rig.client_ns(), me, s.vip(), false).unwrap();
        let mut ports = BTreeSet::new();
        for _ in 0..3 {
            let reply = c.get("/", &[]).unwrap();
            let named = reply.headers["x-proxy-client"]
                .to_str()
                .unwrap()
                .to_string();
            let address: std::net::SocketAddr = named.parse().unwrap();
            assert_eq!(address.ip(), me, "{named}");
            ports.insert(address.port());
        }
        assert_eq!(ports.len(), 1, "one client connection, one port: {ports:?}");
        seen.extend(ports);
    }
    assert_eq!(
        seen.len(),
        2,
        "each client connection is named with its own port: {seen:?}"
    );
}

/// An IPv6 service (VIP6 on the balancer, IPv6 backends and clients) with cookies, and a
/// backend added at run time with a port of its own: sessions keep their backends, new
/// visitors reach the new one.
#[test]
fn an_ipv6_service_keeps_sessions_while_a_backend_is_added() {
    use sticky_lb_common::Family;
    let mut s = Setup::new_in("hck-ipv6", Mode::Generic, Family::Ipv6, 2, 4);
    let mut web = start_backends(&s);
    let keys = write_keys(s.scratch.path(), "keys.yaml", &[(1, &test_secret(1))]);
    let config = http_config(
        &s,
        &format!("cookie_keys: {}\n", keys.display()),
        "    policy: least-conn\n    stick:\n      cookie: {}\n",
    );
    s.start(&config);
    for k in 1..=2 {
        s.wait_state(&format!("b{k}"), "up", Duration::from_secs(10));
    }
    let me = client(&s, 0);
    assert!(me.is_ipv6() && s.vip().is_ipv6());
    let mut c = WebClient::connect(s.rig.client_ns(), me, s.vip(), true).unwrap();
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let reply = c.get("/", &[]).unwrap();
        assert_eq!(reply.received("x-forwarded-for"), Some(me.to_string()));
        assert_eq!(
            reply.received("forwarded"),
            Some(format!("for=\"[{me}]\";proto=http"))
        );
        sessions.push((reply.backend().to_string(), reply.cookie(COOKIE).unwrap()));
    }
    let k = s.rig.add_backend().expect("a third backend");
    let address = s.rig.backend_addr_in(Family::Ipv6, k);
    web.push(
        WebBackend::start(
            s.rig.backend_ns(k),
            std::net::SocketAddr::new(address, sticky_lb_tests::web::BACKEND_PORT),
            "b3",
        )
        .unwrap(),
    );
    let out = s.cli_ok(&[
        "backend",
        "add",
        "web/b3",
        &address.to_string(),
        "--port",
        &sticky_lb_tests::web::BACKEND_PORT.to_string(),
    ]);
    assert!(out.contains("web/b3 added"), "{out}");
    s.wait_state("b3", "up", Duration::from_secs(10));
    for (backend, value) in &sessions {
        let reply = c
            .get("/", &[("cookie", &format!("{COOKIE}={value}"))])
            .unwrap();
        assert_eq!(reply.backend(), backend);
    }
    let mut reached = BTreeSet::new();
    for _ in 0..6 {
        reached.insert(c.get("/", &[]).unwrap().backend().to_string());
    }
    assert!(
        reached.contains("b3"),
        "new visitors reach the added backend: {reached:?}"
    );
}
