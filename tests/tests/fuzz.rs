//! A packet fuzzer for the XDP program: a seeded stream of random and mutated frames goes through
//! the real program and maps under BPF_PROG_TEST_RUN, and every verdict is judged by an oracle
//! written here from the frame bytes alone.
//!
//! Why: the parser decides from untrusted bytes whether a frame is a TCP segment to a service,
//! and so whether it is rewritten and transmitted to a backend. The fixtures in datapath.rs check
//! the frames someone thought of; this checks the ones nobody did, against these invariants, on
//! every frame:
//!
//! 1. the verdict is XDP_PASS, XDP_DROP or XDP_TX, never XDP_ABORTED or anything else;
//! 2. XDP_TX only for a well-formed, unfragmented TCP segment to a service ([`judge`]), and
//!    then, for a DSR service, only the DSR rewrite: destination MAC a backend's *of that
//!    segment's service*, source MAC ours, the length and every byte from offset 12 on
//!    unchanged; for a tunnel service, if the IP packet fits the MTU with the outer header, the
//!    encapsulation exactly (Ethernet to a backend of that service, tag kept; the outer IPv4 or
//!    IPv6 header with every field as the rules give it, its length 20 or 40 + the inner IP
//!    length, its checksum valid; then the input's bytes from its IP header on), and if it does
//!    not, exactly the ICMP "fragmentation needed" / ICMPv6 "packet too big" reply with valid
//!    checksums (both built by `sticky_lb_tests::tunnel`). Conversely every such segment is
//!    transmitted: all backends are up, so passing or dropping one loses a client's packet;
//!    for a NAT service (with or without source NAT), exactly the translation of the input
//!    to one of that service's backends (built by `sticky_lb_tests::nat`: MACs, destination
//!    address and port the backend's, with source NAT source address the service's and port
//!    inside its range and held by no other connection to that backend; the IPv4 header and
//!    TCP checksums valid whenever the input's were, else exactly as wrong), and only as the
//!    connection table allows: an oracle-side model of the connections (opened by a SYN
//!    without ACK, closing after a FIN or RST of either side, replaced by a SYN when closing)
//!    says which backend and port each segment of an open connection must keep, and a
//!    segment of no connection, or an IPv6 one with extension headers, must be dropped;
//!    backends' replies on the model's connections (generated from them) must be translated
//!    back exactly (from the VIP and service port, with source NAT to the client, to the MAC
//!    the client's SYN came from);
//! 4. a client forwarded more than once always reaches the same backend of a service: the pool
//!    does not change during the run, so anything else is a split session. A client is an IPv4
//!    address (those services' mask is /32) or an IPv6 /64 (those services' mask is /64: every
//!    address of the /64 must reach one backend). Checked from the output MACs, not the stick
//!    table, to keep a frame cheap.
//!
//! The program serves eight services at once: DSR on 198.18.0.100:80 and [2001:db8::100]:80,
//! tunnel on port 8443 of both VIPs (small MTUs, so a good share of segments is answered too
//! big), NAT on port 8080 and NAT with source NAT on port 8081 of both (one backend of each on
//! a port of its own), so frames of each family meet a program that also serves the other and
//! the other forwarding modes: an IPv6 header whose bytes happen to hold the IPv4 VIP where an IPv4
//! destination would sit must not reach an IPv4 service. IPv6 segments come with chains of up to
//! five extension headers (the data path follows four).
//!
//! The seed is fixed so a failure reproduces; `SLB_FUZZ_SEED` picks another stream and
//! `SLB_FUZZ_FRAMES` the number of frames (default 100,000; `cargo xtask bench` runs a million in
//! a release build). Violations are collected, not fatal at once, so one run shows every kind;
//! `--nocapture` shows the summary of a passing run too.

use rand::{RngExt, SeedableRng, rngs::Xoshiro256PlusPlus};
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};
use sticky_lb_common::{addr, addr::Family};
use sticky_lb_tests::{
    fixture::{
        ACK, FIN_ACK, Fixture, NatParams, OUR_MAC, PORT, RST, SYN, TunnelParams, VIP, VIP6,
        XDP_DROP, XDP_PASS, XDP_TX,
    },
    nat,
    packet::{ETH_LEN, Frame, IPV4_LEN, IPV6_LEN, TCP_LEN},
    tunnel,
};

const DEFAULT_FRAMES: u64 = 100_000;
const DEFAULT_SEED: u64 = 0x5eed_f0cc_1a55_0001;
/// Distinct client addresses the segments come from: few enough that each is forwarded many
/// times (invariant 4 needs repeats), many enough to spread over all three backends.
const CLIENTS: usize = 300;
/// Examples kept per kind of violation; the count says how many more there were.
const EXAMPLES: usize = 3;

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// IPv6 next headers the data path walks past, and the fragment header it stops at.
const HOPOPTS: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DSTOPTS: u8 = 60;
/// Extension headers the data path follows (sticky_lb_common::MAX_IPV6_EXT_HEADERS).
const MAX_EXT_HEADERS: usize = sticky_lb_common::MAX_IPV6_EXT_HEADERS as usize;
/// The IPv6 service's client mask: a session is a /64.
const V6_CLIENT_MASK: u8 = 64;
const ETH_P_8021Q: u16 = 0x8100;
const IP_MF_AND_OFFSET: u16 = 0x3fff;
const PSH_ACK: u8 = 0x18;
/// Ethernet's minimum frame (without FCS): shorter frames arrive padded with zeros.
const ETH_MIN_FRAME: usize = 60;
/// The tunnel services' port (on both VIPs) and parameters. The MTUs are small so that many
/// segments the generator makes do not fit: an IPv4 packet fits up to 80 bytes (a segment
/// without options and with up to 40 bytes of payload), an IPv6 one up to 120.
const TUNNEL_PORT: u16 = 8443;
const TUNNEL4: TunnelParams = TunnelParams {
    source: IpAddr::V4(Ipv4Addr::new(198, 19, 100, 0)),
    prefix: 24,
    mtu: 100,
};
const TUNNEL6: TunnelParams = TunnelParams {
    source: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0x5b, 0)),
    prefix: 112,
    mtu: 160,
};

/// The NAT services' ports (on both VIPs): plain NAT, and NAT with source NAT from
/// [`SNAT4`] / [`SNAT6`], ports [`SNAT_FIRST`] on (Linux's default, below the ephemeral range).
const NAT_PORT: u16 = 8080;
const SNAT_PORT: u16 = 8081;
const SNAT4: Ipv4Addr = Ipv4Addr::new(198, 19, 100, 9);
const SNAT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0x5b, 9);
const SNAT_FIRST: u16 = 1024;
const SNAT_COUNT: u32 = 31744;
/// A NAT service's segments come from this many ports of each client, so that a connection
/// sees several segments after its SYN; one in [`REPLY_ONE_IN`] frames is a backend's reply on
/// one of the connections opened so far.
const NAT_CLIENT_PORTS: u16 = 4;
const REPLY_ONE_IN: u32 = 10;
const TCP_SYN: u8 = 0x02;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const SYN_ACK: u8 = 0x12;

/// Why the oracle says a frame must not be transmitted: the first rule it breaks, in the order
/// a parser meets the fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Unfit {
    /// No IPv4 or IPv6 EtherType after at most one 802.1Q tag (or the frame ends inside the tag).
    NotIp,
    /// The frame ends inside the IP header (IPv4: IHL*4 bytes; IPv6: 40).
    IpHeaderCut,
    /// The version nibble does not match the EtherType.
    IpVersion,
    IhlBelow5,
    /// IPv6 payload length 0 (a jumbogram, or nothing).
    PayloadLenZero,
    /// tot_len (IPv6: 40 + payload length) reaches past the end of the frame.
    TotLenPastFrame,
    /// tot_len leaves no room for the IP header (and extension headers) and a minimal TCP header.
    TotLenBelowHeaders,
    /// More IPv6 extension headers than the data path follows.
    TooManyExtHeaders,
    Fragment,
    NotTcp,
    /// Another address or port: some other host's traffic.
    NotService,
    DataOffsetBelow5,
    /// The TCP header (data offset * 4) reaches past tot_len.
    DataOffsetPastTotLen,
}

/// Offset of the IP header and its family: after the MACs, at most one 802.1Q tag and an IPv4
/// or IPv6 EtherType.
fn ip_offset(frame: &[u8]) -> Option<(usize, Family)> {
    let ether_type_at = |offset: usize| {
        frame
            .get(offset..offset + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let mut offset = 12;
    if ether_type_at(offset)? == ETH_P_8021Q {
        offset += 4;
    }
    match ether_type_at(offset)? {
        ETH_P_IPV4 => Some((offset + 2, Family::Ipv4)),
        ETH_P_IPV6 => Some((offset + 2, Family::Ipv6)),
        _ => None,
    }
}

/// How one of the run's services forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    /// Port [`PORT`].
    Dsr,
    /// Port [`TUNNEL_PORT`].
    Tunnel,
    /// Port [`NAT_PORT`].
    Nat,
    /// Port [`SNAT_PORT`].
    SourceNat,
}

/// One of the run's services: its family and how it forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Target {
    family: Family,
    kind: Kind,
}

impl Target {
    fn nat(self) -> bool {
        matches!(self.kind, Kind::Nat | Kind::SourceNat)
    }

    /// The index of a NAT service in [`Run::nat_backends`].
    fn nat_index(self) -> usize {
        (self.kind == Kind::SourceNat) as usize * 2 + self.family as usize
    }

    fn port(self) -> u16 {
        match self.kind {
            Kind::Dsr => PORT,
            Kind::Tunnel => TUNNEL_PORT,
            Kind::Nat => NAT_PORT,
            Kind::SourceNat => SNAT_PORT,
        }
    }
}

/// A session as the oracle sees it: the service and its client (an IPv4 address, or the /64 of
/// an IPv6 one).
type Session = (Target, IpAddr);

/// The service port `port` names, if any.
fn target(family: Family, port: u16) -> Option<Target> {
    let kind = match port {
        PORT => Kind::Dsr,
        TUNNEL_PORT => Kind::Tunnel,
        NAT_PORT => Kind::Nat,
        SNAT_PORT => Kind::SourceNat,
        _ => return None,
    };
    Some(Target { family, kind })
}

/// A well-formed, unfragmented TCP segment as the oracle reads it.
#[derive(Clone, Copy, Debug)]
struct Tcp {
    /// Offset of the IP header in the frame.
    l3: usize,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    flags: u8,
    /// IPv6 extension headers before TCP.
    ext: bool,
    /// The service it is addressed to, if any.
    service: Option<Target>,
}

impl Tcp {
    /// The session it belongs to (for a segment to a service): an IPv4 client, or the /64 of
    /// an IPv6 one.
    fn session(&self, service: Target) -> Session {
        let client = match self.src {
            IpAddr::V6(a) => {
                let mut bytes = a.octets();
                bytes[(V6_CLIENT_MASK / 8) as usize..].fill(0);
                Ipv6Addr::from(bytes).into()
            }
            v4 => v4,
        };
        (service, client)
    }
}

/// The oracle's parser: `Ok` if the frame is a well-formed, unfragmented TCP segment (to a
/// service, a port of 198.18.0.100 or [2001:db8::100] listed in [`target`], if `service` says
/// so); otherwise the reason the balancer must not transmit it. Trailing bytes after the IP
/// packet are Ethernet padding and allowed.
fn judge(frame: &[u8]) -> Result<Tcp, Unfit> {
    let (l3, family) = ip_offset(frame).ok_or(Unfit::NotIp)?;
    let ip = frame
        .get(l3..)
        .filter(|ip| !ip.is_empty())
        .ok_or(Unfit::IpHeaderCut)?;
    let mut tcp = match family {
        Family::Ipv4 => judge_ipv4(ip),
        Family::Ipv6 => judge_ipv6(ip),
    }?;
    tcp.l3 = l3;
    Ok(tcp)
}

fn judge_ipv4(ip: &[u8]) -> Result<Tcp, Unfit> {
    if ip[0] >> 4 != 4 {
        return Err(Unfit::IpVersion);
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    if ihl < IPV4_LEN {
        return Err(Unfit::IhlBelow5);
    }
    if ip.len() < ihl {
        return Err(Unfit::IpHeaderCut);
    }
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if tot_len > ip.len() {
        return Err(Unfit::TotLenPastFrame);
    }
    if tot_len < ihl + TCP_LEN {
        return Err(Unfit::TotLenBelowHeaders);
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & IP_MF_AND_OFFSET != 0 {
        return Err(Unfit::Fragment);
    }
    if ip[9] != 6 {
        return Err(Unfit::NotTcp);
    }
    let tcp = &ip[ihl..tot_len];
    let port = u16::from_be_bytes([tcp[2], tcp[3]]);
    let service = target(Family::Ipv4, port).filter(|_| ip[16..20] == VIP.octets());
    let data_offset = (tcp[12] >> 4) as usize * 4;
    if data_offset < TCP_LEN {
        return Err(Unfit::DataOffsetBelow5);
    }
    if ihl + data_offset > tot_len {
        return Err(Unfit::DataOffsetPastTotLen);
    }
    Ok(Tcp {
        l3: 0,
        src: tunnel::from_octets(&ip[12..16]),
        dst: tunnel::from_octets(&ip[16..20]),
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: port,
        flags: tcp[13],
        ext: false,
        service,
    })
}

/// RFC 8200 as the data path applies it: payload length not 0 and inside the frame; at most
/// [`MAX_EXT_HEADERS`] hop-by-hop, routing or destination-options headers, all inside the
/// payload, before TCP; a fragment header or any other next header is not a segment to take.
fn judge_ipv6(ip: &[u8]) -> Result<Tcp, Unfit> {
    if ip[0] >> 4 != 6 {
        return Err(Unfit::IpVersion);
    }
    if ip.len() < IPV6_LEN {
        return Err(Unfit::IpHeaderCut);
    }
    let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    if payload == 0 {
        return Err(Unfit::PayloadLenZero);
    }
    if IPV6_LEN + payload > ip.len() {
        return Err(Unfit::TotLenPastFrame);
    }
    let packet = &ip[..IPV6_LEN + payload];
    let mut next = ip[6];
    let mut at = IPV6_LEN;
    let mut walked = 0;
    while next != 6 {
        match next {
            HOPOPTS | ROUTING | DSTOPTS => {}
            FRAGMENT => return Err(Unfit::Fragment),
            _ => return Err(Unfit::NotTcp),
        }
        if walked == MAX_EXT_HEADERS {
            return Err(Unfit::TooManyExtHeaders);
        }
        walked += 1;
        if at + 2 > packet.len() {
            return Err(Unfit::TotLenBelowHeaders);
        }
        next = packet[at];
        at += (packet[at + 1] as usize + 1) * 8;
    }
    if at + TCP_LEN > packet.len() {
        return Err(Unfit::TotLenBelowHeaders);
    }
    let tcp = &packet[at..];
    let port = u16::from_be_bytes([tcp[2], tcp[3]]);
    let service = target(Family::Ipv6, port).filter(|_| ip[24..40] == VIP6.octets());
    let data_offset = (tcp[12] >> 4) as usize * 4;
    if data_offset < TCP_LEN {
        return Err(Unfit::DataOffsetBelow5);
    }
    if data_offset > tcp.len() {
        return Err(Unfit::DataOffsetPastTotLen);
    }
    Ok(Tcp {
        l3: 0,
        src: tunnel::from_octets(&ip[8..24]),
        dst: tunnel::from_octets(&ip[24..40]),
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: port,
        flags: tcp[13],
        ext: walked > 0,
        service,
    })
}

/// A broken invariant; the key the report groups violations by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Violation {
    /// Invariant 1: XDP_ABORTED or a verdict the program has no business returning.
    Verdict(u32),
    /// Invariant 2: transmitted although the oracle says it must not be.
    ForwardedUnfit(Unfit),
    /// Invariant 2, converse: a service segment passed or dropped (the verdict).
    SegmentNotForwarded(u32),
    /// Invariant 2: transmitted with more than the DSR rewrite (or to an unknown MAC).
    BadRewrite,
    /// Invariant 2: a tunnel service's segment that fits, transmitted as anything but its
    /// encapsulation for a backend of that service.
    BadEncapsulation,
    /// Invariant 2: a tunnel service's segment too big to encapsulate, transmitted as anything
    /// but the ICMP or ICMPv6 reply.
    BadTooBigReply,
    /// Invariant 2: a NAT service's segment (or a reply on one of its connections) transmitted
    /// as anything but its translation for the connection's backend (or a backend of that
    /// service, for a new connection) and port.
    BadNatTranslation,
    /// Invariant 2: a new source-NAT connection's port outside the range, or held by another
    /// connection to that backend.
    BadNatPort,
    /// Invariant 2: the input's checksums were valid, the translation's are not.
    BadNatChecksum,
    /// Invariant 2: a NAT service's segment of no connection, or one that cannot be translated
    /// (IPv6 extension headers), not dropped (the verdict).
    NatNotDropped(u32),
    /// Invariant 3.
    PassAltered,
    /// Invariant 4.
    SplitSession,
}

#[derive(Default)]
struct Tally {
    count: u64,
    examples: Vec<String>,
}

/// A tunnel service's backend: id, name, MAC and address.
type TunnelBackend = (u32, String, [u8; 6], IpAddr);

/// A NAT service's backend: name, MAC, address and port.
type NatBackend = (String, [u8; 6], IpAddr, u16);

/// What a transmitted frame of a service turned out to be.
enum Sent {
    /// Forwarded to this backend (an index into the service's backends).
    Backend(usize),
    /// The ICMP "too big" reply to the client.
    TooBig,
}

/// A NAT connection as the oracle's model has it: (service, client, client port).
type ConnKey = (Target, IpAddr, u16);

/// What the model knows of a NAT connection: what the program must keep translating its
/// segments with, and whether it is closing (a SYN then replaces it).
#[derive(Clone, Copy, Debug)]
struct Conn {
    /// Index into its service's backends.
    backend: usize,
    /// Source NAT: its port (host order); else 0.
    nat_port: u16,
    /// The source MAC of the SYN that opened it: where replies go.
    client_mac: [u8; 6],
    closing: bool,
}

/// A backend's reply as it is addressed: (backend, backend port, peer, peer port).
type ReplyKey = (IpAddr, u16, IpAddr, u16);

/// The fuzz run's state: the loaded program and what it has done so far.
struct Run {
    fixture: Fixture,
    /// The tunnel services' backends, IPv4 then IPv6, each with its address.
    tunnel_backends: [Vec<TunnelBackend>; 2],
    /// The NAT services' backends, by [`Target::nat_index`].
    nat_backends: [Vec<NatBackend>; 4],
    /// Per session: the backend (index into its service's backends) it was first forwarded to,
    /// and how often.
    sessions: HashMap<Session, (usize, u64)>,
    /// The model of the NAT connections, their keys in the order they first opened (to pick
    /// one to reply on), and how their backends' replies are addressed.
    conns: HashMap<ConnKey, Conn>,
    conn_keys: Vec<ConnKey>,
    replies: HashMap<ReplyKey, ConnKey>,
    /// Source-NAT ports held, per service and backend.
    held: HashSet<(Target, usize, u16)>,
    frames: u64,
    passed: u64,
    dropped: u64,
    forwarded: u64,
    /// Of the forwarded: by a tunnel, and answered too big.
    tunnelled: u64,
    too_big: u64,
    /// Of the forwarded: translated by NAT to a backend, and replies translated back; of the
    /// dropped, NAT segments of no connection or with extension headers.
    nat_forwarded: u64,
    nat_replies: u64,
    nat_dropped: u64,
    violations: BTreeMap<Violation, Tally>,
}

impl Run {
    fn new() -> Run {
        let mut fixture = Fixture::new(32);
        fixture.add_other_family(V6_CLIENT_MASK);
        let mut tunnel_backends = [Vec::new(), Vec::new()];
        for (i, (family, mask, params)) in [
            (Family::Ipv4, 32, TUNNEL4),
            (Family::Ipv6, V6_CLIENT_MASK, TUNNEL6),
        ]
        .into_iter()
        .enumerate()
        {
            let service =
                fixture.add_service(family, TUNNEL_PORT, 2 + i as u32, mask, Some(params));
            tunnel_backends[i] = service
                .backends
                .into_iter()
                .map(|(id, name, mac)| {
                    let entry = fixture.dataplane.backends.get(&id, 0).unwrap();
                    (id, name, mac, addr::from_words(family, entry.addr))
                })
                .collect();
        }
        let mut nat_backends: [Vec<NatBackend>; 4] = Default::default();
        for (family, mask) in [(Family::Ipv4, 32), (Family::Ipv6, V6_CLIENT_MASK)] {
            for kind in [Kind::Nat, Kind::SourceNat] {
                let target = Target { family, kind };
                let i = target.nat_index();
                let params = match kind {
                    Kind::SourceNat => NatParams::source(snat_addr(family), SNAT_FIRST, SNAT_COUNT),
                    _ => NatParams::PLAIN,
                };
                let service =
                    fixture.add_nat_service(family, target.port(), 4 + i as u32, mask, params);
                nat_backends[i] = service
                    .backends
                    .into_iter()
                    .enumerate()
                    .map(|(b, (id, name, mac))| {
                        let mut entry = fixture.dataplane.backends.get(&id, 0).unwrap();
                        // The first backend listens on a port of its own.
                        if b == 0 {
                            entry.port = (9000 + i as u16).to_be();
                            fixture.dataplane.backends.set(id, &entry, 0).unwrap();
                        }
                        let address = addr::from_words(family, entry.addr);
                        (name, mac, address, u16::from_be(entry.port))
                    })
                    .collect();
            }
        }
        Run {
            fixture,
            tunnel_backends,
            nat_backends,
            sessions: HashMap::new(),
            conns: HashMap::new(),
            conn_keys: Vec::new(),
            replies: HashMap::new(),
            held: HashSet::new(),
            frames: 0,
            passed: 0,
            dropped: 0,
            forwarded: 0,
            tunnelled: 0,
            too_big: 0,
            nat_forwarded: 0,
            nat_replies: 0,
            nat_dropped: 0,
            violations: BTreeMap::new(),
        }
    }

    /// Runs one frame through the program and checks every invariant on the result.
    /// `origin` names how the frame was made, for the report.
    fn check(&mut self, origin: &dyn Fn() -> String, input: &[u8]) {
        let (verdict, output) = self.fixture.run(input);
        self.frames += 1;
        match verdict {
            XDP_PASS => self.passed += 1,
            XDP_DROP => self.dropped += 1,
            XDP_TX => self.forwarded += 1,
            _ => {}
        }
        let mut note = String::new();
        let violation = match judge(input) {
            Err(unfit) => unfit_verdict(unfit, verdict, input, &output),
            Ok(tcp) => match tcp.service {
                None => match self.replies.get(&(tcp.src, tcp.sport, tcp.dst, tcp.dport)) {
                    Some(&key) => self.nat_reply(key, &tcp, verdict, input, &output),
                    None => unfit_verdict(Unfit::NotService, verdict, input, &output),
                },
                Some(service) if service.nat() => {
                    self.nat_segment(service, &tcp, verdict, input, &output, &mut note)
                }
                Some(service) => match verdict {
                    XDP_PASS if output != input => Some(Violation::PassAltered),
                    XDP_PASS | XDP_DROP => Some(Violation::SegmentNotForwarded(verdict)),
                    XDP_TX => match self.sent(service, input, &output) {
                        Err(violation) => Some(violation),
                        Ok(Sent::TooBig) => None,
                        Ok(Sent::Backend(backend)) => {
                            self.same_backend(tcp.session(service), backend, &mut note)
                        }
                    },
                    other => Some(Violation::Verdict(other)),
                },
            },
        };
        if let Some(violation) = violation {
            let tally = self.violations.entry(violation).or_default();
            tally.count += 1;
            if tally.examples.len() < EXAMPLES {
                let mut example = format!("{}, {} bytes", origin(), input.len());
                if !note.is_empty() {
                    write!(example, "; {note}").unwrap();
                }
                write!(example, "\n      in:  {}", hex(input)).unwrap();
                if verdict != XDP_DROP {
                    write!(example, "\n      out: {}", hex(&output)).unwrap();
                }
                tally.examples.push(example);
            }
        }
    }

    /// Invariant 4: `session` forwarded to `backend` (an index into its service's backends)
    /// must have gone there every time before.
    fn same_backend(
        &mut self,
        session: Session,
        backend: usize,
        note: &mut String,
    ) -> Option<Violation> {
        let entry = self.sessions.entry(session).or_insert((backend, 0));
        entry.1 += 1;
        let first = entry.0;
        (first != backend).then(|| {
            let names = self.backends(session.0);
            *note = format!(
                "client {} of {:?} went to {}, now to {}",
                session.1, session.0, names[first], names[backend]
            );
            Violation::SplitSession
        })
    }

    /// A segment to a NAT service: dropped if it has no connection to be translated in (or
    /// cannot be translated), else translated for its connection (a new one for a SYN); the
    /// model follows what the program must have done.
    fn nat_segment(
        &mut self,
        service: Target,
        tcp: &Tcp,
        verdict: u32,
        input: &[u8],
        output: &[u8],
        note: &mut String,
    ) -> Option<Violation> {
        let key = (service, tcp.src, tcp.sport);
        let opens = tcp.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let existing = self.conns.get(&key).copied();
        // Some(connection to keep, or None for a new one), or None: must be dropped.
        let expected = match existing {
            _ if tcp.ext => None,
            Some(conn) if !(opens && conn.closing) => Some(Some(conn)),
            _ if opens => Some(None),
            _ => None,
        };
        let Some(kept) = expected else {
            return match verdict {
                XDP_DROP => {
                    self.nat_dropped += 1;
                    None
                }
                XDP_PASS if output != input => Some(Violation::PassAltered),
                XDP_PASS | XDP_TX => Some(Violation::NatNotDropped(verdict)),
                other => Some(Violation::Verdict(other)),
            };
        };
        match verdict {
            XDP_TX => {}
            XDP_PASS if output != input => return Some(Violation::PassAltered),
            XDP_PASS | XDP_DROP => return Some(Violation::SegmentNotForwarded(verdict)),
            other => return Some(Violation::Verdict(other)),
        }
        let backends = &self.nat_backends[service.nat_index()];
        let backend = match kept {
            Some(conn) => conn.backend,
            None => match backends.iter().position(|b| output.starts_with(&b.1)) {
                Some(b) => b,
                None => return Some(Violation::BadNatTranslation),
            },
        };
        let (_, mac, address, port) = backends[backend];
        let source_nat = service.kind == Kind::SourceNat;
        let nat_port = match (kept, source_nat) {
            (_, false) => 0,
            (Some(conn), true) => conn.nat_port,
            (None, true) => {
                let sport = nat::endpoints(output, tcp.l3).0.1;
                // A port the connection replaced by this SYN held is free again.
                let freed = existing
                    .filter(|c| c.backend == backend)
                    .map(|c| c.nat_port);
                let range = SNAT_FIRST as u32..SNAT_FIRST as u32 + SNAT_COUNT;
                if !range.contains(&(sport as u32))
                    || (self.held.contains(&(service, backend, sport)) && freed != Some(sport))
                {
                    *note = format!("port {sport}");
                    return Some(Violation::BadNatPort);
                }
                sport
            }
        };
        let src = source_nat.then(|| (snat_addr(service.family), nat_port));
        let expected = nat::translated(input, tcp.l3, src, Some((address, port)), mac, OUR_MAC);
        if output != expected {
            return Some(Violation::BadNatTranslation);
        }
        if let Some(v) = checksums_carried(input, output, tcp.l3) {
            return Some(v);
        }
        self.nat_forwarded += 1;
        match kept {
            Some(_) => {
                if tcp.flags & (TCP_FIN | TCP_RST) != 0 {
                    self.conns.get_mut(&key).unwrap().closing = true;
                }
            }
            None => {
                let mut client_mac = [0; 6];
                client_mac.copy_from_slice(&input[6..12]);
                self.open(
                    key,
                    Conn {
                        backend,
                        nat_port,
                        client_mac,
                        closing: false,
                    },
                );
            }
        }
        self.same_backend(tcp.session(service), backend, note)
    }

    /// Records connection `key` (replacing the one it had, with its reply address and port).
    fn open(&mut self, key: ConnKey, conn: Conn) {
        let service = key.0;
        if let Some(old) = self.conns.insert(key, conn) {
            self.replies.remove(&self.reply_key(key, &old));
            self.held.remove(&(service, old.backend, old.nat_port));
        } else {
            self.conn_keys.push(key);
        }
        self.replies.insert(self.reply_key(key, &conn), key);
        if service.kind == Kind::SourceNat {
            self.held.insert((service, conn.backend, conn.nat_port));
        }
    }

    /// How the backend's replies on connection `key` are addressed.
    fn reply_key(&self, (service, client, port): ConnKey, conn: &Conn) -> ReplyKey {
        let (_, _, address, backend_port) = self.nat_backends[service.nat_index()][conn.backend];
        match service.kind {
            Kind::SourceNat => (
                address,
                backend_port,
                snat_addr(service.family),
                conn.nat_port,
            ),
            _ => (address, backend_port, client, port),
        }
    }

    /// A backend's reply on connection `key` of the model: translated back to its client
    /// (dropped only if it cannot be, IPv6 with extension headers).
    fn nat_reply(
        &mut self,
        key: ConnKey,
        tcp: &Tcp,
        verdict: u32,
        input: &[u8],
        output: &[u8],
    ) -> Option<Violation> {
        let (service, client, client_port) = key;
        if tcp.ext {
            return match verdict {
                XDP_DROP => {
                    self.nat_dropped += 1;
                    None
                }
                XDP_PASS if output != input => Some(Violation::PassAltered),
                _ => Some(Violation::NatNotDropped(verdict)),
            };
        }
        match verdict {
            XDP_TX => {}
            XDP_PASS if output != input => return Some(Violation::PassAltered),
            XDP_PASS | XDP_DROP => return Some(Violation::SegmentNotForwarded(verdict)),
            other => return Some(Violation::Verdict(other)),
        }
        let conn = self.conns[&key];
        let vip = match service.family {
            Family::Ipv4 => IpAddr::from(VIP),
            Family::Ipv6 => VIP6.into(),
        };
        let dst = (service.kind == Kind::SourceNat).then_some((client, client_port));
        let src = Some((vip, service.port()));
        let expected = nat::translated(input, tcp.l3, src, dst, conn.client_mac, OUR_MAC);
        if output != expected {
            return Some(Violation::BadNatTranslation);
        }
        if let Some(v) = checksums_carried(input, output, tcp.l3) {
            return Some(v);
        }
        self.nat_replies += 1;
        if tcp.flags & (TCP_FIN | TCP_RST) != 0 {
            self.conns.get_mut(&key).unwrap().closing = true;
        }
        None
    }

    /// The names of the backends of `service`.
    fn backends(&self, service: Target) -> Vec<&str> {
        match service.kind {
            Kind::Tunnel => self.tunnel_backends[service.family as usize]
                .iter()
                .map(|b| b.1.as_str())
                .collect(),
            Kind::Nat | Kind::SourceNat => self.nat_backends[service.nat_index()]
                .iter()
                .map(|b| b.0.as_str())
                .collect(),
            Kind::Dsr => self
                .dsr_backends(service.family)
                .iter()
                .map(|b| b.1.as_str())
                .collect(),
        }
    }

    /// The backends of the DSR service of `family`.
    fn dsr_backends(&self, family: Family) -> &[(u32, String, [u8; 6])] {
        match family {
            Family::Ipv4 => &self.fixture.backends,
            Family::Ipv6 => {
                &self
                    .fixture
                    .other
                    .as_ref()
                    .expect("an IPv6 service")
                    .backends
            }
        }
    }

    /// What the transmitted `output` of segment `input` to `service` is, if it is what that
    /// service may send (see invariant 2).
    fn sent(&mut self, service: Target, input: &[u8], output: &[u8]) -> Result<Sent, Violation> {
        if service.kind != Kind::Tunnel {
            return self
                .dsr_backend(service.family, input, output)
                .map(Sent::Backend)
                .ok_or(Violation::BadRewrite);
        }
        let (l3, _) = ip_offset(input).expect("a segment the oracle accepted");
        let (params, outer) = match service.family {
            Family::Ipv4 => (TUNNEL4, IPV4_LEN),
            Family::Ipv6 => (TUNNEL6, IPV6_LEN),
        };
        if tunnel::ip_len(&input[l3..]) + outer > params.mtu as usize {
            self.too_big += 1;
            return (output == tunnel::too_big_reply(input, l3, params.mtu))
                .then_some(Sent::TooBig)
                .ok_or(Violation::BadTooBigReply);
        }
        self.tunnelled += 1;
        let backends = &self.tunnel_backends[service.family as usize];
        let backend = backends
            .iter()
            .position(|b| output.starts_with(&b.2))
            .ok_or(Violation::BadEncapsulation)?;
        let (_, _, mac, dest) = backends[backend];
        // The expected header's checksum is computed (and verified) by the builder: an equal
        // output has a valid one, and the outer length is 20 or 40 + the inner IP length.
        (output == tunnel::encapsulated(input, l3, &params, mac, dest))
            .then_some(Sent::Backend(backend))
            .ok_or(Violation::BadEncapsulation)
    }

    /// The backend (index) of the `family` service a transmitted frame went to, if the program
    /// changed nothing but what L2 DSR changes: the destination MAC to one of that service's
    /// backends and the source MAC to ours.
    fn dsr_backend(&self, family: Family, input: &[u8], output: &[u8]) -> Option<usize> {
        let backend = self
            .dsr_backends(family)
            .iter()
            .position(|b| output.starts_with(&b.2))?;
        (output.len() == input.len() && output[6..12] == OUR_MAC && output[12..] == input[12..])
            .then_some(backend)
    }

    fn violation_count(&self) -> u64 {
        self.violations.values().map(|t| t.count).sum()
    }

    fn report(&self) -> String {
        let mut out = String::new();
        for (violation, tally) in &self.violations {
            writeln!(out, "{:>8}  {violation:?}", tally.count).unwrap();
            for example in &tally.examples {
                writeln!(out, "    - {example}").unwrap();
            }
        }
        writeln!(
            out,
            "fuzz: {} frames, {} passed, {} dropped ({} by NAT), {} forwarded ({} tunnelled, {} \
             answered too big, {} translated by NAT, {} NAT replies translated back; {} NAT \
             connections), {} violations",
            self.frames,
            self.passed,
            self.dropped,
            self.nat_dropped,
            self.forwarded,
            self.tunnelled,
            self.too_big,
            self.nat_forwarded,
            self.nat_replies,
            self.conn_keys.len(),
            self.violation_count()
        )
        .unwrap();
        out
    }
}

/// Invariants 2 and 3 for a frame that must not be transmitted.
fn unfit_verdict(unfit: Unfit, verdict: u32, input: &[u8], output: &[u8]) -> Option<Violation> {
    match verdict {
        XDP_PASS => (output != input).then_some(Violation::PassAltered),
        XDP_DROP => None,
        XDP_TX => Some(Violation::ForwardedUnfit(unfit)),
        other => Some(Violation::Verdict(other)),
    }
}

/// A translation's checksums: valid whenever the input's were (the translation itself was
/// compared byte for byte already; this says so from a computation from scratch).
fn checksums_carried(input: &[u8], output: &[u8], l3: usize) -> Option<Violation> {
    let at = nat::layout(input, l3);
    (nat::checksums_valid(input, &at) && !nat::checksums_valid(output, &at))
        .then_some(Violation::BadNatChecksum)
}

/// The source-NAT service's address of `family`.
fn snat_addr(family: Family) -> IpAddr {
    match family {
        Family::Ipv4 => SNAT4.into(),
        Family::Ipv6 => SNAT6.into(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            write!(s, "{b:02x}").unwrap();
            s
        })
}

/// Ways to damage a well-formed segment, in the order they are applied: header fields first
/// (at the offsets of the frame as built), then the tag changes that shift them, then the length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mutation {
    ByteFlips,
    TotLenTooLong,
    TotLenTooShort,
    TotLenRandom,
    Ihl,
    IpVersion,
    DataOffset,
    FragmentBits,
    Protocol,
    EtherType,
    /// Removes the 802.1Q tag, or adds one to an untagged frame: both stay well-formed.
    ToggleVlanTag,
    /// Adds an 802.1Q tag in front of whatever is there (QinQ if it was tagged).
    AddVlanTag,
    Truncate,
    Padding,
}

const MUTATIONS: [Mutation; 14] = [
    Mutation::ByteFlips,
    Mutation::TotLenTooLong,
    Mutation::TotLenTooShort,
    Mutation::TotLenRandom,
    Mutation::Ihl,
    Mutation::IpVersion,
    Mutation::DataOffset,
    Mutation::FragmentBits,
    Mutation::Protocol,
    Mutation::EtherType,
    Mutation::ToggleVlanTag,
    Mutation::AddVlanTag,
    Mutation::Truncate,
    Mutation::Padding,
];

/// A segment as built, with the offsets the mutations aim at.
struct Segment {
    bytes: Vec<u8>,
    family: Family,
    l3: usize,
    /// Where the IP payload starts: after IPv4 options, or after the IPv6 header (extension
    /// headers are payload).
    payload: usize,
    l4: usize,
    /// The byte that says the next header is TCP: IPv4's protocol, or the last next-header field
    /// of the IPv6 chain.
    next_at: usize,
    /// The first IPv6 extension header, if there is one.
    first_ext: Option<usize>,
}

impl Segment {
    fn build(frame: &Frame, flags: u8) -> Segment {
        // Built with its flags, so its checksums are valid until a mutation changes a byte.
        let bytes = Frame {
            tcp_flags: flags,
            ..frame.clone()
        }
        .build();
        let l3 = frame.ip_offset();
        let family = Family::of(&frame.src);
        let (payload, l4, next_at, first_ext) = match family {
            Family::Ipv4 => {
                let l4 = l3 + (bytes[l3] & 0x0f) as usize * 4;
                (l4, l4, l3 + 9, None)
            }
            Family::Ipv6 => {
                let payload = l3 + IPV6_LEN;
                let (mut at, mut next_at) = (payload, l3 + 6);
                for _ in &frame.ipv6_ext {
                    next_at = at;
                    at += (bytes[at + 1] as usize + 1) * 8;
                }
                let first_ext = (!frame.ipv6_ext.is_empty()).then_some(payload);
                (payload, at, next_at, first_ext)
            }
        };
        Segment {
            bytes,
            family,
            l3,
            payload,
            l4,
            next_at,
            first_ext,
        }
    }

    /// Sets IPv4's total length, or IPv6's payload length (what follows the 40-byte header).
    fn set_tot_len(&mut self, tot_len: u16) {
        let at = match self.family {
            Family::Ipv4 => self.l3 + 2,
            Family::Ipv6 => self.l3 + 4,
        };
        self.bytes[at..at + 2].copy_from_slice(&tot_len.to_be_bytes());
    }

    /// The length field's value that covers the frame to its end.
    fn length_to_end(&self) -> usize {
        match self.family {
            Family::Ipv4 => self.bytes.len().saturating_sub(self.l3),
            Family::Ipv6 => self.bytes.len().saturating_sub(self.payload),
        }
    }

    fn set_data_offset(&mut self, words: u8) {
        let at = self.l4 + 12;
        self.bytes[at] = words << 4 | (self.bytes[at] & 0x0f);
    }
}

/// The frame source: a seeded PRNG and the client addresses segments come from.
struct Generator {
    rng: Xoshiro256PlusPlus,
    clients: Vec<Ipv4Addr>,
    clients6: Vec<Ipv6Addr>,
}

impl Generator {
    fn new(seed: u64) -> Generator {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        // 198.18.0.0/15, the benchmarking range the rig and the fixture use.
        let clients = (0..CLIENTS)
            .map(|_| Ipv4Addr::from(0xc612_0000 | rng.random_range(0..1u32 << 17)))
            .collect();
        // 2001:db8:1::/48, in 40 /64s with random interface identifiers (as privacy addresses
        // have), so each /64 is several addresses that must share a backend.
        let clients6 = (0..CLIENTS)
            .map(|_| {
                let net = rng.random_range(0..40u16);
                Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    1,
                    net,
                    rng.random(),
                    rng.random(),
                    rng.random(),
                    rng.random(),
                )
            })
            .collect();
        Generator {
            rng,
            clients,
            clients6,
        }
    }

    /// The next frame and the names of how it was made.
    fn next(&mut self) -> (Vec<u8>, Vec<&'static str>) {
        match self.rng.random_range(0..100) {
            0..15 => (self.random_bytes(), vec!["random bytes"]),
            15..50 => (self.segment().bytes, vec!["segment"]),
            _ => {
                let mut segment = self.segment();
                let mut mutations: Vec<Mutation> = (0..self.rng.random_range(1..=3))
                    .map(|_| MUTATIONS[self.rng.random_range(0..MUTATIONS.len())])
                    .collect();
                mutations.sort();
                let mut origin = vec!["segment"];
                for mutation in mutations {
                    origin.push(self.mutate(&mut segment, mutation));
                }
                (segment.bytes, origin)
            }
        }
    }

    fn random_bytes(&mut self) -> Vec<u8> {
        let mut bytes = vec![0u8; self.rng.random_range(ETH_LEN..=200)];
        self.rng.fill(&mut bytes[..]);
        bytes
    }

    /// A backend's reply on one of `run`'s NAT connections, one frame in [`REPLY_ONE_IN`] (if
    /// there is a connection): any flags a server sends, a payload, optionally tagged, padded,
    /// with a wrong checksum, or (IPv6) with a hop-by-hop header, which must not be translated.
    fn reply(&mut self, run: &Run) -> Option<(Vec<u8>, Vec<&'static str>)> {
        let rng = &mut self.rng;
        if run.conn_keys.is_empty() || rng.random_range(0..REPLY_ONE_IN) != 0 {
            return None;
        }
        let key = run.conn_keys[rng.random_range(0..run.conn_keys.len())];
        let conn = &run.conns[&key];
        let (backend, backend_port, peer, peer_port) = run.reply_key(key, conn);
        let mut frame = Frame::tcp_syn(backend, peer, peer_port);
        frame.src_port = backend_port;
        frame.src_mac = run.nat_backends[key.0.nat_index()][conn.backend].1;
        frame.dst_mac = OUR_MAC;
        frame.tcp_flags =
            [SYN_ACK, ACK, ACK, PSH_ACK, PSH_ACK, FIN_ACK, RST][rng.random_range(0..7)];
        frame.payload = vec![0u8; rng.random_range(0..=64)];
        rng.fill(&mut frame.payload[..]);
        let mut origin = vec!["reply"];
        if rng.random_bool(0.25) {
            frame.vlan = Some(rng.random_range(1..4095));
        }
        if key.0.family == Family::Ipv6 && rng.random_bool(0.05) {
            frame.ipv6_ext = vec![(HOPOPTS, vec![1, 4, 0, 0, 0, 0])];
            origin.push("hop-by-hop header");
        }
        let mut bytes = frame.build();
        if rng.random_bool(0.1) {
            // A corrupted payload byte: the checksum no longer matches.
            let at = bytes.len() - 1;
            bytes[at] ^= 0x40;
            origin.push("wrong checksum");
        }
        if rng.random_bool(0.1) {
            bytes.resize(bytes.len().max(ETH_MIN_FRAME) + rng.random_range(0..8), 0);
            origin.push("padding");
        }
        Some((bytes, origin))
    }

    /// A segment to a service from one of the clients, IPv4 or IPv6, DSR, tunnel, NAT or
    /// source NAT (a quarter each), in one of the shapes real traffic has: any flags,
    /// optionally VLAN-tagged, with IPv4 options or IPv6 extension headers, TCP options,
    /// payload; its checksums valid. Well formed, except that one IPv6 segment in 20 carries
    /// one extension header more than the data path follows.
    fn segment(&mut self) -> Segment {
        let rng = &mut self.rng;
        let mut frame = if rng.random_bool(0.5) {
            let client = self.clients[rng.random_range(0..self.clients.len())];
            let mut frame = Frame::tcp_syn(client, VIP, PORT);
            if rng.random_bool(0.25) {
                frame.ip_options = vec![0u8; rng.random_range(1..=40)];
                rng.fill(&mut frame.ip_options[..]);
            }
            frame
        } else {
            let client = self.clients6[rng.random_range(0..self.clients6.len())];
            let mut frame = Frame::tcp_syn(client, VIP6, PORT);
            let count =
                [0, 0, 0, 1, 1, 2, 3, MAX_EXT_HEADERS, MAX_EXT_HEADERS + 1][rng.random_range(0..9)];
            frame.ipv6_ext = (0..count)
                .map(|_| {
                    let kind = [HOPOPTS, ROUTING, DSTOPTS][rng.random_range(0..3)];
                    let mut body = vec![0u8; 6 + 8 * rng.random_range(0..4)];
                    rng.fill(&mut body[..]);
                    (kind, body)
                })
                .collect();
            frame
        };
        // A quarter each to DSR, tunnel, NAT and source NAT; a NAT service's segments come
        // from a few ports of each client, so its connections see several segments.
        frame.dst_port = [PORT, TUNNEL_PORT, NAT_PORT, SNAT_PORT][rng.random_range(0..4)];
        frame.src_port = match frame.dst_port {
            NAT_PORT | SNAT_PORT => 40000 + rng.random_range(0..NAT_CLIENT_PORTS),
            _ => rng.random_range(1024..=u16::MAX),
        };
        if rng.random_bool(0.25) {
            frame.vlan = Some(rng.random_range(1..4095));
        }
        let flags = [SYN, ACK, FIN_ACK, RST, PSH_ACK][rng.random_range(0..5)];
        frame.payload = vec![0u8; rng.random_range(0..=64)];
        rng.fill(&mut frame.payload[..]);
        let mut segment = Segment::build(&frame, flags);
        // TCP options: count the first words of the payload as part of the header.
        if rng.random_bool(0.25) {
            let room = (frame.payload.len() / 4).min(10) as u8;
            segment.set_data_offset(5 + rng.random_range(0..=room));
        }
        segment
    }

    /// Applies one mutation; returns its name.
    fn mutate(&mut self, segment: &mut Segment, mutation: Mutation) -> &'static str {
        let rng = &mut self.rng;
        let (l3, l4, family) = (segment.l3, segment.l4, segment.family);
        let (next_at, first_ext, payload) = (segment.next_at, segment.first_ext, segment.payload);
        let fits = segment.length_to_end() as u16;
        let bytes = &mut segment.bytes;
        let len = bytes.len();
        match mutation {
            Mutation::ByteFlips => {
                let headers_end = len.min(l4 + TCP_LEN);
                for _ in 0..rng.random_range(1..=4) {
                    bytes[rng.random_range(0..headers_end)] ^= rng.random_range(1..=u8::MAX);
                }
                "byte flips in the headers"
            }
            Mutation::TotLenTooLong => {
                segment.set_tot_len(rng.random_range(fits + 1..=fits + 1500));
                "tot_len past the frame"
            }
            Mutation::TotLenTooShort => {
                let start = match family {
                    Family::Ipv4 => l3,
                    Family::Ipv6 => payload,
                };
                let headers = (l4 - start + TCP_LEN) as u16;
                segment.set_tot_len(rng.random_range(0..headers));
                "tot_len below the headers"
            }
            Mutation::TotLenRandom => {
                segment.set_tot_len(rng.random());
                "tot_len random"
            }
            Mutation::Ihl if family == Family::Ipv4 => {
                bytes[l3] = 0x40 | rng.random_range(0..16u8);
                "IHL random"
            }
            Mutation::Ihl => match first_ext {
                Some(at) => {
                    bytes[at + 1] = rng.random();
                    "extension header length random"
                }
                None => {
                    bytes[l3 + 6] = [HOPOPTS, ROUTING, DSTOPTS][rng.random_range(0..3)];
                    "extension header made of the TCP header"
                }
            },
            Mutation::IpVersion => {
                bytes[l3] = rng.random_range(0..16u8) << 4 | (bytes[l3] & 0x0f);
                "IP version random"
            }
            Mutation::DataOffset => {
                segment.set_data_offset(rng.random_range(0..16));
                "data offset random"
            }
            Mutation::FragmentBits if family == Family::Ipv6 => {
                // What follows is read as a fragment header.
                bytes[next_at] = FRAGMENT;
                "fragment header"
            }
            Mutation::FragmentBits => {
                let dont_fragment = 0x4000 * rng.random_range(0..2u16);
                let frag = match rng.random_range(0..4) {
                    0 => 0x2000, // first fragment: MF, offset 0
                    1 => rng.random_range(1..0x2000),
                    2 => 0x2000 | rng.random_range(1..0x2000),
                    _ => rng.random(),
                } | dont_fragment;
                bytes[l3 + 6..l3 + 8].copy_from_slice(&frag.to_be_bytes());
                "fragment bits"
            }
            Mutation::Protocol => {
                bytes[next_at] = [1, 17, 58, FRAGMENT, 59, rng.random()][rng.random_range(0..6)];
                "protocol"
            }
            Mutation::EtherType => {
                let ether_type = [
                    ETH_P_IPV6,
                    ETH_P_IPV4,
                    0x0806,
                    0x88a8,
                    ETH_P_8021Q,
                    rng.random(),
                ][rng.random_range(0..6)];
                bytes[l3 - 2..l3].copy_from_slice(&ether_type.to_be_bytes());
                "EtherType"
            }
            Mutation::ToggleVlanTag => {
                if l3 == ETH_LEN {
                    add_vlan_tag(bytes, rng.random_range(1..4095));
                    "VLAN tag added"
                } else {
                    bytes.drain(12..16);
                    "VLAN tag removed"
                }
            }
            Mutation::AddVlanTag => {
                add_vlan_tag(bytes, rng.random_range(1..4095));
                "outer VLAN tag"
            }
            Mutation::Truncate => {
                bytes.truncate(rng.random_range(ETH_LEN..len.max(ETH_LEN + 1)));
                "truncated"
            }
            Mutation::Padding => {
                let pad = rng.random_range(1..=64);
                if rng.random_bool(0.5) {
                    bytes.resize(len + pad, 0);
                } else {
                    bytes.extend((0..pad).map(|_| rng.random::<u8>()));
                }
                "padding"
            }
        }
    }
}

/// Inserts an 802.1Q tag after the MACs, in front of the EtherType or tag already there.
fn add_vlan_tag(bytes: &mut Vec<u8>, vlan_id: u16) {
    let tag = [ETH_P_8021Q.to_be_bytes(), vlan_id.to_be_bytes()].concat();
    bytes.splice(12..12, tag);
}

/// The faults the issue reports, and truncation at every length, run before the random stream.
fn explicit_cases() -> Vec<(String, Vec<u8>)> {
    let client = Ipv4Addr::new(198, 18, 1, 1);
    let syn = || Segment::build(&Frame::tcp_syn(client, VIP, PORT), SYN);
    let with_payload = |len: usize| {
        let mut frame = Frame::tcp_syn(client, VIP, PORT);
        frame.payload = vec![0xab; len];
        Segment::build(&frame, PSH_ACK)
    };
    let mut cases = Vec::new();
    let mut doff_4 = syn();
    doff_4.set_data_offset(4);
    cases.push(("issue: TCP data offset 4".to_string(), doff_4.bytes));
    let mut doff_15 = syn();
    doff_15.set_data_offset(15);
    cases.push((
        "issue: data offset 15 in a 40-byte IP packet".to_string(),
        doff_15.bytes,
    ));
    // 14 + 20 + 20 + 20 bytes of payload = 74.
    let mut long = with_payload(20);
    long.set_tot_len(1400);
    cases.push((
        "issue: tot_len 1400 in a 74-byte frame".to_string(),
        long.bytes,
    ));
    let mut short = with_payload(20);
    short.set_tot_len(30);
    cases.push((
        "issue: tot_len 30 in a 74-byte frame".to_string(),
        short.bytes,
    ));
    let cut = syn().bytes[..ETH_LEN + IPV4_LEN + 6].to_vec();
    cases.push((
        "issue: frame cut 6 bytes into the TCP header".to_string(),
        cut.clone(),
    ));
    // What a NIC delivers for a frame that short: the same bytes padded to Ethernet's minimum,
    // so the TCP header's missing bytes read as zeros; once as cut, once as an IP packet that
    // really ends 6 bytes into its TCP header (tot_len 26).
    let mut padded = cut;
    padded.resize(ETH_MIN_FRAME, 0);
    cases.push((
        "issue: frame cut 6 bytes into the TCP header, padded to 60 bytes".to_string(),
        padded.clone(),
    ));
    padded[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&(IPV4_LEN as u16 + 6).to_be_bytes());
    cases.push((
        "issue: IP packet ending 6 bytes into the TCP header, padded to 60 bytes".to_string(),
        padded,
    ));
    let mut tagged = Frame::tcp_syn(client, VIP, PORT);
    tagged.vlan = Some(7);
    tagged.ip_options = vec![1; 8];
    tagged.payload = vec![0xcd; 12];
    for (name, whole) in [
        ("SYN", syn().bytes),
        (
            "tagged SYN with options and payload",
            Segment::build(&tagged, SYN).bytes,
        ),
    ] {
        for len in ETH_LEN..whole.len() {
            cases.push((
                format!("{name} truncated to {len} bytes"),
                whole[..len].to_vec(),
            ));
        }
    }
    cases.extend(explicit_ipv6_cases());
    cases.extend(explicit_tunnel_cases());
    cases
}

/// Tunnel services: a SYN of each family truncated at every length, and segments at the MTU's
/// edge (the largest that fits, one byte more), untagged, tagged and padded.
fn explicit_tunnel_cases() -> Vec<(String, Vec<u8>)> {
    let mut cases = Vec::new();
    for (client, params, headers) in [
        (
            IpAddr::from(Ipv4Addr::new(198, 18, 1, 2)),
            TUNNEL4,
            IPV4_LEN + TCP_LEN,
        ),
        (
            Ipv6Addr::new(0x2001, 0xdb8, 1, 7, 0, 0, 0, 2).into(),
            TUNNEL6,
            IPV6_LEN + TCP_LEN,
        ),
    ] {
        let vip = match client {
            IpAddr::V4(_) => IpAddr::from(VIP),
            IpAddr::V6(_) => VIP6.into(),
        };
        let outer = headers - TCP_LEN;
        let fits = params.mtu as usize - outer - headers;
        let whole = Segment::build(&Frame::tcp_syn(client, vip, TUNNEL_PORT), SYN).bytes;
        for len in ETH_LEN..whole.len() {
            cases.push((
                format!("tunnel SYN from {client} truncated to {len} bytes"),
                whole[..len].to_vec(),
            ));
        }
        for payload in [fits, fits + 1] {
            for vlan in [None, Some(5)] {
                let mut frame = Frame::tcp_syn(client, vip, TUNNEL_PORT);
                frame.payload = vec![0x5a; payload];
                frame.vlan = vlan;
                let bytes = Segment::build(&frame, PSH_ACK).bytes;
                let mut padded = bytes.clone();
                padded.resize(bytes.len() + 9, 0);
                let name = format!("tunnel segment from {client}, {payload} bytes, {vlan:?}");
                cases.push((name.clone(), bytes));
                cases.push((format!("{name}, padded"), padded));
            }
        }
    }
    cases
}

/// IPv6: truncation at every boundary of a chain of extension headers, the IPv4 VIP's bytes
/// where an IPv4 destination would sit, and the IPv4 segment relabelled IPv6 and back.
fn explicit_ipv6_cases() -> Vec<(String, Vec<u8>)> {
    let client = Ipv6Addr::new(0x2001, 0xdb8, 1, 7, 0, 0, 0, 1);
    let mut cases = Vec::new();
    let mut chained = Frame::tcp_syn(client, VIP6, PORT);
    chained.ipv6_ext = vec![
        (HOPOPTS, vec![1; 6]),
        (ROUTING, vec![2; 14]),
        (DSTOPTS, vec![3; 6]),
    ];
    chained.payload = vec![0xef; 8];
    for (name, whole) in [
        (
            "IPv6 SYN",
            Segment::build(&Frame::tcp_syn(client, VIP6, PORT), SYN).bytes,
        ),
        (
            "IPv6 SYN behind three extension headers",
            Segment::build(&chained, SYN).bytes,
        ),
    ] {
        for len in ETH_LEN..whole.len() {
            cases.push((
                format!("{name} truncated to {len} bytes"),
                whole[..len].to_vec(),
            ));
            // The same cut with the payload length made to fit the cut frame, so the parser
            // meets the cut header itself rather than a length past the frame.
            if len > ETH_LEN + IPV6_LEN {
                let mut fitted = whole[..len].to_vec();
                let fits = (len - ETH_LEN - IPV6_LEN) as u16;
                fitted[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&fits.to_be_bytes());
                cases.push((format!("{name} cut to {len} bytes, length fitted"), fitted));
            }
        }
    }
    // An IPv6 segment whose bytes 16..20 (an IPv4 header's destination) hold the IPv4 VIP, to
    // a destination that is no service: passed.
    let v4 = VIP.octets();
    let source = Ipv6Addr::from([
        0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 1, v4[0], v4[1], v4[2], v4[3], 0, 0, 0, 1,
    ]);
    let lookalike = Frame::tcp_syn(source, "2001:db8::200".parse::<Ipv6Addr>().unwrap(), PORT);
    cases.push((
        "IPv6 carrying the IPv4 VIP where an IPv4 destination would be".to_string(),
        Segment::build(&lookalike, SYN).bytes,
    ));
    let mut relabelled = Segment::build(&lookalike, SYN).bytes;
    relabelled[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
    cases.push(("that IPv6 segment labelled IPv4".to_string(), relabelled));
    let mut v4_as_v6 = Segment::build(
        &Frame::tcp_syn(Ipv4Addr::new(198, 18, 1, 1), VIP, PORT),
        SYN,
    )
    .bytes;
    v4_as_v6[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    cases.push(("an IPv4 SYN labelled IPv6".to_string(), v4_as_v6));
    cases
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |value| {
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number"))
    })
}

#[test]
fn random_and_malformed_frames_keep_every_invariant() {
    let frames = env_u64("SLB_FUZZ_FRAMES", DEFAULT_FRAMES);
    let seed = env_u64("SLB_FUZZ_SEED", DEFAULT_SEED);
    let started = Instant::now();
    let mut run = Run::new();
    for (name, frame) in explicit_cases() {
        run.check(&|| name.clone(), &frame);
    }
    let mut generator = Generator::new(seed);
    while run.frames < frames {
        let (frame, origin) = match generator.reply(&run) {
            Some(reply) => reply,
            None => generator.next(),
        };
        run.check(&|| origin.join(" + "), &frame);
    }
    let elapsed = started.elapsed();
    let repeated = run.sessions.values().filter(|s| s.1 >= 2).count();
    print!("{}", run.report());
    println!(
        "fuzz run: seed {seed}, {:.1} s ({:.1} us/frame), {repeated} clients forwarded twice or more",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / run.frames as f64
    );
    assert!(
        run.forwarded > 0,
        "no frame was forwarded: the fuzz checked nothing"
    );
    assert_eq!(
        run.violation_count(),
        0,
        "the XDP program broke its invariants (seed {seed}); see the report above"
    );
}
