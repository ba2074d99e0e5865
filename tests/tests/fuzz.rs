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
//! 2. XDP_TX only for a well-formed, unfragmented TCP segment to the service ([`judge`]), and
//!    then only the DSR rewrite: destination MAC a backend's, source MAC ours, the length and
//!    every byte from offset 12 on unchanged. Conversely every such segment is transmitted: all
//!    three backends are up, so passing or dropping one loses a client's packet;
//! 3. XDP_PASS leaves the frame exactly as it came (XDP_DROP output is not looked at);
//! 4. a client address forwarded more than once always reaches the same backend: the pool does
//!    not change during the run and the service's client mask is /32, so anything else is a
//!    split session. Checked from the output MACs, not the stick table, to keep a frame cheap.
//!
//! The seed is fixed so a failure reproduces; `SLB_FUZZ_SEED` picks another stream and
//! `SLB_FUZZ_FRAMES` the number of frames (default 100,000; `cargo xtask bench` runs a million in
//! a release build). Violations are collected, not fatal at once, so one run shows every kind;
//! `--nocapture` shows the summary of a passing run too.

use rand::{RngExt, SeedableRng, rngs::Xoshiro256PlusPlus};
use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write,
    net::Ipv4Addr,
    time::Instant,
};
use sticky_lb_tests::{
    fixture::{ACK, FIN_ACK, Fixture, OUR_MAC, PORT, RST, SYN, VIP, XDP_DROP, XDP_PASS, XDP_TX},
    packet::{ETH_LEN, Frame, IPV4_LEN, TCP_LEN},
};

const DEFAULT_FRAMES: u64 = 100_000;
const DEFAULT_SEED: u64 = 0x5eed_f0cc_1a55_0001;
/// Distinct client addresses the segments come from: few enough that each is forwarded many
/// times (invariant 4 needs repeats), many enough to spread over all three backends.
const CLIENTS: usize = 300;
/// Examples kept per kind of violation; the count says how many more there were.
const EXAMPLES: usize = 3;

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const IP_MF_AND_OFFSET: u16 = 0x3fff;
const PSH_ACK: u8 = 0x18;
/// Ethernet's minimum frame (without FCS): shorter frames arrive padded with zeros.
const ETH_MIN_FRAME: usize = 60;

/// Why the oracle says a frame must not be transmitted: the first rule it breaks, in the order
/// a parser meets the fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Unfit {
    /// No IPv4 EtherType after at most one 802.1Q tag (or the frame ends inside the tag).
    NotIpv4,
    /// The frame ends inside the IPv4 header (IHL*4 bytes).
    IpHeaderCut,
    IpVersionNot4,
    IhlBelow5,
    /// tot_len reaches past the end of the frame.
    TotLenPastFrame,
    /// tot_len leaves no room for the IPv4 header and a minimal TCP header.
    TotLenBelowHeaders,
    Fragment,
    NotTcp,
    /// Another address or port: some other host's traffic.
    NotService,
    DataOffsetBelow5,
    /// The TCP header (data offset * 4) reaches past tot_len.
    DataOffsetPastTotLen,
}

/// Offset of the IPv4 header: after the MACs, at most one 802.1Q tag and an IPv4 EtherType.
fn ip_offset(frame: &[u8]) -> Option<usize> {
    let ether_type_at = |offset: usize| {
        frame
            .get(offset..offset + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let mut offset = 12;
    if ether_type_at(offset)? == ETH_P_8021Q {
        offset += 4;
    }
    (ether_type_at(offset)? == ETH_P_IPV4).then_some(offset + 2)
}

/// The oracle: `Ok(client address)` if the frame is a well-formed, unfragmented TCP segment to
/// 198.18.0.100:80, which the balancer must transmit; otherwise the reason it must not.
/// Trailing bytes after tot_len are Ethernet padding and allowed.
fn judge(frame: &[u8]) -> Result<[u8; 4], Unfit> {
    let l3 = ip_offset(frame).ok_or(Unfit::NotIpv4)?;
    let ip = frame
        .get(l3..)
        .filter(|ip| !ip.is_empty())
        .ok_or(Unfit::IpHeaderCut)?;
    if ip[0] >> 4 != 4 {
        return Err(Unfit::IpVersionNot4);
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
    if ip[16..20] != VIP.octets() || u16::from_be_bytes([tcp[2], tcp[3]]) != PORT {
        return Err(Unfit::NotService);
    }
    let data_offset = (tcp[12] >> 4) as usize * 4;
    if data_offset < TCP_LEN {
        return Err(Unfit::DataOffsetBelow5);
    }
    if ihl + data_offset > tot_len {
        return Err(Unfit::DataOffsetPastTotLen);
    }
    Ok([ip[12], ip[13], ip[14], ip[15]])
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

/// The fuzz run's state: the loaded program and what it has done so far.
struct Run {
    fixture: Fixture,
    /// Per client address: the backend (index) it was first forwarded to, and how often.
    sessions: HashMap<[u8; 4], (usize, u64)>,
    frames: u64,
    passed: u64,
    dropped: u64,
    forwarded: u64,
    violations: BTreeMap<Violation, Tally>,
}

impl Run {
    fn new() -> Run {
        Run {
            fixture: Fixture::new(32),
            sessions: HashMap::new(),
            frames: 0,
            passed: 0,
            dropped: 0,
            forwarded: 0,
            violations: BTreeMap::new(),
        }
    }

    /// Runs one frame through the program and checks every invariant on the result.
    /// `origin` names how the frame was made, for the report.
    fn check(&mut self, origin: &dyn Fn() -> String, input: &[u8]) {
        let (verdict, output) = self.fixture.run(input);
        self.frames += 1;
        let expected = judge(input);
        let mut note = String::new();
        let violation = match verdict {
            XDP_PASS => {
                self.passed += 1;
                if output != input {
                    Some(Violation::PassAltered)
                } else {
                    expected
                        .ok()
                        .map(|_| Violation::SegmentNotForwarded(verdict))
                }
            }
            XDP_DROP => {
                self.dropped += 1;
                expected
                    .ok()
                    .map(|_| Violation::SegmentNotForwarded(verdict))
            }
            XDP_TX => {
                self.forwarded += 1;
                match (expected, self.dsr_backend(input, &output)) {
                    (Err(unfit), _) => Some(Violation::ForwardedUnfit(unfit)),
                    (Ok(_), None) => Some(Violation::BadRewrite),
                    (Ok(client), Some(backend)) => {
                        let session = self.sessions.entry(client).or_insert((backend, 0));
                        session.1 += 1;
                        let first = session.0;
                        (first != backend).then(|| {
                            note = format!(
                                "client {} went to {}, now to {}",
                                Ipv4Addr::from(client),
                                self.fixture.backends[first].1,
                                self.fixture.backends[backend].1
                            );
                            Violation::SplitSession
                        })
                    }
                }
            }
            other => Some(Violation::Verdict(other)),
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

    /// The backend (index) a transmitted frame went to, if the program changed nothing but what
    /// L2 DSR changes: the destination MAC to a backend's and the source MAC to ours.
    fn dsr_backend(&self, input: &[u8], output: &[u8]) -> Option<usize> {
        let backend = self
            .fixture
            .backends
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
            "fuzz: {} frames, {} passed, {} dropped, {} forwarded, {} violations",
            self.frames,
            self.passed,
            self.dropped,
            self.forwarded,
            self.violation_count()
        )
        .unwrap();
        out
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
    l3: usize,
    l4: usize,
}

impl Segment {
    fn build(frame: &Frame, flags: u8) -> Segment {
        let mut bytes = frame.build();
        let l3 = frame.ip_offset();
        let l4 = l3 + (bytes[l3] & 0x0f) as usize * 4;
        // Frame builds a SYN; the checksum is left as is (XDP never checks it).
        bytes[l4 + 13] = flags;
        Segment { bytes, l3, l4 }
    }

    fn set_tot_len(&mut self, tot_len: u16) {
        self.bytes[self.l3 + 2..self.l3 + 4].copy_from_slice(&tot_len.to_be_bytes());
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
}

impl Generator {
    fn new(seed: u64) -> Generator {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        // 198.18.0.0/15, the benchmarking range the rig and the fixture use.
        let clients = (0..CLIENTS)
            .map(|_| Ipv4Addr::from(0xc612_0000 | rng.random_range(0..1u32 << 17)))
            .collect();
        Generator { rng, clients }
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

    /// A well-formed segment to the service from one of the clients, in one of the shapes real
    /// traffic has: any flags, optionally VLAN-tagged, with IPv4 options, TCP options, payload.
    fn segment(&mut self) -> Segment {
        let rng = &mut self.rng;
        let client = self.clients[rng.random_range(0..self.clients.len())];
        let mut frame = Frame::tcp_syn(client, VIP, PORT);
        frame.src_port = rng.random_range(1024..=u16::MAX);
        if rng.random_bool(0.25) {
            frame.vlan = Some(rng.random_range(1..4095));
        }
        if rng.random_bool(0.25) {
            frame.ip_options = vec![0u8; rng.random_range(1..=40)];
            rng.fill(&mut frame.ip_options[..]);
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
        let (l3, l4) = (segment.l3, segment.l4);
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
                let fits = (len - l3) as u16;
                segment.set_tot_len(rng.random_range(fits + 1..=fits + 1500));
                "tot_len past the frame"
            }
            Mutation::TotLenTooShort => {
                let headers = (l4 - l3 + TCP_LEN) as u16;
                segment.set_tot_len(rng.random_range(0..headers));
                "tot_len below the headers"
            }
            Mutation::TotLenRandom => {
                segment.set_tot_len(rng.random());
                "tot_len random"
            }
            Mutation::Ihl => {
                bytes[l3] = 0x40 | rng.random_range(0..16u8);
                "IHL random"
            }
            Mutation::IpVersion => {
                bytes[l3] = rng.random_range(0..16u8) << 4 | (bytes[l3] & 0x0f);
                "IP version random"
            }
            Mutation::DataOffset => {
                segment.set_data_offset(rng.random_range(0..16));
                "data offset random"
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
                bytes[l3 + 9] = [1, 17, rng.random()][rng.random_range(0..3)];
                "protocol"
            }
            Mutation::EtherType => {
                let ether_type =
                    [0x86dd, 0x0806, 0x88a8, ETH_P_8021Q, rng.random()][rng.random_range(0..5)];
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
        let (frame, origin) = generator.next();
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
