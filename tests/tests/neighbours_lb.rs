//! The balancer follows its interface's neighbour table and link, end to end in the netns rig: a
//! backend whose MAC changes (announced by a gratuitous ARP) keeps its clients, served at its new
//! MAC; the balancer's interface deleted and created again gets the data path attached again,
//! over the same pinned maps, with every client on its backend as before. Needs root.
//!
//! Without the watch, the first would time out: the data path would keep sending b2's clients
//! to the old MAC (dropped by b2's NIC) while b2's health checks, sent by the kernel, which does
//! learn the new MAC, keep it up. The second would leave the data path on a dead link.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};
use sticky_lb_tests::{
    rig::fetch_name,
    scenario::{Mode, Setup},
};

/// Fast checks, as in pool.rs: every 200 ms, 150 ms timeout, rise 2, fall 3.
const FAST_CHECKS: &str = "    health_check:\n      interval: 200ms\n      timeout: 150ms\n      rise: 2\n      fall: 3\n";
/// What b2's NIC is changed to (locally administered; the test checks it differs from the MAC
/// the kernel made up for it, which is locally administered too).
const NEW_B2_MAC: [u8; 6] = [0x02, 0x5e, 0x1b, 0x00, 0x01, 0x12];
/// How soon b2's clients must be served again after its MAC changed.
const MAC_CHANGE_LIMIT: Duration = Duration::from_secs(2);
/// One attempt of a client while waiting for the data path to catch up: a connection whose SYN
/// went to a MAC nobody has would only retry after 1 s, so a short attempt and a new one.
const PROBE_TIMEOUT: Duration = Duration::from_millis(100);
/// How long the controller may take to see the interface go and to attach to the new one.
const LINK_LIMIT: Duration = Duration::from_secs(5);
/// How soon clients must be served again once the interface is back.
const RECREATE_LIMIT: Duration = Duration::from_secs(5);

fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn log(s: &Setup) -> String {
    s.balancer.as_ref().expect("a balancer").log_text()
}

/// Polls the controller's log until it holds `needle` `count` times; returns how long that took,
/// or panics after `within`.
fn wait_log(s: &Setup, needle: &str, count: usize, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if log(s).matches(needle).count() >= count {
            return started.elapsed();
        }
        if started.elapsed() > within {
            panic!(
                "{needle:?} not logged {count} time(s) within {within:?}; log:\n{}",
                log(s)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The balancer namespace's neighbour entry for `address` on its interface, as `ip` prints it.
fn neighbour_entry(s: &Setup, address: Ipv4Addr) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", s.rig.lb_ns(), "neigh", "show"])
        .arg(address.to_string())
        .args(["dev", s.rig.lb_dev()])
        .output()
        .expect("ip neigh show");
    assert!(out.status.success(), "ip neigh show: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs a command in a namespace the rig made; panics unless it succeeds.
fn run_in(ns: &str, args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("ip netns exec");
    assert!(out.status.success(), "{args:?} in {ns}: {out:?}");
}

/// Tries `client` with short attempts until one is answered (by anyone) or `within` has passed
/// since `since`; returns the answer and when it came, counted from `since`.
fn first_answer(
    s: &Setup,
    client: Ipv4Addr,
    since: Instant,
    within: Duration,
) -> Option<(String, Duration)> {
    // Bounded: every attempt takes at most PROBE_TIMEOUT, plus the pause.
    while since.elapsed() < within {
        if let Ok(name) = fetch_name(s.rig.client_ns(), client, s.vip(), PROBE_TIMEOUT) {
            return Some((name, since.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// The XDP attachment `ip -d link` shows on the balancer's interface: `xdp` (native) or
/// `xdpgeneric`, with the program id.
fn xdp_on_lb_dev(s: &Setup) -> Option<(String, u32)> {
    let out = std::process::Command::new("ip")
        .args(["-n", s.rig.lb_ns(), "-j", "-d", "link", "show", "dev"])
        .arg(s.rig.lb_dev())
        .output()
        .expect("ip link show");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let xdp = &links[0]["xdp"];
    let mode = match xdp["mode"].as_u64()? {
        1 => "xdp",
        2 => "xdpgeneric",
        other => panic!("unexpected XDP attach mode {other} on the balancer's interface: {xdp}"),
    };
    Some((mode.to_owned(), xdp["prog"]["id"].as_u64()? as u32))
}

/// The program in the link pinned for the balancer's data path.
fn pinned_link_program(s: &Setup) -> u32 {
    let link = aya::programs::links::PinnedLink::from_pin(s.guard.pins().link())
        .expect("the pinned link opens");
    aya::programs::links::FdLink::from(link)
        .info()
        .expect("the pinned link's info")
        .program_id()
}

fn interface_index(s: &Setup) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["-n", s.rig.lb_ns(), "-j", "link", "show", "dev"])
        .arg(s.rig.lb_dev())
        .output()
        .expect("ip link show");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    links[0]["ifindex"].as_u64().expect("an ifindex")
}

/// b2's NIC gets a new MAC, announced by a gratuitous ARP (arp_notify): the controller learns it
/// from the neighbour table and rewrites b2's entry in the data path, so b2's clients reach b2
/// again within 2 s, on the same backend, and nobody moves.
fn mac_change(mode: Mode) {
    let mut s = Setup::new("macmove", mode, 3, 60);
    let config = s.config_with(
        "",
        &format!("    stick:\n      timeout: 30m\n{FAST_CHECKS}"),
        &vec![String::new(); 3],
    );
    s.start(&config);
    let clients: Vec<Ipv4Addr> = s.rig.client_addrs().to_vec();
    let before = s.round(&clients);
    let on_b2: Vec<Ipv4Addr> = clients
        .iter()
        .zip(&before)
        .filter(|(_, n)| *n == "b2")
        .map(|(c, _)| *c)
        .collect();
    assert!(
        on_b2.len() >= 5,
        "b2 has only {} of 60 clients: {before:?}",
        on_b2.len()
    );

    // The balancer's entry for b2 is the kernel's to update (not a permanent one the rig or
    // anyone else pinned, which a gratuitous ARP would not change), and holds b2's MAC now.
    let b2 = s.rig.backend_addr(2);
    // Read before the change: the rig's backend_mac() is what it saw at build time.
    let old_mac = s.rig.backend_mac(2);
    assert_ne!(old_mac, NEW_B2_MAC);
    let entry = neighbour_entry(&s, b2);
    eprintln!("{mode:?}: the balancer's neighbour entry for b2 before: {entry}");
    assert!(
        !entry.contains("PERMANENT") && !entry.contains("NOARP"),
        "b2's entry is pinned: {entry:?}"
    );
    assert!(
        entry.contains(&format!("lladdr {}", format_mac(old_mac))),
        "{entry:?}"
    );
    assert_eq!(
        s.backend_status("b2")["mac"],
        format_mac(old_mac).as_str(),
        "the data path forwards to b2's MAC"
    );

    // b2's NIC changes; with arp_notify the kernel announces it with a gratuitous ARP (sent
    // before `ip` returns: the clock starts before it runs).
    let b2_ns = s.rig.backend_ns(2).to_owned();
    let dev = "eth0";
    run_in(
        &b2_ns,
        &[
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv4.conf.{dev}.arp_notify=1"),
        ],
    );
    let changed = Instant::now();
    run_in(
        &b2_ns,
        &[
            "ip",
            "link",
            "set",
            "dev",
            dev,
            "address",
            &format_mac(NEW_B2_MAC),
        ],
    );

    let (name, served) = first_answer(&s, on_b2[0], changed, MAC_CHANGE_LIMIT).unwrap_or_else(|| {
        panic!(
            "{mode:?}: b2's client {} was not served within {MAC_CHANGE_LIMIT:?} of b2's MAC change; \
             the balancer's entry: {}; log:\n{}",
            on_b2[0],
            neighbour_entry(&s, b2),
            log(&s)
        )
    });
    assert_eq!(name, "b2", "{} moved off b2", on_b2[0]);
    // Every client of b2, each with a new connection: all reach b2, still within the limit.
    let again = s.round(&on_b2);
    let round_done = changed.elapsed();
    assert!(
        again.iter().all(|n| n == "b2"),
        "b2's clients moved: {again:?}"
    );
    assert!(
        round_done <= MAC_CHANGE_LIMIT,
        "b2's clients were all served only after {round_done:?}"
    );
    eprintln!(
        "{mode:?}: b2's MAC changed; its first client was served again after {served:?}, all {} of its clients after {round_done:?}",
        on_b2.len()
    );
    // Nobody moved, on any backend.
    assert_eq!(s.round(&clients), before, "a client changed backend");
    assert_eq!(s.status()["services"][0]["redispatches"], 0);
    assert_eq!(s.backend_status("b2")["state"], "up");

    let moved = format!(
        "backend web/b2 ({b2}) moved from MAC {} to {}",
        format_mac(old_mac),
        format_mac(NEW_B2_MAC)
    );
    assert!(log(&s).contains(&moved), "no {moved:?} in:\n{}", log(&s));
    assert_eq!(log(&s).matches("moved from MAC").count(), 1, "{}", log(&s));
    let entry = neighbour_entry(&s, b2);
    assert!(
        entry.contains(&format!("lladdr {}", format_mac(NEW_B2_MAC))),
        "{entry:?}"
    );
    // The state file (what `status` shows) follows too: it is written right after the data
    // path, so by now, but give it a moment.
    let started = Instant::now();
    while s.backend_status("b2")["mac"] != format_mac(NEW_B2_MAC).as_str() {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "status still shows {} for b2",
            s.backend_status("b2")["mac"]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_backend_mac_change_is_followed_without_moving_clients_generic() {
    mac_change(Mode::Generic);
}

#[test]
fn a_backend_mac_change_is_followed_without_moving_clients_native() {
    mac_change(Mode::Native);
}

/// The balancer's interface is deleted (with its XDP link) and created again under the same
/// name and MAC, twice: once after the controller has seen it go, once at once. Each time the
/// controller loads the program again over the pinned maps and attaches a new link; clients
/// reach their backends as before, and `status` still answers.
fn recreated_interface(mode: Mode) {
    let mut s = Setup::new("recreate", mode, 3, 60);
    // Default checks (every 2 s, fall 3): the interface is away for far less than the 6 s it
    // would take them to give up on the backends.
    let config = s.config(3, "30m", "");
    s.start(&config);
    let clients: Vec<Ipv4Addr> = s.rig.client_addrs().to_vec();
    let before = s.round(&clients);
    let entries = s.table().len();
    assert_eq!(entries, clients.len());
    let pins = s.guard.pins();
    assert!(pins.is_attached());
    let attach_kind = match mode {
        Mode::Native => "xdp",
        Mode::Generic => "xdpgeneric",
    };
    let (kind, first_prog) = xdp_on_lb_dev(&s).expect("a program on the balancer's interface");
    assert_eq!(kind, attach_kind);
    assert_eq!(pinned_link_program(&s), first_prog);
    let gone = format!(
        "interface {} is gone, and the data path with it",
        s.rig.lb_dev()
    );
    let attached = format!(
        "attached to the new {} in {} mode",
        s.rig.lb_dev(),
        mode.yaml()
    );

    let mut index = interface_index(&s);
    let mut prog = first_prog;
    for (round, wait_for_gone) in [(1, true), (2, false)] {
        let started = Instant::now();
        if wait_for_gone {
            s.delete_lb_dev();
            let seen = wait_log(&s, &gone, round, LINK_LIMIT);
            eprintln!("{mode:?}: the controller saw the interface go after {seen:?}");
            s.create_lb_dev();
        } else {
            s.recreate_lb_dev();
        }
        let created = Instant::now();
        // Until the program is attached again the balancer's own kernel answers for the VIP
        // (with a RST: nothing listens on it there), so attempts fail fast.
        let (name, served) = first_answer(&s, clients[0], created, RECREATE_LIMIT)
            .unwrap_or_else(|| {
                panic!(
                    "{mode:?}: no client served within {RECREATE_LIMIT:?} of the interface's return; log:\n{}",
                    log(&s)
                )
            });
        assert_eq!(name, before[0], "{} moved", clients[0]);
        let after = s.round(&clients);
        let all_served = created.elapsed();
        assert_eq!(after, before, "a client changed backend");
        wait_log(&s, &attached, round, LINK_LIMIT);
        eprintln!(
            "{mode:?} (recreate {round}, {}): deleted and created in {:?}; after it was back, the first client was served after {served:?}, all 60 after {all_served:?}",
            if wait_for_gone {
                "after the controller saw it go"
            } else {
                "at once"
            },
            created - started,
        );

        let text = log(&s);
        assert_eq!(text.matches(&gone).count(), round, "{text}");
        assert_eq!(text.matches(&attached).count(), round, "{text}");
        assert!(
            text.rfind(&gone) < text.rfind(&attached),
            "gone, then attached:\n{text}"
        );
        assert!(!text.contains("attaching to the new"), "{text}");
        let new_index = interface_index(&s);
        assert_ne!(new_index, index, "the interface is a new one");
        assert!(
            text.contains(&format!(
                "interface {} is back (index {new_index})",
                s.rig.lb_dev()
            )),
            "{text}"
        );
        index = new_index;

        // The same maps (stick table kept), a new program in a new pinned link.
        assert_eq!(s.table().len(), entries, "the stick table was kept");
        assert!(pins.is_attached(), "the link is pinned again");
        let (kind, new_prog) = xdp_on_lb_dev(&s).expect("a program on the new interface");
        assert_eq!(kind, attach_kind);
        assert_ne!(new_prog, prog, "a program loaded again");
        assert_eq!(
            pinned_link_program(&s),
            new_prog,
            "the pinned link is the new interface's"
        );
        prog = new_prog;
        let status = s.status();
        assert_eq!(status["xdp_mode"], mode.yaml(), "{status}");
        assert_eq!(status["controller_running"], true, "{status}");
        assert_eq!(status["services"][0]["redispatches"], 0, "{status}");
        for b in status["services"][0]["backends"].as_array().unwrap() {
            assert_eq!(b["state"], "up", "{status}");
        }
    }
}

#[test]
fn a_recreated_interface_is_attached_again_generic() {
    recreated_interface(Mode::Generic);
}

#[test]
fn a_recreated_interface_is_attached_again_native() {
    recreated_interface(Mode::Native);
}
