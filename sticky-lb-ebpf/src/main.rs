//! sticky-lb's XDP data path.
//!
//! For each frame: parse Ethernet, IPv4 or IPv6, and TCP; if it is a well-formed segment addressed to a
//! configured service, send it to its connection's backend (connection table), or for a new
//! connection to its client's backend (stick table), or choose one with the service's policy and
//! record it; send the frame to that backend by the service's forwarding mode (L2 DSR: new MACs;
//! tunnel: an outer IP header in front) and transmit it. Everything else is passed to the kernel
//! untouched so the host keeps working.
#![no_std]
#![no_main]
// Atomic add and compare-and-exchange on the BPF target (see atomic.rs).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod atomic;
mod bench;
mod conntrack;
mod consts;
mod csum;
mod events;
mod expire;
mod forward;
mod frame;
mod guard;
mod icmp;
mod maps;
mod nat;
mod parse;
mod select;
mod stats;

use aya_ebpf::{
    Global, bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, macros::xdp,
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use conntrack::Opened;
use consts::{TCP_FIN, TCP_RST};
use maps::{SERVICE_INDEX, SERVICES};
use network_types::eth::EthHdr;
use parse::{Parsed, Segment};
use select::NoBackend;
use sticky_lb_common::{
    Backend, BackendId, Counter, FEATURE_NAT, Family, FlowKey, FlowState, Forwarding, NatEntry,
    NatKey, PROTO_TCP, SERVICE_INDEX_PROBES, SERVICE_INDEX_SLOTS, SERVICE_INDEX_TOMBSTONE,
    SERVICE_SOURCE_NAT, Service, StickEntry, StickKey, addr::masked, hash::service_slot,
    refresh_interval_ns,
};

/// MAC address of the interface the program is attached to; the controller sets it at load time
/// (read-only data, so the verifier treats it as a constant).
#[unsafe(no_mangle)]
static IFACE_MAC: Global<[u8; 6]> = Global::new([0; 6]);

// Inlined into the entry the macro generates: grown past LLVM's threshold, the body would
// otherwise be a BPF-to-BPF call on every packet (a few ns of frame set-up).
#[xdp]
#[inline(always)]
pub fn sticky_lb(ctx: XdpContext) -> u32 {
    try_sticky_lb(&ctx)
}

#[inline(always)]
fn try_sticky_lb(ctx: &XdpContext) -> u32 {
    let packet = match parse::tcp_segment(ctx) {
        Parsed::Tcp(packet) => packet,
        Parsed::NotIp => return pass(Counter::PassNotIp),
        Parsed::NotTcp => return pass(Counter::PassNotService),
        Parsed::Fragment => return pass(Counter::PassFragment),
        Parsed::Truncated => return pass(Counter::PassTruncated),
        Parsed::BadIpHeader => return pass(Counter::PassBadIpHeader),
        Parsed::BadTcpHeader => return pass(Counter::PassBadTcpHeader),
        Parsed::TooManyExtHeaders => return pass(Counter::PassIpv6ExtHeaders),
        Parsed::TooBigError(error) => return too_big_error(ctx, &error),
    };
    let service = match find_service(&packet.daddr, packet.dport, packet.family) {
        Lookup::Service(service) => service,
        Lookup::NotService => return not_for_a_service(ctx, &packet),
        Lookup::Corrupt => {
            // XDP_ABORTED also fires the xdp_exception tracepoint, so the bug is visible.
            stats::count(Counter::Aborted);
            return xdp_action::XDP_ABORTED;
        }
    };
    // A tunnel service's segment that will not fit once encapsulated is answered before it is
    // placed: it is not delivered, so it must leave no trace (a FIN closing a connection whose
    // last data never arrived, a SYN with data opening a connection and placing a new client);
    // the client sends it again in smaller segments, and those are placed as usual.
    if service.forwarding == Forwarding::Tunnel as u8 {
        if let Some(verdict) = answer_too_big(ctx, service) {
            return verdict;
        }
    }
    // Likewise a NAT service's segment that cannot be translated is dropped before it is
    // placed (see nat::translatable): no connection, no count, no source-NAT port.
    if service.forwarding == Forwarding::Nat as u8
        && !nat::translatable(ctx, nat::is_v6(service.family))
    {
        return drop(Counter::DropNatExtHeaders);
    }
    match place(ctx, &packet, service) {
        Ok(placed) => forward(ctx, packet.eth, service, &placed),
        Err(verdict) => verdict,
    }
}

/// Where a segment goes: the backend, and its connection's source-NAT port (network order; 0
/// without source NAT).
struct Placed {
    id: BackendId,
    backend: &'static Backend,
    nat_port: u16,
}

/// A TCP segment not addressed to a service: a backend's reply on a NAT connection (translated
/// back and sent to the client), or the host's own traffic (passed). The reply table is looked
/// up only while a NAT service exists, so pass-through traffic pays one array read otherwise.
#[inline(always)]
fn not_for_a_service(ctx: &XdpContext, packet: &Segment) -> u32 {
    match maps::FEATURES.get(0) {
        Some(&features) if features & FEATURE_NAT != 0 => {}
        _ => return pass(Counter::PassNotService),
    }
    let key = NatKey {
        backend: packet.saddr,
        peer: packet.daddr,
        backend_port: packet.sport,
        peer_port: packet.dport,
        family: packet.family as u32,
    };
    let Some(entry) = maps::NAT.get_ptr(&key) else {
        return pass(Counter::PassNotService);
    };
    // SAFETY: a live LRU value, copied (another CPU may replace it).
    let entry = unsafe { *entry };
    let v6 = nat::is_v6(packet.family);
    // A reply that cannot be translated changes nothing (its FIN ends no connection).
    if !nat::translatable(ctx, v6) {
        return drop(Counter::DropNatExtHeaders);
    }
    // Only a reply of a connection still open on the backend that sent it is translated.
    let flow_key = FlowKey {
        service: entry.service,
        client: entry.client,
        client_port: entry.client_port,
        _pad: 0,
    };
    let Some(flow) = conntrack::lookup(&flow_key) else {
        return drop(Counter::DropNatStaleReply);
    };
    // SAFETY: a live hash-map value; backend and NAT port are written once, at insert.
    let (id, nat_port) = unsafe { ((*flow).backend, (*flow).nat_port) };
    let source_nat = key.peer != entry.client || key.peer_port != entry.client_port;
    let from_backend = match maps::BACKENDS.get(id) {
        Some(b) => {
            id == entry.backend
                && b.service == entry.service
                && b.addr == packet.saddr
                && b.port == packet.sport
        }
        None => false,
    };
    if !from_backend || (source_nat && nat_port != packet.dport) {
        return drop(Counter::DropNatStaleReply);
    }
    // The server's FIN or RST ends the connection too (NAT sees both halves, like IPVS).
    if packet.flags & (TCP_FIN | TCP_RST) != 0 {
        conntrack::finish(flow, &flow_key);
    }
    conntrack::seen(flow, unsafe { bpf_ktime_get_coarse_ns() });
    let vip = nat::Endpoint {
        addr: entry.vip,
        port: entry.vip_port,
    };
    let client = nat::Endpoint {
        addr: entry.client,
        port: entry.client_port,
    };
    let back = nat::Translation {
        src: vip,
        dst: client,
        change_src: true,
        change_dst: source_nat,
    };
    match nat::rewrite(ctx, v6, &back, entry.client_mac, IFACE_MAC.load()) {
        Ok(()) => {
            stats::count(Counter::TxNatReply);
            xdp_action::XDP_TX
        }
        Err(nat::NotTranslated::ExtHeaders) => drop(Counter::DropNatExtHeaders),
        Err(nat::NotTranslated::Truncated) => drop(Counter::DropResizeFailed),
    }
}

/// The backend a segment of `service` goes to: its connection's, else its client's stick
/// entry's, else the policy's choice (recorded). `Err` holds the verdict when there is none.
/// One call site of [`forward`] for every way here keeps the verifier's paths few.
#[inline(always)]
fn place(ctx: &XdpContext, packet: &Segment, service: &'static Service) -> Result<Placed, u32> {
    let client = masked(packet.saddr, service.client_mask);
    // The coarse clock (jiffies resolution) is plenty for refreshes and timeouts of 100 ms and
    // more, and far cheaper than the precise one, which reads the clock source.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let refresh_ns = refresh_interval_ns(service.stick_timeout_ns);
    // An open connection goes where it started, whatever its client's entry says now.
    let flow_key = conntrack::key(service.id, packet);
    if let Some(flow) = conntrack::lookup(&flow_key) {
        // SAFETY: a live hash-map value; backend id and NAT port are written once, at insert.
        let (id, state, nat_port) = unsafe { ((*flow).backend, (*flow).state, (*flow).nat_port) };
        match select::usable(service, id) {
            // Only a connection that is closing gives its port to a new one (the client's
            // TIME_WAIT is over), like IPVS: a SYN on an open connection is a retransmission,
            // or made up, and changes nothing.
            Some(backend) if !(packet.opens() && state == FlowState::Closing as u8) => {
                // The client's FIN or RST stops the count, but the connection keeps its backend
                // until it has been idle for the closing timeout: in DSR the server may still be
                // sending, and the client's ACKs must reach it.
                if packet.flags & (TCP_FIN | TCP_RST) != 0 {
                    conntrack::finish(flow, &flow_key);
                }
                if conntrack::touch(flow, &flow_key, packet, now, refresh_ns) {
                    select::refresh(service, &client, id, now);
                }
                return Ok(Placed {
                    id,
                    backend,
                    nat_port,
                });
            }
            // Or its backend is down, disabled or gone: the connection ends here, and the
            // client is placed anew below.
            _ => {
                conntrack::finish(flow, &flow_key);
                if service.forwarding == Forwarding::Nat as u8 {
                    forget_nat_reply(service, id, packet, nat_port);
                }
                conntrack::remove(&flow_key);
            }
        }
    }
    match select::backend_for(service, &client, now, refresh_ns, packet.opens()) {
        Ok(choice) if service.forwarding == Forwarding::Nat as u8 => {
            open_nat(packet, service, &flow_key, choice.id, choice.backend, now)
        }
        Ok(choice) => {
            if packet.opens() && choice.recorded {
                if let Opened::Full = conntrack::open(&flow_key, choice.id, now, 0) {
                    stats::count_service(service.id, |c| &mut c.flows_untracked);
                }
            }
            Ok(Placed {
                id: choice.id,
                backend: choice.backend,
                nat_port: 0,
            })
        }
        Err(NoBackend::Empty) => {
            debug!(ctx, "service {} has no eligible backend", service.id);
            Err(drop(Counter::DropNoBackend))
        }
        Err(NoBackend::NotUp) => Err(drop(Counter::DropBadBackend)),
    }
}

/// ICMP "fragmentation needed" / "packet too big" about a VIP's reply (a router between a
/// backend and its client found it too big; the error comes to the VIP, the reply's source):
/// forwarded to the backend that owns the connection, so path-MTU discovery works through the
/// balancer (Katran does the same). The connection table names the backend; without an entry
/// there, the client's stick entry; without either the error is passed to the host, which has
/// no such connection and ignores it.
#[inline(always)]
fn too_big_error(ctx: &XdpContext, error: &parse::TooBigError) -> u32 {
    let service = match find_service(&error.vip, error.port, error.family) {
        Lookup::Service(service) => service,
        Lookup::NotService => return pass(Counter::PassNotService),
        Lookup::Corrupt => {
            stats::count(Counter::Aborted);
            return xdp_action::XDP_ABORTED;
        }
    };
    let flow_key = FlowKey {
        service: service.id,
        client: error.client,
        client_port: error.client_port,
        _pad: 0,
    };
    let stick_key = StickKey {
        service: service.id,
        client: masked(error.client, service.client_mask),
    };
    // A NAT service's error goes only to a connection's backend, translated (see nat_error).
    if service.forwarding == Forwarding::Nat as u8 {
        return nat_error(ctx, error, service, &flow_key);
    }
    // SAFETY: live hash-map values; only the backend id is read.
    let id = match conntrack::lookup(&flow_key) {
        Some(flow) => unsafe { (*flow).backend },
        None => match maps::STICK.get_ptr(&stick_key) {
            Some(entry) => StickEntry::placement_backend(unsafe { (*entry).placement() }),
            None => return pass(Counter::PassIcmpNoFlow),
        },
    };
    let Some(backend) = select::usable(service, id) else {
        return pass(Counter::PassIcmpNoFlow);
    };
    let placed = Placed {
        id,
        backend,
        nat_port: 0,
    };
    let verdict = forward(ctx, error.eth, service, &placed);
    if verdict == xdp_action::XDP_TX {
        stats::count(Counter::TxIcmpToBackend);
    }
    verdict
}

/// A NAT service's segment without a connection: a new connection is recorded (always, flood
/// guard or not: its replies cannot be translated without it) with its reply-table entry and,
/// with source NAT, a port of its own. Any other segment has no connection to be translated in:
/// dropped (the client's retransmissions end when it gives up, as with IPVS).
#[inline(always)]
fn open_nat(
    packet: &Segment,
    service: &'static Service,
    flow_key: &FlowKey,
    id: BackendId,
    backend: &'static Backend,
    now: u64,
) -> Result<Placed, u32> {
    if !packet.opens() {
        return Err(drop(Counter::DropNatUntracked));
    }
    let client = nat::Endpoint {
        addr: packet.saddr,
        port: packet.sport,
    };
    let entry = NatEntry {
        client: packet.saddr,
        vip: packet.daddr,
        service: service.id,
        backend: id,
        client_port: packet.sport,
        vip_port: packet.dport,
        // SAFETY: the parser checked the frame holds the Ethernet header.
        client_mac: unsafe { (*packet.eth).src_addr },
        _pad: [0; 2],
    };
    let source_nat = service.flags & SERVICE_SOURCE_NAT != 0;
    let nat_port = if source_nat {
        match nat::allocate_port(service, backend, &client, &entry, now) {
            Some(port) => port,
            None => return Err(drop(Counter::DropNatPortsExhausted)),
        }
    } else {
        0
    };
    match conntrack::open(flow_key, id, now, nat_port) {
        Opened::New => {
            if !source_nat {
                nat::record_reply(service, backend, &client, &entry);
            }
            Ok(Placed {
                id,
                backend,
                nat_port,
            })
        }
        // Another CPU recorded this connection a moment ago (a retransmitted SYN), or the
        // table is full: this SYN goes nowhere (the client retransmits).
        opened => {
            if source_nat {
                nat::forget_reply(service, backend, &client, nat_port);
            }
            if let Opened::Full = opened {
                stats::count_service(service.id, |c| &mut c.flows_untracked);
            }
            Err(drop(Counter::DropNatUntracked))
        }
    }
}

/// Deletes the reply-table entry of a connection that ends here, if its backend's address is
/// still known (otherwise the LRU ages the entry out; it never translates anything).
#[inline(always)]
fn forget_nat_reply(service: &Service, id: BackendId, packet: &Segment, nat_port: u16) {
    if let Some(backend) = maps::BACKENDS.get(id)
        && backend.service == service.id
    {
        let client = nat::Endpoint {
            addr: packet.saddr,
            port: packet.sport,
        };
        nat::forget_reply(service, backend, &client, nat_port);
    }
}

/// An ICMP "too big" error about a NAT connection's reply, sent on to the connection's backend
/// translated as its reply was, backwards: the outer destination becomes the backend, the
/// quoted reply's source the backend's address and port (and with source NAT its destination
/// the balancer's address and the connection's port), so the backend's kernel finds the
/// connection and lowers its path MTU. Only a connection in the connection table (a NAT
/// connection always has one) on a backend that still serves.
#[inline(always)]
fn nat_error(
    ctx: &XdpContext,
    error: &parse::TooBigError,
    service: &Service,
    flow_key: &FlowKey,
) -> u32 {
    let Some(flow) = conntrack::lookup(flow_key) else {
        return pass(Counter::PassIcmpNoFlow);
    };
    // SAFETY: a live hash-map value; backend and NAT port are written once, at insert.
    let (id, nat_port) = unsafe { ((*flow).backend, (*flow).nat_port) };
    let Some(backend) = select::usable(service, id) else {
        return pass(Counter::PassIcmpNoFlow);
    };
    let t = nat::Translation {
        src: nat::Endpoint {
            addr: backend.addr,
            port: backend.port,
        },
        dst: nat::Endpoint {
            addr: service.nat_source,
            port: nat_port,
        },
        change_src: true,
        change_dst: service.flags & SERVICE_SOURCE_NAT != 0,
    };
    let v6 = nat::is_v6(service.family);
    let mac = IFACE_MAC.load();
    match nat::error_to_backend(ctx, v6, &error.at, &backend.addr, &t, backend.mac, mac) {
        Ok(()) => {
            stats::count(Counter::TxIcmpToBackend);
            xdp_action::XDP_TX
        }
        Err(_) => pass(Counter::PassIcmpNoFlow),
    }
}

/// Sends the frame to `backend` by the service's forwarding mode and counts it (the client's
/// frame, before any encapsulation).
#[inline(always)]
fn forward(ctx: &XdpContext, eth: *mut EthHdr, service: &Service, placed: &Placed) -> u32 {
    let (id, backend) = (placed.id, placed.backend);
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    if service.forwarding == Forwarding::Nat as u8 {
        let to_backend = nat::Translation {
            src: nat::Endpoint {
                addr: service.nat_source,
                port: placed.nat_port,
            },
            dst: nat::Endpoint {
                addr: backend.addr,
                port: backend.port,
            },
            change_src: service.flags & SERVICE_SOURCE_NAT != 0,
            change_dst: true,
        };
        let v6 = nat::is_v6(service.family);
        match nat::rewrite(ctx, v6, &to_backend, backend.mac, IFACE_MAC.load()) {
            Ok(()) => {}
            Err(nat::NotTranslated::ExtHeaders) => return drop(Counter::DropNatExtHeaders),
            Err(nat::NotTranslated::Truncated) => return drop(Counter::DropResizeFailed),
        }
    } else if service.forwarding == Forwarding::Tunnel as u8 {
        let v6 = service.family == Family::Ipv6 as u8;
        let Some(inner) = parse::outbound(ctx, v6) else {
            return drop(Counter::DropResizeFailed);
        };
        // A client's segment that does not fit was answered before it was placed
        // (`answer_too_big`); what gets here too big is an ICMP error for a backend, never
        // answered with another.
        if !forward::fits(&inner, v6, service) {
            return drop(Counter::DropTooBig);
        }
        if forward::tunnel(ctx, &inner, v6, service, backend, IFACE_MAC.load()).is_err() {
            return drop(Counter::DropResizeFailed);
        }
    } else {
        forward::dsr(eth, backend, IFACE_MAC.load());
    }
    stats::count_backend(id, bytes);
    xdp_action::XDP_TX
}

/// Answers a tunnel service's client whose packet does not fit once encapsulated: ICMP
/// "fragmentation needed" or ICMPv6 "packet too big" naming the MTU less the outer header.
/// `None` (nothing done) if it fits.
#[inline(always)]
fn answer_too_big(ctx: &XdpContext, service: &Service) -> Option<u32> {
    let v6 = service.family == Family::Ipv6 as u8;
    // Cannot fail on a frame the parser accepted; if it did, forward() drops the frame.
    let inner = parse::outbound(ctx, v6)?;
    if forward::fits(&inner, v6, service) {
        return None;
    }
    let mtu = (service.mtu as u32).saturating_sub(forward::outer_len(v6) as u32);
    Some(match icmp::too_big(ctx, &inner, v6, mtu) {
        Ok(()) => {
            stats::count(Counter::TxIcmpTooBig);
            xdp_action::XDP_TX
        }
        Err(_) => drop(Counter::DropResizeFailed),
    })
}

/// What the service index says about a destination.
enum Lookup {
    Service(&'static Service),
    NotService,
    /// The index names a parameters slot that does not exist: a controller bug, not traffic.
    Corrupt,
}

/// The service a TCP segment's destination (address, port, family) belongs to: a few inlined
/// array lookups in the service index (see maps.rs), the whole address and the family checked
/// to rule out a colliding slot.
#[inline(always)]
fn find_service(daddr: &[u32; 4], dport: u16, family: u8) -> Lookup {
    let home = service_slot(daddr, dport, SERVICE_INDEX_SLOTS);
    let mut probe = 0;
    while probe < SERVICE_INDEX_PROBES {
        let slot = (home + probe) & (SERVICE_INDEX_SLOTS - 1);
        probe += 1;
        let entry = match SERVICE_INDEX.get(slot) {
            Some(&entry) => entry,
            None => return Lookup::Corrupt,
        };
        if entry == 0 {
            return Lookup::NotService;
        }
        if entry == SERVICE_INDEX_TOMBSTONE {
            continue;
        }
        let Some(service) = SERVICES.get(entry - 1) else {
            return Lookup::Corrupt;
        };
        if service.vip == *daddr
            && service.port == dport
            && service.family == family
            && service.protocol == PROTO_TCP
        {
            return Lookup::Service(service);
        }
    }
    Lookup::NotService
}

#[inline(always)]
fn pass(reason: Counter) -> u32 {
    stats::count(reason);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn drop(reason: Counter) -> u32 {
    stats::count(reason);
    xdp_action::XDP_DROP
}

/// A do-nothing program. Attached to the veth peers in the test rig (native-mode XDP_TX on veth
/// only delivers to a peer that runs an XDP program) and the floor in benchmarks.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
