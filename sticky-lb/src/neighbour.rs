//! Layer-2 facts the DSR data path needs: our interface's MAC and each backend's MAC from the
//! kernel's neighbour table.
//!
//! Both are read through the calling thread's network namespace (ioctl on a socket,
//! /proc/thread-self/net/arp), never through /sys, which shows the namespace sysfs was mounted in.

use anyhow::{Context, Result, bail};
use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

/// The MAC address of `interface` (SIOCGIFHWADDR).
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

/// The MAC the kernel has resolved for `addr` on `interface`, if the entry is complete.
pub fn lookup(addr: Ipv4Addr, interface: &str) -> Option<[u8; 6]> {
    let table = std::fs::read_to_string("/proc/thread-self/net/arp").ok()?;
    parse_arp_table(&table, addr, interface)
}

/// Parses /proc/net/arp: `IP address  HW type  Flags  HW address  Mask  Device`.
fn parse_arp_table(table: &str, addr: Ipv4Addr, interface: &str) -> Option<[u8; 6]> {
    const ATF_COM: u32 = 0x2; // the entry is complete
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[0].parse::<Ipv4Addr>().ok()? != addr || f[5] != interface {
            return None;
        }
        let flags = u32::from_str_radix(f[2].trim_start_matches("0x"), 16).ok()?;
        if flags & ATF_COM == 0 {
            return None;
        }
        crate::config::parse_mac(f[3]).ok()
    })
}

/// Makes the kernel resolve `addr` by sending it one empty UDP datagram to the discard port,
/// then waits for the neighbour entry. Returns `None` if nothing answers within `timeout`.
pub fn resolve(addr: Ipv4Addr, interface: &str, timeout: Duration) -> Option<[u8; 6]> {
    if let Some(mac) = lookup(addr, interface) {
        return Some(mac);
    }
    if let Ok(socket) = UdpSocket::bind("0.0.0.0:0") {
        let _ = socket.send_to(&[], SocketAddrV4::new(addr, 9));
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        if let Some(mac) = lookup(addr, interface) {
            return Some(mac);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_complete_entries_only() {
        let table = "\
IP address       HW type     Flags       HW address            Mask     Device
198.18.0.11      0x1         0x2         02:aa:bb:cc:dd:01     *        lb0
198.18.0.12      0x1         0x0         00:00:00:00:00:00     *        lb0
198.18.0.13      0x1         0x2         02:aa:bb:cc:dd:03     *        eth9
";
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            parse_arp_table(table, a("198.18.0.11"), "lb0"),
            Some([2, 0xaa, 0xbb, 0xcc, 0xdd, 1])
        );
        assert_eq!(parse_arp_table(table, a("198.18.0.12"), "lb0"), None);
        assert_eq!(parse_arp_table(table, a("198.18.0.13"), "lb0"), None);
    }
}
