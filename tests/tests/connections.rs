//! The connection table end to end, in the netns rig, in native and in generic XDP mode.
//!
//! A stick entry decides where a client's *new* connections go; the connection table decides
//! where an *open* connection's segments go, for the connection's whole life. The two must not
//! be confused: an idle connection (a WebSocket, a database session) outlives its client's
//! stick entry, and if the pool changed meanwhile the client's next connection goes elsewhere
//! while the open one must stay put, or its backend answers the next request with a RST. These
//! tests drive real TCP connections through the real `sticky-lb` binary and check:
//!
//! * an idle connection keeps its backend after its client's entry was swept and a new backend
//!   took the client's hash slot;
//! * a 500 ms stick timeout is refreshed by a client that keeps connecting (the entry is never
//!   re-created), and expires once the client stops;
//! * least-connections' per-backend active counts equal the connections actually open, at every
//!   check, over 1,000 connections opened and closed while the sweep runs every 100 ms.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};
use sticky_lb::{dataplane::PinnedMaps, state};
use sticky_lb_common::BackendId;
use sticky_lb_tests::{
    netns::in_netns,
    rig::{HeldConnection, fetch_names_many, open_held_many},
    scenario::{Mode, PORT, Setup, TIMEOUT},
};

// ---------------------------------------------------------------------------
// A backend server that answers on a kept-open connection
// ---------------------------------------------------------------------------

/// Bounds for [`LineServer`], so a leaked server cannot run on.
const LINE_SERVER_LIFETIME: Duration = Duration::from_secs(120);
const LINE_SERVER_MAX_CONNECTIONS: usize = 1000;

/// A backend server that answers its name when a connection opens and again for every line the
/// client sends on it. The rig's servers answer once per connection (`NameServer` then closes,
/// `HoldServer` then only reads): to learn which backend a segment sent on an old, idle
/// connection reached, the backend has to answer on that connection. One thread per
/// connection; the tests here open at most a few hundred.
/// These tests measure time (idle periods, a 500 ms timeout, polls for counts): run them one at a
/// time, so on a 2-CPU machine one test's load never stretches another's pauses.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct LineServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LineServer {
    /// Listens on 0.0.0.0:PORT in namespace `ns` (which covers the VIP on the backend's `lo`,
    /// as direct server return needs). The listener keeps the namespace it was created in, so
    /// the serving threads need not enter it.
    fn start(ns: &str, name: &str) -> LineServer {
        let listener = in_netns(ns, || {
            TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT))
        })
        .unwrap_or_else(|e| panic!("line server {name} in {ns}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let answer = format!("{name}\n");
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut connections = Vec::new();
                while !stop.load(Ordering::Relaxed)
                    && started.elapsed() < LINE_SERVER_LIFETIME
                    && connections.len() < LINE_SERVER_MAX_CONNECTIONS
                {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (stop, answer) = (stop.clone(), answer.clone());
                            connections.push(std::thread::spawn(move || {
                                answer_every_line(stream, &answer, &stop)
                            }));
                        }
                        // Nothing pending (or a transient failure): look again shortly.
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                for connection in connections {
                    let _ = connection.join();
                }
            })
        };
        LineServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for LineServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes `answer` at once and again for every newline received, until the client closes, the
/// connection fails, the server stops or [`LINE_SERVER_LIFETIME`] passes.
fn answer_every_line(stream: TcpStream, answer: &str, stop: &AtomicBool) {
    let mut writer = &stream;
    if writer.write_all(answer.as_bytes()).is_err() {
        return;
    }
    // Short reads, so the stop flag is seen within 100 ms.
    if stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .is_err()
    {
        return;
    }
    let started = Instant::now();
    let mut reader = &stream;
    let mut chunk = [0u8; 256];
    while !stop.load(Ordering::Relaxed) && started.elapsed() < LINE_SERVER_LIFETIME {
        match reader.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                for _ in chunk[..n].iter().filter(|&&b| b == b'\n') {
                    if writer.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// Sends one request line on an open connection and returns the answer line: the name of the
/// backend that received the request. A request that reached another backend comes back as a
/// reset (that backend has no such connection), or as silence.
fn ask(connection: &HeldConnection) -> std::io::Result<String> {
    let stream = connection.stream();
    let mut writer = stream;
    writer.write_all(b"which backend?\n")?;
    let deadline = Instant::now() + TIMEOUT;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let mut reader = stream;
    // Bounded by the deadline and by the line length.
    while !line.ends_with(b"\n") && line.len() < 256 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match reader.read(&mut byte)? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            _ => line.push(byte[0]),
        }
    }
    stream.set_read_timeout(None)?;
    Ok(String::from_utf8_lossy(&line).trim().to_owned())
}

/// Clients present in `table show --json`, with their rows.
fn table_by_client(s: &Setup) -> BTreeMap<String, serde_json::Value> {
    s.table()
        .into_iter()
        .map(|row| (row["client"].as_str().unwrap().to_owned(), row))
        .collect()
}

/// The config `Setup::config_with` writes, with another `sweep_interval` (it writes 500ms).
fn with_sweep_interval(config: String, interval: &str) -> String {
    assert!(config.contains("sweep_interval: 500ms\n"), "{config}");
    config.replace(
        "sweep_interval: 500ms\n",
        &format!("sweep_interval: {interval}\n"),
    )
}

// ---------------------------------------------------------------------------
// 1. An idle connection outlives its client's entry and a pool change
// ---------------------------------------------------------------------------

/// 60 clients each open one connection and leave it idle for 4 s. Their stick entries (timeout
/// 2 s) are swept; a fourth backend joins and takes about a quarter of the hash slots, so some
/// of these clients' new connections now go to it. Every idle connection's next request must
/// still reach the backend it opened on, without a reset.
fn idle_connection_keeps_its_backend_after_its_entry_expired_and_the_pool_changed(mode: Mode) {
    let _one_at_a_time = one_at_a_time();
    let tag = match mode {
        Mode::Native => "idlekeep-n",
        Mode::Generic => "idlekeep-g",
    };
    let mut s = Setup::new(tag, mode, 3, 60);
    // The name servers answer once and close; these answer on the open connection too.
    for server in s.servers.drain(..3) {
        server.stop();
    }
    let mut servers: Vec<LineServer> = (1..=3)
        .map(|k| LineServer::start(s.rig.backend_ns(k), &format!("b{k}")))
        .collect();
    // Sweep every 500 ms (Setup's default), so an entry idle past 2 s is really deleted.
    let config = s.config(3, "2s", "");
    s.start(&config);
    let clients = s.rig.client_addrs().to_vec();
    let requests: Vec<_> = clients.iter().map(|c| (*c, s.vip())).collect();

    let opened_at = Instant::now();
    let idle: Vec<(HeldConnection, String)> = open_held_many(s.rig.client_ns(), &requests, TIMEOUT)
        .into_iter()
        .zip(&clients)
        .map(|(r, c)| r.unwrap_or_else(|e| panic!("client {c}: {e:#}")))
        .collect();
    assert_eq!(table_by_client(&s).len(), clients.len());

    // The entries expire (no segment on an idle connection refreshes them) and are swept.
    let swept_after = loop {
        let left = table_by_client(&s);
        if clients.iter().all(|c| !left.contains_key(&c.to_string())) {
            break opened_at.elapsed();
        }
        assert!(
            opened_at.elapsed() < Duration::from_secs(6),
            "entries of idle clients not swept within 6 s (timeout 2 s, sweep 500 ms): {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    // A fourth backend joins at run time: Maglev gives it about a quarter of the slots.
    let k = s.rig.add_backend().expect("adding a backend namespace");
    servers.push(LineServer::start(s.rig.backend_ns(k), "b4"));
    let out = s.cli_ok(&[
        "backend",
        "add",
        "web/b4",
        &s.rig.backend_addr(k).to_string(),
    ]);
    assert!(out.contains("web/b4 added"), "{out}");
    std::thread::sleep(Duration::from_secs(4).saturating_sub(opened_at.elapsed()));

    // New connections of the same clients: those whose slot b4 took now go there, and their
    // new stick entries say b4 while their old connection is still open on another backend.
    let fresh: Vec<String> = open_held_many(s.rig.client_ns(), &requests, TIMEOUT)
        .into_iter()
        .zip(&clients)
        .map(|(r, c)| {
            r.unwrap_or_else(|e| panic!("client {c}, new connection: {e:#}"))
                .1
        })
        .collect();
    let moved: Vec<usize> = (0..clients.len())
        .filter(|&i| fresh[i] == "b4" && idle[i].1 != "b4")
        .collect();
    assert!(
        !moved.is_empty(),
        "no client's new connection went to the new backend: {fresh:?}"
    );
    let table = table_by_client(&s);
    for &i in &moved {
        assert_eq!(
            table[&clients[i].to_string()]["backend"],
            "b4",
            "{}'s entry places it on the new backend",
            clients[i]
        );
    }

    // Now the idle connections speak again, each after at least 4 s of silence.
    let idle_for = opened_at.elapsed();
    let mut failures: Vec<(usize, String)> = Vec::new();
    for (i, (connection, first)) in idle.iter().enumerate() {
        match ask(connection) {
            Ok(name) if &name == first => {}
            Ok(name) => failures.push((i, format!("opened on {first}, now answered by {name}"))),
            Err(e) => failures.push((i, format!("opened on {first}, now {e}"))),
        }
    }
    let kept = idle.len() - failures.len();
    let moved_kept = moved
        .iter()
        .filter(|&&i| !failures.iter().any(|(f, _)| *f == i))
        .count();
    eprintln!(
        "{mode:?}: idle connections kept their backend: {kept}/{} (idle {:.1} s; entries swept after {:.1} s); \
         clients whose new connections moved to b4: {} ({moved_kept} of their idle connections kept their backend)",
        idle.len(),
        idle_for.as_secs_f64(),
        swept_after.as_secs_f64(),
        moved.len()
    );
    assert!(
        failures.is_empty(),
        "{} idle connections lost their backend:\n{}",
        failures.len(),
        failures
            .iter()
            .map(|(i, f)| format!("{}: {f}", clients[*i]))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(idle);
    drop(servers);
}

#[test]
fn idle_connection_keeps_its_backend_after_its_entry_expired_and_the_pool_changed_native() {
    idle_connection_keeps_its_backend_after_its_entry_expired_and_the_pool_changed(Mode::Native);
}

#[test]
fn idle_connection_keeps_its_backend_after_its_entry_expired_and_the_pool_changed_generic() {
    idle_connection_keeps_its_backend_after_its_entry_expired_and_the_pool_changed(Mode::Generic);
}

// ---------------------------------------------------------------------------
// 2. A short stick timeout is refreshed in time
// ---------------------------------------------------------------------------

/// How long the clients keep connecting, and how often.
const KEEP_CONNECTING: Duration = Duration::from_secs(3);
const CONNECT_EVERY: Duration = Duration::from_millis(50);

/// Stick timeout 500 ms, refreshed at half of it (250 ms), so a client connecting more often than
/// every 250 ms must never lose its entry: three clients that open a new short connection every
/// 50 ms for 3 s keep the entry they got first (its age only grows, one
/// insert each, never idle past the timeout). Once they stop, their entries expire and are
/// swept (every 200 ms) well within 1.5 s.
fn stick_timeout_of_500ms_is_refreshed_by_a_client_that_keeps_connecting(mode: Mode) {
    let _one_at_a_time = one_at_a_time();
    let tag = match mode {
        Mode::Native => "refresh-n",
        Mode::Generic => "refresh-g",
    };
    let mut s = Setup::new(tag, mode, 2, 3);
    let config = with_sweep_interval(s.config(2, "500ms", ""), "200ms");
    s.start(&config);
    let clients = s.rig.client_addrs().to_vec();
    let keys: Vec<String> = clients.iter().map(|c| c.to_string()).collect();
    let requests: Vec<_> = clients.iter().map(|c| (*c, s.vip())).collect();
    let client_ns = s.rig.client_ns().to_owned();

    // The clients connect on their own thread at a steady pace, while this one reads the table.
    let started = Instant::now();
    let done = AtomicBool::new(false);
    let (rounds, samples) = std::thread::scope(|scope| {
        let connecting = scope.spawn(|| {
            let mut rounds: Vec<(Instant, Vec<String>)> = Vec::new();
            let mut n = 0u32;
            while started.elapsed() < KEEP_CONNECTING {
                std::thread::sleep((CONNECT_EVERY * n).saturating_sub(started.elapsed()));
                n += 1;
                let names = fetch_names_many(&client_ns, &requests, TIMEOUT)
                    .into_iter()
                    .map(|r| r.unwrap_or_else(|e| format!("failed: {e:#}")))
                    .collect();
                rounds.push((Instant::now(), names));
            }
            done.store(true, Ordering::Relaxed);
            rounds
        });
        let mut samples = Vec::new();
        // Bounded by the connecting thread's 3 s (plus one round) and a hard 10 s.
        while !done.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(250));
            samples.push(table_by_client(&s));
        }
        (connecting.join().unwrap(), samples)
    });
    let last_connection = rounds.last().unwrap().0;

    // Every connection reached the client's first backend.
    let first = &rounds[0].1;
    for (_, names) in &rounds {
        assert_eq!(names, first, "a client changed backend: {names:?}");
    }
    let max_gap = rounds
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or_default();
    // The entry was never idle past its timeout, and never re-created: its age only grows.
    let mut max_idle_ms = 0;
    let mut age_ms = vec![0u64; clients.len()];
    for (k, sample) in samples.iter().enumerate() {
        for (i, key) in keys.iter().enumerate() {
            let row = sample.get(key).unwrap_or_else(|| {
                panic!(
                    "sample {k}: {key}'s entry is gone while it keeps connecting \
                     (largest gap between its connections {max_gap:?}): {sample:?}"
                )
            });
            let idle = row["idle_ms"].as_u64().unwrap();
            let age = row["age_ms"].as_u64().unwrap();
            max_idle_ms = max_idle_ms.max(idle);
            assert_eq!(
                row["expired"], false,
                "sample {k}: {key}'s entry idled past 500 ms (largest gap between connections {max_gap:?}): {row}"
            );
            assert!(
                age >= age_ms[i],
                "sample {k}: {key}'s entry was re-created: age {age} ms after {} ms",
                age_ms[i]
            );
            age_ms[i] = age;
        }
    }
    let samples_taken = samples.len();
    assert!(samples_taken >= 8, "only {samples_taken} table samples");
    let status = s.status();
    let service = &status["services"][0];
    assert_eq!(
        (
            &service["stick_inserts"],
            &service["stick_misses"],
            &service["redispatches"]
        ),
        (
            &serde_json::json!(clients.len()),
            &serde_json::json!(clients.len()),
            &serde_json::json!(0)
        ),
        "one insert per client, never re-created: {service}"
    );
    let oldest = *age_ms.iter().min().unwrap();
    assert!(
        oldest >= 2500,
        "entries aged only {age_ms:?} ms over {KEEP_CONNECTING:?} of connecting"
    );

    // The clients stop: idle past 500 ms and swept by a 200 ms sweep, within 1.5 s.
    let mut gone_after = None;
    while last_connection.elapsed() < Duration::from_millis(1500) {
        let table = table_by_client(&s);
        if gone_after.is_none() && keys.iter().all(|k| !table.contains_key(k)) {
            gone_after = Some(last_connection.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let table = table_by_client(&s);
    assert!(
        keys.iter().all(|k| !table.contains_key(k)),
        "entries still there 1.5 s after the clients stopped: {table:?}"
    );
    eprintln!(
        "{mode:?}: {} clients x {} connections every {CONNECT_EVERY:?} (largest gap {max_gap:?}): \
         {} stick inserts, entry ages {age_ms:?} ms at the last of {samples_taken} samples, \
         largest idle {max_idle_ms} ms (timeout 500 ms); after they stopped the entries were gone \
         within {:?}",
        clients.len(),
        rounds.len(),
        service["stick_inserts"],
        gone_after.unwrap()
    );
}

#[test]
fn stick_timeout_of_500ms_is_refreshed_by_a_client_that_keeps_connecting_native() {
    stick_timeout_of_500ms_is_refreshed_by_a_client_that_keeps_connecting(Mode::Native);
}

#[test]
fn stick_timeout_of_500ms_is_refreshed_by_a_client_that_keeps_connecting_generic() {
    stick_timeout_of_500ms_is_refreshed_by_a_client_that_keeps_connecting(Mode::Generic);
}

// ---------------------------------------------------------------------------
// 3. Least-connections' counts are exact while the sweep runs
// ---------------------------------------------------------------------------

/// Rounds of [`CLIENTS`] new held connections (one per client), 1,000 in all.
const ROUNDS: usize = 10;
const CLIENTS: usize = 100;
/// How long a client's FIN may take to reach the balancer before a count that is still off is a
/// failure. A FIN crosses one bridge: milliseconds.
const FIN_PROPAGATION: Duration = Duration::from_secs(2);
/// How long each round then watches the counts with no traffic: longer than the stick timeout,
/// so every client's entry expires and is swept while its connections stay open, and the next
/// round places it anew.
const QUIET: Duration = Duration::from_millis(600);
const STICK_TIMEOUT: &str = "500ms";

/// Per-backend counts as the balancer reports them (`status --json`, clamped at 0) and as the
/// data path holds them (the pinned `slb_active` array, signed: a count below zero shows here).
fn reported_counts(
    s: &Setup,
    maps: &PinnedMaps,
    ids: &BTreeMap<String, BackendId>,
) -> BTreeMap<String, (i64, i64)> {
    let status = s.status();
    status["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let name = b["name"].as_str().unwrap().to_owned();
            let raw = maps.active.get(&ids[&name], 0).unwrap();
            (name, (b["active_connections"].as_i64().unwrap(), raw))
        })
        .collect()
}

/// Whether every backend's reported and raw counts equal the connections open to it.
fn counts_match(counts: &BTreeMap<String, (i64, i64)>, open: &[(HeldConnection, String)]) -> bool {
    counts.iter().all(|(name, &(reported, raw))| {
        let expected = open.iter().filter(|(_, n)| n == name).count() as i64;
        reported == expected && raw == expected
    })
}

/// How many connections are open to each backend.
fn open_by_backend(open: &[(HeldConnection, String)]) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for (_, name) in open {
        *by.entry(name.clone()).or_default() += 1;
    }
    by
}

/// `sticky_lb_sweeps_total` from the controller's metrics endpoint in the balancer's namespace.
fn sweeps_total(s: &Setup, listen: SocketAddrV4) -> u64 {
    let text = in_netns(s.rig.lb_ns(), || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&listen.into(), TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: lb\r\n\r\n")?;
        let mut text = String::new();
        stream.take(4 << 20).read_to_string(&mut text)?;
        Ok(text)
    })
    .expect("scraping metrics");
    text.lines()
        .find_map(|l| l.strip_prefix("sticky_lb_sweeps_total "))
        .unwrap_or_else(|| panic!("no sticky_lb_sweeps_total in:\n{text}"))
        .trim()
        .parse::<f64>()
        .unwrap() as u64
}

/// A small deterministic generator (xorshift64*), so the subsets closed are "random" yet the
/// same on every run.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Ten rounds: 100 held connections open (counts must match at once: a SYN is counted before
/// it is forwarded), then a varying share of all open ones close (counts must match once the
/// FINs arrived), then 600 ms without traffic (counts must not move). Stick entries (timeout
/// 500 ms) expire and are swept between rounds, so each round's clients are placed anew, and the
/// connection sweep walks the table every 100 ms throughout: neither may move a count.
fn least_conn_counts_equal_open_connections_while_sweeps_run(mode: Mode) {
    let _one_at_a_time = one_at_a_time();
    let tag = match mode {
        Mode::Native => "lccount-n",
        Mode::Generic => "lccount-g",
    };
    let mut s = Setup::new(tag, mode, 3, CLIENTS);
    let holders = s.hold_connections();
    let listen = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9180);
    let config = with_sweep_interval(
        s.config_with(
            &format!("metrics:\n  listen: {listen}\n"),
            &format!("    policy: least-conn\n    stick:\n      timeout: {STICK_TIMEOUT}\n"),
            &vec![String::new(); 3],
        ),
        "100ms",
    );
    s.start(&config);
    let maps = PinnedMaps::open(&s.guard.pins()).expect("opening the pinned maps");
    let runtime = state::RuntimeState::read(&state::path(Some(s.rig.lb_ns()), s.rig.lb_dev()))
        .expect("the controller's state file");
    let ids: BTreeMap<String, BackendId> = runtime.services[0]
        .backends
        .iter()
        .map(|b| (b.name.clone(), b.id))
        .collect();
    let requests: Vec<_> = s.rig.client_addrs().iter().map(|c| (*c, s.vip())).collect();

    let sweeps_before = sweeps_total(&s, listen);
    let started = Instant::now();
    let mut dice = Dice(0x5eed_1234_abcd_0001);
    let mut open: Vec<(HeldConnection, String)> = Vec::new();
    let (mut checks, mut opened, mut closed) = (0, 0, 0);
    let mut slowest_fin = Duration::ZERO;
    for round in 0..ROUNDS {
        for (r, (c, _)) in open_held_many(s.rig.client_ns(), &requests, TIMEOUT)
            .into_iter()
            .zip(&requests)
        {
            open.push(r.unwrap_or_else(|e| panic!("round {round}, client {c}: {e:#}")));
            opened += 1;
        }
        // A SYN is counted before it is forwarded, so the counts are there before the answer.
        let counts = reported_counts(&s, &maps, &ids);
        checks += 1;
        assert!(
            counts_match(&counts, &open),
            "round {round}, after opening: balancer counts (reported, raw) {counts:?}, open {:?}",
            open_by_backend(&open)
        );

        // Close a share of the open connections: 30..=90 % of them, all in the last round.
        let percent = if round == ROUNDS - 1 {
            100
        } else {
            30 + dice.below(61)
        };
        let mut keep = Vec::with_capacity(open.len());
        for connection in open.drain(..) {
            if dice.below(100) < percent {
                closed += 1;
                drop(connection); // the client's FIN
            } else {
                keep.push(connection);
            }
        }
        open = keep;
        let closed_at = Instant::now();
        // Only the FINs' propagation is tolerated: poll, bounded, then the counts must match.
        let counts = loop {
            let counts = reported_counts(&s, &maps, &ids);
            checks += 1;
            if counts_match(&counts, &open) || closed_at.elapsed() > FIN_PROPAGATION {
                break counts;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        slowest_fin = slowest_fin.max(closed_at.elapsed());
        assert!(
            counts_match(&counts, &open),
            "round {round}, {FIN_PROPAGATION:?} after closing: balancer counts (reported, raw) \
             {counts:?}, open {:?}",
            open_by_backend(&open)
        );
        // Then nothing happens for a while except the sweeps (and stick entries expiring and
        // being swept): the counts must not move at all.
        let quiet_from = Instant::now();
        while quiet_from.elapsed() < QUIET {
            std::thread::sleep(Duration::from_millis(50));
            let counts = reported_counts(&s, &maps, &ids);
            checks += 1;
            assert!(
                counts_match(&counts, &open),
                "round {round}, {:?} after the FINs, with no traffic: balancer counts \
                 (reported, raw) {counts:?}, open {:?}",
                quiet_from.elapsed(),
                open_by_backend(&open)
            );
        }
        eprintln!(
            "{mode:?}: round {round}: closed {percent}%, open now {:?}",
            open_by_backend(&open)
        );
    }
    let elapsed = started.elapsed();
    let sweeps = sweeps_total(&s, listen) - sweeps_before;
    let status = s.status();
    let service = &status["services"][0];
    let inserts = service["stick_inserts"].as_u64().unwrap();
    eprintln!(
        "{mode:?}: {opened} connections opened, {closed} closed; {checks} count checks, all exact \
         (slowest FIN propagation {slowest_fin:?}); {sweeps} sweeps ran in {:.1} s \
         (sweep_interval 100 ms); {inserts} stick inserts (clients placed anew after their \
         entries expired); connections untracked: {}",
        elapsed.as_secs_f64(),
        service["connections_untracked"]
    );
    assert_eq!(service["connections_untracked"], 0, "{service}");
    assert!(
        inserts >= (ROUNDS * CLIENTS / 2) as u64,
        "entries did not expire between rounds: {inserts} inserts"
    );
    assert_eq!(opened, ROUNDS * CLIENTS);
    assert!(
        sweeps as f64 >= elapsed.as_secs_f64() * 5.0,
        "only {sweeps} sweeps in {elapsed:?} with a 100 ms interval"
    );
    drop(holders);
}

#[test]
fn least_conn_counts_equal_open_connections_while_sweeps_run_native() {
    least_conn_counts_equal_open_connections_while_sweeps_run(Mode::Native);
}

#[test]
fn least_conn_counts_equal_open_connections_while_sweeps_run_generic() {
    least_conn_counts_equal_open_connections_while_sweeps_run(Mode::Generic);
}
