//! Restart without refused connections: `sticky-lb run --take-over` while clients keep
//! opening connections to a `mode: http` service. The running controller hands its listening
//! socket over and stops; the new one serves the same socket and adopts the data path. Needs
//! root.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use sticky_lb_tests::{
    balancer::Balancer,
    scenario::{Mode, Setup},
    web::{WebClient, http_config, start_backends, test_secret, write_keys},
};

/// Client threads, each opening one connection per request.
const CLIENTS: usize = 4;
/// Upper bound of the load, whatever happens.
const LOAD_LIMIT: Duration = Duration::from_secs(30);

/// Four clients open a new connection for every request, before, during and after a
/// take-over: not one connection is refused or request lost, requests are answered after the
/// old controller has exited (by the new one), and a cookie issued by the old one routes the
/// same through the new one (same key file).
#[test]
fn take_over_hands_the_listening_socket_over_without_a_refused_connection() {
    let mut s = Setup::new("hho-takeover", Mode::Generic, 3, 4);
    let _web = start_backends(&s);
    let keys = write_keys(s.scratch.path(), "keys.yaml", &[(1, &test_secret(1))]);
    let config = http_config(
        &s,
        &format!("cookie_keys: {}\n", keys.display()),
        "    policy: least-conn\n    stick:\n      cookie:\n        name: SLBID\n",
    );
    s.start(&config);
    for k in 1..=3 {
        s.wait_state(&format!("b{k}"), "up", Duration::from_secs(10));
    }
    let client = s.clients()[0];
    let mut c = WebClient::connect(s.rig.client_ns(), client, s.vip(), false).unwrap();
    let first = c.get("/", &[]).unwrap();
    let cookie = format!("SLBID={}", first.cookie("SLBID").unwrap());
    let backend = first.backend().to_string();
    drop(c);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let after_exit = Arc::new(AtomicU64::new(0));
    let old_gone = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for t in 0..CLIENTS {
        let (stop, ok, failed, after_exit, old_gone) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            after_exit.clone(),
            old_gone.clone(),
        );
        let (ns, source, vip) = (s.rig.client_ns().to_string(), s.clients()[t], s.vip());
        threads.push(std::thread::spawn(move || {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_LIMIT {
                let gone = old_gone.load(Ordering::Relaxed);
                let result =
                    WebClient::connect(&ns, source, vip, false).and_then(|mut c| c.get("/", &[]));
                match result {
                    Ok(reply) if reply.status == 200 && !reply.backend().is_empty() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if gone {
                            after_exit.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(reply) => failed
                        .lock()
                        .unwrap()
                        .push(format!("status {}", reply.status)),
                    Err(e) => failed.lock().unwrap().push(format!("{e:#}")),
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = ok.load(Ordering::Relaxed);
    let started = Instant::now();
    let new = Balancer::take_over(s.rig.lb_ns(), s.rig.lb_dev(), s.scratch.path(), &config)
        .expect("the new controller takes over");
    let mut old = s.balancer.take().expect("the first controller");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = old.exited() {
            break status;
        }
        assert!(Instant::now() < deadline, "the old controller did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    old_gone.store(true, Ordering::Relaxed);
    eprintln!(
        "take-over: new controller serving {:?} after it started; old one exited ({status})",
        started.elapsed()
    );
    assert!(
        status.success(),
        "the old controller exits cleanly: {status}"
    );
    s.balancer = Some(new);
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let failed = failed.lock().unwrap();
    let (ok, after_exit) = (
        ok.load(Ordering::Relaxed),
        after_exit.load(Ordering::Relaxed),
    );
    eprintln!(
        "take-over: {ok} requests answered ({before} before it started, {after_exit} after the old controller exited), {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(before > 0 && after_exit > 0, "{before} / {after_exit}");
    // The session the old controller placed routes the same through the new one.
    let mut c = WebClient::connect(s.rig.client_ns(), client, s.vip(), false).unwrap();
    for _ in 0..3 {
        assert_eq!(
            c.get("/", &[("cookie", &cookie)]).unwrap().backend(),
            backend
        );
    }
    let status = s.status();
    assert_eq!(status["services"][0]["mode"], "http", "{status}");
}
