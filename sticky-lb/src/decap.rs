//! `sticky-lb decap`: the backend side of `forwarding: tunnel`. The balancer sends a client's
//! packet inside an outer IPv4 header (protocol 4) or IPv6 header (next header 41) addressed to
//! the backend; this loads the decapsulation program (sticky-lb-ebpf's `sticky-lb-decap`, its
//! own small object), tells it this host's tunnel addresses, attaches it to the interface the
//! tunnel packets arrive on and keeps it there until SIGINT or SIGTERM. Nothing is pinned: the
//! program lives as long as the process, like a tunnel device would live with its host.

use crate::{
    config::XdpMode,
    dataplane::{Attached, attach_in_mode},
};
use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, PerCpuArray},
    programs::Xdp,
};
use std::net::IpAddr;
use sticky_lb_common::{
    Family, addr,
    decap::{DecapCounter, MAX_TUNNEL_ADDRS, TunnelAddr, map_names},
};
use tracing::info;

/// The compiled decapsulation object (sticky-lb-ebpf's `sticky-lb-decap`), embedded at build time.
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("STICKY_LB_DECAP_OBJECT"));

/// Name of the XDP program in the object.
pub const PROGRAM: &str = "decap";

/// What `sticky-lb decap` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// The interface tunnel packets arrive on.
    pub interface: String,
    /// The outer destinations to decapsulate, as given on the command line (`--address`); empty:
    /// every IPv4 and IPv6 address of the interface.
    pub addresses: Vec<String>,
    pub mode: XdpMode,
}

/// The loaded decapsulation program (not attached) and its maps.
pub struct Decap {
    ebpf: Ebpf,
    addresses: HashMap<MapData, TunnelAddr, u8>,
    stats: PerCpuArray<MapData, u64>,
}

impl Decap {
    /// Loads the object and its program into the kernel; no tunnel address yet, nothing attached.
    pub fn load() -> Result<Decap> {
        let mut ebpf = EbpfLoader::new()
            .load(DECAP_OBJECT)
            .context("loading the decapsulation program")?;
        let addresses = take(&mut ebpf, map_names::ADDRS)?;
        let stats = take(&mut ebpf, map_names::STATS)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .context("program decap missing")?
            .try_into()?;
        program
            .load()
            .context("the kernel rejected the decapsulation program")?;
        Ok(Decap {
            ebpf,
            addresses,
            stats,
        })
    }

    /// Decapsulates tunnel packets whose outer destination is `address` from now on.
    pub fn add_address(&mut self, address: IpAddr) -> Result<()> {
        self.addresses
            .insert(&tunnel_key(&address), &1, 0)
            .with_context(|| format!("adding tunnel address {address}"))
    }

    /// The XDP program (for BPF_PROG_TEST_RUN in tests, and to attach).
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf.program_mut(PROGRAM).unwrap().try_into().unwrap()
    }

    /// Each counter summed over the CPUs, in [`DecapCounter::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(DecapCounter, u64)>> {
        DecapCounter::ALL
            .iter()
            .map(|&counter| {
                let per_cpu = self
                    .stats
                    .get(&(counter as u32), 0)
                    .with_context(|| format!("reading counter {}", counter.name()))?;
                Ok((counter, per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// The map key of a tunnel address.
pub fn tunnel_key(address: &IpAddr) -> TunnelAddr {
    TunnelAddr::new(Family::of(address), addr::words(address))
}

/// Loads the program, fills in the tunnel addresses, attaches it to the interface and waits for
/// SIGINT or SIGTERM; then detaches it and prints its counters, one `name value` line each.
/// Everything that can be checked is checked before anything is loaded: an unknown interface, an
/// address that is not an IPv4 or IPv6 unicast address, an interface without addresses and no
/// `--address`, more than [`MAX_TUNNEL_ADDRS`] addresses, missing privileges.
pub fn run(options: &Options) -> Result<()> {
    let interface = options.interface.as_str();
    interface_index(interface)?;
    let mut addresses = if options.addresses.is_empty() {
        let found = crate::neighbour::interface_addresses(interface)?;
        if found.is_empty() {
            bail!(
                "interface {interface} has no IPv4 or IPv6 address to decapsulate for: \
                 add one, or name them with --address"
            );
        }
        found
    } else {
        options
            .addresses
            .iter()
            .map(|text| parse_address(text))
            .collect::<Result<Vec<_>>>()?
    };
    addresses.sort();
    addresses.dedup();
    if addresses.len() > MAX_TUNNEL_ADDRS as usize {
        bail!(
            "{} tunnel addresses: at most {MAX_TUNNEL_ADDRS}",
            addresses.len()
        );
    }
    require_privileges()?;
    // Held from here on, so a signal that comes during set-up is taken after the attach and
    // the program is detached as usual, never left behind half set up.
    let signals = StopSignals::block()?;

    let mut decap = Decap::load()?;
    for &address in &addresses {
        decap.add_address(address)?;
    }
    let (link, attached) = attach_in_mode(decap.program(), interface, options.mode)
        .with_context(|| format!("attaching to {interface}"))?;
    info!("{}", describe(interface, attached, &addresses));

    let signal = signals.wait()?;
    decap
        .program()
        .detach(link)
        .with_context(|| format!("detaching from {interface}"))?;
    info!("signal {signal}: detached from {interface}");
    for (counter, value) in decap.counters()? {
        println!("{} {value}", counter.name());
    }
    Ok(())
}

/// The line `sticky-lb decap` logs once attached: the interface, the mode, the tunnel kinds and
/// the addresses.
pub fn describe(interface: &str, attached: Attached, addresses: &[IpAddr]) -> String {
    let mode = match attached {
        Attached::Native => "native",
        Attached::Generic | Attached::Replaced => "generic",
    };
    let mut kinds = Vec::new();
    if addresses.iter().any(IpAddr::is_ipv4) {
        kinds.push("IPv4-in-IPv4 (IPIP) and IPv6-in-IPv4");
    }
    if addresses.iter().any(IpAddr::is_ipv6) {
        kinds.push("IPv4-in-IPv6 and IPv6-in-IPv6");
    }
    let list: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
    format!(
        "decapsulating on {interface} ({mode} XDP): {} to {}; everything else passes untouched",
        kinds.join(", "),
        list.join(", ")
    )
}

/// An `--address` value: an IPv4 or IPv6 unicast address (a tunnel packet is never sent to an
/// unspecified, multicast or broadcast address).
pub fn parse_address(text: &str) -> Result<IpAddr> {
    let address: IpAddr = text
        .parse()
        .map_err(|_| anyhow!("--address {text}: not an IPv4 or IPv6 address"))?;
    let broadcast = matches!(address, IpAddr::V4(a) if a.is_broadcast());
    if address.is_unspecified() || address.is_multicast() || broadcast {
        bail!("--address {text}: not a unicast address");
    }
    Ok(address)
}

/// The index of `interface` in the current network namespace.
fn interface_index(interface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(interface)
        .map_err(|_| anyhow!("'{interface}' is not an interface name"))?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => bail!("no interface named {interface}"),
        index => Ok(index),
    }
}

/// `CAP_NET_ADMIN`, `CAP_SYS_ADMIN` and `CAP_BPF` (include/uapi/linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Fails unless the process may load and attach an XDP program: `CAP_NET_ADMIN`, and `CAP_BPF`
/// or `CAP_SYS_ADMIN` (what root has), read from the effective set in /proc/self/status. Checked
/// before loading, so the error is one plain line instead of the first syscall's EPERM.
fn require_privileges() -> Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff line in /proc/self/status")?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    if !(has(CAP_NET_ADMIN) && (has(CAP_BPF) || has(CAP_SYS_ADMIN))) {
        bail!("decap needs root (or CAP_BPF and CAP_NET_ADMIN) to load and attach an XDP program");
    }
    Ok(())
}

fn take<T: TryFrom<Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the decapsulation object"))?;
    Ok(T::try_from(map)?)
}

/// SIGINT and SIGTERM, blocked for the calling thread (and any thread it starts later) so they
/// stay pending until [`StopSignals::wait`] takes one: no handler, no async runtime.
struct StopSignals {
    set: libc::sigset_t,
}

impl StopSignals {
    fn block() -> Result<StopSignals> {
        // SAFETY: sigemptyset and sigaddset initialise the set we own; pthread_sigmask changes
        // this thread's mask only.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc)).context("blocking signals");
            }
            Ok(StopSignals { set })
        }
    }

    /// Waits for SIGINT or SIGTERM; returns its name.
    fn wait(&self) -> Result<&'static str> {
        loop {
            // SAFETY: a set of blocked signals; no siginfo wanted.
            let signal = unsafe { libc::sigwaitinfo(&self.set, std::ptr::null_mut()) };
            match signal {
                libc::SIGINT => return Ok("SIGINT"),
                libc::SIGTERM => return Ok("SIGTERM"),
                _ => {
                    let error = std::io::Error::last_os_error();
                    if error.kind() != std::io::ErrorKind::Interrupted {
                        return Err(error).context("waiting for SIGINT or SIGTERM");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unicast_ipv4_or_ipv6() {
        assert_eq!(
            parse_address("198.18.0.2").unwrap(),
            "198.18.0.2".parse::<IpAddr>().unwrap()
        );
        assert!(parse_address("2001:db8::2").is_ok());
        for (text, why) in [
            ("eth0", "not an IPv4 or IPv6 address"),
            ("02:00:00:00:00:01", "not an IPv4 or IPv6 address"),
            ("198.18.0.0/15", "not an IPv4 or IPv6 address"),
            ("0.0.0.0", "not a unicast address"),
            ("::", "not a unicast address"),
            ("224.0.0.1", "not a unicast address"),
            ("ff02::1", "not a unicast address"),
            ("255.255.255.255", "not a unicast address"),
        ] {
            let error = parse_address(text).unwrap_err().to_string();
            assert_eq!(error, format!("--address {text}: {why}"));
        }
    }

    #[test]
    fn the_key_holds_the_family_and_the_map_words() {
        let v4: IpAddr = "198.18.0.2".parse().unwrap();
        let key = tunnel_key(&v4);
        assert_eq!(key.family, Family::Ipv4 as u32);
        assert_eq!(key.addr, [u32::from_ne_bytes([198, 18, 0, 2]), 0, 0, 0]);
        // An IPv6 address with the same words is another key.
        let v6 = IpAddr::from([198, 18, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(tunnel_key(&v6).addr, key.addr);
        assert_ne!(tunnel_key(&v6), key);
    }

    #[test]
    fn the_log_line_names_the_tunnel_kinds_of_the_address_families() {
        let both: Vec<IpAddr> = vec![
            "198.18.0.2".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
        ];
        assert_eq!(
            describe("eth0", Attached::Native, &both),
            "decapsulating on eth0 (native XDP): IPv4-in-IPv4 (IPIP) and IPv6-in-IPv4, \
             IPv4-in-IPv6 and IPv6-in-IPv6 to 198.18.0.2, 2001:db8::2; everything else passes \
             untouched"
        );
        assert_eq!(
            describe("eth0", Attached::Generic, &both[1..]),
            "decapsulating on eth0 (generic XDP): IPv4-in-IPv6 and IPv6-in-IPv6 to 2001:db8::2; \
             everything else passes untouched"
        );
    }
}
