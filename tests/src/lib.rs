//! Test support for sticky-lb: frames built byte by byte for BPF_PROG_TEST_RUN fixtures, and the
//! network-namespace rig used by the end-to-end tests in `tests/tests/`.

pub mod balancer;
pub mod decap;
pub mod fixture;
pub mod loadgen;
pub mod nat;
pub mod netns;
pub mod packet;
pub mod rig;
pub mod scenario;
pub mod socket;
pub mod tunnel;
