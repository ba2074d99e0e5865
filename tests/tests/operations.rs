//! Operating sticky-lb, end to end in the netns rig: the control API and its CLI, reload as a
//! diff, restart and upgrade without losing a session, incompatible layouts refused, Prometheus
//! metrics that move with traffic.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};
use sticky_lb_tests::{
    balancer::cli,
    netns::in_netns,
    rig::{Family, fetch_names_many},
    scenario::{Mode, Setup, TIMEOUT, backend_server, client_key, count_names},
};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn control_api_drives_the_stick_table_and_the_pool() {
    let mut s = Setup::new("api", Mode::Generic, 3, 80);
    // A draining backend goes once no client is stuck to it and its closed connections are
    // gone too (they still reach it for flow_closing_timeout after the client's FIN).
    let config = s.config(3, "3s", "flow_closing_timeout: 2s\n");
    s.start(&config);
    let clients: Vec<Ipv4Addr> = s.rig.client_addrs()[..30].to_vec();
    let first = s.round(&clients);

    // stats: one insert per client.
    let stats = json(&s.cli_ok(&["stats", "--json"]));
    assert_eq!(stats["services"][0]["stick_inserts"], 30);
    assert_eq!(stats["counters"]["drop_no_backend"], 0);

    // table get: what the client saw.
    let got = json(&s.cli_ok(&["table", "get", &clients[0].to_string(), "--json"]));
    assert_eq!(got[0]["backend"], first[0].as_str());
    // table set: the client's next connection goes where the operator said.
    let other = ["b1", "b2", "b3"]
        .into_iter()
        .find(|b| *b != first[0])
        .unwrap();
    let out = s.cli_ok(&[
        "table",
        "set",
        &clients[0].to_string(),
        &format!("web/{other}"),
    ]);
    assert_eq!(out.trim(), format!("web {} -> {other}", clients[0]));
    assert_eq!(s.round(&clients[..1]), vec![other.to_string()]);
    // table delete: forgotten, then placed anew by the hash (back where it was).
    let out = s.cli_ok(&["table", "delete", &clients[0].to_string()]);
    assert_eq!(out.trim(), "1 stick entry deleted");
    assert!(
        s.cli_ok(&["table", "get", &clients[0].to_string()])
            .contains("no stick entry")
    );
    assert_eq!(s.round(&clients[..1]), vec![first[0].clone()]);
    // table show filters, then flush.
    let one = json(&s.cli_ok(&[
        "table",
        "show",
        "--client",
        &clients[1].to_string(),
        "--json",
    ]));
    assert_eq!(one.as_array().unwrap().len(), 1);
    let out = s.cli_ok(&["table", "flush", "--service", "web"]);
    assert_eq!(out.trim(), "30 stick entries deleted");
    assert_eq!(
        json(&s.cli_ok(&["table", "show", "--json"]))
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // backend add: a fourth backend joins at run time and takes new clients.
    let k = s.rig.add_backend().unwrap();
    s.servers.push(backend_server(&s.rig, k));
    let out = s.cli_ok(&[
        "backend",
        "add",
        "web/b4",
        &s.rig.backend_addr(k).to_string(),
    ]);
    assert!(
        out.contains("web/b4 added (198.18.0.14, weight 1): up"),
        "{out}"
    );
    let newcomers: Vec<Ipv4Addr> = s.rig.client_addrs()[30..].to_vec();
    let new = count_names(&s.round(&newcomers));
    assert!(
        new.get("b4").copied().unwrap_or(0) >= 3,
        "b4 takes new clients: {new:?}"
    );
    // backend remove: drained first (its clients stay), removed once their entries expire.
    let b4_clients: Vec<Ipv4Addr> = newcomers
        .iter()
        .zip(s.round(&newcomers))
        .filter(|(_, n)| n == "b4")
        .map(|(c, _)| *c)
        .collect();
    let out = s.cli_ok(&["backend", "remove", "web/b4"]);
    assert!(out.contains("web/b4 drains"), "{out}");
    assert!(
        s.round(&b4_clients).iter().all(|n| n == "b4"),
        "draining keeps its clients"
    );
    let started = Instant::now();
    loop {
        let list = json(&s.cli_ok(&["backend", "list", "--json"]));
        let names: Vec<String> = list[0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap().to_string())
            .collect();
        if !names.contains(&"b4".to_string()) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "b4 never drained out: {names:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = s.balancer.as_ref().unwrap().log_text();
    assert!(log.contains("backend web/b4 drained out"), "{log}");

    // Errors: one line, status 1.
    for (args, expected) in [
        (
            &["backend", "drain", "shop/b1"][..],
            "sticky-lb: error: no service 'shop'",
        ),
        (
            &["table", "set", "198.18.1.1", "web/nope"],
            "sticky-lb: error: no backend 'nope' in service 'web'",
        ),
        (
            &["backend", "add", "web/b1", "198.18.0.99"],
            "sticky-lb: error: service 'web' already has backend 'b1' (198.18.0.11)",
        ),
    ] {
        let (code, _, err) = cli(s.rig.lb_ns(), args);
        assert_eq!((code, err.trim()), (1, expected), "{args:?}");
    }
    // A user without access to the socket is refused (the socket is root's, mode 0600).
    let socket = sticky_lb::control::socket_path(Some(s.rig.lb_ns()), s.rig.lb_dev());
    let refused = std::thread::spawn(move || {
        // SAFETY: changes only this thread's filesystem uid, which the socket's permission
        // check uses.
        unsafe { libc::setfsuid(65534) };
        sticky_lb::control::call(&socket, &sticky_lb::control::Request::Stats)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    })
    .join()
    .unwrap();
    assert!(refused.starts_with("permission denied on"), "{refused}");
    // No daemon: one line.
    s.balancer.as_mut().unwrap().stop();
    let (code, _, err) = cli(s.rig.lb_ns(), &["-i", "lb0", "stats"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("sticky-lb: error: no sticky-lb controller is running here"),
        "{err}"
    );
}

/// The control API over an IPv6 service: a stick entry is the client's /64 (the default
/// `client_mask`), so `table set/get/delete/show` take any address in it and print the prefix;
/// a client or backend of the other family is refused in one line and changes nothing.
#[test]
fn control_api_drives_an_ipv6_service() {
    // Two clients per /64: 2001:db8:1:P::1 and 2001:db8:1:P::2.
    let mut s = Setup::with_rig("api6", Mode::Generic, Family::Ipv6, |o| {
        o.backends(3).clients(120).clients_per_64(2)
    });
    let config = s.config(3, "30m", "");
    s.start(&config);
    let clients = s.clients();
    let (firsts, seconds): (Vec<IpAddr>, Vec<IpAddr>) =
        clients.chunks(2).map(|pair| (pair[0], pair[1])).unzip();
    let (firsts, newcomers) = firsts.split_at(20);
    let seconds = &seconds[..20];
    let key = |c: IpAddr| client_key(c, 64);
    let row_of = |table: &[serde_json::Value], c: IpAddr| {
        let rows: Vec<serde_json::Value> = table
            .iter()
            .filter(|r| r["client"] == key(c).as_str())
            .cloned()
            .collect();
        assert!(rows.len() <= 1, "one entry per /64: {rows:?}");
        rows.into_iter().next()
    };

    // One entry per /64: the second address of each follows the first.
    let first = s.round(firsts);
    assert_eq!(s.round(seconds), first, "an address follows its /64");
    let stats = json(&s.cli_ok(&["stats", "--json"]));
    assert_eq!(stats["services"][0]["stick_inserts"], 20);
    let table = s.table();
    assert_eq!(table.len(), 20, "{table:?}");
    for (&c, b) in firsts.iter().zip(&first) {
        let row = row_of(&table, c).unwrap_or_else(|| panic!("no entry {}", key(c)));
        assert_eq!(row["backend"], b.as_str(), "{row}");
    }

    // table get, by either address of the /64: the prefix and the backend.
    let (a, a2) = (firsts[0], seconds[0]);
    assert_eq!(key(a), "2001:db8:1:1::/64");
    assert_eq!(key(a2), key(a));
    for c in [a, a2] {
        let got = json(&s.cli_ok(&["table", "get", &c.to_string(), "--json"]));
        assert_eq!(got.as_array().unwrap().len(), 1, "{got}");
        assert_eq!(got[0]["service"], "web");
        assert_eq!(got[0]["client"], "2001:db8:1:1::/64");
        assert_eq!(got[0]["backend"], first[0].as_str());
    }

    // table set: the whole /64 goes where the operator said (a backend Maglev did not choose).
    let other = ["b1", "b2", "b3"]
        .into_iter()
        .find(|b| *b != first[0])
        .unwrap();
    let out = s.cli_ok(&["table", "set", &a.to_string(), &format!("web/{other}")]);
    assert_eq!(out.trim(), format!("web 2001:db8:1:1::/64 -> {other}"));
    assert_eq!(s.round(&[a, a2]), vec![other.to_string(); 2]);
    let out = s.cli_ok(&["table", "get", &a2.to_string()]);
    assert!(
        out.trim()
            .starts_with(&format!("web 2001:db8:1:1::/64 -> {other} (idle ")),
        "{out}"
    );
    let got = json(&s.cli_ok(&["table", "get", &a.to_string(), "--json"]));
    assert_eq!(got[0]["client"], "2001:db8:1:1::/64");
    assert_eq!(got[0]["backend"], other);
    assert_eq!(
        got[0]["backend_address"],
        s.backend_addr(other[1..].parse().unwrap()).to_string()
    );
    let table = s.table();
    assert_eq!(table.len(), 20, "set replaced the entry: {table:?}");
    assert_eq!(row_of(&table, a).unwrap()["backend"], other);
    let one = json(&s.cli_ok(&["table", "show", "--client", &a2.to_string(), "--json"]));
    assert_eq!(one.as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one[0]["client"], "2001:db8:1:1::/64");
    assert_eq!(one[0]["backend"], other);

    // table delete, by the other address of the /64: forgotten, then placed anew by Maglev.
    let out = s.cli_ok(&["table", "delete", &a2.to_string()]);
    assert_eq!(out.trim(), "1 stick entry deleted");
    let out = s.cli_ok(&["table", "get", &a.to_string()]);
    assert_eq!(out.trim(), format!("{a}: no stick entry"));
    assert_eq!(s.table().len(), 19);
    assert_eq!(s.round(&[a]), vec![first[0].clone()]);
    assert_eq!(s.round(&[a2]), vec![first[0].clone()]);
    assert_eq!(row_of(&s.table(), a).unwrap()["backend"], first[0].as_str());

    // The other family: one line, status 1, nothing changed.
    let before = s.table();
    for (args, expected) in [
        (
            &["table", "set", "198.18.1.1", "web/b1"][..],
            "sticky-lb: error: client 198.18.1.1 is IPv4 but service web is IPv6",
        ),
        (
            &["table", "get", "198.18.1.1", "--service", "web"],
            "sticky-lb: error: client 198.18.1.1 is IPv4 but service web is IPv6",
        ),
        (
            &["backend", "add", "web/b4", "198.18.0.14"],
            "sticky-lb: error: 198.18.0.14 is IPv4 but the service's vip 2001:db8::100 is IPv6: a service is one family",
        ),
        (
            &["backend", "add", "web/b4", "fe80::14"],
            "sticky-lb: error: fe80::14 cannot be a backend: a link-local address (fe80::/10) needs a zone; use a global or unique local address",
        ),
        (
            &["backend", "add", "web/b9", "2001:db8::11"],
            "sticky-lb: error: service 'web' already has backend 'b1' (2001:db8::11)",
        ),
    ] {
        let (code, out, err) = cli(s.rig.lb_ns(), args);
        assert_eq!((code, err.trim()), (1, expected), "{args:?}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err:?}");
    }
    let (code, out, err) = cli(s.rig.lb_ns(), &["table", "get", "198.18.1.1"]);
    assert_eq!(
        (code, out.trim()),
        (0, "198.18.1.1: no stick entry"),
        "an IPv4 client has no entry in an IPv6 service: {err}"
    );
    let strip = |rows: Vec<serde_json::Value>| -> Vec<(String, String)> {
        rows.iter()
            .map(|r| (r["client"].to_string(), r["backend"].to_string()))
            .collect()
    };
    assert_eq!(strip(s.table()), strip(before), "refusals change nothing");
    let list = json(&s.cli_ok(&["backend", "list", "--json"]));
    assert_eq!(list[0]["backends"].as_array().unwrap().len(), 3, "{list}");

    // backend add: a fourth backend at its IPv6 address joins and takes new clients.
    let k = s.rig.add_backend().unwrap();
    let server = s.backend_server(k);
    s.servers.push(server);
    let address = s.backend_addr(k).to_string();
    assert_eq!(address, "2001:db8::14");
    let out = s.cli_ok(&["backend", "add", "web/b4", &address]);
    assert_eq!(out.trim(), "web/b4 added (2001:db8::14, weight 1): up");
    let list = json(&s.cli_ok(&["backend", "list", "--json"]));
    let b4 = list[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "b4")
        .cloned()
        .unwrap_or_else(|| panic!("no b4 in {list}"));
    assert_eq!(b4["address"], "2001:db8::14", "{b4}");
    let new = s.round(newcomers);
    let counts = count_names(&new);
    eprintln!("IPv6 service: 40 new /64s after b4 joined: {counts:?}");
    assert!(
        counts.get("b4").copied().unwrap_or(0) >= 3,
        "b4 takes new clients: {counts:?}"
    );
    let table = s.table();
    for (&c, b) in newcomers.iter().zip(&new) {
        let row = row_of(&table, c).unwrap_or_else(|| panic!("no entry {}", key(c)));
        assert_eq!(row["backend"], b.as_str(), "{row}");
    }
    let got = json(&s.cli_ok(&[
        "table",
        "get",
        &newcomers[new.iter().position(|n| n == "b4").unwrap()].to_string(),
        "--json",
    ]));
    assert_eq!(got[0]["backend"], "b4");
    assert_eq!(got[0]["backend_address"], "2001:db8::14");
}

#[test]
fn reload_applies_the_difference_and_refuses_a_bad_config() {
    let mut s = Setup::new("reload", Mode::Generic, 3, 160);
    let checks = "    health_check:\n      interval: 200ms\n      timeout: 150ms\n";
    let three = s.config_with(
        "flow_closing_timeout: 2s\n",
        &format!("    stick:\n      timeout: 3s\n{checks}"),
        &vec![String::new(); 3],
    );
    s.start(&three);
    let clients: Vec<Ipv4Addr> = s.rig.client_addrs()[..80].to_vec();
    let before = s.round(&clients);
    let on_b3: Vec<Ipv4Addr> = clients
        .iter()
        .zip(&before)
        .filter(|(_, n)| *n == "b3")
        .map(|(c, _)| *c)
        .collect();

    // A bad config changes nothing and says why.
    let path = s.scratch.path().join("config.yaml");
    std::fs::write(&path, three.replace("port: 80", "port: 0")).unwrap();
    let (code, _, err) = cli(s.rig.lb_ns(), &["reload"]);
    assert_eq!(code, 1);
    assert!(err.contains("reload refused, nothing changed: config error: services[0].port (line 8): must be 1 to 65535"), "{err}");
    assert_eq!(s.round(&clients), before);

    // The new config: b3 leaves, b4 joins.
    let k = s.rig.add_backend().unwrap();
    s.servers.push(backend_server(&s.rig, k));
    let mut new = s.config_with(
        "flow_closing_timeout: 2s\n",
        &format!("    stick:\n      timeout: 3s\n{checks}"),
        &vec![String::new(); 4],
    );
    new = new.replace("      - name: b3\n        address: 198.18.0.13\n", "");
    std::fs::write(&path, &new).unwrap();
    let out = s.cli_ok(&["reload"]);
    assert!(
        out.contains("1 backend(s) added, 0 changed, 0 removed, 1 draining out"),
        "{out}"
    );
    // Nobody of b1 and b2 moved; b3's clients still reach it while it drains; new clients
    // never go to b3 and some go to b4.
    let after = s.round(&clients);
    assert_eq!(
        after, before,
        "no stick entry of a remaining backend is lost"
    );
    let newcomers: Vec<Ipv4Addr> = s.rig.client_addrs()[80..].to_vec();
    let new_clients = count_names(&s.round(&newcomers));
    assert!(
        !new_clients.contains_key("b3") && new_clients.contains_key("b4"),
        "{new_clients:?}"
    );
    // Once b3's clients idle past the timeout, it is removed.
    std::thread::sleep(Duration::from_millis(4500));
    let started = Instant::now();
    while s.status()["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["name"] == "b3")
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "b3 not removed after draining"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let moved = count_names(&s.round(&on_b3));
    assert!(!moved.contains_key("b3"), "{moved:?}");

    // SIGHUP reloads too: weight 0 drains b1.
    std::fs::write(
        &path,
        new.replace(
            "      - name: b1\n        address: 198.18.0.11\n",
            "      - name: b1\n        address: 198.18.0.11\n        weight: 0\n",
        ),
    )
    .unwrap();
    s.balancer.as_ref().unwrap().signal(libc::SIGHUP);
    s.wait_state("b1", "drain", Duration::from_secs(5));
    assert!(
        s.balancer
            .as_ref()
            .unwrap()
            .log_text()
            .contains("reload (SIGHUP): ")
    );
}

/// Clients keep connecting while the controller is SIGKILLed and a new one adopts the pinned
/// data path: no connection fails, no stick entry is lost, no client changes backend. Also on
/// an IPv6 service (`_v6`), whose entries hold 16-byte client keys.
fn restart_under_load(mode: Mode, family: Family) {
    let mut s = Setup::new_in("restart", mode, family, 3, 64);
    let config = s.config(3, "30m", "");
    s.start(&config);
    let clients = s.clients();
    let placement = s.round(&clients);
    let entries_before = s.table().len();

    // Load: rounds of one connection per client, until told to stop (bounded: 60 s).
    let stop = Arc::new(AtomicBool::new(false));
    let (ns, vip) = (s.rig.client_ns().to_string(), s.vip());
    let load = {
        let (stop, clients, placement) = (stop.clone(), clients.clone(), placement.clone());
        std::thread::spawn(move || {
            let requests: Vec<_> = clients.iter().map(|c| (*c, vip)).collect();
            let (mut connections, mut failures, mut moved) = (0u64, 0u64, 0u64);
            let mut last_ok = Instant::now();
            let mut longest_gap = Duration::ZERO;
            let started = Instant::now();
            while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(60) {
                for (i, reply) in fetch_names_many(&ns, &requests, TIMEOUT)
                    .into_iter()
                    .enumerate()
                {
                    connections += 1;
                    match reply {
                        Ok(name) => {
                            moved += (name != placement[i]) as u64;
                            longest_gap = longest_gap.max(last_ok.elapsed());
                            last_ok = Instant::now();
                        }
                        Err(_) => failures += 1,
                    }
                }
            }
            (connections, failures, moved, longest_gap)
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    s.balancer.as_mut().unwrap().kill();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    s.start(&config);
    let adopted_after = killed.elapsed();
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::SeqCst);
    let (connections, failures, moved, gap) = load.join().unwrap();
    let entries_after = s.table().len();
    eprintln!(
        "{mode:?} {family:?}: SIGKILL + adopt ({adopted_after:?} without a controller): {connections} connections, {failures} failed, {moved} moved; stick entries {entries_before} -> {entries_after}; longest gap between successful connections {gap:?}"
    );
    assert!(connections > 3 * 64, "the load ran across the restart");
    assert_eq!((failures, moved), (0, 0));
    assert_eq!(entries_after, entries_before);
    let log = s.balancer.as_ref().unwrap().log_text();
    assert!(
        log.contains("adopting the data path pinned at")
            && log.contains("program replaced in the pinned link"),
        "{log}"
    );
}

#[test]
fn restart_under_load_native() {
    restart_under_load(Mode::Native, Family::Ipv4);
}

#[test]
fn restart_under_load_generic() {
    restart_under_load(Mode::Generic, Family::Ipv4);
}

#[test]
fn restart_under_load_v6_native() {
    restart_under_load(Mode::Native, Family::Ipv6);
}

#[test]
fn restart_under_load_v6_generic() {
    restart_under_load(Mode::Generic, Family::Ipv6);
}

/// XDP program id on the balancer's interface, from `ip -d link`.
fn xdp_prog_id(s: &Setup) -> Option<u32> {
    let out = std::process::Command::new("ip")
        .args(["-n", s.rig.lb_ns(), "-d", "link", "show", "lb0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let at = text.find("prog/xdp id ")?;
    text[at + 12..].split_whitespace().next()?.parse().ok()
}

#[test]
fn upgrade_swaps_the_program_and_an_incompatible_layout_is_refused() {
    let mut s = Setup::new("upgrade", Mode::Generic, 3, 32);
    let config = s.config(3, "30m", "on_exit: keep-running\n");
    s.start(&config);
    let clients = s.rig.client_addrs().to_vec();
    let placement = s.round(&clients);
    let old_prog = xdp_prog_id(&s).expect("an XDP program on lb0");
    s.cli_ok(&["backend", "drain", "web/b3"]);
    s.balancer.as_mut().unwrap().stop();
    // The "new binary" loads its program and swaps it into the pinned link.
    s.start(&config);
    let new_prog = xdp_prog_id(&s).expect("an XDP program on lb0");
    assert_ne!(old_prog, new_prog, "the program was replaced");
    assert_eq!(
        s.backend_status("b3")["state"],
        "drain",
        "the operator's drain survives the restart"
    );
    assert_eq!(s.round(&clients), placement, "sessions survive the upgrade");
    assert_eq!(s.table().len(), 32);
    s.balancer.as_mut().unwrap().stop();

    // Pinned maps of another layout: a controller refuses and changes nothing.
    let pins = s.guard.pins();
    let mut meta: aya::maps::Array<aya::maps::MapData, u32> =
        sticky_lb::dataplane::open_pinned(&pins, "slb_meta").unwrap();
    meta.set(0, &999, 0).unwrap();
    let (code, _, err) = cli(
        s.rig.lb_ns(),
        &[
            "run",
            "--config",
            s.scratch.path().join("config.yaml").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    let expected = format!(
        "uses map layout 999, this binary uses {}: it cannot adopt it; nothing was changed",
        sticky_lb_common::LAYOUT_VERSION
    );
    assert!(err.contains(&expected), "{err}");
    assert_eq!(
        xdp_prog_id(&s),
        Some(new_prog),
        "the running program is untouched"
    );
    assert_eq!(s.round(&clients), placement, "and keeps forwarding");
}

/// GET /metrics with curl (a real HTTP client) from inside the balancer's namespace: the body,
/// or curl's complaint (refused, timed out after 5 s, an HTTP error).
fn try_scrape(ns: &str, addr: SocketAddrV4) -> Result<String, String> {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "5",
        ])
        .arg(format!("http://{addr}/metrics"))
        .output()
        .expect("curl runs");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn scrape(ns: &str, addr: SocketAddrV4) -> String {
    try_scrape(ns, addr).unwrap_or_else(|e| panic!("curl: {e}"))
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn metrics_move_with_traffic() {
    let mut s = Setup::new("metrics", Mode::Generic, 2, 20);
    let listen = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9180);
    let config = s.config(2, "30m", &format!("metrics:\n  listen: {listen}\n"));
    s.start(&config);
    let before = scrape(s.rig.lb_ns(), listen);
    let packets = |text: &str| {
        sample(
            text,
            "sticky_lb_backend_packets_total{service=\"web\",backend=\"b1\"}",
        ) + sample(
            text,
            "sticky_lb_backend_packets_total{service=\"web\",backend=\"b2\"}",
        )
    };
    let clients = s.rig.client_addrs().to_vec();
    s.round(&clients);
    std::thread::sleep(Duration::from_millis(1200)); // one sweep (500 ms) refreshes occupancy
    let after = scrape(s.rig.lb_ns(), listen);
    assert!(
        packets(&after) >= packets(&before) + 60.0,
        "20 connections are at least 60 packets"
    );
    assert_eq!(
        sample(
            &after,
            "sticky_lb_service_stick_inserts_total{service=\"web\"}"
        ),
        20.0
    );
    assert_eq!(
        sample(&after, "sticky_lb_service_stick_entries{service=\"web\"}"),
        20.0
    );
    assert_eq!(
        sample(
            &after,
            "sticky_lb_backend_up{service=\"web\",backend=\"b1\"}"
        ),
        1.0
    );
    assert!(
        sample(
            &after,
            "sticky_lb_backend_health_check_duration_seconds{service=\"web\",backend=\"b1\"}"
        ) < 1.0
    );
    assert!(after.contains("# TYPE sticky_lb_service_stick_hits_total counter"));
    assert!(sample(&after, "sticky_lb_sweeps_total") >= 1.0);
}

/// Reloads keep the metrics endpoint up: an unchanged address goes on serving, a new address
/// takes over from the old one (which closes) before the reload is answered, an address that
/// cannot be bound turns metrics off without stopping the controller, and the next reload turns
/// them on again. Clients connect between the reloads: none fails, none moves.
#[test]
fn metrics_follow_reloads() {
    let mut s = Setup::new("mreload", Mode::Generic, 2, 40);
    let first = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9180);
    let second = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9181);
    let taken = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9182);
    let on = |listen: SocketAddrV4| s.config(2, "30m", &format!("metrics:\n  listen: {listen}\n"));
    let (on_first, on_second, on_taken) = (on(first), on(second), on(taken));
    s.start(&on_first);
    let ns = s.rig.lb_ns().to_string();
    let path = s.scratch.path().join("config.yaml");
    scrape(&ns, first);
    let clients = s.rig.client_addrs().to_vec();
    // `round` fails the test on any failed connection.
    let placement = s.round(&clients);
    let mut rounds = 1;

    s.cli_ok(&["reload"]);
    scrape(&ns, first);
    assert_eq!(s.round(&clients), placement, "nobody moved");
    rounds += 1;

    std::fs::write(&path, &on_second).unwrap();
    s.cli_ok(&["reload"]);
    // Answered once the new listener is up.
    scrape(&ns, second);
    assert!(try_scrape(&ns, first).is_err(), "the old address is closed");

    let squatter = in_netns(&ns, || std::net::TcpListener::bind(taken)).unwrap();
    std::fs::write(&path, &on_taken).unwrap();
    s.cli_ok(&["reload"]);
    let started = Instant::now();
    while !s
        .balancer
        .as_ref()
        .unwrap()
        .log_text()
        .contains(&format!("metrics: binding {taken}"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no warning about {taken}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        try_scrape(&ns, second).is_err(),
        "the old address is closed"
    );
    assert_eq!(s.status()["services"][0]["name"], "web", "still running");
    assert_eq!(s.round(&clients), placement, "nobody moved");
    rounds += 1;

    drop(squatter);
    std::fs::write(&path, &on_first).unwrap();
    s.cli_ok(&["reload"]);
    let text = scrape(&ns, first);
    assert!(sample(&text, "sticky_lb_stick_table_capacity_entries") > 0.0);
    assert_eq!(s.round(&clients), placement, "nobody moved");
    rounds += 1;
    eprintln!(
        "4 reloads with metrics on: {} clients x {rounds} rounds, 0 failed connections, 0 clients moved",
        clients.len()
    );
}
