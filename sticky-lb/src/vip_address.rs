//! The IPv6 VIPs as the interface holds them.
//!
//! The balancer owns each VIP on its interface, so the VIP is a local address like any other, and
//! IPv6 source selection (RFC 6724 rule 8, longest matching prefix, which Linux caps at each
//! address's own prefix length) prefers a /128 VIP over the interface's own /64 or shorter
//! address for destinations close to it: the balancer's health checks then leave from the VIP,
//! and each backend, which holds the VIP on loopback, answers its own VIP instead of the
//! balancer. Every check fails and every backend is marked down. An address added with
//! `preferred_lft 0` is deprecated: packets to it are still received, but it is never chosen as
//! a source (rule 3). IPv4 has no such trap: a /32 VIP is not the primary address of a subnet.
//! The controller does not change the operator's addresses; it says so at attach and after a
//! reload.
//!
//! Read from `/proc/thread-self/net/if_inet6`, so it is the calling thread's network namespace
//! (the one the controller joined) that is asked, as for the ethtool ioctl in offload.rs. One
//! line per address, fields in hex: 32 address digits, interface index, prefix length, scope,
//! flags (`IFA_F_*`, include/uapi/linux/if_addr.h), then the interface name.

use std::net::Ipv6Addr;
use tracing::{debug, warn};

/// `IFA_F_DEPRECATED`: the address's preferred lifetime is over (or was 0).
const IFA_F_DEPRECATED: u32 = 0x20;

/// The VIPs among `vips` that `interface` holds as preferred (not deprecated) addresses, in
/// the text of `if_inet6`. Lines that do not parse are skipped.
pub fn preferred_vips(if_inet6: &str, interface: &str, vips: &[Ipv6Addr]) -> Vec<Ipv6Addr> {
    if_inet6
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [address, _index, _prefix, _scope, flags, name] = fields[..] else {
                return None;
            };
            if name != interface {
                return None;
            }
            let address = Ipv6Addr::from(u128::from_str_radix(address, 16).ok()?);
            let flags = u32::from_str_radix(flags, 16).ok()?;
            (flags & IFA_F_DEPRECATED == 0 && vips.contains(&address)).then_some(address)
        })
        .collect()
}

/// The warning logged for a preferred IPv6 VIP; the README's "Running it on a real host" says
/// the same.
pub fn preferred_vip_warning(interface: &str, vip: Ipv6Addr) -> String {
    format!(
        "VIP {vip} is a preferred address on {interface}: the kernel may choose it as the source \
         of connections the balancer opens itself, so health checks leave from the VIP and each \
         backend answers its own VIP on loopback (every check fails); add it with `ip addr add \
         {vip}/128 dev {interface} preferred_lft 0`, which keeps it receiving but never a source"
    )
}

/// Logs [`preferred_vip_warning`] for each of `vips` that `interface` holds as a preferred
/// address. A file that cannot be read (IPv6 disabled) is only noted at debug level.
pub fn warn_if_preferred(interface: &str, vips: &[Ipv6Addr]) {
    if vips.is_empty() {
        return;
    }
    match std::fs::read_to_string("/proc/thread-self/net/if_inet6") {
        Ok(text) => {
            for vip in preferred_vips(&text, interface, vips) {
                warn!("{}", preferred_vip_warning(interface, vip));
            }
        }
        Err(e) => debug!("interface {interface}: IPv6 addresses not known ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IF_INET6: &str = "\
20010db8000000000000000000000100 03 80 00 82       lb0
20010db8000000000000000000000101 03 80 00 a2       lb0
20010db8000000000000000000000002 03 20 00 82       lb0
20010db8000000000000000000000102 04 80 00 82      eth1
fe80000000000000bc1515fffe1a847e 03 40 20 80       lb0
not an address line
";

    fn v6(text: &str) -> Ipv6Addr {
        text.parse().unwrap()
    }

    #[test]
    fn only_preferred_vips_on_the_interface_are_reported() {
        let vips = [
            v6("2001:db8::100"),
            v6("2001:db8::101"),
            v6("2001:db8::102"),
            v6("2001:db8::103"),
        ];
        // ::100 preferred on lb0: reported. ::101 deprecated (0x20 in 0xa2): not. ::102 is on
        // another interface, ::103 on none; ::2 is no VIP.
        assert_eq!(
            preferred_vips(IF_INET6, "lb0", &vips),
            vec![v6("2001:db8::100")]
        );
        assert_eq!(
            preferred_vips(IF_INET6, "eth1", &vips),
            vec![v6("2001:db8::102")]
        );
        assert!(preferred_vips(IF_INET6, "lb0", &[]).is_empty());
    }

    #[test]
    fn the_warning_names_the_vip_and_the_fix() {
        let text = preferred_vip_warning("lb0", v6("2001:db8::100"));
        assert!(text.starts_with("VIP 2001:db8::100 is a preferred address on lb0"));
        assert!(text.contains("ip addr add 2001:db8::100/128 dev lb0 preferred_lft 0"));
    }
}
