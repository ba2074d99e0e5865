//! What the neighbour watch reports, worked out from netlink messages alone: which messages are
//! about the watched interface and its IPv4 (ARP) and IPv6 (NDP) neighbour entries, which of them change what was
//! reported, and how events wait for a receiver that falls behind. Touches no socket, so it is
//! tested on hand-built messages.

use super::Event;
use rtnetlink::packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourMessage,
    },
};
use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
};

// NUD_* neighbour states (linux/neighbour.h); the kernel reports exactly one per entry. ARP and
// NDP entries share them: an IPv6 entry goes REACHABLE, STALE, DELAY, PROBE just as an IPv4 one
// does, and carries its link-layer address in all four.
const NUD_REACHABLE: u16 = 0x02;
const NUD_STALE: u16 = 0x04;
const NUD_DELAY: u16 = 0x08;
const NUD_PROBE: u16 = 0x10;
const NUD_FAILED: u16 = 0x20;
const NUD_NOARP: u16 = 0x40;
const NUD_PERMANENT: u16 = 0x80;
/// States whose link-layer address may be used (the kernel's NUD_VALID).
const NUD_VALID: u16 =
    NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP;

/// One IPv4 (ARP) or IPv6 (NDP) neighbour entry as RTM_NEWNEIGH (a notification, or the answer
/// to RTM_GETNEIGH) describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) ifindex: u32,
    pub(super) address: IpAddr,
    /// NUD_* state.
    state: u16,
    /// NDA_LLADDR, when it is a 6-byte (Ethernet) address.
    lladdr: Option<[u8; 6]>,
    /// NTF_EXT_MANAGED: the kernel keeps the entry resolved by itself.
    managed: bool,
    /// NTF_EXT_LEARNED: put there by something other than ARP or NDP (a switch driver, a routing
    /// daemon).
    ext_learned: bool,
}

impl Entry {
    /// The entry `message` describes; `None` for families other than AF_INET and AF_INET6 (the
    /// bridge's AF_BRIDGE forwarding entries share the messages), for proxy entries (NTF_PROXY:
    /// addresses this host answers for, not neighbours) and without an NDA_DST of the message's
    /// family (4 bytes for AF_INET, 16 for AF_INET6). NTF_ROUTER, which NDP sets on IPv6
    /// neighbours that are routers, changes nothing: a backend's MAC is its MAC either way.
    ///
    /// Multicast destinations are skipped too: the kernel keeps NOARP entries for the groups it
    /// sends to (IPv6 has several on every interface: all-routers, MLD, solicited-node groups),
    /// whose MAC is computed from the group rather than learnt, and no backend is a group.
    pub(super) fn parse(message: &NeighbourMessage) -> Option<Entry> {
        let family = message.header.family;
        if !matches!(family, AddressFamily::Inet | AddressFamily::Inet6)
            || message.header.flags.contains(NeighbourFlags::Proxy)
        {
            return None;
        }
        let mut address = None;
        let mut lladdr = None;
        let mut managed = false;
        for attribute in &message.attributes {
            match attribute {
                // The crate reads NDA_DST by the header's family, so a mismatch cannot come from
                // the kernel; checked all the same so a hand-built message cannot mix them.
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a))
                    if family == AddressFamily::Inet =>
                {
                    address = Some(IpAddr::V4(*a));
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(a))
                    if family == AddressFamily::Inet6 =>
                {
                    address = Some(IpAddr::V6(*a));
                }
                NeighbourAttribute::LinkLayerAddress(bytes) => {
                    lladdr = <[u8; 6]>::try_from(bytes.as_slice()).ok();
                }
                NeighbourAttribute::ExtFlags(flags) => {
                    managed = flags.contains(NeighbourExtFlags::Managed);
                }
                _ => {}
            }
        }
        let address = address.filter(|address| !address.is_multicast())?;
        Some(Entry {
            ifindex: message.header.ifindex,
            address,
            state: message.header.state.into(),
            lladdr,
            managed,
            ext_learned: message.header.flags.contains(NeighbourFlags::ExtLearned),
        })
    }

    /// The MAC to send to, if the entry is usable.
    pub(super) fn usable_mac(&self) -> Option<[u8; 6]> {
        if self.state & NUD_VALID != 0 {
            self.lladdr
        } else {
            None
        }
    }

    /// Whether [`super::Neighbours::resolve`] should send its request for this entry: not for one that
    /// is someone else's (a managed or NTF_USE request would turn a permanent entry into a
    /// dynamic one and take an externally learnt one over), nor for one the kernel already keeps
    /// resolved, unless that one failed and waits for the kernel's next round.
    pub(super) fn needs_request(&self) -> bool {
        let foreign = self.state & (NUD_PERMANENT | NUD_NOARP) != 0 || self.ext_learned;
        !foreign && (!self.managed || self.state & NUD_FAILED != 0)
    }
}

/// The watched interface as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Link {
    pub(super) index: u32,
    /// IFF_* flags and IF_OPER_* operational state; `None` until first read.
    pub(super) state: Option<(u32, u8)>,
}

impl Link {
    pub(super) fn from_message(message: &LinkMessage) -> Link {
        let operstate = message
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::OperState(state) => Some(u8::from(*state)),
                _ => None,
            })
            .unwrap_or(0);
        Link {
            index: message.header.index,
            state: Some((message.header.flags.bits(), operstate)),
        }
    }
}

/// IFLA_IFNAME of a link message.
fn link_name(message: &LinkMessage) -> Option<&str> {
    message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.as_str()),
            _ => None,
        })
}

/// Follows the watched interface by name and turns netlink messages into [`Event`]s, reporting
/// changes only. Touches no socket.
#[derive(Debug)]
pub(super) struct Tracker {
    pub(super) interface: String,
    /// The interface now called by the watched name, if any.
    link: Option<Link>,
    /// What was last reported per address on the interface: `Some(mac)` usable, `None` not.
    /// An address missing here was never reported, or its entry was deleted.
    reported: BTreeMap<IpAddr, Option<[u8; 6]>>,
}

impl Tracker {
    pub(super) fn new(interface: &str, link: Option<Link>) -> Tracker {
        Tracker {
            interface: interface.to_string(),
            link,
            reported: BTreeMap::new(),
        }
    }

    pub(super) fn index(&self) -> Option<u32> {
        self.link.map(|link| link.index)
    }

    /// Appends the events one notification makes to `events`.
    pub(super) fn message(&mut self, message: &RouteNetlinkMessage, events: &mut Vec<Event>) {
        match message {
            RouteNetlinkMessage::NewLink(link) => self.link_message(link, false, events),
            RouteNetlinkMessage::DelLink(link) => self.link_message(link, true, events),
            RouteNetlinkMessage::NewNeighbour(entry) => {
                self.neighbour_message(entry, false, events)
            }
            RouteNetlinkMessage::DelNeighbour(entry) => self.neighbour_message(entry, true, events),
            _ => {}
        }
    }

    fn link_message(&mut self, message: &LinkMessage, deleted: bool, events: &mut Vec<Event>) {
        // Only AF_UNSPEC messages describe the interface itself: the bridge sends AF_BRIDGE ones
        // about its ports, RTM_DELLINK included when a port leaves it and lives on.
        if message.header.interface_family != AddressFamily::Unspec {
            return;
        }
        let ours = self.index() == Some(message.header.index);
        let name = link_name(message);
        if deleted {
            if ours {
                events.push(self.gone());
            }
        } else if name == Some(self.interface.as_str()) {
            self.up(Link::from_message(message), events);
        } else if ours && name.is_some() {
            // Renamed: the interface we followed no longer bears the name.
            events.push(self.gone());
        }
    }

    fn neighbour_message(
        &mut self,
        message: &NeighbourMessage,
        deleted: bool,
        events: &mut Vec<Event>,
    ) {
        let Some(entry) = Entry::parse(message) else {
            return;
        };
        if self.index() != Some(entry.ifindex) {
            return;
        }
        if deleted {
            self.forget(entry.address, events);
        } else {
            self.report(entry.address, entry.usable_mac(), events);
        }
    }

    /// Brings the link to what a fresh read found: `None` if no interface has the name.
    pub(super) fn resync_link(&mut self, link: Option<Link>, events: &mut Vec<Event>) {
        match link {
            Some(link) => self.up(link, events),
            None if self.link.is_some() => events.push(self.gone()),
            None => {}
        }
    }

    /// Brings everything to what a fresh read found: the link, and `entries` (any interface's).
    pub(super) fn resync(
        &mut self,
        link: Option<Link>,
        entries: &[Entry],
        events: &mut Vec<Event>,
    ) {
        self.resync_link(link, events);
        let Some(index) = self.index() else {
            return;
        };
        let now: BTreeMap<IpAddr, Option<[u8; 6]>> = entries
            .iter()
            .filter(|entry| entry.ifindex == index)
            .map(|entry| (entry.address, entry.usable_mac()))
            .collect();
        let vanished: Vec<IpAddr> = self
            .reported
            .keys()
            .filter(|address| !now.contains_key(address))
            .copied()
            .collect();
        for address in vanished {
            self.forget(address, events);
        }
        for (address, mac) in now {
            self.report(address, mac, events);
        }
    }

    /// The interface now called by the name is `link`.
    fn up(&mut self, link: Link, events: &mut Vec<Event>) {
        match self.link {
            Some(old) if old.index == link.index => {
                // The first read after an index alone fills the state in: nothing changed.
                let changed = old.state.is_some() && old.state != link.state;
                self.link = Some(link);
                if !changed {
                    return;
                }
            }
            Some(_) => {
                // Another interface took the name without its predecessor's deletion being seen
                // (it was renamed, or the message was lost).
                events.push(self.gone());
                self.link = Some(link);
            }
            None => self.link = Some(link),
        }
        events.push(Event::LinkUp {
            interface: self.interface.clone(),
            index: link.index,
        });
    }

    fn gone(&mut self) -> Event {
        self.link = None;
        self.reported.clear();
        Event::LinkGone {
            interface: self.interface.clone(),
        }
    }

    fn report(&mut self, address: IpAddr, mac: Option<[u8; 6]>, events: &mut Vec<Event>) {
        if self.reported.insert(address, mac) != Some(mac) {
            events.push(Event::Neighbour { address, mac });
        }
    }

    /// The entry for `address` was deleted. Reported even if it was never reported usable: the
    /// receiver may have read it through [`super::Neighbours::lookup`].
    fn forget(&mut self, address: IpAddr, events: &mut Vec<Event>) {
        if self.reported.remove(&address) != Some(None) {
            events.push(Event::Neighbour { address, mac: None });
        }
    }
}

/// Events the receiver has not taken yet, at most one per subject (an address, the link going,
/// the link coming): a newer event replaces the queued one and goes to the back. A receiver that
/// falls behind thus gets the latest state of everything, in the order of the last changes, and
/// the backlog is bounded by the number of neighbours, not of changes.
#[derive(Debug, Default)]
pub(super) struct Pending(VecDeque<Event>);

impl Pending {
    pub(super) fn push(&mut self, event: Event) {
        let gone = matches!(event, Event::LinkGone { .. });
        self.0.retain(|queued| {
            // The entries went with the interface: what was queued about them is moot.
            let moot = gone && matches!(queued, Event::Neighbour { .. });
            !moot && !same_subject(queued, &event)
        });
        self.0.push_back(event);
    }

    pub(super) fn pop(&mut self) -> Option<Event> {
        self.0.pop_front()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}

fn same_subject(a: &Event, b: &Event) -> bool {
    match (a, b) {
        (Event::Neighbour { address: x, .. }, Event::Neighbour { address: y, .. }) => x == y,
        (Event::LinkGone { .. }, Event::LinkGone { .. })
        | (Event::LinkUp { .. }, Event::LinkUp { .. }) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::{
        packet_core::Parseable,
        packet_route::{
            link::{LinkFlags, State},
            neighbour::NeighbourState,
        },
    };

    const IF: &str = "lb0";
    const MAC_A: [u8; 6] = [2, 0xaa, 0xbb, 0xcc, 0xdd, 1];
    const MAC_B: [u8; 6] = [2, 0xaa, 0xbb, 0xcc, 0xdd, 2];
    const UP: LinkFlags = LinkFlags::Up.union(LinkFlags::Running);

    fn addr(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn neighbour(
        ifindex: u32,
        address: &str,
        state: NeighbourState,
        mac: Option<[u8; 6]>,
    ) -> NeighbourMessage {
        let mut message = NeighbourMessage::default();
        let address = addr(address);
        message.header.family = match address {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        message.header.ifindex = ifindex;
        message.header.state = state;
        let destination = NeighbourAddress::from(address);
        message
            .attributes
            .push(NeighbourAttribute::Destination(destination));
        if let Some(mac) = mac {
            let lladdr = NeighbourAttribute::LinkLayerAddress(mac.to_vec());
            message.attributes.push(lladdr);
        }
        message
    }

    fn new_neighbour(ifindex: u32, address: &str, state: NeighbourState, mac: [u8; 6]) -> Message {
        RouteNetlinkMessage::NewNeighbour(neighbour(ifindex, address, state, Some(mac)))
    }

    fn link(index: u32, name: &str, flags: LinkFlags) -> LinkMessage {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.header.flags = flags;
        message.attributes.push(LinkAttribute::IfName(name.into()));
        message.attributes.push(LinkAttribute::OperState(State::Up));
        message
    }

    type Message = RouteNetlinkMessage;

    fn new_link(index: u32, name: &str, flags: LinkFlags) -> Message {
        RouteNetlinkMessage::NewLink(link(index, name, flags))
    }

    fn del_link(index: u32, name: &str) -> Message {
        RouteNetlinkMessage::DelLink(link(index, name, UP))
    }

    fn up(index: u32) -> Event {
        Event::LinkUp {
            interface: IF.into(),
            index,
        }
    }

    fn gone() -> Event {
        Event::LinkGone {
            interface: IF.into(),
        }
    }

    fn mac_event(address: &str, mac: Option<[u8; 6]>) -> Event {
        Event::Neighbour {
            address: addr(address),
            mac,
        }
    }

    fn feed(tracker: &mut Tracker, message: Message) -> Vec<Event> {
        let mut events = Vec::new();
        tracker.message(&message, &mut events);
        events
    }

    /// A tracker that has seen `IF` with index 3, up.
    fn tracking() -> Tracker {
        let mut tracker = Tracker::new(IF, None);
        assert_eq!(feed(&mut tracker, new_link(3, IF, UP)), [up(3)]);
        tracker
    }

    #[test]
    fn usable_states_give_the_mac_others_none() {
        for (state, usable) in [
            (NeighbourState::Reachable, true),
            (NeighbourState::Stale, true),
            (NeighbourState::Delay, true),
            (NeighbourState::Probe, true),
            (NeighbourState::Permanent, true),
            (NeighbourState::Noarp, true),
            (NeighbourState::Incomplete, false),
            (NeighbourState::Failed, false),
            (NeighbourState::None, false),
        ] {
            let entry = Entry::parse(&neighbour(3, "198.18.0.11", state, Some(MAC_A))).unwrap();
            assert_eq!(entry.address, addr("198.18.0.11"));
            assert_eq!(entry.ifindex, 3);
            assert_eq!(entry.usable_mac(), usable.then_some(MAC_A), "{state}");
        }
    }

    #[test]
    fn parse_skips_what_is_no_ip_neighbour() {
        let mut proxy = neighbour(3, "198.18.0.11", NeighbourState::Permanent, None);
        proxy.header.flags = NeighbourFlags::Proxy;
        assert_eq!(Entry::parse(&proxy), None);

        let mut no_destination = neighbour(3, "198.18.0.11", NeighbourState::Reachable, None);
        no_destination.attributes.clear();
        assert_eq!(Entry::parse(&no_destination), None);

        let mut bridge = neighbour(3, "198.18.0.11", NeighbourState::Reachable, Some(MAC_A));
        bridge.header.family = AddressFamily::Bridge;
        assert_eq!(Entry::parse(&bridge), None);

        // A usable state without a 6-byte address is no usable MAC.
        let mut short = neighbour(3, "198.18.0.11", NeighbourState::Reachable, None);
        let lladdr = NeighbourAttribute::LinkLayerAddress(vec![1, 2, 3, 4]);
        short.attributes.push(lladdr);
        assert_eq!(Entry::parse(&short).unwrap().usable_mac(), None);

        // An address of the other family than the header's is no entry.
        let mut mixed = neighbour(3, "2001:db8::11", NeighbourState::Reachable, Some(MAC_A));
        mixed.header.family = AddressFamily::Inet;
        assert_eq!(Entry::parse(&mixed), None);
        let mut mixed = neighbour(3, "198.18.0.11", NeighbourState::Reachable, Some(MAC_A));
        mixed.header.family = AddressFamily::Inet6;
        assert_eq!(Entry::parse(&mixed), None);
        let mut proxy = neighbour(3, "2001:db8::11", NeighbourState::Permanent, None);
        proxy.header.flags = NeighbourFlags::Proxy;
        assert_eq!(Entry::parse(&proxy), None);

        // The kernel's entries for multicast groups it sends to.
        let mld = [0x33, 0x33, 0, 0, 0, 0x16];
        let group = neighbour(3, "ff02::16", NeighbourState::Noarp, Some(mld));
        assert_eq!(Entry::parse(&group), None);
        let igmp = [0x01, 0x00, 0x5e, 0, 0, 0x16];
        let group = neighbour(3, "224.0.0.22", NeighbourState::Noarp, Some(igmp));
        assert_eq!(Entry::parse(&group), None);
    }

    #[test]
    fn ipv6_entries_parse_like_ipv4_ones() {
        use NeighbourState::{Delay, Failed, Incomplete, Probe, Reachable, Stale};
        // NDP's usable states all carry the link-layer address; INCOMPLETE and FAILED have none
        // worth using (the kernel may keep the last one in a FAILED entry).
        for (state, usable) in [
            (Reachable, true),
            (Stale, true),
            (Delay, true),
            (Probe, true),
            (Incomplete, false),
            (Failed, false),
        ] {
            let message = neighbour(3, "2001:db8::11", state, Some(MAC_A));
            let entry = Entry::parse(&message).unwrap();
            assert_eq!(entry.address, addr("2001:db8::11"));
            assert_eq!(entry.ifindex, 3);
            assert_eq!(entry.usable_mac(), usable.then_some(MAC_A), "{state}");
        }
        // The bytes the kernel sends (struct ndmsg, then NDA_DST of 16 bytes and NDA_LLADDR),
        // through the crate's parser. NTF_ROUTER (an NDP neighbour that is a router) changes
        // nothing.
        let mut bytes = vec![
            10, 0, 0, 0, // ndm_family AF_INET6, padding
            3, 0, 0, 0, // ndm_ifindex 3
            0x02, 0,    // ndm_state NUD_REACHABLE
            0x80, // ndm_flags NTF_ROUTER
            1,    // ndm_type RTN_UNICAST
            20, 0, 1, 0, // NDA_DST, 4 + 16 bytes
        ];
        let destination: std::net::Ipv6Addr = "2001:db8::11".parse().unwrap();
        bytes.extend(destination.octets());
        bytes.extend([10, 0, 2, 0]); // NDA_LLADDR, 4 + 6 bytes, padded to 12
        bytes.extend(MAC_A);
        bytes.extend([0, 0]);
        let decoded = NeighbourMessage::parse(&bytes[..]).unwrap();
        assert!(decoded.header.flags.contains(NeighbourFlags::Router));
        let entry = Entry::parse(&decoded).unwrap();
        assert_eq!(entry.address, addr("2001:db8::11"));
        assert_eq!(entry.usable_mac(), Some(MAC_A));
        assert!(entry.needs_request());
    }

    #[test]
    fn ipv6_neighbour_changes_are_reported_once() {
        use NeighbourState::{Delay, Failed, Incomplete, Probe, Reachable, Stale};
        const V6: &str = "2001:db8::11";
        let mut tracker = tracking();
        let t = &mut tracker;
        let resolving = RouteNetlinkMessage::NewNeighbour(neighbour(3, V6, Incomplete, None));
        assert_eq!(feed(t, resolving), [mac_event(V6, None)]);
        let new = |state, mac| new_neighbour(3, V6, state, mac);
        assert_eq!(feed(t, new(Reachable, MAC_A)), [mac_event(V6, Some(MAC_A))]);
        // NUD ageing with the same MAC is no change.
        for state in [Stale, Delay, Probe, Reachable] {
            assert_eq!(feed(t, new(state, MAC_A)), [], "{state}");
        }
        // A new MAC (an unsolicited Neighbour Advertisement, or a managed entry's revalidation)
        // is; a failed probe takes the MAC away.
        assert_eq!(feed(t, new(Stale, MAC_B)), [mac_event(V6, Some(MAC_B))]);
        assert_eq!(feed(t, new(Failed, MAC_B)), [mac_event(V6, None)]);
        assert_eq!(feed(t, new(Reachable, MAC_B)), [mac_event(V6, Some(MAC_B))]);
        // The IPv4 entry of the same backend is another subject.
        let v4 = new_neighbour(3, "198.18.0.11", Reachable, MAC_B);
        assert_eq!(feed(t, v4), [mac_event("198.18.0.11", Some(MAC_B))]);
        let deleted = neighbour(3, V6, Reachable, Some(MAC_B));
        let deleted = RouteNetlinkMessage::DelNeighbour(deleted);
        assert_eq!(feed(t, deleted), [mac_event(V6, None)]);
        // On another interface: not ours.
        assert_eq!(feed(t, new_neighbour(4, V6, Reachable, MAC_A)), []);
    }

    #[test]
    fn resync_reports_ipv6_differences() {
        use NeighbourState::{Reachable, Stale};
        let mut tracker = tracking();
        for (address, mac) in [
            ("2001:db8::11", MAC_A),
            ("2001:db8::12", MAC_B),
            ("198.18.0.11", MAC_A),
        ] {
            feed(&mut tracker, new_neighbour(3, address, Reachable, mac));
        }
        let entry =
            |address, state, mac| Entry::parse(&neighbour(3, address, state, Some(mac))).unwrap();
        // Both families' dumps together: ::12 vanished, ::11 changed its MAC, ::13 is new.
        let dump = [
            entry("198.18.0.11", Stale, MAC_A),
            entry("2001:db8::11", Stale, MAC_B),
            entry("2001:db8::13", Reachable, MAC_A),
        ];
        let mut events = Vec::new();
        let same_link = Link::from_message(&link(3, IF, UP));
        tracker.resync(Some(same_link), &dump, &mut events);
        let expected = [
            mac_event("2001:db8::12", None),
            mac_event("2001:db8::11", Some(MAC_B)),
            mac_event("2001:db8::13", Some(MAC_A)),
        ];
        assert_eq!(events, expected);
    }

    #[test]
    fn requests_only_for_entries_that_are_ours_to_manage() {
        let entry = |state, managed, ext_learned| Entry {
            ifindex: 3,
            address: addr("198.18.0.11"),
            state,
            lladdr: Some(MAC_A),
            managed,
            ext_learned,
        };
        assert!(entry(NUD_REACHABLE, false, false).needs_request());
        assert!(entry(NUD_STALE, false, false).needs_request());
        assert!(!entry(NUD_REACHABLE, true, false).needs_request());
        assert!(entry(NUD_FAILED, true, false).needs_request());
        assert!(!entry(NUD_PERMANENT, false, false).needs_request());
        assert!(!entry(NUD_NOARP, false, false).needs_request());
        assert!(!entry(NUD_REACHABLE, false, true).needs_request());

        let mut managed = neighbour(3, "198.18.0.11", NeighbourState::Reachable, Some(MAC_A));
        let flags = NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed);
        managed.attributes.push(flags);
        assert!(Entry::parse(&managed).unwrap().managed);
        let mut learnt = neighbour(3, "198.18.0.11", NeighbourState::Reachable, Some(MAC_A));
        learnt.header.flags = NeighbourFlags::ExtLearned;
        assert!(!Entry::parse(&learnt).unwrap().needs_request());
    }

    #[test]
    fn neighbour_changes_are_reported_once() {
        use NeighbourState::{Delay, Failed, Incomplete, Reachable, Stale};
        let mut tracker = tracking();
        let t = &mut tracker;
        let resolving = || {
            let message = neighbour(3, "198.18.0.11", Incomplete, None);
            RouteNetlinkMessage::NewNeighbour(message)
        };
        // Resolving: nothing usable yet, said once.
        assert_eq!(feed(t, resolving()), [mac_event("198.18.0.11", None)]);
        assert_eq!(feed(t, resolving()), []);
        let a = Some(MAC_A);
        let b = Some(MAC_B);
        let new = |state, mac| new_neighbour(3, "198.18.0.11", state, mac);
        assert_eq!(
            feed(t, new(Reachable, MAC_A)),
            [mac_event("198.18.0.11", a)]
        );
        // Ageing with the same MAC is no change.
        assert_eq!(feed(t, new(Stale, MAC_A)), []);
        assert_eq!(feed(t, new(Delay, MAC_A)), []);
        // A new MAC (a gratuitous ARP after a NIC change) is.
        assert_eq!(feed(t, new(Stale, MAC_B)), [mac_event("198.18.0.11", b)]);
        assert_eq!(
            feed(t, new(Failed, MAC_B)),
            [mac_event("198.18.0.11", None)]
        );
        assert_eq!(
            feed(t, new(Reachable, MAC_B)),
            [mac_event("198.18.0.11", b)]
        );
        let deleted = neighbour(3, "198.18.0.11", Reachable, b);
        let deleted = RouteNetlinkMessage::DelNeighbour(deleted);
        assert_eq!(feed(t, deleted), [mac_event("198.18.0.11", None)]);
        // Deleting an entry never reported still says so: it may have been looked up.
        let other = RouteNetlinkMessage::DelNeighbour(neighbour(3, "198.18.0.12", Stale, a));
        assert_eq!(feed(t, other), [mac_event("198.18.0.12", None)]);
    }

    #[test]
    fn other_interfaces_and_families_are_ignored() {
        let mut tracker = tracking();
        let t = &mut tracker;
        let elsewhere = new_neighbour(4, "198.18.0.11", NeighbourState::Reachable, MAC_A);
        assert_eq!(feed(t, elsewhere), []);
        assert_eq!(feed(t, new_link(4, "eth1", UP)), []);
        assert_eq!(feed(t, del_link(4, "eth1")), []);
        // A bridge port leaving its bridge: the interface lives on.
        let mut port = link(3, IF, UP);
        port.header.interface_family = AddressFamily::Bridge;
        assert_eq!(feed(t, RouteNetlinkMessage::DelLink(port)), []);
        assert_eq!(t.index(), Some(3));
    }

    #[test]
    fn the_interface_is_followed_by_name() {
        let mut tracker = tracking();
        let t = &mut tracker;
        let reachable =
            |ifindex| new_neighbour(ifindex, "198.18.0.11", NeighbourState::Reachable, MAC_A);
        let usable = || mac_event("198.18.0.11", Some(MAC_A));
        assert_eq!(feed(t, reachable(3)), [usable()]);
        // The same state again is no change; going down is.
        assert_eq!(feed(t, new_link(3, IF, UP)), []);
        assert_eq!(feed(t, new_link(3, IF, LinkFlags::Broadcast)), [up(3)]);

        assert_eq!(feed(t, del_link(3, IF)), [gone()]);
        assert_eq!(t.index(), None);
        assert_eq!(feed(t, reachable(3)), []);

        // Created again under the same name, with a new index.
        assert_eq!(feed(t, new_link(7, IF, UP)), [up(7)]);
        // What was reported about the old interface is forgotten: the same MAC is news here.
        assert_eq!(feed(t, reachable(7)), [usable()]);

        // Renamed away, then another interface renamed to the name.
        assert_eq!(feed(t, new_link(7, "old-lb0", UP)), [gone()]);
        assert_eq!(feed(t, new_link(9, IF, UP)), [up(9)]);
        // A new index without the deletion seen first still reports it gone first.
        assert_eq!(feed(t, new_link(11, IF, UP)), [gone(), up(11)]);
    }

    #[test]
    fn the_first_read_after_an_index_alone_is_no_change() {
        let known = Link {
            index: 3,
            state: None,
        };
        let mut tracker = Tracker::new(IF, Some(known));
        let mut events = Vec::new();
        let read = Link::from_message(&link(3, IF, UP));
        tracker.resync_link(Some(read), &mut events);
        assert_eq!(events, []);
        tracker.resync_link(None, &mut events);
        assert_eq!(events, [gone()]);
    }

    #[test]
    fn resync_reports_the_differences() {
        use NeighbourState::{Failed, Reachable, Stale};
        let mut tracker = tracking();
        for (address, mac) in [
            ("198.18.0.11", MAC_A),
            ("198.18.0.12", MAC_B),
            ("198.18.0.13", MAC_A),
        ] {
            feed(&mut tracker, new_neighbour(3, address, Reachable, mac));
        }
        let entry = |ifindex, address, state, mac| {
            Entry::parse(&neighbour(ifindex, address, state, Some(mac))).unwrap()
        };
        let dump = [
            entry(3, "198.18.0.11", Stale, MAC_A),
            entry(3, "198.18.0.13", Failed, MAC_A),
            entry(3, "198.18.0.14", Reachable, MAC_B),
            entry(4, "198.18.0.12", Reachable, MAC_A),
        ];
        let mut events = Vec::new();
        let same_link = Link::from_message(&link(3, IF, UP));
        tracker.resync(Some(same_link), &dump, &mut events);
        let expected = [
            mac_event("198.18.0.12", None),
            mac_event("198.18.0.13", None),
            mac_event("198.18.0.14", Some(MAC_B)),
        ];
        assert_eq!(events, expected);

        // The interface was recreated meanwhile: gone, back, and its entries anew.
        let mut events = Vec::new();
        let recreated = Link::from_message(&link(5, IF, UP));
        let dump = [entry(5, "198.18.0.11", Reachable, MAC_A)];
        tracker.resync(Some(recreated), &dump, &mut events);
        let anew = mac_event("198.18.0.11", Some(MAC_A));
        assert_eq!(events, [gone(), up(5), anew]);
    }

    #[test]
    fn pending_keeps_the_latest_event_per_subject() {
        let mut pending = Pending::default();
        pending.push(mac_event("198.18.0.11", Some(MAC_A)));
        pending.push(mac_event("198.18.0.12", Some(MAC_A)));
        pending.push(mac_event("198.18.0.11", Some(MAC_B)));
        assert_eq!(pending.pop(), Some(mac_event("198.18.0.12", Some(MAC_A))));
        assert_eq!(pending.pop(), Some(mac_event("198.18.0.11", Some(MAC_B))));
        assert_eq!(pending.pop(), None);

        // Entries queued before the interface went are dropped with it; gone and up stay apart.
        pending.push(up(3));
        pending.push(mac_event("198.18.0.11", Some(MAC_A)));
        pending.push(gone());
        pending.push(up(5));
        pending.push(mac_event("198.18.0.11", Some(MAC_B)));
        assert_eq!(pending.pop(), Some(gone()));
        assert_eq!(pending.pop(), Some(up(5)));
        assert_eq!(pending.pop(), Some(mac_event("198.18.0.11", Some(MAC_B))));
        assert!(pending.is_empty());

        // Gone, back and gone again ends gone.
        pending.push(gone());
        pending.push(up(7));
        pending.push(gone());
        assert_eq!(pending.pop(), Some(up(7)));
        assert_eq!(pending.pop(), Some(gone()));
        assert!(pending.is_empty());
    }
}
