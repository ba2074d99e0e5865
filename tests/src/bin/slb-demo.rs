//! `./x demo`: sticky-lb in a sandbox of network namespaces, end to end, in about a minute.
//!
//! Builds clients, a balancer and three backends joined by a bridge (198.18.0.0/15 and
//! 2001:db8::/32 only), starts `sticky-lb run` with the embedded config/demo.yaml, sends real TCP
//! connections from many IPv4 and IPv6 clients, shows who reached whom and the stick table, adds a
//! backend without moving a stuck client, then removes everything it made. Then a second
//! sandbox: two balancer nodes behind a router's ECMP route sharing one stick table through a
//! real Redis (config/demo-cluster.yaml): a backend joins on every node, the ECMP set changes,
//! and no client moves. Last, a web shop as a `mode: http` service (config/demo-web.yaml): eight
//! phones behind one address, each with its own cookie jar, spread over the backends and keep
//! theirs; a backend fails and its phones move once.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};
use sticky_lb_tests::{
    balancer::{Balancer, DataPathGuard, PeerXdp, ScratchDir, binary},
    ecmp::{EcmpRig, EcmpRigOptions},
    netns::{require_root, unique_tag},
    rig::{NameServer, Rig, RigOptions, fetch_names_many},
    web::{WebBackend, curl_backend, curl_in, test_secret, write_keys},
};

const CONFIG: &str = include_str!("../../../config/demo.yaml");
const CLUSTER_CONFIG: &str = include_str!("../../../config/demo-cluster.yaml");
const WEB_CONFIG: &str = include_str!("../../../config/demo-web.yaml");
/// Phones behind one address in the web part, each with its own cookie jar.
const PHONES: usize = 8;
/// Clients of the cluster part, each opening [`CONNECTIONS`] connections.
const CLUSTER_CLIENTS: usize = 24;
const CLIENTS: usize = 48;
const CONNECTIONS: usize = 5;
/// IPv6 clients: four /64s of four addresses each.
const CLIENTS6: usize = 16;
const CLIENTS_PER_64: usize = 4;
const PORT: u16 = 80;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn main() {
    require_root();
    // Ctrl-C ends the demo between steps, through the normal clean-up.
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    if let Err(e) = demo().and_then(|()| cluster()).and_then(|()| web()) {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn step(title: &str) -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        anyhow::bail!("interrupted");
    }
    println!("\n=== {title}");
    Ok(())
}

fn demo() -> anyhow::Result<()> {
    step(
        "Building the sandbox: a client namespace with 48 addresses, a balancer, 3 backends, one bridge",
    )?;
    let tag = unique_tag("demo");
    let mut rig = Rig::build(
        RigOptions::new(&tag)
            .backends(3)
            .clients(CLIENTS + 16)
            .clients_per_64(CLIENTS_PER_64),
    )?;
    let mut servers = Vec::new();
    for k in 1..=3 {
        servers.push(server(&rig, k)?);
    }
    let (bridge_ns, bridge_port) = rig.bridge_peer_of_lb();
    // Native XDP_TX on a veth needs an XDP program on the peer (a real NIC does not).
    let _peer = PeerXdp::attach(bridge_ns, bridge_port)?;
    let scratch = ScratchDir::new(&tag);
    let guard = DataPathGuard::new(rig.lb_ns(), rig.lb_dev());
    println!("namespaces: {}", rig.namespaces().join(" "));
    println!(
        "VIPs {}:{PORT} and [{}]:{PORT} on the balancer; backends 198.18.0.11-13 and 2001:db8::11-13 answer clients directly (DSR); port 8080 reaches them by full NAT",
        rig.vip(),
        rig.vip6()
    );

    step("Starting `sticky-lb run --config config/demo.yaml` in the balancer namespace")?;
    let mut balancer = Balancer::start(rig.lb_ns(), rig.lb_dev(), scratch.path(), CONFIG)?;
    print!("{}", balancer.log_text());

    step(&format!(
        "{CLIENTS} clients open {CONNECTIONS} new TCP connections each; the backend's name is the reply"
    ))?;
    let clients: Vec<Ipv4Addr> = rig.client_addrs()[..CLIENTS].to_vec();
    let vip = SocketAddrV4::new(rig.vip(), PORT);
    let mut seen: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
    for _ in 0..CONNECTIONS {
        let requests: Vec<_> = clients.iter().map(|c| (*c, vip)).collect();
        for (client, reply) in clients.iter().zip(fetch_names_many(
            rig.client_ns(),
            &requests,
            Duration::from_secs(3),
        )) {
            seen.entry(*client)
                .or_default()
                .push(reply.unwrap_or_else(|e| format!("error: {e}")));
        }
    }
    let mut sticky = 0;
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for (client, names) in &seen {
        let same = names.iter().all(|n| *n == names[0]);
        sticky += same as usize;
        *per_backend.entry(names[0].clone()).or_default() += 1;
        println!(
            "  {client:<14} -> {}   {}",
            names.join(" "),
            if same {
                "same backend every time"
            } else {
                "MOVED"
            }
        );
    }
    println!(
        "{sticky} of {CLIENTS} clients reached the same backend on all {CONNECTIONS} connections"
    );
    println!("clients per backend: {per_backend:?}");

    step(&format!(
        "{CLIENTS6} IPv6 clients, {CLIENTS_PER_64} in each of four /64s, open {CONNECTIONS} connections each to shop-v6 (client_mask 64)"
    ))?;
    let clients6: Vec<Ipv6Addr> = rig.client_addrs6()[..CLIENTS6].to_vec();
    let vip6 = SocketAddrV6::new(rig.vip6(), PORT, 0, 0);
    let mut seen6: BTreeMap<Ipv6Addr, Vec<String>> = BTreeMap::new();
    for _ in 0..CONNECTIONS {
        let requests: Vec<_> = clients6.iter().map(|c| (*c, vip6)).collect();
        for (client, reply) in clients6.iter().zip(fetch_names_many(
            rig.client_ns(),
            &requests,
            Duration::from_secs(3),
        )) {
            seen6
                .entry(*client)
                .or_default()
                .push(reply.unwrap_or_else(|e| format!("error: {e}")));
        }
    }
    // Per /64: the backends its addresses reached.
    let mut per_64: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for (client, names) in &seen6 {
        let s = client.segments();
        let prefix = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
        println!("  {client:<18} -> {}", names.join(" "));
        per_64
            .entry(format!("{prefix}/64"))
            .or_default()
            .extend(names.iter().cloned());
    }
    for (prefix, backends) in &per_64 {
        println!(
            "  {prefix:<22} {}",
            if backends.len() == 1 {
                format!("every address on {}", backends.first().unwrap())
            } else {
                format!("SPLIT over {backends:?}")
            }
        );
    }

    step(
        "16 clients open 5 connections each to office (VIP port 8080, full NAT to the backends' port 80)",
    )?;
    let office = SocketAddrV4::new(rig.vip(), 8080);
    let mut seen_nat: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
    for _ in 0..CONNECTIONS {
        let requests: Vec<_> = clients[..16].iter().map(|c| (*c, office)).collect();
        for (client, reply) in clients.iter().zip(fetch_names_many(
            rig.client_ns(),
            &requests,
            Duration::from_secs(3),
        )) {
            seen_nat
                .entry(*client)
                .or_default()
                .push(reply.unwrap_or_else(|e| format!("error: {e}")));
        }
    }
    let sticky_nat = seen_nat
        .values()
        .filter(|names| names.iter().all(|n| *n == names[0]))
        .count();
    for (client, names) in seen_nat.iter().take(4) {
        println!("  {client:<14} -> {}", names.join(" "));
    }
    println!(
        "{sticky_nat} of 16 clients reached the same backend on all {CONNECTIONS} connections, every reply translated back by the data path"
    );

    step("The stick table (`sticky-lb table show`, first rows)")?;
    let table = sticky_lb(rig.lb_ns(), &["table", "show"])?;
    for line in table.lines().take(12) {
        println!("{line}");
    }
    println!("  ... {}", table.lines().last().unwrap_or(""));

    step("`sticky-lb status`")?;
    print!("{}", sticky_lb(rig.lb_ns(), &["status"])?);

    step(
        "A backend joins: backend-4 is added and the controller restarted; the data path and its stick table stay",
    )?;
    let k = rig.add_backend()?;
    servers.push(server(&rig, k)?);
    balancer.stop();
    let config = format!(
        "{CONFIG}      - name: backend-4\n        address: {}\n",
        rig.backend_addr(k)
    );
    let balancer = Balancer::start(rig.lb_ns(), rig.lb_dev(), scratch.path(), &config)?;
    let requests: Vec<_> = clients.iter().map(|c| (*c, vip)).collect();
    let again = fetch_names_many(rig.client_ns(), &requests, Duration::from_secs(3));
    let moved = clients
        .iter()
        .zip(&again)
        .filter(|(c, r)| r.as_ref().ok() != seen[*c].first())
        .count();
    println!("{moved} of {CLIENTS} stuck clients moved");
    let newcomers: Vec<Ipv4Addr> = rig.client_addrs()[CLIENTS..].to_vec();
    let requests: Vec<_> = newcomers.iter().map(|c| (*c, vip)).collect();
    let mut fresh: BTreeMap<String, usize> = BTreeMap::new();
    for reply in fetch_names_many(rig.client_ns(), &requests, Duration::from_secs(3)) {
        *fresh
            .entry(reply.unwrap_or_else(|e| format!("error: {e}")))
            .or_default() += 1;
    }
    println!("{} new clients went to: {fresh:?}", newcomers.len());

    step("Tearing down: controller stopped, data path detached, namespaces removed")?;
    drop(balancer);
    drop(guard);
    drop(servers);
    drop(rig);
    Ok(())
}

/// The second sandbox: two nodes, one stick table through Redis.
fn cluster() -> anyhow::Result<()> {
    step(
        "Two balancer nodes behind a router's ECMP route, sharing one stick table through Redis: 24 clients behind the router, 3 backends, redis-server",
    )?;
    let tag = unique_tag("demo-ecmp");
    let rig = EcmpRig::build(
        EcmpRigOptions::new(&tag)
            .balancers(2)
            .backends(3)
            .clients(CLUSTER_CLIENTS),
    )?;
    let scratch = ScratchDir::new(rig.tag());
    let store = rig.start_store()?;
    let guards: Vec<DataPathGuard> = (1..=2).map(|i| rig.datapath_guard(i)).collect();
    let servers = rig.start_backend_servers()?;
    let balancers: Vec<Balancer> = (1..=2)
        .map(|i| rig.start_balancer(i, scratch.path(), &format!("node: lb{i}\n{CLUSTER_CONFIG}")))
        .collect::<anyhow::Result<_>>()?;
    let clients: Vec<Ipv4Addr> = rig.client_addrs().to_vec();
    let each: Vec<Ipv4Addr> = clients
        .iter()
        .flat_map(|c| std::iter::repeat_n(*c, CONNECTIONS))
        .collect();
    let backends_per_client = |names: &[String]| {
        let mut per: BTreeMap<Ipv4Addr, std::collections::BTreeSet<String>> = BTreeMap::new();
        for (c, name) in each.iter().zip(names) {
            per.entry(*c).or_default().insert(name.clone());
        }
        per
    };
    step(
        "5 connections from each client; the router spreads them over both nodes (ECMP lb1, lb2)",
    )?;
    let first = backends_per_client(&rig.round(&each, Duration::from_secs(3)));
    let one = first.values().filter(|names| names.len() == 1).count();
    println!("{one} of {CLUSTER_CLIENTS} clients reached one backend through both nodes");
    std::thread::sleep(Duration::from_millis(300));
    for i in 1..=2 {
        let table = sticky_lb(rig.lb_ns(i), &["table", "show", "--json"])?;
        let rows = serde_json::from_str::<serde_json::Value>(&table)?;
        println!(
            "lb{i}'s stick table: {} clients",
            rows.as_array().map_or(0, Vec::len)
        );
    }
    step("b3 joins on every node (`sticky-lb backend add web/b3 198.18.0.13 --all-nodes` on lb1)")?;
    print!(
        "{}",
        sticky_lb(
            rig.lb_ns(1),
            &[
                "backend",
                "add",
                "web/b3",
                &rig.backend_addr(3).to_string(),
                "--all-nodes"
            ]
        )?
    );
    std::thread::sleep(Duration::from_secs(1));
    step("lb1 leaves the ECMP set: every client now reaches lb2 only")?;
    rig.set_ecmp(&[2])?;
    let again = backends_per_client(&rig.round(&each, Duration::from_secs(3)));
    let moved = clients
        .iter()
        .filter(|c| first[*c].len() == 1 && again[*c] != first[*c])
        .count();
    println!("{moved} of {one} stuck clients moved (each node learned what the other decided)");
    step("`sticky-lb stats` on lb2 (its last line is the shared table)")?;
    let stats = sticky_lb(rig.lb_ns(2), &["stats"])?;
    if let Some(line) = stats.lines().find(|l| l.starts_with("shared table")) {
        println!("{line}");
    }
    step("Tearing down: controllers stopped, Redis stopped, namespaces removed")?;
    drop(balancers);
    drop(guards);
    drop(servers);
    drop(store);
    drop(scratch);
    drop(rig);
    Ok(())
}

/// The third sandbox: a web shop whose visitors are kept by a sealed cookie.
fn web() -> anyhow::Result<()> {
    step(&format!(
        "A web shop as a mode: http service (config/demo-web.yaml): {PHONES} phones behind one carrier-NAT address, each with its own cookie jar"
    ))?;
    let tag = unique_tag("demo-web");
    let rig = Rig::build(RigOptions::new(&tag).backends(3).clients(1))?;
    let scratch = ScratchDir::new(&tag);
    let guard = DataPathGuard::new(rig.lb_ns(), rig.lb_dev());
    let mut backends = (1..=3)
        .map(|k| {
            WebBackend::start(
                rig.backend_ns(k),
                SocketAddr::new(rig.backend_addr(k).into(), 8080),
                &format!("backend-{k}"),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let keys = write_keys(
        scratch.path(),
        "demo-cookie-keys.yaml",
        &[(1, &test_secret(7))],
    );
    let config = WEB_CONFIG.replace("demo-cookie-keys.yaml", &keys.display().to_string());
    let balancer = Balancer::start(rig.lb_ns(), rig.lb_dev(), scratch.path(), &config)?;
    // The first health checks (every 200 ms, up after 2).
    std::thread::sleep(Duration::from_millis(800));
    let phone_address = rig.client_addrs()[0].into();
    let url = format!("http://{}/", rig.vip());
    let visit = |phone: usize| {
        let jar = scratch.path().join(format!("phone-{phone}.jar"));
        let jar = jar.display().to_string();
        let out = curl_in(
            rig.client_ns(),
            phone_address,
            &["-c", &jar, "-b", &jar, &url],
        );
        curl_backend(&out).unwrap_or_else(|| "no answer".into())
    };
    let mut first = Vec::new();
    for phone in 0..PHONES {
        let visits: Vec<String> = (0..5).map(|_| visit(phone)).collect();
        let same = visits.iter().all(|v| *v == visits[0]);
        println!(
            "  phone {phone} ({phone_address}) -> {}   {}",
            visits.join(" "),
            if same {
                "same backend every time"
            } else {
                "MOVED"
            }
        );
        first.push(visits[0].clone());
    }
    let mut spread: BTreeMap<&str, usize> = BTreeMap::new();
    for name in &first {
        *spread.entry(name.as_str()).or_default() += 1;
    }
    println!("phones per backend (one client address): {spread:?}");
    step("backend-1's web server stops; its phones move once (a new cookie) and stay")?;
    backends[0].stop();
    // Down after 3 failed checks, 200 ms apart.
    std::thread::sleep(Duration::from_millis(1500));
    for (phone, before) in first.iter().enumerate() {
        let visits: Vec<String> = (0..3).map(|_| visit(phone)).collect();
        println!("  phone {phone}: was on {before}, now {}", visits.join(" "));
    }
    step("`sticky-lb stats` (the proxy's counters)")?;
    let stats = sticky_lb(rig.lb_ns(), &["stats"])?;
    if let Some(line) = stats.lines().find(|l| l.contains("(http)")) {
        println!("{line}");
    }
    step("Tearing down: controller stopped, namespaces removed")?;
    drop(balancer);
    drop(guard);
    drop(backends);
    drop(scratch);
    drop(rig);
    println!("done. Try `./x test` for the test suite; README.md for running it on a real NIC.");
    Ok(())
}

/// Backend `k`'s name server on [::]:80, which takes IPv4 connections too (as IPv4-mapped
/// addresses: the namespace's bindv6only is 0).
fn server(rig: &Rig, k: usize) -> anyhow::Result<NameServer> {
    NameServer::start(
        rig.backend_ns(k),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, PORT)),
        &format!("backend-{k}"),
    )
}

fn sticky_lb(netns: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(binary())
        .arg("--netns")
        .arg(netns)
        .args(args)
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "sticky-lb {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
