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
mod csum;
mod expire;
mod forward;
mod guard;
mod icmp;
mod maps;
mod parse;
mod select;
mod stats;

use aya_ebpf::{
    Global, bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, macros::xdp,
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use conntrack::Opened;
use maps::{SERVICE_INDEX, SERVICES};
use parse::{Parsed, Segment, TCP_FIN, TCP_RST};
use select::NoBackend;
use sticky_lb_common::{
    Backend, BackendId, Counter, Family, FlowState, Forwarding, PROTO_TCP, SERVICE_INDEX_PROBES,
    SERVICE_INDEX_SLOTS, SERVICE_INDEX_TOMBSTONE, Service, addr::masked, hash::service_slot,
    refresh_interval_ns,
};

/// MAC address of the interface the program is attached to; the controller sets it at load time
/// (read-only data, so the verifier treats it as a constant).
#[unsafe(no_mangle)]
static IFACE_MAC: Global<[u8; 6]> = Global::new([0; 6]);

#[xdp]
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
    };
    let service = match find_service(&packet) {
        Lookup::Service(service) => service,
        Lookup::NotService => return pass(Counter::PassNotService),
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
    match place(ctx, &packet, service) {
        Ok((id, backend)) => forward(ctx, &packet, service, id, backend),
        Err(verdict) => verdict,
    }
}

/// The backend a segment of `service` goes to: its connection's, else its client's stick
/// entry's, else the policy's choice (recorded). `Err` holds the verdict when there is none.
/// One call site of [`forward`] for every way here keeps the verifier's paths few.
#[inline(always)]
fn place(
    ctx: &XdpContext,
    packet: &Segment,
    service: &'static Service,
) -> Result<(BackendId, &'static Backend), u32> {
    let client = masked(packet.saddr, service.client_mask);
    // The coarse clock (jiffies resolution) is plenty for refreshes and timeouts of 100 ms and
    // more, and far cheaper than the precise one, which reads the clock source.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let refresh_ns = refresh_interval_ns(service.stick_timeout_ns);
    // An open connection goes where it started, whatever its client's entry says now.
    let flow_key = conntrack::key(service.id, packet);
    if let Some(flow) = conntrack::lookup(&flow_key) {
        // SAFETY: a live hash-map value; the backend id is written once, at insert.
        let (id, state) = unsafe { ((*flow).backend, (*flow).state) };
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
                return Ok((id, backend));
            }
            // Or its backend is down, disabled or gone: the connection ends here, and the
            // client is placed anew below.
            _ => {
                conntrack::finish(flow, &flow_key);
                conntrack::remove(&flow_key);
            }
        }
    }
    match select::backend_for(service, &client, now, refresh_ns, packet.opens()) {
        Ok(choice) => {
            if packet.opens() && choice.recorded {
                if let Opened::Full = conntrack::open(&flow_key, choice.id, now) {
                    stats::count_service(service.id, |c| &mut c.flows_untracked);
                }
            }
            Ok((choice.id, choice.backend))
        }
        Err(NoBackend::Empty) => {
            debug!(ctx, "service {} has no eligible backend", service.id);
            Err(drop(Counter::DropNoBackend))
        }
        Err(NoBackend::NotUp) => Err(drop(Counter::DropBadBackend)),
    }
}

/// Sends the frame to `backend` by the service's forwarding mode and counts it (the client's
/// frame, before any encapsulation).
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    packet: &Segment,
    service: &Service,
    id: BackendId,
    backend: &Backend,
) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    if service.forwarding == Forwarding::Tunnel as u8 {
        let v6 = service.family == Family::Ipv6 as u8;
        let Some(inner) = parse::outbound(ctx, v6) else {
            return drop(Counter::DropResizeFailed);
        };
        if forward::tunnel(ctx, &inner, v6, service, backend, IFACE_MAC.load()).is_err() {
            return drop(Counter::DropResizeFailed);
        }
    } else {
        forward::dsr(packet.eth, backend, IFACE_MAC.load());
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
fn find_service(packet: &Segment) -> Lookup {
    let home = service_slot(&packet.daddr, packet.dport, SERVICE_INDEX_SLOTS);
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
        if service.vip == packet.daddr
            && service.port == packet.dport
            && service.family == packet.family
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
