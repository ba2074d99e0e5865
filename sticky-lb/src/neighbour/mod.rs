//! Layer-2 facts the DSR data path needs: our interface's MAC, and each backend's MAC from the
//! kernel's neighbour tables (ARP for IPv4 backends, NDP for IPv6 ones), kept current through
//! rtnetlink. Both families go through the same messages (RTM_*NEIGH with AF_INET or AF_INET6)
//! and the same kernel code for entry states and managed entries, so everything here treats them
//! alike; only the address and the family in each request differ.
//!
//! The XDP program rewrites and sends frames itself, so the kernel never sees the traffic to a
//! backend and never revalidates that backend's neighbour entry on its own: a backend whose NIC
//! changed would keep its old MAC while its health checks (sent by the kernel) still pass.
//! [`Neighbours::resolve`] therefore asks for a managed entry, which the kernel keeps resolved by
//! itself, and [`Neighbours::watch`] reports every change of the interface's entries and of the
//! interface itself.
//!
//! Everything goes through the calling thread's network namespace (an ioctl on a socket, a
//! netlink socket opened in that thread), never through /sys, which shows the namespace sysfs was
//! mounted in.

mod tracker;

use anyhow::{Context, Result, bail};
use futures_util::{Stream, StreamExt};
use log::{debug, warn};
use rtnetlink::{
    Handle, MulticastGroup, RouteMessageBuilder,
    packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags,
            NeighbourMessage, NeighbourState,
        },
        route::{RouteAddress, RouteAttribute},
    },
    sys::AsyncSocket,
};
use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};
use tokio::{
    sync::{Notify, mpsc},
    task::AbortHandle,
    time::Instant,
};
use tracker::{Entry, Link, Pending, Tracker};

/// The MAC address of `interface` (SIOCGIFHWADDR). Errors if the name is too long or no
/// interface has it.
pub fn interface_mac(interface: &str) -> Result<[u8; 6]> {
    if interface.len() >= libc::IFNAMSIZ {
        bail!("interface name '{interface}' too long");
    }
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for SIOCGIFHWADDR");
    }
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(interface.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: req is a valid ifreq with a NUL-terminated name.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = std::io::Error::last_os_error();
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err).with_context(|| format!("reading the MAC address of {interface}"));
    }
    // SAFETY: SIOCGIFHWADDR fills ifru_hwaddr.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(data.iter()) {
        *dst = *src as u8;
    }
    Ok(mac)
}

/// Every IPv4 and IPv6 address of `interface` in the current network namespace, in the order
/// the kernel lists them (getifaddrs(3), which asks over netlink: no /sys, so `--netns` works).
pub fn interface_addresses(interface: &str) -> Result<Vec<IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listing interface addresses");
    }
    let mut found = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*entry };
        entry = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if name.to_bytes() != interface.as_bytes() {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr of the family its sa_family says.
        let address = unsafe {
            match (*ifa.ifa_addr).sa_family as libc::c_int {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes())
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::from(sin6.sin6_addr.s6_addr)
                }
                // AF_PACKET (the link itself) and anything else.
                _ => continue,
            }
        };
        found.push(address);
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// The MTU of `interface` in bytes (SIOCGIFMTU): the largest IP packet it sends. Errors if the
/// name is too long or no interface has it.
pub fn interface_mtu(interface: &str) -> Result<u16> {
    if interface.len() >= libc::IFNAMSIZ {
        bail!("interface name '{interface}' too long");
    }
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for SIOCGIFMTU");
    }
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(interface.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: req is a valid ifreq with a NUL-terminated name.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFMTU, &mut req) };
    let err = std::io::Error::last_os_error();
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err).with_context(|| format!("reading the MTU of {interface}"));
    }
    // SAFETY: SIOCGIFMTU fills ifru_mtu.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    Ok(mtu.clamp(0, u16::MAX as i32) as u16)
}

/// A change [`Neighbours::watch`] reports. Only changes are reported: the kernel's routine moves
/// between usable states (REACHABLE, STALE, DELAY, PROBE) with the same MAC make no event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The kernel's neighbour entry for `address` (an ARP entry for IPv4, an NDP one for IPv6)
    /// on the watched interface changed: `Some(mac)` when it is usable (NUD_REACHABLE, STALE,
    /// DELAY, PROBE, PERMANENT or NOARP), `None` when it is not (still resolving, failed, or
    /// deleted). The kernel's entries for multicast groups are not reported.
    Neighbour {
        address: IpAddr,
        mac: Option<[u8; 6]>,
    },
    /// The watched interface was deleted (or renamed away), and its neighbour entries with it:
    /// no `Neighbour { mac: None }` follows for them.
    LinkGone { interface: String },
    /// An interface with the watched name appeared (possibly with a new index: then a `LinkGone`
    /// always came first), or its IFF_* flags or operational state changed. Entries made by
    /// [`Neighbours::resolve`] on an earlier interface are gone: resolve again.
    LinkUp { interface: String, index: u32 },
}

/// Events waiting in the channel before later ones are merged in the watching task instead.
const CHANNEL_CAPACITY: usize = 64;
/// Receive buffer asked for the netlink socket, in bytes (the kernel caps it at
/// net.core.rmem_max): room for bursts such as a flushed neighbour table.
const RECEIVE_BUFFER: usize = 1 << 20;
/// Longest wait of [`Neighbours::resolve`] between two reads of the entry, in case a
/// notification was lost.
const RECHECK: Duration = Duration::from_millis(100);

/// A watch of one interface's neighbour entries over an rtnetlink connection, and requests on
/// them. Dropping it ends the watch: the event receiver then yields `None`.
#[derive(Debug)]
pub struct Neighbours {
    interface: String,
    handle: Handle,
    shared: Arc<Shared>,
    /// The connection's task and the watching task.
    tasks: [AbortHandle; 2],
}

/// What the watching task shares with [`Neighbours`].
#[derive(Debug)]
struct Shared {
    /// Index of the interface now called by the watched name; 0 while there is none (the kernel
    /// never gives out index 0).
    index: AtomicU32,
    /// Woken whenever the interface or one of its neighbour entries changes.
    changed: Notify,
}

impl Neighbours {
    /// Opens an rtnetlink connection in the calling thread's network namespace, subscribed to
    /// link and neighbour notifications (RTNLGRP_LINK, RTNLGRP_NEIGH: the kernel sends the
    /// changes of every neighbour table, ARP and NDP alike, to that one group), and runs it on the
    /// current tokio runtime. Events about `interface` go to the returned receiver; the interface is
    /// followed by name, so one deleted and created again (with a new index) is followed too. A
    /// receiver that falls behind gets only the latest untaken event about each neighbour, and
    /// the latest `LinkGone` and `LinkUp`: no state is lost, and the backlog is bounded by the
    /// number of neighbours rather than of changes. If the socket overflows all the same, the
    /// interface and its entries are read again and the differences reported. The receiver
    /// yields `None` once the connection fails: watch again.
    ///
    /// Errors outside a tokio runtime or if the socket cannot be opened. A missing interface is
    /// no error: it is reported when it appears.
    pub fn watch(interface: &str) -> Result<(Neighbours, mpsc::Receiver<Event>)> {
        let runtime = tokio::runtime::Handle::try_current()
            .context("watching neighbour entries needs a tokio runtime")?;
        let (mut connection, handle, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Neigh])
                .context("opening an rtnetlink socket")?;
        if let Err(e) = connection
            .socket_mut()
            .socket_mut()
            .set_rx_buf_sz(RECEIVE_BUFFER)
        {
            debug!("netlink receive buffer left at its default: {e}");
        }
        // Read after subscribing, so a change in between is not missed. The flags and operational
        // state follow from the watching task's first read.
        let index = crate::config::interface_index(interface);
        let shared = Arc::new(Shared {
            index: AtomicU32::new(index.unwrap_or(0)),
            changed: Notify::new(),
        });
        let tracker = Tracker::new(interface, index.map(|index| Link { index, state: None }));
        let (events, receiver) = mpsc::channel(CHANNEL_CAPACITY);
        let connection = runtime.spawn(connection).abort_handle();
        let watching = runtime
            .spawn(follow(
                tracker,
                messages.map(|(message, _)| message),
                handle.clone(),
                shared.clone(),
                events,
            ))
            .abort_handle();
        let neighbours = Neighbours {
            interface: interface.to_string(),
            handle,
            shared,
            tasks: [connection, watching],
        };
        Ok((neighbours, receiver))
    }

    /// The watched interface's name.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// The index of the interface now called by the watched name, if there is one.
    pub fn index(&self) -> Option<u32> {
        match self.shared.index.load(Ordering::Relaxed) {
            0 => None,
            index => Some(index),
        }
    }

    /// The usable MAC the kernel has for `address` on the interface now (RTM_GETNEIGH, in the ARP
    /// table for an IPv4 address, the NDP one for IPv6); `None` if there is no entry, it is not
    /// usable, or the interface is missing.
    pub async fn lookup(&self, address: IpAddr) -> Option<[u8; 6]> {
        let index = self.index()?;
        self.entry(index, address).await?.usable_mac()
    }

    /// Asks the kernel to resolve `address` on the interface and waits up to `timeout` for a
    /// usable entry; `None` if there is none by then (with a zero timeout this only asks, and the
    /// answer shows later in [`Neighbours::lookup`] and as an [`Event::Neighbour`]).
    ///
    /// The entry is made managed (NTF_EXT_MANAGED, Linux 5.16 and later): the kernel resolves it
    /// and keeps revalidating it as if it carried traffic, so a changed MAC is learnt, and shows
    /// as an event, without anyone asking again. An existing entry's address and state are left
    /// as they are; permanent, NOARP and externally learnt entries are not touched at all, since
    /// they are someone else's to keep. The entry goes with the interface: after
    /// [`Event::LinkUp`] with a new index, resolve again.
    ///
    /// The kernel asks by ARP for an IPv4 address and by Neighbour Solicitation for an IPv6 one.
    /// A solicitation that no packet waits on goes out from the interface's link-local address
    /// only, and only once that address passed duplicate address detection (a second or two
    /// after the link comes up): the kernel skips its solicitations until then, so a fresh
    /// interface's first answer may take about 2 s, and the kernel's later visits of its managed
    /// entries (every net.ipv6.neigh.IFACE.interval_probe_time_ms, 5 s by default) try again. An
    /// interface without a link-local address (addrgenmode none) resolves IPv6 neighbours only
    /// for traffic the kernel sends them, health checks included, and cannot revalidate them.
    pub async fn resolve(&self, address: IpAddr, timeout: Duration) -> Option<[u8; 6]> {
        let deadline = Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
        // The interface index the request went to: asked once per interface.
        let mut asked = None;
        loop {
            // Registered before reading, so a change between the read and the wait wakes us.
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(index) = self.index() {
                let entry = self.entry(index, address).await;
                if asked != Some(index) && entry.is_none_or(|entry| entry.needs_request()) {
                    self.request_managed(index, address).await;
                    asked = Some(index);
                }
                if let Some(mac) = entry.and_then(|entry| entry.usable_mac()) {
                    return Some(mac);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let _ = tokio::time::timeout((deadline - now).min(RECHECK), changed).await;
        }
    }

    /// The next hop towards `address` in the calling namespace's routing table (RTM_GETROUTE,
    /// as `ip route get` asks): the gateway of the route, or `address` itself when it is on-link.
    /// Tunnel services send a backend's frames to this neighbour's MAC.
    ///
    /// Errors, in one line, if no route leads there or the route leaves by another interface than
    /// the watched one: the data path sends frames only back out of the interface they came in on.
    pub async fn next_hop(&self, address: IpAddr) -> Result<IpAddr> {
        let index = self
            .index()
            .with_context(|| format!("interface {} is missing", self.interface))?;
        let request = match address {
            IpAddr::V4(a) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        let mut routes = self.handle.route().get(request).execute();
        let route = match routes.next().await {
            Some(Ok(route)) => route,
            Some(Err(e)) => bail!("no route to {address}: {e}"),
            None => bail!("no route to {address}"),
        };
        let mut gateway = None;
        let mut oif = None;
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        if oif != Some(index) {
            bail!(
                "the route to {address} does not leave by {} (the data path sends only out of the interface it is attached to)",
                self.interface
            );
        }
        Ok(gateway.unwrap_or(address))
    }

    /// The kernel's entry for `address` on interface `index` (RTM_GETNEIGH for one entry), if
    /// there is one.
    async fn entry(&self, index: u32, address: IpAddr) -> Option<Entry> {
        let mut query = NeighbourMessage::default();
        query.header.family = family(address);
        query.header.ifindex = index;
        query
            .attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(
                address,
            )));
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(query));
        request.header.flags = NLM_F_REQUEST;
        let mut replies = self.handle.clone().request(request).ok()?;
        while let Some(reply) = replies.next().await {
            match reply.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(message)) => {
                    return Entry::parse(&message)
                        .filter(|entry| entry.ifindex == index && entry.address == address);
                }
                NetlinkPayload::Error(e) => {
                    if e.raw_code() != -libc::ENOENT {
                        debug!("reading the neighbour entry of {address}: {e}");
                    }
                    return None;
                }
                _ => {}
            }
        }
        None
    }

    /// Creates or updates the entry for `address` on interface `index` as a managed one
    /// (RTM_NEWNEIGH with NLM_F_CREATE, neither NLM_F_EXCL nor NLM_F_REPLACE), which also starts
    /// resolving it at once. Failures are logged only: the caller sees the entry, or none.
    async fn request_managed(&self, index: u32, address: IpAddr) {
        let mut message = NeighbourMessage::default();
        message.header.family = family(address);
        message.header.ifindex = index;
        // Not permanent, which a managed entry may not be; an existing entry keeps its own state
        // (the kernel ignores the one asked for along with NTF_USE or the managed flag).
        message.header.state = NeighbourState::None;
        // NTF_USE as well: a kernel older than 5.16 ignores the managed flag's attribute but still
        // resolves the entry once.
        message.header.flags = NeighbourFlags::Use;
        message
            .attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(
                address,
            )));
        message
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(message));
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE;
        let Ok(mut replies) = self.handle.clone().request(request) else {
            warn!("cannot ask the kernel to resolve {address}: the netlink connection is closed");
            return;
        };
        while let Some(reply) = replies.next().await {
            if let NetlinkPayload::Error(e) = reply.payload
                && e.code.is_some()
            {
                warn!(
                    "asking the kernel to resolve {address} on {}: {e}",
                    self.interface
                );
            }
        }
    }
}

impl Drop for Neighbours {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The watching task: turns the connection's unsolicited messages into events for the
/// receiver, merging what the receiver has not taken yet.
async fn follow(
    mut tracker: Tracker,
    mut messages: impl Stream<Item = NetlinkMessage<RouteNetlinkMessage>> + Unpin,
    handle: Handle,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
) {
    let mut pending = Pending::default();
    let mut fresh = Vec::new();
    match read_link(&handle, &tracker.interface).await {
        Ok(link) => tracker.resync_link(link, &mut fresh),
        Err(e) => warn!("reading interface {}: {e}", tracker.interface),
    }
    loop {
        if !fresh.is_empty() {
            shared
                .index
                .store(tracker.index().unwrap_or(0), Ordering::Relaxed);
            shared.changed.notify_waiters();
            if events.is_closed() {
                fresh.clear();
            }
            for event in fresh.drain(..) {
                pending.push(event);
            }
        }
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { break };
                match message.payload {
                    NetlinkPayload::InnerMessage(message) => tracker.message(&message, &mut fresh),
                    NetlinkPayload::Overrun(_) => {
                        warn!(
                            "netlink notifications about {} were lost (socket buffer overrun); \
                             reading the interface and its neighbour entries again",
                            tracker.interface
                        );
                        resync(&mut tracker, &handle, &mut fresh).await;
                    }
                    _ => {}
                }
            }
            permit = events.reserve(), if !pending.is_empty() => match permit {
                Ok(permit) => permit.send(pending.pop().expect("pending is not empty")),
                // Nobody listens any more; the index is still followed for lookup and resolve.
                Err(_) => pending.clear(),
            },
        }
    }
    debug!("netlink connection for {} closed", tracker.interface);
}

/// Reads the interface and all IPv4 and IPv6 neighbour entries again and reports what differs
/// from what was reported.
async fn resync(tracker: &mut Tracker, handle: &Handle, events: &mut Vec<Event>) {
    let link = match read_link(handle, &tracker.interface).await {
        Ok(link) => link,
        Err(e) => {
            warn!("reading interface {}: {e}", tracker.interface);
            return;
        }
    };
    let mut entries = Vec::new();
    if link.is_some() {
        // One dump per followed table, asked for by its family.
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut dump = handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute();
            while let Some(message) = dump.next().await {
                match message {
                    Ok(message) => entries.extend(Entry::parse(&message)),
                    Err(e) => {
                        warn!("reading the {family:?} neighbour table: {e}");
                        return;
                    }
                }
            }
        }
    }
    tracker.resync(link, &entries, events);
}

/// The neighbour table `address` belongs in: AF_INET (ARP) or AF_INET6 (NDP).
fn family(address: IpAddr) -> AddressFamily {
    match address {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// The interface called `name` now (RTM_GETLINK by name); `Ok(None)` if there is none.
async fn read_link(handle: &Handle, name: &str) -> Result<Option<Link>, rtnetlink::Error> {
    let mut replies = handle.link().get().match_name(name).execute();
    match replies.next().await {
        Some(Ok(message)) => Ok(Some(Link::from_message(&message))),
        Some(Err(rtnetlink::Error::NetlinkError(e))) if e.raw_code() == -libc::ENODEV => Ok(None),
        Some(Err(e)) => Err(e),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One watch is shared by the controller's tasks on a multi-threaded runtime.
    #[test]
    fn a_watch_can_be_shared_between_tasks() {
        fn shared<T: Send + Sync>() {}
        fn sent<T: Send>(_: &T) {}
        shared::<Neighbours>();
        let _ = |neighbours: &'static Neighbours| {
            sent(&neighbours.resolve(IpAddr::from([198, 18, 0, 11]), Duration::ZERO));
            sent(&neighbours.lookup(IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11])));
        };
    }
}
