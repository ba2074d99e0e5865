//! The neighbour watch against a real kernel: two namespaces joined by a veth pair, the
//! balancer's end watched from a thread inside its namespace. Resolution, a peer's MAC change
//! announced by gratuitous ARP or made silently, and the watched interface deleted and created
//! again. Needs root.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use sticky_lb::neighbour::{Event, Neighbours, interface_mac};
use sticky_lb_tests::netns::{NetNs, in_netns, listed_namespaces, require_root, unique_tag};
use tokio::sync::mpsc::Receiver;
use tokio::time::{Instant, timeout_at};

/// The balancer's end of the veth pair (watched) and the peer's end.
const LB_DEV: &str = "nb0";
const PEER_DEV: &str = "nb1";
const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const PEER_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11));
/// A permanent entry nobody answers for.
const PINNED_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 50));
/// The same pair over IPv6 (neighbour discovery instead of ARP).
const LB_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const PEER_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11);
const PINNED_MAC: [u8; 6] = [0x02, 0x5e, 0x1b, 0x00, 0x00, 0x50];
/// What the peer's NIC is changed to (locally administered).
const NEW_PEER_MAC: [u8; 6] = [0x02, 0x5e, 0x1b, 0x00, 0x00, 0x11];
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
const EVENT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a managed entry may take to notice a silent MAC change: the kernel revisits managed
/// entries every net.ipv4.neigh.default.interval_probe_time_ms (5 s by default, and only the
/// initial namespace has that setting), then probes.
const SILENT_CHANGE_TIMEOUT: Duration = Duration::from_secs(15);

#[test]
fn resolves_and_follows_mac_changes_and_a_recreated_interface() {
    require_root();
    let tag = unique_tag("neighbours");
    let (lb, peer) = namespaces(&tag);
    connect(&lb, &peer, true);

    in_lb(&lb, async {
        let (neighbours, mut events) = Neighbours::watch(LB_DEV).expect("watch");
        let first_index = neighbours.index().expect("the interface is there");
        assert_eq!(
            interface_mac(LB_DEV).expect("interface MAC"),
            read_mac(&lb, LB_DEV)
        );

        // Resolution through the kernel, into a managed entry.
        let peer_mac = read_mac(&peer, PEER_DEV);
        assert_eq!(
            neighbours.resolve(PEER_ADDR, RESOLVE_TIMEOUT).await,
            Some(peer_mac)
        );
        assert_eq!(neighbours.lookup(PEER_ADDR).await, Some(peer_mac));
        let entry = lb
            .ip(&["neigh", "show", &PEER_ADDR.to_string(), "dev", LB_DEV])
            .expect("ip neigh show");
        assert!(entry.contains("managed"), "not a managed entry: {entry:?}");

        // Someone else's permanent entry is answered from, and left as it is.
        let pinned = PINNED_ADDR.to_string();
        lb.ip(&[
            "neigh",
            "add",
            &pinned,
            "lladdr",
            &format_mac(PINNED_MAC),
            "dev",
            LB_DEV,
            "nud",
            "permanent",
        ])
        .expect("permanent entry");
        assert_eq!(
            neighbours.resolve(PINNED_ADDR, RESOLVE_TIMEOUT).await,
            Some(PINNED_MAC)
        );
        let entry = lb
            .ip(&["neigh", "show", &pinned, "dev", LB_DEV])
            .expect("ip neigh show");
        assert!(
            entry.contains("PERMANENT") && !entry.contains("managed"),
            "the permanent entry was changed: {entry:?}"
        );

        // The peer's NIC changes; arp_notify announces it with a gratuitous ARP.
        set_peer_mac(&peer, NEW_PEER_MAC);
        wait_for_mac(
            &mut events,
            "the peer's new MAC",
            EVENT_TIMEOUT,
            PEER_ADDR,
            NEW_PEER_MAC,
        )
        .await;
        assert_eq!(neighbours.lookup(PEER_ADDR).await, Some(NEW_PEER_MAC));

        // Deleting our end deletes the pair.
        lb.ip(&["link", "del", LB_DEV]).expect("delete the veth");
        wait_for(&mut events, "LinkGone", EVENT_TIMEOUT, |event| {
            *event
                == Event::LinkGone {
                    interface: LB_DEV.into(),
                }
        })
        .await;
        assert_eq!(neighbours.index(), None);
        assert_eq!(neighbours.lookup(PEER_ADDR).await, None);

        // Created again under the same name: followed by name, with its new index.
        connect(&lb, &peer, true);
        let index = sticky_lb::config::interface_index(LB_DEV).expect("recreated");
        assert_ne!(index, first_index);
        wait_for(
            &mut events,
            "LinkUp with the new index",
            EVENT_TIMEOUT,
            |event| {
                *event
                    == Event::LinkUp {
                        interface: LB_DEV.into(),
                        index,
                    }
            },
        )
        .await;
        assert_eq!(neighbours.index(), Some(index));
        let peer_mac = read_mac(&peer, PEER_DEV);
        assert_eq!(
            neighbours.resolve(PEER_ADDR, RESOLVE_TIMEOUT).await,
            Some(peer_mac)
        );
    });

    let prefix = format!("slb-{tag}-");
    drop((lb, peer));
    assert_eq!(listed_namespaces(&prefix), Vec::<String>::new());
}

/// The kernel sees no traffic to a backend (the data path sends it), so nothing but the managed
/// entry makes it notice that the backend's MAC changed without an announcement.
#[test]
fn a_managed_entry_follows_a_silent_mac_change() {
    require_root();
    let tag = unique_tag("neighsilent");
    let (lb, peer) = namespaces(&tag);
    connect(&lb, &peer, false);
    // The entry is revalidated after 0.25..0.75 s instead of 15..45 s, and its unicast probes
    // to the old MAC fail within a second. The entry then fails, and only the kernel's care for
    // managed entries resolves it again (by broadcast): an ordinary entry stays failed. The time
    // between the kernel's visits of managed entries is not the namespace's to shorten.
    quick_revalidation(&lb, "ipv4");

    in_lb(&lb, async {
        let (neighbours, mut events) = Neighbours::watch(LB_DEV).expect("watch");
        let peer_mac = read_mac(&peer, PEER_DEV);
        assert_eq!(
            neighbours.resolve(PEER_ADDR, RESOLVE_TIMEOUT).await,
            Some(peer_mac)
        );
        set_peer_mac(&peer, NEW_PEER_MAC);
        wait_for_mac(
            &mut events,
            "the peer's new MAC",
            SILENT_CHANGE_TIMEOUT,
            PEER_ADDR,
            NEW_PEER_MAC,
        )
        .await;
    });
}

/// An IPv6 backend's MAC comes from neighbour discovery: resolved into a managed entry, then
/// followed through an announced change (unsolicited neighbour advertisement) and a silent one
/// (found by the managed entry's probes).
#[test]
fn resolves_an_ipv6_neighbour_and_follows_its_mac_changes() {
    require_root();
    let tag = unique_tag("neigh6");
    // No duplicate address detection (the link-local address solicitations are sent from must be
    // usable at once) and no router solicitations.
    let (lb, peer) = namespaces_with(
        &tag,
        &[
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.default.router_solicitations=0",
            "net.ipv6.conf.default.accept_ra=0",
        ],
    );
    lb.ip_batch(&format!(
        "link add {LB_DEV} type veth peer name {PEER_DEV} netns {}\n\
         addr add {LB_ADDR6}/64 dev {LB_DEV} nodad\n\
         link set {LB_DEV} up\n",
        peer.name()
    ))
    .expect("balancer end");
    peer.exec(&[
        "sysctl",
        "-q",
        "-w",
        &format!("net.ipv6.conf.{PEER_DEV}.ndisc_notify=1"),
    ])
    .expect("ndisc_notify");
    peer.ip_batch(&format!(
        "addr add {PEER_ADDR6}/64 dev {PEER_DEV} nodad\n\
         link set {PEER_DEV} up\n"
    ))
    .expect("peer end");
    // Revalidation within a second once the peer stops answering at its old MAC (see
    // a_managed_entry_follows_a_silent_mac_change).
    quick_revalidation(&lb, "ipv6");
    let peer_addr = IpAddr::V6(PEER_ADDR6);
    in_lb(&lb, async {
        let (neighbours, mut events) = Neighbours::watch(LB_DEV).expect("watch");
        assert_eq!(neighbours.lookup(peer_addr).await, None, "not resolved yet");
        let peer_mac = read_mac(&peer, PEER_DEV);
        assert_eq!(
            neighbours.resolve(peer_addr, RESOLVE_TIMEOUT).await,
            Some(peer_mac)
        );
        let entry = lb
            .ip(&[
                "-6",
                "neigh",
                "show",
                &PEER_ADDR6.to_string(),
                "dev",
                LB_DEV,
            ])
            .expect("ip neigh show");
        assert!(entry.contains("managed"), "not a managed entry: {entry:?}");
        // Announced: ndisc_notify sends an unsolicited advertisement with the new MAC.
        set_peer_mac(&peer, NEW_PEER_MAC);
        wait_for_mac(
            &mut events,
            "the announced MAC",
            EVENT_TIMEOUT,
            peer_addr,
            NEW_PEER_MAC,
        )
        .await;
        // Silent: no advertisement; the managed entry's probes find the new MAC.
        peer.exec(&[
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv6.conf.{PEER_DEV}.ndisc_notify=0"),
        ])
        .expect("ndisc_notify off");
        set_peer_mac(&peer, PINNED_MAC);
        wait_for_mac(
            &mut events,
            "the silent change",
            SILENT_CHANGE_TIMEOUT,
            peer_addr,
            PINNED_MAC,
        )
        .await;
        assert_eq!(neighbours.lookup(peer_addr).await, Some(PINNED_MAC));
    });
    let prefix = format!("slb-{tag}-");
    drop((lb, peer));
    assert_eq!(listed_namespaces(&prefix), Vec::<String>::new());
}

/// The balancer's and the peer's namespace, named after `tag`, with IPv6 off (no router
/// solicitations or DAD in the way).
fn namespaces(tag: &str) -> (NetNs, NetNs) {
    namespaces_with(
        tag,
        &[
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ],
    )
}

/// The balancer's and the peer's namespace, named after `tag`, with these sysctls set in both.
fn namespaces_with(tag: &str, sysctls: &[&str]) -> (NetNs, NetNs) {
    let lb = NetNs::new(format!("slb-{tag}-lb")).expect("balancer namespace");
    let peer = NetNs::new(format!("slb-{tag}-peer")).expect("peer namespace");
    for ns in [&lb, &peer] {
        let mut args = vec!["sysctl", "-q", "-e", "-w"];
        args.extend_from_slice(sysctls);
        ns.exec(&args).expect("namespace sysctls");
    }
    (lb, peer)
}

/// Creates the veth pair (`LB_DEV` in `lb`, `PEER_DEV` in `peer`), addresses it and brings it
/// up; with `announce`, arp_notify on the peer's end makes it announce a change of its MAC with a
/// gratuitous ARP.
fn connect(lb: &NetNs, peer: &NetNs, announce: bool) {
    lb.ip_batch(&format!(
        "link add {LB_DEV} type veth peer name {PEER_DEV} netns {}\n\
         addr add {LB_ADDR}/16 dev {LB_DEV}\n\
         link set {LB_DEV} up\n",
        peer.name()
    ))
    .expect("balancer end");
    peer.exec(&[
        "sysctl",
        "-q",
        "-w",
        &format!("net.ipv4.conf.{PEER_DEV}.arp_notify={}", u8::from(announce)),
    ])
    .expect("arp_notify");
    peer.ip_batch(&format!(
        "addr add {PEER_ADDR}/16 dev {PEER_DEV}\n\
         link set {PEER_DEV} up\n"
    ))
    .expect("peer end");
}

/// Runs `work` on a current-thread runtime in a thread inside `lb`'s namespace (where the
/// watched interface is).
fn in_lb(lb: &NetNs, work: impl std::future::Future<Output = ()>) {
    in_netns(lb.name(), || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(work)
    });
}

/// Makes the balancer's end revalidate a neighbour (`ipv4` or `ipv6` table) within a second of
/// it no longer answering at its old MAC.
fn quick_revalidation(lb: &NetNs, table: &str) {
    let neigh = format!("net.{table}.neigh.{LB_DEV}");
    lb.exec(&[
        "sysctl",
        "-q",
        "-w",
        &format!("{neigh}.base_reachable_time_ms=500"),
        &format!("{neigh}.delay_first_probe_time=1"),
        &format!("{neigh}.retrans_time_ms=200"),
    ])
    .expect("neighbour timers");
}

/// Sets the MAC of the peer's end of the pair.
fn set_peer_mac(peer: &NetNs, mac: [u8; 6]) {
    peer.ip(&["link", "set", "dev", PEER_DEV, "address", &format_mac(mac)])
        .expect("change the peer's MAC");
}

/// Waits for the event saying `address` is now at `mac`.
async fn wait_for_mac(
    events: &mut Receiver<Event>,
    what: &str,
    limit: Duration,
    address: IpAddr,
    mac: [u8; 6],
) {
    let wanted = Event::Neighbour {
        address,
        mac: Some(mac),
    };
    wait_for(events, what, limit, |event| *event == wanted).await;
}

/// Receives events until one satisfies `wanted`; panics after `limit` or if the watch ends.
async fn wait_for(
    events: &mut Receiver<Event>,
    what: &str,
    limit: Duration,
    wanted: impl Fn(&Event) -> bool,
) {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        match timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) if wanted(&event) => return,
            Ok(Some(event)) => seen.push(event),
            Ok(None) => panic!("the watch ended while waiting for {what}; saw {seen:?}"),
            Err(_) => panic!("{what} did not come within {limit:?}; saw {seen:?}"),
        }
    }
}

/// The MAC of `dev` in `ns`, from `ip -j link show`.
fn read_mac(ns: &NetNs, dev: &str) -> [u8; 6] {
    let json = ns
        .ip(&["-j", "link", "show", "dev", dev])
        .expect("ip link show");
    let links: serde_json::Value = serde_json::from_str(&json).expect("ip -j output");
    let text = links[0]["address"].as_str().expect("an address");
    sticky_lb::config::parse_mac(text).expect("a MAC")
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}
