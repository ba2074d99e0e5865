//! The controller's life, end to end in the netns rig: a SIGHUP while it starts, what it tells
//! systemd (sd_notify), one controller per interface, a reload whose services do not fit the
//! service index, and a state file that cannot be written.

use serde_json::Value;
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::unix::net::{UnixDatagram, UnixStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use sticky_lb::{dataplane::PinDir, state};
use sticky_lb_common::{SERVICE_INDEX_PROBES, SERVICE_INDEX_SLOTS, hash::service_slot};
use sticky_lb_tests::{
    balancer::{Balancer, binary, cli},
    netns::in_netns,
    rig::fetch_names_many,
    scenario::{Mode, PORT, Setup, TIMEOUT},
};

/// Fast checks: every 200 ms, 150 ms timeout, rise 2, fall 3.
const FAST_CHECKS: &str = "    health_check:\n      interval: 200ms\n      timeout: 150ms\n      rise: 2\n      fall: 3\n";

/// A backend nobody answers ARP for (no rig namespace has 198.18.0.99): a start waits for its
/// MAC (1.5 s) before it loads and attaches anything, which leaves a window in which the
/// controller runs but is not up yet. Appended to a `Setup::config*` config (its last lines
/// are the backends of `web`).
const GHOST: &str = "      - name: ghost\n        address: 198.18.0.99\n        health_check:\n          type: none\n";

/// Backend k's lines as `Setup::config_with` writes them.
fn backend_lines(s: &Setup, k: usize) -> String {
    format!(
        "      - name: b{k}\n        address: {}\n",
        s.rig.backend_addr(k)
    )
}

/// `config` with backend k at weight 0 (a reload drains it).
fn with_weight_zero(s: &Setup, config: &str, k: usize) -> String {
    let lines = backend_lines(s, k);
    assert!(config.contains(&lines), "{config}");
    config.replace(&lines, &format!("{lines}        weight: 0\n"))
}

fn config_path(s: &Setup) -> PathBuf {
    s.scratch.path().join("config.yaml")
}

fn state_path(s: &Setup) -> PathBuf {
    state::path(Some(s.rig.lb_ns()), s.rig.lb_dev())
}

fn pins(s: &Setup) -> PinDir {
    PinDir::new(Some(s.rig.lb_ns()), s.rig.lb_dev())
}

fn lb(s: &mut Setup) -> &mut Balancer {
    s.balancer.as_mut().expect("a balancer")
}

fn log(s: &Setup) -> String {
    s.balancer
        .as_ref()
        .map(|b| b.log_text())
        .unwrap_or_default()
}

/// Whether process `pid` catches SIGHUP (bit 0 of `SigCgt` in /proc/PID/status).
fn catches_sighup(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & 1 << (libc::SIGHUP - 1) != 0)
}

/// CLOCK_MONOTONIC in µs, the clock systemd wants MONOTONIC_USEC= in.
fn monotonic_us() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as i128 * 1_000_000 + ts.tv_nsec as i128 / 1000
}

/// A SIGHUP that arrives while the controller starts (handlers installed, data path not yet
/// attached) is queued and reloads once it is up; it never kills it (the default action of
/// SIGHUP, which a start that installed its handlers last was exposed to).
///
/// The signal is sent as soon as the process catches SIGHUP rather than right after the spawn:
/// before its `main` has run, SIGHUP ends any program, whatever its code says.
#[test]
fn sighup_right_after_start_reloads_and_never_kills() {
    let mut s = Setup::new("hupstart", Mode::Generic, 2, 8);
    let config = s.config(2, "30m", "") + GHOST;
    let balancer = Balancer::spawn(
        s.rig.lb_ns(),
        s.rig.lb_dev(),
        s.scratch.path(),
        &config,
        &[],
    )
    .expect("spawning sticky-lb");
    let pid = balancer.pid();
    s.balancer = Some(balancer);
    let started = Instant::now();
    while !catches_sighup(pid) {
        if let Some(status) = lb(&mut s).exited() {
            panic!("sticky-lb exited with {status} during start:\n{}", log(&s));
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "sticky-lb never caught SIGHUP:\n{}",
            log(&s)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // The config was read before the handlers were installed: this one is the reload's.
    std::fs::write(config_path(&s), with_weight_zero(&s, &config, 2)).unwrap();
    lb(&mut s).signal(libc::SIGHUP);
    // Sent before the controller was up: nothing attached yet, no state file.
    let early = !pins(&s).is_attached() && !state_path(&s).exists();
    assert!(
        early,
        "SIGHUP was caught only once the controller was up (handlers must come first):\n{}",
        log(&s)
    );

    lb(&mut s)
        .wait_up(Duration::from_secs(20))
        .expect("the controller comes up after an early SIGHUP");
    s.wait_state("b2", "drain", Duration::from_secs(10));
    assert!(
        lb(&mut s).exited().is_none(),
        "the controller still runs:\n{}",
        log(&s)
    );
    let text = log(&s);
    assert!(text.contains("SIGHUP: reloading"), "{text}");
    assert!(text.contains("reload (SIGHUP): "), "{text}");
    // It serves: b2 drains (weight 0) and the ghost has no MAC, so every new client gets b1.
    let clients = s.rig.client_addrs().to_vec();
    assert!(s.round(&clients).iter().all(|n| n == "b1"));
    assert_eq!(lb(&mut s).stop(), Some(0));
}

/// The datagrams a controller sends to `NOTIFY_SOCKET`.
struct Notifications {
    socket: UnixDatagram,
}

impl Notifications {
    fn bind(path: &Path) -> Notifications {
        let socket = UnixDatagram::bind(path).expect("binding the notify socket");
        Notifications { socket }
    }

    /// The next datagram's lines; panics after `within`, naming `what` was awaited (with the
    /// controller's log).
    fn next(&self, what: &str, within: Duration, log: impl Fn() -> String) -> Vec<String> {
        self.socket.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n])
                .lines()
                .map(str::to_string)
                .collect(),
            Err(e) => panic!(
                "no notification ({what}) within {within:?} ({e}); log:\n{}",
                log()
            ),
        }
    }

    /// A datagram already sent and not read yet, if any (looks once, without waiting).
    fn pending(&self) -> Option<Vec<String>> {
        self.socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        let got = self.socket.recv(&mut buf).ok().map(|n| {
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .map(str::to_string)
                .collect()
        });
        self.socket.set_nonblocking(false).unwrap();
        got
    }
}

/// systemd `Type=notify`: READY=1 once the data path is attached and the control socket,
/// metrics and state file are up; RELOADING=1 with MONOTONIC_USEC= on SIGHUP, then READY=1
/// once the reload is applied; STOPPING=1 on SIGTERM.
#[test]
fn systemd_notify_ready_after_attach_and_around_reloads() {
    let mut s = Setup::new("notify", Mode::Generic, 2, 8);
    let metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9183);
    // The ghost makes the start take 1.5 s before it attaches: a READY=1 sent early is seen.
    let config = s.config(2, "30m", &format!("metrics:\n  listen: {metrics}\n")) + GHOST;
    let socket_path = s.scratch.path().join("notify.sock");
    let notifications = Notifications::bind(&socket_path);
    let balancer = Balancer::spawn(
        s.rig.lb_ns(),
        s.rig.lb_dev(),
        s.scratch.path(),
        &config,
        &[("NOTIFY_SOCKET", socket_path.as_os_str())],
    )
    .expect("spawning sticky-lb");
    let pid = balancer.pid();
    s.balancer = Some(balancer);

    let ready = notifications.next("READY=1 at start", Duration::from_secs(20), || log(&s));
    // What READY=1 promises, looked at as soon as it arrives.
    let attached = pins(&s).is_attached();
    let state_pid = state::RuntimeState::read(&state_path(&s))
        .ok()
        .map(|st| st.pid);
    let control = UnixStream::connect(sticky_lb::control::socket_path(
        Some(s.rig.lb_ns()),
        s.rig.lb_dev(),
    ));
    let metrics_up = in_netns(s.rig.lb_ns(), || {
        TcpStream::connect_timeout(&metrics.into(), Duration::from_secs(2))
    });
    assert_eq!(ready, ["READY=1"], "the first notification");
    assert!(attached, "READY=1 before the data path was attached");
    assert_eq!(
        state_pid,
        Some(pid),
        "READY=1 before the state file was written"
    );
    assert!(
        control.is_ok(),
        "READY=1 before the control socket: {control:?}"
    );
    assert!(metrics_up.is_ok(), "READY=1 before metrics: {metrics_up:?}");
    drop((control, metrics_up));
    lb(&mut s)
        .wait_up(Duration::from_secs(5))
        .expect("up once READY=1 was sent");

    // SIGHUP: RELOADING=1 stamped with the monotonic clock, then READY=1 once applied.
    std::fs::write(config_path(&s), with_weight_zero(&s, &config, 2)).unwrap();
    let before = monotonic_us();
    lb(&mut s).signal(libc::SIGHUP);
    let reloading =
        notifications.next("RELOADING=1 on SIGHUP", Duration::from_secs(10), || log(&s));
    let after = monotonic_us();
    assert_eq!(reloading.len(), 2, "{reloading:?}");
    assert_eq!(reloading[0], "RELOADING=1", "{reloading:?}");
    let usec: i128 = reloading[1]
        .strip_prefix("MONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC= in {reloading:?}"))
        .parse()
        .expect("MONOTONIC_USEC is a number");
    assert!(
        (before..=after).contains(&usec),
        "MONOTONIC_USEC={usec} is CLOCK_MONOTONIC between the signal ({before}) and its receipt ({after})"
    );
    let ready = notifications.next("READY=1 after the reload", Duration::from_secs(10), || {
        log(&s)
    });
    let b2 = state::RuntimeState::read(&state_path(&s))
        .unwrap()
        .services
        .iter()
        .flat_map(|svc| svc.backends.clone())
        .find(|b| b.name == "b2")
        .expect("b2 in the state file");
    assert_eq!(ready, ["READY=1"], "the reload's end");
    assert_eq!(b2.state, "drain", "READY=1 before the reload was applied");
    assert!(log(&s).contains("reload (SIGHUP): "), "{}", log(&s));

    // SIGTERM: STOPPING=1, and nothing else was sent.
    assert_eq!(
        notifications.pending(),
        None,
        "nothing between the reload's READY=1 and the stop"
    );
    assert_eq!(lb(&mut s).stop(), Some(0));
    let stopping = notifications.next("STOPPING=1 on SIGTERM", Duration::from_secs(5), || log(&s));
    assert_eq!(stopping, ["STOPPING=1"]);
}

/// A SIGHUP reload that is refused still ends with READY=1: systemd holds a unit that sent
/// RELOADING=1 in "reloading" until READY=1 comes. A stick_table_size change passes
/// `check-config` (the unit's first ExecReload) and is refused only by the running controller.
#[test]
fn a_refused_sighup_reload_still_ends_with_ready() {
    let mut s = Setup::new("notifyno", Mode::Generic, 2, 4);
    let config = s.config(2, "30m", "");
    let socket_path = s.scratch.path().join("notify.sock");
    let notifications = Notifications::bind(&socket_path);
    let balancer = Balancer::spawn(
        s.rig.lb_ns(),
        s.rig.lb_dev(),
        s.scratch.path(),
        &config,
        &[("NOTIFY_SOCKET", socket_path.as_os_str())],
    )
    .expect("spawning sticky-lb");
    s.balancer = Some(balancer);
    assert_eq!(
        notifications.next("READY=1 at start", Duration::from_secs(20), || log(&s)),
        ["READY=1"]
    );
    lb(&mut s).wait_up(Duration::from_secs(5)).unwrap();
    let clients = s.rig.client_addrs().to_vec();
    let placement = s.round(&clients);

    let refused = s.config(2, "30m", "stick_table_size: 65536\n");
    std::fs::write(config_path(&s), &refused).unwrap();
    lb(&mut s).signal(libc::SIGHUP);
    let reloading =
        notifications.next("RELOADING=1 on SIGHUP", Duration::from_secs(10), || log(&s));
    assert_eq!(reloading.first().map(String::as_str), Some("RELOADING=1"));
    let ready = notifications.next(
        "READY=1 after the refused reload",
        Duration::from_secs(5),
        || log(&s),
    );
    assert_eq!(ready, ["READY=1"], "a refused reload ends too");
    assert!(
        log(&s).contains("reload refused, nothing changed"),
        "{}",
        log(&s)
    );
    assert_eq!(
        s.round(&clients),
        placement,
        "the running config keeps serving"
    );
    assert_eq!(lb(&mut s).stop(), Some(0));
}

/// Runs `sticky-lb ARGS...` with a deadline (a second controller that did not refuse would run
/// until stopped); returns (status code, stdout, stderr). Killed and failed after `within`.
fn run_bounded(dir: &Path, args: &[&str], within: Duration) -> (i32, String, String) {
    let out_path = dir.join("second.out");
    let err_path = dir.join("second.err");
    let mut child = Command::new(binary())
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(std::fs::File::create(&out_path).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&err_path).unwrap()))
        .spawn()
        .expect("running sticky-lb");
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "sticky-lb {args:?} still ran after {within:?}:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(&out_path).unwrap_or_default(),
        std::fs::read_to_string(&err_path).unwrap_or_default(),
    )
}

/// XDP program id on the balancer's interface, from `ip -d link`.
fn xdp_prog_id(s: &Setup) -> Option<u32> {
    let out = Command::new("ip")
        .args(["-n", s.rig.lb_ns(), "-d", "link", "show", s.rig.lb_dev()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let at = text.find("prog/xdp id ")?;
    text[at + 12..].split_whitespace().next()?.parse().ok()
}

/// `status --json` without what traffic and time move (counters, entries, connections).
fn shape(status: &Value) -> Value {
    let services: Vec<Value> = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|svc| {
            let backends: Vec<Value> = svc["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    serde_json::json!({
                        "name": b["name"], "address": b["address"], "mac": b["mac"],
                        "weight": b["weight"], "state": b["state"],
                    })
                })
                .collect();
            serde_json::json!({
                "name": svc["name"], "vip": svc["vip"], "port": svc["port"],
                "policy": svc["policy"], "backends": backends,
            })
        })
        .collect();
    serde_json::json!({
        "xdp_mode": status["xdp_mode"],
        "controller_pid": status["controller_pid"],
        "controller_running": status["controller_running"],
        "config": status["config"],
        "services": services,
    })
}

/// One controller per interface: a second `run` refuses in one line naming the first one's pid,
/// and touches nothing: the first keeps its data path, control socket and state file.
#[test]
fn a_second_controller_on_the_same_interface_refuses() {
    let mut s = Setup::new("second", Mode::Generic, 3, 24);
    let config = s.config(3, "30m", "");
    s.start(&config);
    let first = lb(&mut s).pid();
    let clients = s.rig.client_addrs().to_vec();
    let placement = s.round(&clients);
    let status = shape(&s.status());
    let program = xdp_prog_id(&s).expect("an XDP program on the interface");

    let config_file = config_path(&s);
    let (code, out, err) = run_bounded(
        s.scratch.path(),
        &[
            "--netns",
            s.rig.lb_ns(),
            "run",
            "--config",
            config_file.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert_ne!(code, 0, "the second controller must refuse: {err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(
        err.contains(&format!("(pid {first})")) && err.contains(s.rig.lb_dev()),
        "names the running controller's pid and the interface: {err}"
    );

    assert!(
        lb(&mut s).exited().is_none(),
        "the first controller still runs:\n{}",
        log(&s)
    );
    assert_eq!(xdp_prog_id(&s), Some(program), "the program is untouched");
    assert_eq!(shape(&s.status()), status, "status is unchanged");
    assert_eq!(
        s.round(&clients),
        placement,
        "clients reach the same backends"
    );
    // Its control socket still answers.
    let stats: Value = serde_json::from_str(&s.cli_ok(&["stats", "--json"])).unwrap();
    assert_eq!(stats["services"][0]["stick_inserts"], clients.len());
    assert_eq!(lb(&mut s).stop(), Some(0));
}

/// The service-index home slot of `vip`:`port`, as the data path computes it (the key holds the
/// address and the port in network byte order).
fn home_slot(vip: Ipv4Addr, port: u16) -> u32 {
    service_slot(
        &[u32::from_ne_bytes(vip.octets()), 0, 0, 0],
        port.to_be(),
        SERVICE_INDEX_SLOTS,
    )
}

/// The slots a key with home slot `home` may take.
fn chain(home: u32) -> Vec<u32> {
    (0..SERVICE_INDEX_PROBES)
        .map(|p| (home + p) & (SERVICE_INDEX_SLOTS - 1))
        .collect()
}

/// `SERVICE_INDEX_PROBES + 1` addresses in 198.18.128.0/17 (no rig address) whose home slot
/// for `port` is one and the same, and whose chain does not reach `avoid`.
fn colliding_vips(port: u16, avoid: u32) -> Vec<Ipv4Addr> {
    let wanted = SERVICE_INDEX_PROBES as usize + 1;
    let mut by_home: BTreeMap<u32, Vec<Ipv4Addr>> = BTreeMap::new();
    for n in 0u32..(1 << 15) {
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + n);
        if matches!(vip.octets()[3], 0 | 255) {
            continue;
        }
        let home = home_slot(vip, port);
        if chain(home).contains(&avoid) {
            continue;
        }
        let group = by_home.entry(home).or_default();
        group.push(vip);
        if group.len() == wanted {
            return group.clone();
        }
    }
    panic!("no {wanted} addresses share a home slot");
}

/// `web`'s config plus services `extra1`.. on `vips`, each with backend 1 as its only backend.
fn with_services(s: &Setup, config: &str, vips: &[Ipv4Addr]) -> String {
    let mut yaml = config.to_string();
    for (i, vip) in vips.iter().enumerate() {
        yaml += &format!(
            "  - name: extra{}\n    vip: {vip}\n    port: {PORT}\n    health_check:\n      type: none\n    backends:\n      - name: e1\n        address: {}\n",
            i + 1,
            s.rig.backend_addr(1)
        );
    }
    yaml
}

/// The pinned service index: slot -> entry, for the slots in use (tombstones included).
fn service_index(s: &Setup) -> BTreeMap<u32, u32> {
    let index: aya::maps::Array<aya::maps::MapData, u32> =
        sticky_lb::dataplane::open_pinned(&pins(s), sticky_lb_common::map_names::SERVICE_INDEX)
            .expect("the pinned service index");
    (0..SERVICE_INDEX_SLOTS)
        .filter_map(|slot| {
            let entry = index.get(&slot, 0).unwrap();
            (entry != 0).then_some((slot, entry))
        })
        .collect()
}

fn service_names(s: &Setup) -> Vec<String> {
    s.status()["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|svc| svc["name"].as_str().unwrap().to_string())
        .collect()
}

/// A reload adding more services with one home slot than the data path probes from it: the
/// last cannot be placed, so the reload is refused naming it and nothing changes, neither the
/// index nor the state nor any client. The same services less one fit.
#[test]
fn a_reload_that_does_not_fit_changes_nothing() {
    let mut s = Setup::new("nofit", Mode::Generic, 3, 24);
    let config = s.config(3, "30m", "");
    s.start(&config);
    let clients = s.rig.client_addrs().to_vec();
    let placement = s.round(&clients);
    let index = service_index(&s);
    let web_home = home_slot(s.rig.vip(), PORT);
    assert_eq!(index.keys().copied().collect::<Vec<_>>(), [web_home]);

    let vips = colliding_vips(PORT, web_home);
    let last = format!("extra{}", vips.len());
    std::fs::write(config_path(&s), with_services(&s, &config, &vips)).unwrap();
    let (code, out, err) = cli(s.rig.lb_ns(), &["reload"]);
    assert_eq!(code, 1, "the reload must be refused: {out}{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(
        err.contains("reload refused, nothing changed")
            && err.contains(&format!(
                "service {last}: the service index has no free slot"
            )),
        "{err}"
    );
    assert_eq!(service_names(&s), ["web"], "status lists only web");
    assert_eq!(service_index(&s), index, "the service index is unchanged");
    assert_eq!(
        s.round(&clients),
        placement,
        "clients reach the same backends"
    );
    assert!(lb(&mut s).exited().is_none(), "{}", log(&s));

    // One fewer fits: they fill the chain from the shared home slot.
    let fit = &vips[..SERVICE_INDEX_PROBES as usize];
    std::fs::write(config_path(&s), with_services(&s, &config, fit)).unwrap();
    let out = s.cli_ok(&["reload"]);
    assert!(out.starts_with("reloaded: "), "{out}");
    let mut names = vec!["web".to_string()];
    names.extend((1..=fit.len()).map(|i| format!("extra{i}")));
    assert_eq!(service_names(&s), names);
    let mut slots: Vec<u32> = chain(home_slot(vips[0], PORT));
    slots.push(web_home);
    slots.sort();
    assert_eq!(service_index(&s).keys().copied().collect::<Vec<_>>(), slots);
    assert_eq!(s.round(&clients), placement, "web's clients did not move");
}

/// Puts a non-empty directory where the state file goes (a rename of the new state file over
/// it fails, as root too); removes it on drop, also when a test fails.
struct StateFileBlocker {
    path: PathBuf,
    spare: PathBuf,
}

impl StateFileBlocker {
    fn install(path: &Path) -> StateFileBlocker {
        let blocker = StateFileBlocker {
            path: path.to_path_buf(),
            spare: path.with_extension("blocker"),
        };
        // Made aside, then renamed into place: a controller write between the removal and
        // the rename makes the rename fail, and it is tried again.
        for _ in 0..50 {
            std::fs::create_dir_all(&blocker.spare).unwrap();
            std::fs::write(blocker.spare.join("keep"), "not a state file\n").unwrap();
            let _ = std::fs::remove_file(path);
            if std::fs::rename(&blocker.spare, path).is_ok() {
                return blocker;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("could not put a directory at {}", path.display());
    }

    fn remove(&self) {
        if self.path.is_dir() {
            std::fs::remove_dir_all(&self.path).unwrap();
        }
        let _ = std::fs::remove_dir_all(&self.spare);
    }
}

impl Drop for StateFileBlocker {
    fn drop(&mut self) {
        if self.path.is_dir() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
        let _ = std::fs::remove_dir_all(&self.spare);
    }
}

/// The state file cannot be written: a health transition still reaches the data path (the
/// failed backend's clients move), the controller keeps running and answering, and says the
/// file was not written. Once it can be written again, the next change writes it, with what
/// happened in between.
#[test]
fn an_unwritable_state_file_never_stops_the_controller() {
    let mut s = Setup::new("statefile", Mode::Generic, 3, 60);
    let config = s.config_with(
        "",
        &format!("    stick:\n      timeout: 30m\n{FAST_CHECKS}"),
        &vec![String::new(); 3],
    );
    s.start(&config);
    let clients = s.rig.client_addrs().to_vec();
    let before = s.round(&clients);
    let (on_b2, others): (Vec<usize>, Vec<usize>) =
        (0..clients.len()).partition(|&i| before[i] == "b2");
    assert!(!on_b2.is_empty(), "{before:?}");

    let path = state_path(&s);
    let blocker = StateFileBlocker::install(&path);
    let b2 = s.servers.remove(1);
    b2.stop();

    // The data path acts: b2's clients are sent elsewhere (while b2 is still taken as up, their
    // connections are refused).
    let requests: Vec<(Ipv4Addr, SocketAddr)> =
        on_b2.iter().map(|&i| (clients[i], s.vip())).collect();
    let started = Instant::now();
    loop {
        let replies = fetch_names_many(s.rig.client_ns(), &requests, TIMEOUT);
        if replies.iter().all(|r| r.as_ref().is_ok_and(|n| n != "b2")) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "b2's clients were not redispatched: {replies:?}\n{}",
            log(&s)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let kept: Vec<Ipv4Addr> = others.iter().map(|&i| clients[i]).collect();
    let expected: Vec<String> = others.iter().map(|&i| before[i].clone()).collect();
    assert_eq!(s.round(&kept), expected, "nobody else moved");

    assert!(
        lb(&mut s).exited().is_none(),
        "the controller still runs:\n{}",
        log(&s)
    );
    let stats: Value = serde_json::from_str(&s.cli_ok(&["stats", "--json"])).unwrap();
    assert!(stats["services"][0]["redispatches"].as_u64().unwrap() >= on_b2.len() as u64);
    let text = log(&s);
    assert!(
        text.contains("backend web/b2 (198.18.0.12) is DOWN"),
        "{text}"
    );
    assert!(text.contains("state file not written ("), "{text}");
    assert!(path.is_dir(), "the blocker is still in place");

    // Writable again: the next change writes it, with b2 down and b1 drained. (With no state
    // file, the CLI needs the interface named: it finds interfaces by their state files.)
    blocker.remove();
    let dev = s.rig.lb_dev().to_string();
    s.cli_ok(&["--interface", &dev, "backend", "drain", "web/b1"]);
    let written = state::RuntimeState::read(&path).expect("the state file is written again");
    let state_of = |name: &str| {
        written.services[0]
            .backends
            .iter()
            .find(|b| b.name == name)
            .map(|b| b.state.clone())
    };
    assert_eq!(state_of("b1").as_deref(), Some("drain"));
    assert_eq!(state_of("b2").as_deref(), Some("down"));
    assert_eq!(written.pid, lb(&mut s).pid());
    assert!(log(&s).contains("written again"), "{}", log(&s));
    assert_eq!(s.backend_status("b1")["state"], "drain");
    assert_eq!(lb(&mut s).stop(), Some(0));
    drop(blocker);
}

/// An operator's change made while a reload looks at the backends it adds (here one that never
/// answers, so the look takes its full 1.5 s) is kept: the reload applies the config over the
/// run-time changes as they are when it finishes, not as they were when it began.
#[test]
fn a_reload_keeps_changes_made_while_it_looked_at_new_backends() {
    let mut s = Setup::new("reloadkeep", Mode::Generic, 2, 8);
    let config = s.config(2, "30m", "");
    s.start(&config);
    let clients = s.rig.client_addrs().to_vec();
    let placement = s.round(&clients);
    // b3 at an address nobody holds: its first look waits for a neighbour answer in vain.
    let dead = Ipv4Addr::new(198, 18, 0, 99);
    let with_dead = config.clone() + &format!("      - name: b3\n        address: {dead}\n");
    std::fs::write(config_path(&s), with_dead).unwrap();
    let mut reload = Command::new(binary())
        .args(["--netns", s.rig.lb_ns(), "reload"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sticky-lb reload");
    std::thread::sleep(Duration::from_millis(300));
    let drained = s.cli_ok(&["backend", "drain", "web/b1"]);
    assert!(drained.contains("web/b1: drain"), "{drained}");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = reload.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the reload never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reload.wait_with_output().unwrap();
    assert!(status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(reply.contains("1 backend(s) added"), "{reply}");
    assert_eq!(
        s.backend_status("b1")["state"],
        "drain",
        "the drain made meanwhile stays"
    );
    assert_eq!(
        s.backend_status("b3")["state"],
        "down",
        "no neighbour answer, no clients"
    );
    // Drained, not failed: b1's stuck clients keep it.
    assert_eq!(s.round(&clients), placement);
}

/// `backend enable` takes back a `backend remove` while the backend drains out: it keeps its id
/// and its clients, and stays after a reload.
#[test]
fn enable_takes_back_a_remove_while_the_backend_drains_out() {
    let mut s = Setup::new("unremove", Mode::Generic, 2, 16);
    let config = s.config(2, "30m", "");
    s.start(&config);
    let clients = s.rig.client_addrs().to_vec();
    let placement = s.round(&clients);
    let id_of_b2 = |s: &Setup| -> u64 {
        let state: Value =
            serde_json::from_str(&std::fs::read_to_string(state_path(s)).unwrap()).unwrap();
        state["services"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "b2")
            .and_then(|b| b["id"].as_u64())
            .expect("b2 in the state file")
    };
    let id = id_of_b2(&s);
    let out = s.cli_ok(&["backend", "remove", "web/b2"]);
    assert!(out.contains("web/b2 drains"), "{out}");
    assert_eq!(s.backend_status("b2")["state"], "drain");
    let (code, _, err) = cli(s.rig.lb_ns(), &["backend", "weight", "web/b2", "3"]);
    assert_eq!(code, 1);
    assert!(err.contains("`backend enable` keeps it"), "{err}");
    let out = s.cli_ok(&["backend", "enable", "web/b2"]);
    assert!(out.contains("web/b2: up"), "{out}");
    assert_eq!(id_of_b2(&s), id, "same id");
    s.cli_ok(&["reload"]);
    assert_eq!(
        s.backend_status("b2")["state"],
        "up",
        "kept across a reload"
    );
    assert_eq!(s.round(&clients), placement, "nobody moved");
}
