//! Forwarding modes. Only L2 direct server return so far: the IP packet is untouched (no
//! checksum work), only the Ethernet addresses change, and the frame leaves by the interface it
//! came in on. The backend holds the VIP on loopback and answers the client directly.

use network_types::eth::EthHdr;
use sticky_lb_common::Backend;

/// Rewrites the frame for `backend`: its MAC as destination, ours as source.
#[inline(always)]
pub fn dsr(eth: *mut EthHdr, backend: &Backend, our_mac: [u8; 6]) {
    // SAFETY: the parser checked the frame holds the Ethernet header.
    unsafe {
        (*eth).dst_addr = backend.mac;
        (*eth).src_addr = our_mac;
    }
}
