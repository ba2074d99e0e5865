//! `mode: http` with `stick.token` end to end: sticky-lb issues a random token (in a cookie or
//! a response header) or learns the application's own session cookie from its responses, keeps
//! token -> backend in a real Redis, and routes every request that carries the token there.
//!
//! One balancer (the netns rig, its Redis in the balancer's namespace): tokens in a cookie and
//! in a header, learned sessions, `sticky-lb table` on a token service. Two balancers behind
//! the ECMP router of [`sticky_lb_tests::ecmp`] sharing one Redis (each holds the VIP on `lo`,
//! where its proxy listens, and answers clients via the router): a token's requests reach one
//! backend through either node, a failed backend's tokens move once and both nodes follow, and
//! Redis killed in the middle of traffic costs no request. Needs root.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed},
    time::{Duration, Instant},
};
use sticky_lb::http::token::fallback;
use sticky_lb_tests::{
    balancer::{Balancer, DataPathGuard, ScratchDir, cli},
    ecmp::{CLIENT_NET, CLIENT_PREFIX_LEN, EcmpRig, EcmpRigOptions},
    netns,
    redis::{REDIS_PORT, RedisServer},
    rig::Family,
    scenario::{Mode, Setup},
    wait::wait_for,
    web::{BACKEND_PORT, METRICS, Reply, WebBackend, WebClient, http_config, start_backends},
};

/// The key prefix of the shared store in every test.
const PREFIX: &str = "slbtok";
/// The stick timeout (the tokens' TTL in Redis) of every test, and in milliseconds.
const STICK_TIMEOUT: &str = "10m";
const STICK_TIMEOUT_MS: i64 = 600_000;
/// The token cookie of `stick.token.cookie` services.
const COOKIE: &str = "SLBTOKEN";
/// Bound of anything a test waits for: a hang guard, not a speed requirement.
const HANG: Duration = Duration::from_secs(15);
/// Each ECMP node's metrics listener, on its own namespace's loopback.
const METRICS_PORT: u16 = 19180;

/// `PREFIX:token:web:TOKEN`, the store's key of a token of service `web`.
fn key(token: &str) -> String {
    format!("{PREFIX}:token:web:{token}")
}

/// The value of sample `name` (as printed, labels included) in a metrics text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (n, value) = line.rsplit_once(' ')?;
        (n == name).then(|| value.parse().ok())?
    })
}

/// Whether a metrics text says the token store uses Redis (`sticky_lb_token_store_down 0`).
fn store_up(text: &str) -> bool {
    sample(text, "sticky_lb_token_store_down") == Some(0.0)
}

/// A token counter (`sticky_lb_token_NAME_total`) of a metrics text, 0 if absent.
fn token_counter(text: &str, name: &str) -> u64 {
    sample(text, &format!("sticky_lb_token_{name}_total")).unwrap_or(0.0) as u64
}

/// The metrics text of the balancer in namespace `ns`, listening on `listen` there.
fn metrics_text(ns: &str, listen: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "--max-time", "5"])
        .arg(format!("http://{listen}/metrics"))
        .output()
        .expect("running curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Where a token travels.
#[derive(Clone, Copy, Debug)]
enum Carrier {
    /// `stick.token.cookie: SLBTOKEN`.
    Cookie,
    /// `stick.token.header: X-Session`.
    Header,
}

impl Carrier {
    /// The `token:` lines of the service's config.
    fn yaml(self) -> &'static str {
        match self {
            Carrier::Cookie => "        cookie: SLBTOKEN\n",
            Carrier::Header => "        header: X-Session\n",
        }
    }

    /// The token a response issues, if it issues one.
    fn issued(self, reply: &Reply) -> Option<String> {
        match self {
            Carrier::Cookie => reply.cookie(COOKIE),
            Carrier::Header => reply
                .headers
                .get("x-session")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        }
    }

    /// The request header that carries `token` (the cookie among the application's own).
    fn carry(self, token: &str) -> (&'static str, String) {
        match self {
            Carrier::Cookie => ("cookie", format!("theme=dark; {COOKIE}={token}; lang=en")),
            Carrier::Header => ("x-session", token.to_string()),
        }
    }
}

/// One balancer in the netns rig with a [`WebBackend`] on every backend, its Redis in the
/// balancer's namespace (on the balancer's own address), and service `web` (`least-conn`,
/// so new sessions take turns over the backends) with `stick.token` as `token` says; `more`
/// adds services after it. Fields drop in order: backends, Redis, then the balancer and the namespaces.
struct Single {
    _web: Vec<WebBackend>,
    redis: RedisServer,
    s: Setup,
}

impl Single {
    fn start(tag: &str, backends: usize, token: &str, more: impl Fn(&Setup) -> String) -> Single {
        let mut s = Setup::new(tag, Mode::Generic, backends, 4);
        let web = start_backends(&s);
        let redis = RedisServer::start(s.rig.lb_ns(), s.rig.lb_addr_in(Family::Ipv4), REDIS_PORT)
            .expect("redis-server");
        let top = format!(
            "node: lb1\nshared_table:\n  redis: {}\n  key_prefix: {PREFIX}\n",
            redis.url()
        );
        let service = format!(
            "    policy: least-conn\n    stick:\n      timeout: {STICK_TIMEOUT}\n      token:\n{token}"
        );
        let config = http_config(&s, &top, &service) + &more(&s);
        s.start(&config);
        for k in 1..=backends {
            s.wait_state(&format!("b{k}"), "up", HANG);
        }
        wait_for("the token store using Redis", HANG, || {
            store_up(&metrics_text(s.rig.lb_ns(), METRICS))
        });
        Single {
            _web: web,
            redis,
            s,
        }
    }

    fn metrics(&self) -> String {
        metrics_text(self.s.rig.lb_ns(), METRICS)
    }

    /// A new connection from client `k` (HTTP/2 if `http2`).
    fn connect(&self, k: usize, http2: bool) -> WebClient {
        WebClient::connect(
            self.s.rig.client_ns(),
            self.s.clients()[k],
            self.s.vip(),
            http2,
        )
        .expect("connecting to the VIP")
    }
}

/// What a new client gets and what it reaches with it later: six new clients on one
/// connection each get a token (least-conn spreads them over the three backends); each
/// returning request with its token, on that connection and on new ones from other addresses
/// (HTTP/1.1 and HTTP/2), reaches the token's backend and gets no new token. Redis holds
/// `PREFIX:token:web:TOKEN` naming the backend and this node, with the stick timeout as TTL.
fn issued_tokens_keep_their_backend(tag: &str, carrier: Carrier) {
    let started = Instant::now();
    let t = Single::start(tag, 3, carrier.yaml(), |_| String::new());
    let mut c = t.connect(0, false);
    let mut sessions: Vec<(String, String)> = Vec::new();
    for i in 0..6 {
        let reply = c.get("/", &[]).unwrap();
        assert_eq!(reply.status, 200, "{reply:?}");
        let token = carrier
            .issued(&reply)
            .unwrap_or_else(|| panic!("new client {i} got no token: {:?}", reply.headers));
        assert_eq!(token.len(), 22, "{token}");
        if let Carrier::Cookie = carrier {
            let line = reply.set_cookies().join("\n");
            for attribute in ["Path=/", "HttpOnly"] {
                assert!(line.contains(attribute), "{attribute}: {line}");
            }
        }
        sessions.push((token, reply.backend().to_string()));
    }
    let spread: BTreeSet<&str> = sessions.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(spread.len(), 3, "least-conn takes turns: {sessions:?}");
    let distinct: BTreeSet<&str> = sessions.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        distinct.len(),
        sessions.len(),
        "tokens repeat: {sessions:?}"
    );

    let mut returning = 0;
    for round in 0..5 {
        for (token, backend) in &sessions {
            let (name, value) = carrier.carry(token);
            let reply = c.get("/", &[(name, &value)]).unwrap();
            assert_eq!(
                (reply.status, reply.backend()),
                (200, backend.as_str()),
                "round {round}, token {token}"
            );
            assert_eq!(
                carrier.issued(&reply),
                None,
                "a placed token is not re-issued"
            );
            returning += 1;
        }
    }
    // The token, not the connection or the address, names the backend.
    for (j, (token, backend)) in sessions.iter().enumerate() {
        let mut other = t.connect(1 + j % 3, j % 2 == 1);
        let (name, value) = carrier.carry(token);
        let reply = other.get("/", &[(name, &value)]).unwrap();
        assert_eq!(
            reply.backend(),
            backend,
            "token {token} from another address"
        );
        returning += 1;
    }

    let mut ttls = Vec::new();
    for (token, backend) in &sessions {
        let value = t.redis.command(&["GET", &key(token)]).unwrap();
        assert!(
            value.starts_with(&format!("{backend}\t")) && value.ends_with("\tlb1"),
            "{token}: {value:?}"
        );
        let pttl: i64 = t
            .redis
            .command(&["PTTL", &key(token)])
            .unwrap()
            .parse()
            .unwrap();
        // The TTL set is the stick timeout; what has passed since is the test's own run.
        assert!(
            pttl <= STICK_TIMEOUT_MS && pttl > STICK_TIMEOUT_MS - 60_000,
            "{token}: PTTL {pttl} ms; the stick timeout is {STICK_TIMEOUT_MS} ms"
        );
        ttls.push(pttl);
    }
    let m = t.metrics();
    eprintln!(
        "{carrier:?}: {} tokens on {spread:?}; {returning} returning requests kept their backend; PTTLs {:?}..{:?} ms; claims won {}, lookups {}, cache hits {}, store hits {}; took {:?}",
        sessions.len(),
        ttls.iter().min(),
        ttls.iter().max(),
        token_counter(&m, "claims_won"),
        token_counter(&m, "lookups"),
        token_counter(&m, "cache_hits"),
        token_counter(&m, "store_hits"),
        started.elapsed()
    );
    assert_eq!(token_counter(&m, "claims_won"), sessions.len() as u64);
}

#[test]
fn a_token_in_a_cookie_keeps_its_backend_and_lives_in_redis_for_the_stick_timeout() {
    issued_tokens_keep_their_backend("htk-cookie", Carrier::Cookie);
}

#[test]
fn a_token_in_a_header_keeps_its_backend_and_lives_in_redis_for_the_stick_timeout() {
    issued_tokens_keep_their_backend("htk-header", Carrier::Header);
}

/// `learn_from_response_cookie: APPSESSION`: requests without a session are placed by the
/// policy alone (least-conn takes turns); a login's `Set-Cookie: APPSESSION=...` (the web
/// backend names itself in the value) becomes a token naming the backend that answered, and
/// every later request carrying it reaches that backend, from any connection.
#[test]
fn a_session_cookie_learned_from_the_response_keeps_its_backend() {
    let started = Instant::now();
    let t = Single::start(
        "htk-learn",
        3,
        "        learn_from_response_cookie: APPSESSION\n",
        |_| String::new(),
    );
    let mut c = t.connect(0, false);
    let anonymous: BTreeSet<String> = (0..3)
        .map(|_| c.get("/", &[]).unwrap().backend().to_string())
        .collect();
    assert_eq!(
        anonymous.len(),
        3,
        "no session, no stickiness: {anonymous:?}"
    );
    let mut sessions = Vec::new();
    for i in 0..3 {
        let reply = c.get("/login", &[]).unwrap();
        let value = reply
            .cookie("APPSESSION")
            .unwrap_or_else(|| panic!("login {i}: no APPSESSION: {:?}", reply.headers));
        assert!(
            value.starts_with(&format!("{}-", reply.backend())),
            "{value}"
        );
        assert!(
            reply.cookie(COOKIE).is_none(),
            "learning issues nothing itself"
        );
        sessions.push((value, reply.backend().to_string()));
    }
    let spread: BTreeSet<&str> = sessions.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(spread.len(), 3, "{sessions:?}");
    let mut kept = 0;
    for round in 0..5 {
        for (value, backend) in &sessions {
            let cookie = format!("theme=dark; APPSESSION={value}");
            let reply = c.get("/cart", &[("cookie", &cookie)]).unwrap();
            assert_eq!(reply.backend(), backend, "round {round}, session {value}");
            kept += 1;
        }
    }
    for (j, (value, backend)) in sessions.iter().enumerate() {
        let mut other = t.connect(1 + j, j == 1);
        let reply = other
            .get("/", &[("cookie", &format!("APPSESSION={value}"))])
            .unwrap();
        assert_eq!(
            reply.backend(),
            backend,
            "session {value} from another address"
        );
        kept += 1;
    }
    for (value, backend) in &sessions {
        let stored = t.redis.command(&["GET", &key(value)]).unwrap();
        assert!(
            stored.starts_with(&format!("{backend}\t")),
            "{value}: {stored:?}"
        );
    }
    let m = t.metrics();
    eprintln!(
        "3 anonymous requests on {anonymous:?}; 3 logins learned on {spread:?}; {kept} requests with a learned session kept their backend; claims won {}; took {:?}",
        token_counter(&m, "claims_won"),
        started.elapsed()
    );
    assert_eq!(token_counter(&m, "claims_won"), 3);
}

/// `sticky-lb table` on a token service, through the CLI: `show` lists every token with its
/// backend, TTL and node (plain and `--json`), `get` reads one, `delete` forgets one (its next
/// request is placed anew), `flush --backend` evacuates one backend's tokens and leaves the
/// others, `flush` without a service empties the store; a service without tokens and a token
/// without `--service` are one-line errors with a non-zero status.
#[test]
fn the_table_command_lists_gets_deletes_and_evacuates_tokens() {
    let started = Instant::now();
    // A second http service without persistence, on port 81 of the same VIP.
    let plain = |s: &Setup| {
        format!(
            "  - name: plain\n    mode: http\n    vip: {}\n    port: 81\n    backends:\n      - name: p1\n        address: {}\n        port: {BACKEND_PORT}\n",
            s.vip().ip(),
            s.backend_addr(1)
        )
    };
    let t = Single::start("htk-table", 3, Carrier::Cookie.yaml(), plain);
    let ns = t.s.rig.lb_ns();
    let run = |args: &[&str]| cli(ns, args);
    let ok = |args: &[&str]| {
        let (code, out, err) = run(args);
        assert_eq!(code, 0, "sticky-lb {args:?}: {out}{err}");
        out
    };
    let mut c = t.connect(0, false);
    let mut sessions: BTreeMap<String, String> = BTreeMap::new();
    for _ in 0..6 {
        let reply = c.get("/", &[]).unwrap();
        sessions.insert(reply.cookie(COOKIE).unwrap(), reply.backend().to_string());
    }

    let listing = ok(&["table", "show", "--service", "web"]);
    for (token, backend) in &sessions {
        let line = listing
            .lines()
            .find(|l| l.contains(token.as_str()))
            .unwrap_or_else(|| panic!("{token} not listed:\n{listing}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            (fields[0], fields[2], fields[5]),
            ("web", backend.as_str(), "lb1"),
            "{line}"
        );
    }
    assert!(listing.trim_end().ends_with("6 tokens"), "{listing}");
    let rows: serde_json::Value =
        serde_json::from_str(&ok(&["table", "show", "--service", "web", "--json"])).unwrap();
    let listed: BTreeMap<String, String> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let ttl = r["ttl_ms"].as_i64().unwrap();
            assert!(ttl > 0 && ttl <= STICK_TIMEOUT_MS, "{r}");
            let k: usize = r["backend"].as_str().unwrap()[1..].parse().unwrap();
            assert_eq!(
                r["backend_address"],
                format!("{}:{BACKEND_PORT}", t.s.backend_addr(k)).as_str()
            );
            assert_eq!(r["node"], "lb1");
            (
                r["token"].as_str().unwrap().to_string(),
                r["backend"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(listed, sessions);

    let (token, backend) = sessions
        .iter()
        .next()
        .map(|(t, b)| (t.clone(), b.clone()))
        .unwrap();
    let got: serde_json::Value =
        serde_json::from_str(&ok(&["table", "get", &token, "--service", "web", "--json"])).unwrap();
    assert_eq!(got[0]["backend"], backend.as_str(), "{got}");
    let got = ok(&["table", "get", &token, "--service", "web"]);
    assert!(got.contains(&format!("{token} -> {backend}")), "{got}");
    let none = ok(&["table", "get", "no-such-token", "--service", "web"]);
    assert!(none.contains("no such token"), "{none}");

    // Delete: gone from Redis; the next request with it is placed anew and claimed again.
    let out = ok(&["table", "delete", &token, "--service", "web"]);
    assert_eq!(out.trim(), "1 token deleted");
    assert_eq!(t.redis.command(&["EXISTS", &key(&token)]).unwrap(), "0");
    let reply = c
        .get("/", &[("cookie", &format!("{COOKIE}={token}"))])
        .unwrap();
    assert_eq!(reply.status, 200);
    let again = reply.backend().to_string();
    let stored = t.redis.command(&["GET", &key(&token)]).unwrap();
    assert!(
        stored.starts_with(&format!("{again}\t")),
        "placed anew: {stored:?}"
    );
    sessions.insert(token.clone(), again);

    // Evacuate the backend with the most tokens: only its tokens go.
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for b in sessions.values() {
        *per_backend.entry(b).or_default() += 1;
    }
    let (&victim, &on_victim) = per_backend.iter().max_by_key(|(_, n)| **n).unwrap();
    let out = ok(&["table", "flush", "--service", "web", "--backend", victim]);
    let plural = if on_victim == 1 { "" } else { "s" };
    assert_eq!(
        out.trim(),
        format!("{on_victim} token{plural} of web/{victim} deleted")
    );
    let rows: serde_json::Value =
        serde_json::from_str(&ok(&["table", "show", "--service", "web", "--json"])).unwrap();
    let left: BTreeMap<String, String> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["token"].as_str().unwrap().to_string(),
                r["backend"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: BTreeMap<String, String> = sessions
        .iter()
        .filter(|(_, b)| b.as_str() != victim)
        .map(|(t, b)| (t.clone(), b.clone()))
        .collect();
    assert_eq!(left, expected, "evacuating {victim}");
    for (token, backend) in &sessions {
        let reply = c
            .get("/", &[("cookie", &format!("{COOKIE}={token}"))])
            .unwrap();
        assert_eq!(reply.status, 200);
        if backend != victim {
            assert_eq!(reply.backend(), backend, "{token} was not on {victim}");
        }
        let stored = t.redis.command(&["GET", &key(token)]).unwrap();
        assert!(
            stored.starts_with(&format!("{}\t", reply.backend())),
            "{token}: {stored:?}"
        );
    }

    // Errors: one line on stderr, status 1.
    for (args, words) in [
        (
            &["table", "show", "--service", "plain"][..],
            "service plain has no tokens",
        ),
        (&["table", "get", &token], "is not a client address"),
        (
            &["table", "flush", "--backend", "b1"],
            "--backend needs --service",
        ),
        (
            &["table", "delete", "x", "--service", "nope"],
            "is not a client address",
        ),
    ] {
        let (code, out, err) = run(args);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(words), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err:?}");
    }

    // The evacuated tokens were placed anew by the requests above: all six are back.
    let out = ok(&["table", "flush"]);
    let tokens_left = sessions.len();
    assert_eq!(
        out.trim(),
        format!("0 stick entries deleted, {tokens_left} tokens deleted")
    );
    let keys = t
        .redis
        .command(&["KEYS", &format!("{PREFIX}:token:*")])
        .unwrap();
    assert_eq!(keys, "", "tokens left after a flush");
    let listing = ok(&["table", "show", "--service", "web"]);
    assert!(listing.trim_end().ends_with("0 tokens"), "{listing}");
    eprintln!(
        "table: 6 tokens listed, 1 deleted and placed anew, {on_victim} evacuated off {victim}, {tokens_left} flushed; took {:?}",
        started.elapsed()
    );
}

/// Two balancers behind the ECMP router with the rig's Redis, a [`WebBackend`] on every
/// backend. Fields drop in order: controllers, their pins, backends, Redis, scratch directory,
/// namespaces.
struct Pair {
    _balancers: Vec<Balancer>,
    _guards: Vec<DataPathGuard>,
    web: Vec<WebBackend>,
    store: RedisServer,
    scratch: ScratchDir,
    rig: EcmpRig,
}

/// Node `i`'s config: service `web` (`mode: http` on VIP:80, least-conn, token in a cookie,
/// checks every 200 ms) with every backend on [`BACKEND_PORT`], its tokens under `prefix` in
/// the rig's Redis, as node `lbI`.
fn pair_config(rig: &EcmpRig, i: usize, prefix: &str) -> String {
    let mut yaml = format!(
        "interface: {}\nxdp_mode: generic\nsweep_interval: 500ms\nnode: lb{i}\nshared_table:\n  redis: {}\n  key_prefix: {prefix}\nmetrics:\n  listen: 127.0.0.1:{METRICS_PORT}\nservices:\n  - name: web\n    mode: http\n    vip: {}\n    port: 80\n    policy: least-conn\n    health_check:\n      interval: 200ms\n      timeout: 150ms\n    stick:\n      timeout: {STICK_TIMEOUT}\n      token:\n        cookie: {COOKIE}\n    backends:\n",
        rig.lb_dev(),
        rig.store_url(),
        rig.vip(),
    );
    for k in 1..=rig.backend_count() {
        yaml += &format!(
            "      - name: b{k}\n        address: {}\n        port: {BACKEND_PORT}\n",
            rig.backend_addr(k)
        );
    }
    yaml
}

/// Node `i`'s metrics text ("" if it cannot be read).
fn node_metrics(rig: &EcmpRig, i: usize) -> String {
    rig.node_metrics(i, SocketAddrV4::new(Ipv4Addr::LOCALHOST, METRICS_PORT))
        .unwrap_or_default()
}

/// Waits until node `i`'s token store is up (uses Redis) or down; how long it took.
fn wait_store(rig: &EcmpRig, i: usize, up: bool) -> Duration {
    let what = format!("lb{i}'s token store {}", if up { "up" } else { "down" });
    wait_for(&what, HANG, || {
        sample(&node_metrics(rig, i), "sticky_lb_token_store_down")
            == Some(if up { 0.0 } else { 1.0 })
    })
}

/// The node (1 or 2) whose address a backend saw the request come from.
fn node_of(rig: &EcmpRig, reply: &Reply) -> usize {
    (1..=2)
        .find(|&i| reply.peer() == rig.lb_addr(i).to_string())
        .unwrap_or_else(|| panic!("request proxied from {:?}, not a balancer", reply.peer()))
}

/// One request over a new connection from `source` (so the router picks a node for it), with
/// `token` in the cookie if given.
fn request(rig: &EcmpRig, source: Ipv4Addr, token: Option<&str>) -> anyhow::Result<Reply> {
    let mut client = WebClient::connect(
        rig.client_ns(),
        source.into(),
        SocketAddr::new(rig.vip().into(), 80),
        false,
    )?;
    match token {
        Some(token) => client.get("/", &[("cookie", &format!("{COOKIE}={token}"))]),
        None => client.get("/", &[]),
    }
}

impl Pair {
    fn start(name: &str, backends: usize, clients: usize) -> Pair {
        netns::require_root();
        let rig = EcmpRig::build(
            EcmpRigOptions::new(name)
                .balancers(2)
                .backends(backends)
                .clients(clients),
        )
        .expect("building the ECMP rig");
        // The proxy answers clients itself (no direct server return): each balancer needs
        // its way back to them, via the router. The rig gives every balancer that route.
        for i in 1..=2 {
            let net = format!("{CLIENT_NET}/{CLIENT_PREFIX_LEN}");
            let out = std::process::Command::new("ip")
                .args(["-n", rig.lb_ns(i), "-4", "route", "show", &net])
                .output()
                .expect("ip route");
            let route = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                route.contains(&format!("via {}", rig.router_addr())),
                "lb{i} has no route to the clients via the router: {route:?}"
            );
        }
        let scratch = ScratchDir::new(rig.tag());
        let store = rig.start_store().expect("redis-server");
        let web = (1..=backends)
            .map(|k| {
                WebBackend::start(
                    rig.backend_ns(k),
                    SocketAddr::new(rig.backend_addr(k).into(), BACKEND_PORT),
                    &format!("b{k}"),
                )
                .expect("web backend")
            })
            .collect();
        let guards = (1..=2).map(|i| rig.datapath_guard(i)).collect();
        let balancers = (1..=2)
            .map(|i| {
                rig.start_balancer(i, scratch.path(), &pair_config(&rig, i, PREFIX))
                    .expect("starting sticky-lb")
            })
            .collect();
        let pair = Pair {
            _balancers: balancers,
            _guards: guards,
            web,
            store,
            scratch,
            rig,
        };
        for i in 1..=2 {
            for k in 1..=backends {
                pair.rig.wait_backend_state(i, &format!("b{k}"), "up");
            }
            pair.wait_store(i, true);
        }
        pair
    }

    fn metrics(&self, i: usize) -> String {
        node_metrics(&self.rig, i)
    }

    fn wait_store(&self, i: usize, up: bool) -> Duration {
        wait_store(&self.rig, i, up)
    }

    /// The sum of token counter `name` over both nodes.
    fn counter(&self, name: &str) -> u64 {
        (1..=2).map(|i| token_counter(&self.metrics(i), name)).sum()
    }

    fn node_of(&self, reply: &Reply) -> usize {
        node_of(&self.rig, reply)
    }

    fn request(&self, source: Ipv4Addr, token: Option<&str>) -> anyhow::Result<Reply> {
        request(&self.rig, source, token)
    }

    /// Rewrites node `i`'s config file with `yaml` and reloads it.
    fn reload(&self, i: usize, yaml: &str) {
        let path = self
            .scratch
            .path()
            .join(format!("lb{i}"))
            .join("config.yaml");
        std::fs::write(&path, yaml).expect("writing the config");
        self.rig.node_cli(i, &["reload"]);
    }

    fn finish(self) {
        let prefix = format!("slb-{}-", self.rig.tag());
        drop(self);
        assert_eq!(netns::listed_namespaces(&prefix), Vec::<String>::new());
    }
}

/// Requests of one token over new connections land on both nodes (ECMP spreads connections)
/// and all reach the backend it was placed on; its backend fails, and its tokens move once
/// (one re-placement written in all, both nodes follow it). Then node 2 is given a store of
/// its own (another key prefix): the nodes now disagree on tokens, which is what the shared
/// store prevented.
#[test]
fn two_nodes_sharing_redis_agree_on_each_token_and_move_it_once() {
    const TOKENS: usize = 12;
    /// Requests per token in each phase, each on a new connection.
    const REQUESTS: usize = 8;
    let started = Instant::now();
    let mut p = Pair::start("htk_pair", 3, TOKENS);
    let clients = p.rig.client_addrs().to_vec();
    let mut tokens: Vec<(String, String)> = Vec::new();
    for &c in &clients {
        let reply = p.request(c, None).unwrap();
        assert_eq!(reply.status, 200);
        let token = reply.cookie(COOKIE).expect("a new client gets a token");
        let stored = p.store.command(&["GET", &key(&token)]).unwrap();
        let node = p.node_of(&reply);
        assert!(
            stored.starts_with(&format!("{}\t", reply.backend()))
                && stored.ends_with(&format!("\tlb{node}")),
            "{stored:?}"
        );
        tokens.push((token, reply.backend().to_string()));
    }
    let placed: BTreeSet<&str> = tokens.iter().map(|(_, b)| b.as_str()).collect();

    let mut by_node = [0usize; 2];
    let mut on_both = 0;
    for (j, (token, backend)) in tokens.iter().enumerate() {
        let mut nodes = BTreeSet::new();
        for r in 0..REQUESTS {
            let from = clients[(j + r) % clients.len()];
            let reply = p.request(from, Some(token)).unwrap();
            assert_eq!(
                (reply.status, reply.backend()),
                (200, backend.as_str()),
                "token {token}, request {r}"
            );
            let node = p.node_of(&reply);
            nodes.insert(node);
            by_node[node - 1] += 1;
        }
        on_both += usize::from(nodes.len() == 2);
    }
    eprintln!(
        "{TOKENS} tokens placed on {placed:?}; {} returning requests: {} through lb1, {} through lb2, all on their token's backend; {on_both} tokens went through both nodes",
        TOKENS * REQUESTS,
        by_node[0],
        by_node[1]
    );
    assert!(
        by_node[0] > 0 && by_node[1] > 0 && on_both > 0,
        "ECMP never spread a token over both nodes: the test proves nothing"
    );

    // The backend with the most tokens fails.
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, b) in &tokens {
        *per_backend.entry(b).or_default() += 1;
    }
    let victim = per_backend
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(b, _)| b.to_string())
        .unwrap();
    let k: usize = victim[1..].parse().unwrap();
    p.web[k - 1].stop();
    for i in 1..=2 {
        p.rig.wait_backend_state(i, &victim, "down");
    }
    let mut moved = Vec::new();
    let mut followed_by_both = 0;
    for (j, (token, backend)) in tokens.iter().enumerate() {
        let (mut seen, mut nodes) = (BTreeSet::new(), BTreeSet::new());
        // The placement the first request after the failure leaves (value: backend, time,
        // node), which no later request through either node may write again.
        let mut first_write = None;
        for r in 0..REQUESTS {
            let from = clients[(j + r) % clients.len()];
            let reply = p.request(from, Some(token)).unwrap();
            assert_eq!(reply.status, 200, "token {token} after {victim} failed");
            seen.insert(reply.backend().to_string());
            nodes.insert(p.node_of(&reply));
            let stored = p.store.command(&["GET", &key(token)]).unwrap();
            assert_eq!(
                first_write.get_or_insert_with(|| stored.clone()),
                &stored,
                "{token} was written again"
            );
        }
        if *backend == victim {
            assert_eq!(
                seen.len(),
                1,
                "{token} left {victim} for several backends: {seen:?}"
            );
            let now = seen.into_iter().next().unwrap();
            assert_ne!(now, victim);
            let stored = first_write.unwrap_or_default();
            assert!(
                stored.starts_with(&format!("{now}\t")),
                "{token}: {stored:?}"
            );
            followed_by_both += usize::from(nodes.len() == 2);
            moved.push((token.clone(), now));
        } else {
            assert_eq!(seen, BTreeSet::from([backend.clone()]), "{token} moved");
        }
    }
    let (replaces, replaces_lost) = (p.counter("replaces"), p.counter("replaces_lost"));
    eprintln!(
        "{victim} failed: its {} tokens moved to {:?} ({followed_by_both} of them then served through both nodes); re-placements standing {replaces}, lost to the other node's {replaces_lost}",
        moved.len(),
        moved
            .iter()
            .map(|(_, b)| b.as_str())
            .collect::<BTreeSet<_>>()
    );
    assert!(
        !moved.is_empty() && followed_by_both > 0,
        "no moved token went through both nodes"
    );

    // The victim is back: the moved tokens stay where they moved.
    p.web[k - 1] = WebBackend::start(
        p.rig.backend_ns(k),
        SocketAddr::new(p.rig.backend_addr(k).into(), BACKEND_PORT),
        &victim,
    )
    .expect("web backend");
    for i in 1..=2 {
        p.rig.wait_backend_state(i, &victim, "up");
    }
    for (j, (token, now)) in moved.iter().enumerate() {
        for r in 0..REQUESTS / 2 {
            let reply = p
                .request(clients[(j + r) % clients.len()], Some(token))
                .unwrap();
            assert_eq!(
                reply.backend(),
                now,
                "{token} went back after {victim} returned"
            );
        }
    }

    // Without the shared store: node 2 keeps its tokens apart.
    p.reload(2, &pair_config(&p.rig, 2, "slbtok-alone"));
    p.wait_store(2, true);
    let mut split = 0;
    for (j, (token, _)) in tokens.iter().enumerate() {
        let mut seen = BTreeSet::new();
        for r in 0..REQUESTS {
            let reply = p
                .request(clients[(j + r) % clients.len()], Some(token))
                .unwrap();
            seen.insert(reply.backend().to_string());
        }
        split += usize::from(seen.len() > 1);
    }
    eprintln!(
        "node 2 on a store of its own: {split} of {TOKENS} tokens went to several backends; took {:?}",
        started.elapsed()
    );
    assert!(
        split > 0,
        "the nodes agreed without sharing: the test proves nothing"
    );
    p.finish();
}

/// When a request was sent, as the main thread tells the traffic threads.
const BEFORE: u8 = 0;
/// Redis is killed; not every node has noticed yet.
const KILLING: u8 = 1;
/// Both nodes route without Redis.
const DOWN: u8 = 2;
/// Redis is restarting (empty) or back.
const AFTER: u8 = 3;

/// One request of the traffic threads.
struct Sent {
    token: String,
    /// The token was placed before Redis went away.
    old: bool,
    phase: u8,
    /// (node, backend), or why there was no answer from a backend.
    outcome: Result<(usize, String), String>,
}

/// A token a traffic thread was issued, and when.
struct Issued {
    token: String,
    backend: String,
    phase: u8,
}

/// Sets the flag when dropped: stops the traffic threads also when the test panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

/// Redis is killed while 20 clients keep sending requests through both nodes (each on a new
/// connection), and restarted empty a few seconds later. Not one request fails; the tokens
/// placed before (each seen by both nodes) keep their backend throughout, from the nodes'
/// caches; tokens issued while Redis is away go where the fallback hash says, through either
/// node; and once Redis is back, the claims made meanwhile are in it.
#[test]
fn redis_killed_mid_traffic_fails_no_request_and_both_nodes_agree() {
    const CLIENTS: usize = 20;
    /// New tokens a traffic thread takes at most while Redis is down, and after.
    const NEW_DOWN: usize = 4;
    const NEW_AFTER: usize = 2;
    /// Bounds of each traffic thread.
    const ROUNDS: usize = 3000;
    const LIMIT: Duration = Duration::from_secs(60);
    let started = Instant::now();
    let mut p = Pair::start("htk_outage", 3, CLIENTS);
    let clients = p.rig.client_addrs().to_vec();
    let names = ["b1", "b2", "b3"];

    // One token per client, seen by both nodes (so both caches hold it).
    let mut old: Vec<(String, String)> = Vec::new();
    for &c in &clients {
        let reply = p.request(c, None).unwrap();
        let token = reply.cookie(COOKIE).expect("a token");
        let backend = reply.backend().to_string();
        let mut nodes = BTreeSet::from([p.node_of(&reply)]);
        for _ in 0..40 {
            if nodes.len() == 2 {
                break;
            }
            let reply = p.request(c, Some(&token)).unwrap();
            assert_eq!(reply.backend(), backend);
            nodes.insert(p.node_of(&reply));
        }
        assert_eq!(nodes.len(), 2, "{token} never went through both nodes");
        old.push((token, backend));
    }

    let phase = AtomicU8::new(BEFORE);
    let stop = AtomicBool::new(false);
    // The threads read the rig; this thread alone kills and restarts Redis (on this thread, as
    // its parent-death signal is tied to the thread that started it).
    let (rig, store) = (&p.rig, &mut p.store);
    let (threads, timeline) = std::thread::scope(|scope| {
        let workers: Vec<_> = clients
            .iter()
            .zip(&old)
            .enumerate()
            .map(|(n, (&client, (old_token, _)))| {
                let (phase, stop) = (&phase, &stop);
                scope.spawn(move || {
                    let begun = Instant::now();
                    let mut sent = Vec::new();
                    let mut issued: Vec<Issued> = Vec::new();
                    let send = |token: Option<&str>| -> Result<(usize, String, Reply), String> {
                        let reply = request(rig, client, token).map_err(|e| format!("{e:#}"))?;
                        if reply.status != 200 || reply.backend().is_empty() {
                            return Err(format!("status {}: {}", reply.status, reply.body));
                        }
                        Ok((node_of(rig, &reply), reply.backend().to_string(), reply))
                    };
                    let mut round = 0;
                    while !stop.load(Relaxed) && round < ROUNDS && begun.elapsed() < LIMIT {
                        let now = phase.load(Relaxed);
                        let outcome = send(Some(old_token)).map(|(node, b, _)| (node, b));
                        sent.push(Sent {
                            token: old_token.clone(),
                            old: true,
                            phase: now,
                            outcome,
                        });
                        let wanted = match now {
                            DOWN => NEW_DOWN,
                            AFTER => NEW_DOWN + NEW_AFTER,
                            _ => 0,
                        };
                        if round % 4 == n % 4 && issued.len() < wanted {
                            match send(None) {
                                Ok((node, backend, reply)) => match reply.cookie(COOKIE) {
                                    Some(token) => {
                                        sent.push(Sent {
                                            token: token.clone(),
                                            old: false,
                                            phase: now,
                                            outcome: Ok((node, backend.clone())),
                                        });
                                        issued.push(Issued {
                                            token,
                                            backend,
                                            phase: now,
                                        });
                                    }
                                    None => sent.push(Sent {
                                        token: String::new(),
                                        old: false,
                                        phase: now,
                                        outcome: Err("a new client got no token".into()),
                                    }),
                                },
                                Err(e) => sent.push(Sent {
                                    token: String::new(),
                                    old: false,
                                    phase: now,
                                    outcome: Err(e),
                                }),
                            }
                        }
                        if !issued.is_empty() {
                            let token = issued[round % issued.len()].token.clone();
                            let outcome = send(Some(&token)).map(|(node, b, _)| (node, b));
                            sent.push(Sent {
                                token,
                                old: false,
                                phase: now,
                                outcome,
                            });
                        }
                        round += 1;
                    }
                    (sent, issued, round)
                })
            })
            .collect();
        let _stop = StopOnDrop(&stop);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        phase.store(KILLING, Relaxed);
        store.kill();
        let killed = t0.elapsed();
        let noticed = [wait_store(rig, 1, false), wait_store(rig, 2, false)];
        phase.store(DOWN, Relaxed);
        std::thread::sleep(Duration::from_secs(3));
        phase.store(AFTER, Relaxed);
        let restart_at = t0.elapsed();
        store.restart().expect("restarting redis-server");
        let back = [wait_store(rig, 1, true), wait_store(rig, 2, true)];
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Relaxed);
        let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        (results, (killed, noticed, restart_at, back, t0.elapsed()))
    });
    let (killed, noticed, restart_at, back, ran) = timeline;

    let mut sent: Vec<Sent> = Vec::new();
    let mut issued: Vec<Issued> = Vec::new();
    let mut rounds = 0;
    for (s, i, r) in threads {
        sent.extend(s);
        issued.extend(i);
        rounds += r;
    }
    let failed: Vec<String> = sent
        .iter()
        .filter_map(|s| {
            s.outcome
                .as_ref()
                .err()
                .map(|e| format!("{} (phase {}): {e}", s.token, s.phase))
        })
        .collect();
    let mut per_phase = [0usize; 4];
    let mut per_node = [0usize; 2];
    for s in &sent {
        per_phase[s.phase as usize] += 1;
        if let Ok((node, _)) = &s.outcome {
            per_node[node - 1] += 1;
        }
    }
    // Old tokens: their backend, in every phase.
    let old_backend: BTreeMap<&str, &str> =
        old.iter().map(|(t, b)| (t.as_str(), b.as_str())).collect();
    let mut old_moved = Vec::new();
    // New tokens: one backend each (through either node); issued while down, the hash's.
    let mut seen: BTreeMap<&str, BTreeSet<(usize, &str)>> = BTreeMap::new();
    for s in &sent {
        let Ok((node, backend)) = &s.outcome else {
            continue;
        };
        if s.old {
            if old_backend[s.token.as_str()] != backend {
                old_moved.push(format!(
                    "{} (phase {}, lb{node}): {backend}, not {}",
                    s.token,
                    s.phase,
                    old_backend[s.token.as_str()]
                ));
            }
        } else {
            seen.entry(&s.token).or_default().insert((*node, backend));
        }
    }
    let mut split = Vec::new();
    let mut not_hashed = Vec::new();
    let mut through_both = 0;
    for i in &issued {
        let backends: BTreeSet<&str> = seen[i.token.as_str()].iter().map(|(_, b)| *b).collect();
        let nodes: BTreeSet<usize> = seen[i.token.as_str()].iter().map(|(n, _)| *n).collect();
        through_both += usize::from(nodes.len() == 2);
        if backends.len() != 1 {
            split.push(format!(
                "{} (issued in phase {}): {backends:?}",
                i.token, i.phase
            ));
        }
        let hashed = names[fallback(&i.token, &names).unwrap()];
        if i.phase == DOWN && i.backend != hashed {
            not_hashed.push(format!("{}: {} not {hashed}", i.token, i.backend));
        }
    }
    let issued_down: Vec<&Issued> = issued.iter().filter(|i| i.phase == DOWN).collect();
    // The claims made while Redis was away are written once it is back (looked at until
    // they all are, at most HANG).
    let check = Instant::now();
    let not_written = loop {
        let missing: Vec<String> = issued_down
            .iter()
            .filter_map(|i| {
                let stored = p
                    .store
                    .command(&["GET", &key(&i.token)])
                    .unwrap_or_default();
                (!stored.starts_with(&format!("{}\t", i.backend)))
                    .then(|| format!("{}: {stored:?}, placed on {}", i.token, i.backend))
            })
            .collect();
        if missing.is_empty() || check.elapsed() > HANG {
            break missing;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let written_back = check.elapsed();
    let fallbacks = [1, 2].map(|i| token_counter(&p.metrics(i), "fallback_routings"));
    let pending = p.counter("pending_claimed");
    eprintln!(
        "traffic: {rounds} rounds, {} requests in {ran:?} ({} before, {} while Redis was being killed, {} down, {} after; {} through lb1, {} through lb2), {} failed",
        sent.len(),
        per_phase[0],
        per_phase[1],
        per_phase[2],
        per_phase[3],
        per_node[0],
        per_node[1],
        failed.len()
    );
    eprintln!(
        "Redis killed at {killed:?}, noticed by the nodes in {:?} / {:?}; restarted at {restart_at:?}, used again after {:?} / {:?}",
        noticed[0], noticed[1], back[0], back[1]
    );
    eprintln!(
        "{} old tokens, {} moved; {} new tokens ({} while down, {} after), {through_both} through both nodes, {} on several backends, {} off the fallback hash; routed by the hash: lb1 {}, lb2 {}; claims written back {pending}, all found in Redis by a check of {written_back:?}",
        old.len(),
        old_moved.len(),
        issued.len(),
        issued_down.len(),
        issued.len() - issued_down.len(),
        split.len(),
        not_hashed.len(),
        fallbacks[0],
        fallbacks[1]
    );
    assert!(failed.is_empty(), "failed requests: {failed:#?}");
    assert!(
        not_written.is_empty(),
        "claims not written back: {not_written:#?}"
    );
    assert!(old_moved.is_empty(), "old tokens moved: {old_moved:#?}");
    assert!(
        split.is_empty(),
        "new tokens on several backends: {split:#?}"
    );
    assert!(
        not_hashed.is_empty(),
        "placed while down, not by the hash: {not_hashed:#?}"
    );
    assert!(
        !issued_down.is_empty() && through_both > 0,
        "no token issued while down went through both nodes: the test proves nothing"
    );
    assert!(
        fallbacks.iter().all(|&n| n > 0),
        "a node never routed by the hash: {fallbacks:?}"
    );
    assert!(
        pending >= issued_down.len() as u64,
        "{pending} claims written back"
    );
    eprintln!("took {:?}", started.elapsed());
    p.finish();
}
