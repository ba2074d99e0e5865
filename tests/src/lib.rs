//! Test support for sticky-lb: the network-namespace rig used by the
//! end-to-end tests in `tests/tests/`.

pub mod netns;
pub mod rig;
