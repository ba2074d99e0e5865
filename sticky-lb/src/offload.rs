//! The offload state of the interface the data path attaches to, as far as it changes what XDP
//! sees: receive VLAN offload.
//!
//! With rx VLAN offload on (`ethtool -k`: `rx-vlan-offload`, kernel feature `rx-vlan-hw-parse`,
//! `NETIF_F_HW_VLAN_CTAG_RX`) the driver strips the 802.1Q tag before the XDP program runs: the
//! program never sees the tag of VLAN-tagged service traffic, and a frame it forwards with
//! XDP_TX leaves without it. The controller cannot fix that itself; it says so once at attach.
//!
//! Read like `ethtool -k` does, with the ethtool ioctl (`SIOCETHTOOL`) on a socket, so it is the
//! calling thread's network namespace (the one the controller joined) that is asked, never /sys:
//! `ETHTOOL_GSSET_INFO` (how many features), `ETHTOOL_GSTRINGS` (their names, in bit order),
//! `ETHTOOL_GFEATURES` (the bitmaps). Feature bit numbers are not stable across kernels, so the
//! bit is found by name. Constants and layouts: include/uapi/linux/ethtool.h.

use std::io;
use tracing::{debug, warn};

/// The kernel's name of the rx VLAN offload feature (`NETIF_F_HW_VLAN_CTAG_RX`).
pub const RX_VLAN_FEATURE: &str = "rx-vlan-hw-parse";

/// `ETHTOOL_GSTRINGS`: read a string set (`struct ethtool_gstrings`).
const ETHTOOL_GSTRINGS: u32 = 0x1b;
/// `ETHTOOL_GSSET_INFO`: the sizes of string sets (`struct ethtool_sset_info`).
const ETHTOOL_GSSET_INFO: u32 = 0x37;
/// `ETHTOOL_GFEATURES`: the feature bitmaps (`struct ethtool_gfeatures`).
const ETHTOOL_GFEATURES: u32 = 0x3a;
/// `ETH_SS_FEATURES`: the string set naming the feature bits.
const ETH_SS_FEATURES: u32 = 4;
/// `ETH_GSTRING_LEN`: bytes per name in a string set, NUL-padded.
const ETH_GSTRING_LEN: usize = 32;
/// Bytes per `struct ethtool_get_features_block`: four u32 bitmaps (available, requested,
/// active, never_changed), each covering 32 features.
const FEATURE_BLOCK_LEN: usize = 16;
/// Offset of `active` (the features in effect now, what `ethtool -k` shows) within a block.
const ACTIVE_OFFSET: usize = 8;
/// More features than any kernel has (about 70 today): a larger count is not believed.
const MAX_FEATURES: usize = 4096;

/// The warning logged when rx VLAN offload is on; the README's "Running it on a real host" says
/// the same with `<interface>`.
pub fn rx_vlan_warning(interface: &str) -> String {
    format!(
        "interface {interface} has rx VLAN offload on: the driver strips 802.1Q tags before XDP \
         runs, so VLAN-tagged service traffic reaches sticky-lb without its tag and is forwarded \
         untagged; if clients reach {interface} through a VLAN, turn it off with \
         `ethtool -K {interface} rxvlan off`"
    )
}

/// Logs [`rx_vlan_warning`] if rx VLAN offload is on for `interface`. A failed read (a driver
/// without ethtool support: EOPNOTSUPP; no such device: ENODEV) is logged at debug level only.
pub fn warn_if_rx_vlan_offload(interface: &str) {
    match rx_vlan_offload(interface) {
        Ok(true) => warn!("{}", rx_vlan_warning(interface)),
        Ok(false) => debug!("interface {interface}: rx VLAN offload is off"),
        Err(e) => debug!("interface {interface}: rx VLAN offload not known ({e})"),
    }
}

/// Whether rx VLAN offload ([`RX_VLAN_FEATURE`]) is active on `interface`.
pub fn rx_vlan_offload(interface: &str) -> io::Result<bool> {
    let socket = EthtoolSocket::new(interface)?;
    let count = socket.feature_count()?;
    let names = socket.feature_names(count)?;
    let blocks = socket.feature_blocks(count)?;
    feature_active(&names, &blocks, RX_VLAN_FEATURE).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the kernel names no feature {RX_VLAN_FEATURE}"),
        )
    })
}

/// Whether feature `name` is active, from the `ETH_SS_FEATURES` names (`ETH_GSTRING_LEN` bytes
/// each, NUL-padded, in bit order) and the `ETHTOOL_GFEATURES` blocks (`FEATURE_BLOCK_LEN`
/// bytes each, native-endian u32s; bit i is bit i % 32 of block i / 32). `None` if no feature
/// has that name or the blocks do not reach its bit.
fn feature_active(names: &[u8], blocks: &[u8], name: &str) -> Option<bool> {
    let (names, _) = names.as_chunks::<ETH_GSTRING_LEN>();
    let bit = names.iter().position(|raw| {
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        &raw[..end] == name.as_bytes()
    })?;
    let at = (bit / 32) * FEATURE_BLOCK_LEN + ACTIVE_OFFSET;
    let active = u32::from_ne_bytes(blocks.get(at..at + 4)?.try_into().ok()?);
    Some(active & (1 << (bit % 32)) != 0)
}

/// A datagram socket to send ethtool requests about one interface through; closed on drop.
struct EthtoolSocket {
    fd: libc::c_int,
    interface: String,
}

impl EthtoolSocket {
    fn new(interface: &str) -> io::Result<EthtoolSocket> {
        if interface.is_empty() || interface.len() >= libc::IFNAMSIZ {
            return Err(io::Error::from_raw_os_error(libc::ENODEV));
        }
        // SAFETY: plain socket(2); the fd is closed on drop.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(EthtoolSocket {
            fd,
            interface: interface.into(),
        })
    }

    /// Sends `request` (an ethtool command struct, its u32 command first); the kernel answers in
    /// the same buffer.
    fn ioctl(&self, request: &mut [u8]) -> io::Result<()> {
        // SAFETY: all-zero is a valid ifreq.
        let mut ifreq: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifreq.ifr_name.iter_mut().zip(self.interface.bytes()) {
            *dst = src as libc::c_char;
        }
        ifreq.ifr_ifru.ifru_data = request.as_mut_ptr().cast();
        // SAFETY: ifreq has a NUL-terminated name and points at `request`, which is as large as
        // the command's struct says (the callers size it from the counts they put in it).
        if unsafe { libc::ioctl(self.fd, libc::SIOCETHTOOL, &mut ifreq) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `ETHTOOL_GSSET_INFO` for `ETH_SS_FEATURES`: the number of feature bits.
    fn feature_count(&self) -> io::Result<usize> {
        // struct ethtool_sset_info { u32 cmd; u32 reserved; u64 sset_mask; u32 data[]; }
        let mut request = [0u8; 20];
        put_u32(&mut request, 0, ETHTOOL_GSSET_INFO);
        request[8..16].copy_from_slice(&(1u64 << ETH_SS_FEATURES).to_ne_bytes());
        self.ioctl(&mut request)?;
        let mask = u64::from_ne_bytes(request[8..16].try_into().unwrap());
        let count = get_u32(&request, 16) as usize;
        if mask & (1 << ETH_SS_FEATURES) == 0 || count == 0 || count > MAX_FEATURES {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        Ok(count)
    }

    /// `ETHTOOL_GSTRINGS` for `ETH_SS_FEATURES`: `count` names of `ETH_GSTRING_LEN` bytes.
    fn feature_names(&self, count: usize) -> io::Result<Vec<u8>> {
        // struct ethtool_gstrings { u32 cmd; u32 string_set; u32 len; u8 data[]; }
        let mut request = vec![0u8; 12 + count * ETH_GSTRING_LEN];
        put_u32(&mut request, 0, ETHTOOL_GSTRINGS);
        put_u32(&mut request, 4, ETH_SS_FEATURES);
        put_u32(&mut request, 8, count as u32);
        self.ioctl(&mut request)?;
        let len = (get_u32(&request, 8) as usize).min(count);
        Ok(request[12..12 + len * ETH_GSTRING_LEN].to_vec())
    }

    /// `ETHTOOL_GFEATURES`: the feature blocks covering `count` bits.
    fn feature_blocks(&self, count: usize) -> io::Result<Vec<u8>> {
        // struct ethtool_gfeatures { u32 cmd; u32 size; struct ethtool_get_features_block[]; }
        let blocks = count.div_ceil(32);
        let mut request = vec![0u8; 8 + blocks * FEATURE_BLOCK_LEN];
        put_u32(&mut request, 0, ETHTOOL_GFEATURES);
        put_u32(&mut request, 4, blocks as u32);
        self.ioctl(&mut request)?;
        // The kernel copies min(size asked, its own size) blocks and returns its own size.
        let filled = (get_u32(&request, 4) as usize).min(blocks);
        Ok(request[8..8 + filled * FEATURE_BLOCK_LEN].to_vec())
    }
}

impl Drop for EthtoolSocket {
    fn drop(&mut self) {
        // SAFETY: our own fd, closed once.
        unsafe { libc::close(self.fd) };
    }
}

fn put_u32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_ne_bytes());
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A string set of `names`, each NUL-padded to `ETH_GSTRING_LEN`.
    fn names(names: &[&str]) -> Vec<u8> {
        let mut set = vec![0u8; names.len() * ETH_GSTRING_LEN];
        for (i, name) in names.iter().enumerate() {
            set[i * ETH_GSTRING_LEN..][..name.len()].copy_from_slice(name.as_bytes());
        }
        set
    }

    /// Feature blocks with `active` bits set (and every feature available, to tell the fields
    /// apart).
    fn blocks(count: usize, active: &[usize]) -> Vec<u8> {
        let mut buf = vec![0u8; count.div_ceil(32) * FEATURE_BLOCK_LEN];
        for block in buf.as_chunks_mut::<FEATURE_BLOCK_LEN>().0 {
            put_u32(block, 0, u32::MAX);
        }
        for &bit in active {
            let at = (bit / 32) * FEATURE_BLOCK_LEN + ACTIVE_OFFSET;
            let word = get_u32(&buf, at) | 1 << (bit % 32);
            put_u32(&mut buf, at, word);
        }
        buf
    }

    #[test]
    fn finds_the_feature_by_name_in_any_block() {
        // The feature at bit 1, then at bit 33 (second block), as on different kernels.
        let first = names(&["rx-checksum", RX_VLAN_FEATURE, "tx-vlan-hw-insert"]);
        assert_eq!(
            feature_active(&first, &blocks(3, &[1]), RX_VLAN_FEATURE),
            Some(true)
        );
        assert_eq!(
            feature_active(&first, &blocks(3, &[0, 2]), RX_VLAN_FEATURE),
            Some(false)
        );
        let mut many: Vec<String> = (0..40).map(|i| format!("feature-{i}")).collect();
        many[33] = RX_VLAN_FEATURE.into();
        let many = names(&many.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(
            feature_active(&many, &blocks(40, &[33]), RX_VLAN_FEATURE),
            Some(true)
        );
        // Bit 1 of the second block's `active` is bit 33, not bit 1.
        assert_eq!(
            feature_active(&many, &blocks(40, &[1]), RX_VLAN_FEATURE),
            Some(false)
        );
    }

    #[test]
    fn a_name_is_matched_whole() {
        // The stag variant and a prefix are other features.
        let set = names(&["rx-vlan-stag-hw-parse", "rx-vlan-hw-parse-x", "rx-vlan"]);
        assert_eq!(
            feature_active(&set, &blocks(3, &[0, 1, 2]), RX_VLAN_FEATURE),
            None
        );
        // A name filling all 32 bytes (no NUL) is still read whole.
        let long = "x".repeat(ETH_GSTRING_LEN);
        let set = names(&[&long, RX_VLAN_FEATURE]);
        assert_eq!(feature_active(&set, &blocks(2, &[0]), &long), Some(true));
        assert_eq!(
            feature_active(&set, &blocks(2, &[0]), RX_VLAN_FEATURE),
            Some(false)
        );
    }

    #[test]
    fn blocks_that_do_not_reach_the_bit_are_no_answer() {
        let mut many: Vec<String> = (0..40).map(|i| format!("feature-{i}")).collect();
        many[35] = RX_VLAN_FEATURE.into();
        let many = names(&many.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(
            feature_active(&many, &blocks(32, &[3]), RX_VLAN_FEATURE),
            None
        );
        assert_eq!(feature_active(&many, &[], RX_VLAN_FEATURE), None);
    }

    #[test]
    fn reads_loopback_and_reports_a_missing_interface() {
        // lo never offloads VLANs (`ethtool -k lo`: rx-vlan-offload: off [fixed]).
        assert!(!rx_vlan_offload("lo").unwrap());
        let missing = rx_vlan_offload("slb-no-such0").unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENODEV), "{missing}");
    }

    #[test]
    fn the_warning_names_the_interface_and_the_command() {
        let text = rx_vlan_warning("eth1");
        assert!(text.starts_with("interface eth1 has rx VLAN offload on"));
        assert!(text.ends_with("`ethtool -K eth1 rxvlan off`"));
        // logfmt escapes double quotes; the line has none to escape.
        assert!(!text.contains('"'));
    }
}
