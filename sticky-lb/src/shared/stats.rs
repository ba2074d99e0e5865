//! Counters of the shared table and its replication lag, read by `/metrics` and `status`.

use prometheus_client::metrics::histogram::Histogram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Upper bounds (seconds) of the replication-lag histogram's buckets.
pub const LAG_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// Everything counted since the controller started.
#[derive(Debug)]
pub struct Stats {
    /// Stick events read from the data path.
    pub events_read: AtomicU64,
    /// Placements this node wrote to Redis and published (its claim won, or an operator set it).
    pub events_sent: AtomicU64,
    /// Placements received from other nodes.
    pub events_received: AtomicU64,
    /// Updates dropped because the outgoing queue was full (the next resync carries them).
    pub events_dropped: AtomicU64,
    /// Claims another node won first: this node's entry was rewritten to the winner (here, or
    /// already by the winner's message).
    pub claims_lost: AtomicU64,
    /// Received placements that changed this node's table.
    pub entries_written: AtomicU64,
    /// Redis commands or connections that failed (timeouts included).
    pub redis_errors: AtomicU64,
    /// Full resyncs (push local entries, pull the rest) after a (re)connect.
    pub resyncs: AtomicU64,
    /// Redis keys whose TTL a refresh renewed.
    pub refreshes: AtomicU64,
    /// Redis commands sent (a script counts once, a pipeline per command).
    pub redis_commands: AtomicU64,
    /// Whether the command connection is up now.
    pub connected: AtomicBool,
    /// Time from a placement on one node to its write in this node's table (the sender's and
    /// this node's wall clocks).
    pub lag: Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            events_read: AtomicU64::new(0),
            events_sent: AtomicU64::new(0),
            events_received: AtomicU64::new(0),
            events_dropped: AtomicU64::new(0),
            claims_lost: AtomicU64::new(0),
            entries_written: AtomicU64::new(0),
            redis_errors: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
            redis_commands: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            lag: Histogram::new(LAG_BUCKETS),
        }
    }
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// The counters as metric families: (name, help, value).
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![
            (
                "shared_events_read",
                "Stick events read from the data path.",
                self.events_read.load(Relaxed),
            ),
            (
                "shared_events_sent",
                "Placements this node wrote to Redis and published (its claim won, or an operator set it).",
                self.events_sent.load(Relaxed),
            ),
            (
                "shared_events_received",
                "Placements received from other nodes.",
                self.events_received.load(Relaxed),
            ),
            (
                "shared_events_dropped",
                "Updates dropped because the outgoing queue was full (the next resync carries them).",
                self.events_dropped.load(Relaxed),
            ),
            (
                "shared_claims_lost",
                "Placements another node made first; this node's entry was rewritten to the winner.",
                self.claims_lost.load(Relaxed),
            ),
            (
                "shared_entries_written",
                "Entries written into this node's table from other nodes' placements and resyncs.",
                self.entries_written.load(Relaxed),
            ),
            (
                "shared_redis_errors",
                "Redis commands, connections and subscriptions that failed (timeouts included).",
                self.redis_errors.load(Relaxed),
            ),
            (
                "shared_resyncs",
                "Resyncs with Redis (after a (re)connect or lost updates).",
                self.resyncs.load(Relaxed),
            ),
            (
                "shared_refreshes",
                "Redis keys whose TTL a refresh renewed.",
                self.refreshes.load(Relaxed),
            ),
            (
                "shared_redis_commands",
                "Redis commands sent.",
                self.redis_commands.load(Relaxed),
            ),
        ]
    }
}
