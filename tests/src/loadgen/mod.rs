//! Load generation for the end-to-end benchmarks: an HTTP/1.1 backend server, a bounded
//! multi-threaded HTTP client, CPU accounting (whole machine, a process tree, our own threads),
//! the competing balancers (none, sticky-lb, nftables, HAProxy) set up and torn down inside a
//! rig's namespaces, and a packet-rate generator on BPF_PROG_TEST_RUN's live-frames mode
//! (`slb-bench-e2e`); the HTTP balancers with cookie persistence (HAProxy, nginx, sticky-lb
//! `mode: http`), backends on one event-loop thread, and a keep-alive client on tokio that
//! sends and checks the balancers' cookies (`slb-bench-http`).
//!
//! Everything here runs inside namespaces a [`crate::rig::Rig`] owns and only talks to
//! 198.18.0.0/15 addresses; every loop is bounded by a count and a deadline.

pub mod balancers;
pub mod client;
pub mod command;
pub mod cpu;
pub mod event_server;
pub mod http_balancers;
pub mod http_client;
pub mod live_frames;
pub mod server;

/// The value at quantile `q` (0.0..=1.0) of an ascending slice (nearest rank), or `None` if empty.
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    // Nearest rank: the smallest value with at least q of the samples at or below it.
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The median of some values (the upper one of the middle two for an even count), ignoring
/// NaNs; `None` if there is nothing left.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().filter(|v| !v.is_nan()).collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), Some(50));
        assert_eq!(quantile(&v, 0.99), Some(99));
        assert_eq!(quantile(&v, 1.0), Some(100));
        assert_eq!(quantile(&v, 0.0), Some(1));
        assert_eq!(quantile::<u32>(&[], 0.5), None);
    }

    #[test]
    fn median_skips_nan() {
        assert_eq!(median([3.0, 1.0, f64::NAN, 2.0]), Some(2.0));
        assert_eq!(median([]), None);
    }
}
