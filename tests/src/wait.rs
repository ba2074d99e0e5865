//! Bounded waits for what a test expects to become true (a node learning an entry, a backend
//! coming up): polled, never retried past the bound.

use std::time::{Duration, Instant};

/// How often [`wait_for`] asks again.
const POLL: Duration = Duration::from_millis(20);

/// Waits until `done` holds and returns how long it took; panics naming `what` once `within`
/// has passed without it.
pub fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(POLL);
    }
    started.elapsed()
}
