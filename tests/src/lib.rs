//! Test support for sticky-lb: frames built byte by byte for BPF_PROG_TEST_RUN fixtures, and the
//! network-namespace rigs used by the end-to-end tests in `tests/tests/` (one balancer: `rig`;
//! several behind an ECMP router, sharing a Redis store: `ecmp`).

pub mod balancer;
pub mod browser;
pub mod certs;
pub mod decap;
pub mod ecmp;
pub mod fixture;
pub mod loadgen;
pub mod nat;
pub mod netns;
pub mod packet;
pub mod redis;
pub mod rig;
pub mod scenario;
pub mod socket;
pub mod tunnel;
pub mod wait;
pub mod web;
