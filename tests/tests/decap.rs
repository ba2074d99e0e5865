//! The decapsulation program (`sticky-lb decap`, the backend side of `forwarding: tunnel`): a
//! packet-in / verdict-and-packet-out table under BPF_PROG_TEST_RUN (the object loaded unattached
//! through `sticky_lb::decap::Decap`, with one IPv4 and one IPv6 tunnel address), its cost beside
//! a plain XDP_PASS, the real command between two namespaces, and its one-line errors.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};
use sticky_lb::decap::Decap;
use sticky_lb_common::{Family, decap::DecapCounter};
use sticky_lb_tests::{
    balancer::binary,
    decap::DecapProcess,
    fixture::{XDP_DROP, XDP_PASS, run_on},
    netns::{NetNs, in_netns, require_root, unique_tag},
    packet::{ETH_LEN, Frame, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_LEN, tunnel_frame},
};

/// This host's tunnel addresses, as the fixture's program is told them.
const OURS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const OURS6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// Another host's.
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3);
/// The balancer, the outer source.
const BALANCER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const BALANCER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The client and the service address of the inner packets.
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x100);
const PORT: u16 = 80;

/// The decap program, loaded unattached, decapsulating for [`OURS`] and [`OURS6`].
fn load() -> Decap {
    require_root();
    let mut decap = Decap::load().expect("the kernel accepts the decap program");
    decap.add_address(OURS.into()).unwrap();
    decap.add_address(OURS6.into()).unwrap();
    decap
}

/// A client's SYN to the VIP of `family`: its IP packet is a tunnel's inner packet, and the
/// frame itself (same MACs and tag) what the kernel must receive once the outer header is gone.
fn inner(family: Family) -> Frame {
    match family {
        Family::Ipv4 => Frame::tcp_syn(CLIENT, VIP, PORT),
        Family::Ipv6 => Frame::tcp_syn(CLIENT6, VIP6, PORT),
    }
}

/// `inner`'s IP packet in a tunnel from the balancer to `outer_dst`, in a frame with `inner`'s
/// MACs and tag.
fn tunnel(inner: &Frame, outer_dst: IpAddr) -> Vec<u8> {
    let outer_src: IpAddr = match outer_dst {
        IpAddr::V4(_) => BALANCER.into(),
        IpAddr::V6(_) => BALANCER6.into(),
    };
    tunnel_frame(inner, outer_src, outer_dst, &inner.ip_packet())
}

/// `frame` (untagged, outer IPv4) with 4 bytes of outer options (three NOPs and an end of
/// options list): IHL 6 and a total length 4 bytes longer.
fn with_outer_options(frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    let ip = ETH_LEN;
    out.splice(ip + IPV4_LEN..ip + IPV4_LEN, [1, 1, 1, 0]);
    out[ip] = 0x46;
    let total = u16::from_be_bytes([out[ip + 2], out[ip + 3]]) + 4;
    out[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
    out
}

/// `frame` (untagged, outer IPv4) with the outer flags and fragment offset field set to `frag`.
fn outer_frag(frame: &[u8], frag: u16) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&frag.to_be_bytes());
    out
}

/// `frame` (untagged) with its outer protocol (IPv4) or next header (IPv6) set to `protocol`.
fn outer_protocol(frame: &[u8], protocol: u8) -> Vec<u8> {
    let mut out = frame.to_vec();
    let at = if out[ETH_LEN] >> 4 == 4 { 9 } else { 6 };
    out[ETH_LEN + at] = protocol;
    out
}

/// `frame` with byte `at` set to `value`.
fn with_byte(frame: &[u8], at: usize, value: u8) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[at] = value;
    out
}

/// What the program must do with a frame.
enum Expect {
    /// XDP_PASS with exactly these bytes (the inner packet under the frame's own Ethernet
    /// header), counted under this decapsulation counter.
    Decapsulated(Vec<u8>, DecapCounter),
    /// XDP_PASS with the frame untouched, counted under this reason.
    Untouched(DecapCounter),
    /// XDP_DROP, counted as a malformed inner packet.
    Dropped,
}

fn counters(decap: &Decap) -> BTreeMap<&'static str, u64> {
    decap
        .counters()
        .unwrap()
        .into_iter()
        .map(|(counter, value)| (counter.name(), value))
        .collect()
}

#[test]
fn tunnel_frames_in_verdicts_and_inner_packets_out() {
    use Expect::*;
    let mut decap = load();
    let v4 = inner(Family::Ipv4);
    let v6 = inner(Family::Ipv6);
    let tagged = |frame: &Frame| {
        let mut f = frame.clone();
        f.vlan = Some(0x2007); // priority 1, VLAN 7
        f
    };
    let (v4_tagged, v6_tagged) = (tagged(&v4), tagged(&v6));
    let mut with_data = v4.clone();
    with_data.tcp_flags = 0x18; // PSH+ACK
    with_data.payload = vec![0xab; 1000];
    let ipip = tunnel(&v4, OURS.into());
    let ip6ip6 = tunnel(&v6, OURS6.into());
    let padded = [ipip.clone(), vec![0; 6]].concat();
    let cut_inner = |frame: &Frame, bytes: usize, outer_dst: IpAddr| {
        let mut packet = frame.ip_packet();
        packet.truncate(bytes);
        tunnel_frame(frame, BALANCER.into(), outer_dst, &packet)
    };
    let cut_inner6 = |frame: &Frame, bytes: usize| {
        let mut packet = frame.ip_packet();
        packet.truncate(bytes);
        tunnel_frame(frame, BALANCER6.into(), OURS6.into(), &packet)
    };
    let plain = |src: IpAddr, dst: IpAddr, protocol: u8| {
        let mut f = Frame::tcp_syn(src, dst, 22);
        f.protocol = protocol;
        f.build()
    };
    let mut arp = Frame::tcp_syn(BALANCER, OURS, PORT);
    arp.ether_type = 0x0806;

    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        (
            "IPv4 in IPv4 (IPIP)",
            ipip.clone(),
            Decapsulated(v4.build(), DecapCounter::DecapIpv4),
        ),
        (
            "IPv6 in IPv4",
            tunnel(&v6, OURS.into()),
            Decapsulated(v6.build(), DecapCounter::DecapIpv6),
        ),
        (
            "IPv4 in IPv6",
            tunnel(&v4, OURS6.into()),
            Decapsulated(v4.build(), DecapCounter::DecapIpv4),
        ),
        (
            "IPv6 in IPv6",
            ip6ip6.clone(),
            Decapsulated(v6.build(), DecapCounter::DecapIpv6),
        ),
        (
            "IPIP with an 802.1Q tag: the tag stays",
            tunnel(&v4_tagged, OURS.into()),
            Decapsulated(v4_tagged.build(), DecapCounter::DecapIpv4),
        ),
        (
            "IPv6 in IPv6 with an 802.1Q tag",
            tunnel(&v6_tagged, OURS6.into()),
            Decapsulated(v6_tagged.build(), DecapCounter::DecapIpv6),
        ),
        (
            "IPIP carrying 1000 bytes of data",
            tunnel(&with_data, OURS.into()),
            Decapsulated(with_data.build(), DecapCounter::DecapIpv4),
        ),
        (
            "IPIP with outer IPv4 options",
            with_outer_options(&ipip),
            Decapsulated(v4.build(), DecapCounter::DecapIpv4),
        ),
        (
            "IPIP with bytes after the outer packet (Ethernet padding): kept for the kernel to trim",
            padded,
            Decapsulated([v4.build(), vec![0; 6]].concat(), DecapCounter::DecapIpv4),
        ),
        // Not ours.
        (
            "IPIP to another host",
            tunnel(&v4, OTHER.into()),
            Untouched(DecapCounter::PassNotOurs),
        ),
        (
            "IPv6 in IPv6 to another host",
            tunnel(&v6, OTHER6.into()),
            Untouched(DecapCounter::PassNotOurs),
        ),
        (
            "IPv4 in IPv6 to the IPv6 address whose bytes start with our IPv4 address",
            tunnel(
                &v4,
                IpAddr::from([198, 18, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            ),
            Untouched(DecapCounter::PassNotOurs),
        ),
        // Outer header not taken.
        (
            "IPIP, outer first fragment (MF)",
            outer_frag(&ipip, 0x2000),
            Untouched(DecapCounter::PassNotTunnel),
        ),
        (
            "IPIP, outer later fragment (offset 8 bytes)",
            outer_frag(&ipip, 0x0001),
            Untouched(DecapCounter::PassNotTunnel),
        ),
        (
            "IPIP cut short inside the outer header",
            ipip[..ETH_LEN + 12].to_vec(),
            Untouched(DecapCounter::PassNotTunnel),
        ),
        (
            "IPIP whose outer total length reaches past the frame",
            ipip[..ipip.len() - 4].to_vec(),
            Untouched(DecapCounter::PassNotTunnel),
        ),
        (
            "IPIP with outer IHL 4",
            with_byte(&ipip, ETH_LEN, 0x44),
            Untouched(DecapCounter::PassNotTunnel),
        ),
        (
            "IPIP with outer version 6 under the IPv4 EtherType",
            with_byte(&ipip, ETH_LEN, 0x65),
            Untouched(DecapCounter::PassNotTunnel),
        ),
        (
            "IPv6 in IPv6 whose outer payload length reaches past the frame",
            ip6ip6[..ip6ip6.len() - 4].to_vec(),
            Untouched(DecapCounter::PassNotTunnel),
        ),
        // Not tunnels at all.
        (
            "TCP to our address",
            plain(BALANCER.into(), OURS.into(), 6),
            Untouched(DecapCounter::PassNotTunnel),
        ),
        (
            "TCP to our IPv6 address",
            plain(BALANCER6.into(), OURS6.into(), 6),
            Untouched(DecapCounter::PassNotTunnel),
        ),
        (
            "802.1Q-tagged TCP to our address",
            {
                let mut f = Frame::tcp_syn(BALANCER, OURS, 22);
                f.vlan = Some(7);
                f.build()
            },
            Untouched(DecapCounter::PassNotTunnel),
        ),
        (
            "UDP to our address",
            plain(BALANCER.into(), OURS.into(), 17),
            Untouched(DecapCounter::PassNotTunnel),
        ),
        (
            "ICMP echo to our address",
            plain(BALANCER.into(), OURS.into(), 1),
            Untouched(DecapCounter::PassNotTunnel),
        ),
        (
            "ICMPv6 echo to our IPv6 address",
            plain(BALANCER6.into(), OURS6.into(), 58),
            Untouched(DecapCounter::PassNotTunnel),
        ),
        ("ARP", arp.build(), Untouched(DecapCounter::PassNotTunnel)),
        (
            "a frame that ends inside the 802.1Q tag",
            tunnel(&v4_tagged, OURS.into())[..ETH_LEN + 1].to_vec(),
            Untouched(DecapCounter::PassNotTunnel),
        ),
        // Ours, but nobody can take the inner packet.
        (
            "IPIP whose inner packet is cut short (its total length reaches past the outer packet)",
            cut_inner(&v4, 30, OURS.into()),
            Dropped,
        ),
        (
            "IPIP whose outer packet ends inside the inner header",
            cut_inner(&v4, 12, OURS.into()),
            Dropped,
        ),
        (
            "IPv6 in IPv4 with nothing inside",
            cut_inner(&v4, 0, OURS.into()),
            Dropped,
        ),
        (
            "IPv6 in IPv6 whose inner payload length reaches past the outer packet",
            cut_inner6(&v6, 50),
            Dropped,
        ),
        (
            "protocol 4 (IPv4 inside) carrying an IPv6 packet",
            outer_protocol(&tunnel(&v6, OURS.into()), IPPROTO_IPIP),
            Dropped,
        ),
        (
            "next header 41 (IPv6 inside) carrying an IPv4 packet",
            outer_protocol(&tunnel(&v4, OURS6.into()), IPPROTO_IPV6),
            Dropped,
        ),
        (
            "IPIP with inner IHL 4",
            with_byte(&ipip, ETH_LEN + IPV4_LEN, 0x44),
            Dropped,
        ),
    ];

    for (name, frame, expect) in cases {
        let before = counters(&decap);
        let (verdict, out) = run_on(decap.program(), &frame);
        let counter = match expect {
            Decapsulated(inner_frame, counter) => {
                assert_eq!(verdict, XDP_PASS, "{name}: verdict");
                assert_eq!(out, inner_frame, "{name}: the frame the kernel receives");
                counter
            }
            Untouched(counter) => {
                assert_eq!(verdict, XDP_PASS, "{name}: verdict");
                assert_eq!(out, frame, "{name}: a passed frame must be untouched");
                counter
            }
            Dropped => {
                assert_eq!(verdict, XDP_DROP, "{name}: verdict");
                DecapCounter::DropBadInner
            }
        };
        let after = counters(&decap);
        let changed: Vec<_> = after
            .iter()
            .filter(|(name, value)| before[*name] != **value)
            .map(|(name, value)| (*name, value - before[name]))
            .collect();
        assert_eq!(changed, vec![(counter.name(), 1)], "{name}: counters");
    }
}

#[test]
fn without_tunnel_addresses_nothing_is_decapsulated() {
    require_root();
    let mut decap = Decap::load().unwrap();
    for frame in [
        tunnel(&inner(Family::Ipv4), OURS.into()),
        tunnel(&inner(Family::Ipv6), OURS6.into()),
    ] {
        let (verdict, out) = run_on(decap.program(), &frame);
        assert_eq!((verdict, out), (XDP_PASS, frame));
    }
    let counts = counters(&decap);
    assert_eq!(counts[DecapCounter::PassNotOurs.name()], 2, "{counts:?}");
}

/// `SLB_DECAP_REPEAT` (default 100,000) repetitions per BPF_PROG_TEST_RUN call.
fn repeat() -> u32 {
    std::env::var("SLB_DECAP_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// ns per run of `frame` through `program`, over `repeat` runs in one call.
fn ns_per_packet(program: &aya::programs::Xdp, frame: &[u8], repeat: u32) -> (u32, f64) {
    use aya::programs::{TestRun, TestRunOptions};
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN");
    // aya reports the kernel's duration, already per repetition.
    (result.return_value, result.duration.as_nanos() as f64)
}

/// The median of `calls` single runs (one BPF_PROG_TEST_RUN call each), alternating between the
/// programs of `runs`: for a frame the program changes, which a repeated run would see changed
/// from its second repetition on (the kernel does not restore the frame between repetitions).
fn median_single_runs(runs: &[(&aya::programs::Xdp, &[u8])], calls: usize) -> Vec<f64> {
    let mut samples = vec![Vec::with_capacity(calls); runs.len()];
    for _ in 0..calls {
        for (i, (program, frame)) in runs.iter().enumerate() {
            samples[i].push(ns_per_packet(program, frame, 1).1);
        }
    }
    samples
        .into_iter()
        .map(|mut s| {
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        })
        .collect()
}

/// The cost of the decap program beside a plain XDP_PASS (the balancer object's `xdp_pass`),
/// printed as `decap cost:` lines. Nothing is asserted about time: a shared VM's figures are for
/// reading, not for failing a build.
#[test]
fn decap_cost_beside_a_plain_pass() {
    use sticky_lb::dataplane::{EBPF_OBJECT, PASS_PROGRAM};
    use sticky_lb_common::map_names;
    let mut decap = load();
    // The floor: the balancer object's pass program, its maps kept tiny.
    let mut balancer = aya::EbpfLoader::new()
        .map_max_entries(map_names::STICK, 16)
        .map_max_entries(map_names::FLOWS, 16)
        .map_max_entries(map_names::MAGLEV, 16)
        .load(EBPF_OBJECT)
        .unwrap();
    let pass: &mut aya::programs::Xdp = balancer
        .program_mut(PASS_PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    pass.load().unwrap();
    let pass: &aya::programs::Xdp = pass;
    let program: &aya::programs::Xdp = decap.program();

    let repeat = repeat();
    let tcp = Frame::tcp_syn(BALANCER, OURS, 22).build();
    let ipip = tunnel(&inner(Family::Ipv4), OURS.into());
    let ip6ip6 = tunnel(&inner(Family::Ipv6), OURS6.into());
    let elsewhere = tunnel(&inner(Family::Ipv4), OTHER.into());
    let bad_inner = with_byte(&ipip, ETH_LEN + IPV4_LEN, 0x44);
    let repeated = [
        ("xdp_pass (the floor), TCP", pass, &tcp, XDP_PASS),
        ("decap, TCP (not a tunnel)", program, &tcp, XDP_PASS),
        ("decap, IPIP to another host", program, &elsewhere, XDP_PASS),
        (
            "decap, IPIP to us with a bad inner header (every check and the lookup, dropped)",
            program,
            &bad_inner,
            XDP_DROP,
        ),
    ];
    for (name, program, frame, verdict) in repeated {
        let (got, ns) = ns_per_packet(program, frame, repeat);
        assert_eq!(got, verdict, "{name}");
        println!("decap cost: {name}: {ns:.0} ns/packet (repeat {repeat})");
    }
    let calls = (repeat / 10).max(100) as usize;
    let medians = median_single_runs(&[(pass, &tcp), (program, &ipip), (program, &ip6ip6)], calls);
    println!(
        "decap cost: one run per call, median of {calls}: xdp_pass {:.0} ns, IPIP decapsulated {:.0} ns, \
         IPv6-in-IPv6 decapsulated {:.0} ns (each includes the call's fixed timing cost)",
        medians[0], medians[1], medians[2]
    );
    assert_eq!(ns_per_packet(program, &ipip, 1).0, XDP_PASS);
}

// ---------------------------------------------------------------------------
// The real command between two namespaces
// ---------------------------------------------------------------------------

/// The receiver's and the sender's addresses on their veth pair, and the VIP on the receiver's lo.
const RX: Ipv4Addr = OURS;
const RX6: Ipv6Addr = OURS6;
const TX: Ipv4Addr = BALANCER;
const TX6: Ipv6Addr = BALANCER6;
const RX_DEV: &str = "r0";
const TX_DEV: &str = "t0";

/// A sender (`slb-TAG-tx`, the balancer's role: it sends tunnel packets) and a receiver
/// (`slb-TAG-rx`, a backend holding the VIP on lo with a listener on it), joined by a veth pair.
/// Both namespaces, the veth with them, are deleted on drop.
struct Pair {
    tx: NetNs,
    rx: NetNs,
}

impl Pair {
    fn new(test: &str) -> Pair {
        require_root();
        let tag = unique_tag(test);
        let rx = NetNs::new(format!("slb-{tag}-rx")).unwrap();
        let tx = NetNs::new(format!("slb-{tag}-tx")).unwrap();
        for ns in [&rx, &tx] {
            // Quiet IPv6: nothing tentative, no router solicitations (set before the veth exists).
            ns.exec(&[
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.default.router_solicitations=0",
            ])
            .unwrap();
        }
        tx.ip_batch(&format!(
            "link set lo up\n\
             link add {TX_DEV} type veth peer name {RX_DEV} netns {rx}\n\
             addr add {TX}/24 dev {TX_DEV}\n\
             addr add {TX6}/64 dev {TX_DEV} nodad\n\
             link set {TX_DEV} up\n",
            rx = rx.name()
        ))
        .unwrap();
        rx.ip_batch(&format!(
            "link set lo up\n\
             addr add {RX}/24 dev {RX_DEV}\n\
             addr add {RX6}/64 dev {RX_DEV} nodad\n\
             link set {RX_DEV} up\n\
             addr add {VIP}/32 dev lo\n\
             addr add {VIP6}/128 dev lo nodad\n"
        ))
        .unwrap();
        // Segments the receiver's kernel sends must leave with their checksums filled in.
        tx.exec(&["ethtool", "-K", TX_DEV, "tx", "off"]).unwrap();
        rx.exec(&["ethtool", "-K", RX_DEV, "tx", "off"]).unwrap();
        Pair { tx, rx }
    }
}

/// An owned socket made with socket(2) in the calling thread's namespace.
fn socket(domain: i32, kind: i32, protocol: i32) -> OwnedFd {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The sender's side: raw sockets that put an inner packet under a kernel-built outer header
/// (IPv4 protocol 4 or 41, IPv6 next header 41 or 4: the socket's protocol), and a packet socket
/// on its veth that sees what comes back.
struct Sender {
    ipip: OwnedFd,
    ip6ip6: OwnedFd,
    sniffer: OwnedFd,
}

impl Sender {
    fn new(pair: &Pair) -> Sender {
        in_netns(pair.tx.name(), || {
            let ipip = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_IPIP);
            let ip6ip6 = socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_IPV6);
            let all = (libc::ETH_P_ALL as u16).to_be() as i32;
            let sniffer = socket(libc::AF_PACKET, libc::SOCK_RAW, all);
            let name = std::ffi::CString::new(TX_DEV).unwrap();
            // SAFETY: a NUL-terminated name; a zeroed sockaddr_ll filled in below.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(index, 0, "{TX_DEV} exists in {}", pair.tx.name());
            let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            ll.sll_family = libc::AF_PACKET as u16;
            ll.sll_protocol = all as u16;
            ll.sll_ifindex = index as i32;
            let rc = unsafe {
                libc::bind(
                    sniffer.as_raw_fd(),
                    (&ll as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            let rc = unsafe {
                libc::setsockopt(
                    sniffer.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    size_of::<libc::timeval>() as u32,
                )
            };
            assert_eq!(rc, 0);
            Sender {
                ipip,
                ip6ip6,
                sniffer,
            }
        })
    }

    /// Sends a SYN from the sender's own address and `port` to the VIP of `family`:80 in a
    /// tunnel of the same family to the receiver.
    fn send_syn(&self, family: Family, port: u16) {
        let mut syn = match family {
            Family::Ipv4 => Frame::tcp_syn(TX, VIP, PORT),
            Family::Ipv6 => Frame::tcp_syn(TX6, VIP6, PORT),
        };
        syn.src_port = port;
        let packet = syn.ip_packet();
        // SAFETY: sendto(2) with a zeroed sockaddr of the socket's family, filled in.
        let sent = unsafe {
            match family {
                Family::Ipv4 => {
                    let mut to: libc::sockaddr_in = std::mem::zeroed();
                    to.sin_family = libc::AF_INET as u16;
                    to.sin_addr.s_addr = u32::from_ne_bytes(RX.octets());
                    libc::sendto(
                        self.ipip.as_raw_fd(),
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&to as *const libc::sockaddr_in).cast(),
                        size_of::<libc::sockaddr_in>() as u32,
                    )
                }
                Family::Ipv6 => {
                    let mut to: libc::sockaddr_in6 = std::mem::zeroed();
                    to.sin6_family = libc::AF_INET6 as u16;
                    to.sin6_addr.s6_addr = RX6.octets();
                    libc::sendto(
                        self.ip6ip6.as_raw_fd(),
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&to as *const libc::sockaddr_in6).cast(),
                        size_of::<libc::sockaddr_in6>() as u32,
                    )
                }
            }
        };
        assert_eq!(
            sent,
            packet.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Sends a tunnelled SYN of each of `probes` (family, source port) every 200 ms until each
    /// was answered by a SYN-ACK from the VIP or `within` passed; returns which were answered.
    fn answered(&self, probes: &[(Family, u16)], within: Duration) -> Vec<bool> {
        let mut answered = vec![false; probes.len()];
        let deadline = Instant::now() + within;
        let mut next_send = Instant::now();
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline && answered.contains(&false) {
            if Instant::now() >= next_send {
                for (i, &(family, port)) in probes.iter().enumerate() {
                    if !answered[i] {
                        self.send_syn(family, port);
                    }
                }
                next_send += Duration::from_millis(200);
            }
            // SAFETY: recv(2) into our buffer; SO_RCVTIMEO bounds the wait.
            let n = unsafe {
                libc::recv(
                    self.sniffer.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n <= 0 {
                continue;
            }
            if let Some((family, port)) = syn_ack_from_vip(&buf[..n as usize]) {
                for (i, probe) in probes.iter().enumerate() {
                    if *probe == (family, port) {
                        answered[i] = true;
                    }
                }
            }
        }
        answered
    }
}

/// The (family, destination port) of `frame` if it is a SYN-ACK from the VIP:80 of its family.
fn syn_ack_from_vip(frame: &[u8]) -> Option<(Family, u16)> {
    let ether_type = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(ETH_LEN..)?;
    let (family, tcp) = match ether_type {
        0x0800 if *ip.get(9)? == 6 && ip.get(12..16)? == VIP.octets() => {
            (Family::Ipv4, ip.get(((ip[0] & 0x0f) as usize) * 4..)?)
        }
        0x86dd if *ip.get(6)? == 6 && ip.get(8..24)? == VIP6.octets() => {
            (Family::Ipv6, ip.get(40..)?)
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    (sport == PORT && *tcp.get(13)? & 0x12 == 0x12).then_some((family, dport))
}

/// Whether an XDP program is attached to the receiver's veth.
fn rx_has_xdp(pair: &Pair) -> bool {
    pair.rx
        .ip(&["-d", "link", "show", "dev", RX_DEV])
        .unwrap()
        .contains("xdp")
}

#[test]
fn a_tunnelled_syn_reaches_the_vip_while_decap_runs_and_only_then() {
    let pair = Pair::new("decap-e2e");
    // The service on the receiver: listening on the VIPs (the kernel answers SYNs itself).
    let _listeners = in_netns(pair.rx.name(), || {
        [
            TcpListener::bind((VIP, PORT)).unwrap(),
            TcpListener::bind((VIP6, PORT)).unwrap(),
        ]
    });
    let sender = Sender::new(&pair);
    let quiet = Duration::from_millis(1500);
    let answer = Duration::from_secs(5);

    // This kernel has no ipip or ip6tnl module: without decap the tunnel packets go nowhere.
    let probes = [(Family::Ipv4, 40001), (Family::Ipv6, 40002)];
    assert_eq!(sender.answered(&probes, quiet), [false, false]);

    // Native mode (auto on a veth), every address of the interface.
    let (mut decap, line) = DecapProcess::start(pair.rx.name(), RX_DEV, &[]).unwrap();
    assert!(
        line.contains(&format!("decapsulating on {RX_DEV} (native XDP): ")),
        "{line}"
    );
    assert!(line.contains(&format!("{RX}, {RX6}, fe80::")), "{line}");
    assert!(rx_has_xdp(&pair));
    let probes = [(Family::Ipv4, 40011), (Family::Ipv6, 40012)];
    assert_eq!(sender.answered(&probes, answer), [true, true]);
    let stopped = decap.stop().unwrap();
    assert_eq!(stopped.code, Some(0), "{}", decap.log());
    let counts = &stopped.counters;
    assert_eq!(counts.len(), DecapCounter::ALL.len(), "{}", stopped.stdout);
    assert!(counts["decapsulated_ipv4"] >= 1, "{counts:?}");
    assert!(counts["decapsulated_ipv6"] >= 1, "{counts:?}");
    assert_eq!(counts["drop_bad_inner"], 0, "{counts:?}");
    assert_eq!(counts["aborted"], 0, "{counts:?}");
    assert!(decap.log().contains("detached from r0"), "{}", decap.log());
    assert!(!rx_has_xdp(&pair), "detached on SIGTERM");

    // Generic mode, the addresses given.
    let (mut decap, line) = DecapProcess::start(
        pair.rx.name(),
        RX_DEV,
        &[
            "--mode",
            "generic",
            "--address",
            "198.18.0.2",
            "--address",
            "2001:db8::2",
        ],
    )
    .unwrap();
    assert!(
        line.contains(&format!(
            "decapsulating on {RX_DEV} (generic XDP): IPv4-in-IPv4 (IPIP) and IPv6-in-IPv4, \
             IPv4-in-IPv6 and IPv6-in-IPv6 to {RX}, {RX6}; everything else passes untouched"
        )),
        "{line}"
    );
    let probes = [(Family::Ipv4, 40021), (Family::Ipv6, 40022)];
    assert_eq!(sender.answered(&probes, answer), [true, true]);
    let stopped = decap.stop().unwrap();
    assert_eq!(stopped.code, Some(0), "{}", decap.log());
    assert!(stopped.counters["decapsulated_ipv4"] >= 1, "{stopped:?}");
    assert!(stopped.counters["decapsulated_ipv6"] >= 1, "{stopped:?}");
    assert!(!rx_has_xdp(&pair));

    // Stopped: nothing answers again.
    let probes = [(Family::Ipv4, 40031), (Family::Ipv6, 40032)];
    assert_eq!(sender.answered(&probes, quiet), [false, false]);
}

/// Runs `sticky-lb ARGS...` (as user `uid` if given) within 20 s; returns (status, stderr).
fn run_bounded(args: &[&str], uid: Option<u32>) -> (Option<i32>, String) {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(binary());
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    let mut child = command.spawn().expect("sticky-lb runs");
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sticky-lb {args:?} did not finish within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (code, stderr)
}

#[test]
fn decap_errors_are_one_line_and_attach_nothing() {
    require_root();
    let cases: [(&[&str], Option<u32>, &str); 5] = [
        (
            &["decap", "--interface", "slb-nope0"],
            None,
            "sticky-lb: error: no interface named slb-nope0\n",
        ),
        (
            &["decap"],
            None,
            "sticky-lb: error: decap needs --interface IF (the interface tunnel packets arrive on)\n",
        ),
        (
            &[
                "decap",
                "--interface",
                "lo",
                "--address",
                "02:00:00:00:00:01",
            ],
            None,
            "sticky-lb: error: --address 02:00:00:00:00:01: not an IPv4 or IPv6 address\n",
        ),
        (
            &["decap", "--interface", "lo", "--address", "ff02::1"],
            None,
            "sticky-lb: error: --address ff02::1: not a unicast address\n",
        ),
        // Not root (user nobody): refused when loading, before anything is attached.
        (
            &["decap", "--interface", "lo", "--address", "198.18.0.2"],
            Some(65534),
            "sticky-lb: error: decap needs root (or CAP_BPF and CAP_NET_ADMIN) to load and attach \
             an XDP program\n",
        ),
    ];
    for (args, uid, expected) in cases {
        let (code, stderr) = run_bounded(args, uid);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
        assert!(stderr.ends_with(expected), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("sticky-lb: error: "),
            "{args:?}: {stderr}"
        );
    }
}
