//! The shared stick table: several balancer nodes behind ECMP (or anycast) share what they
//! learned about their clients through Redis, so a client whose connections reach different
//! nodes, or move between them when the ECMP set changes, keeps its backend.
//!
//! ```text
//!  data path --StickEvent--> events task --Update--> outgoing queue --> link task --EVALSHA claim--> Redis
//!   (ring buffer: one per         (names, not ids)     (bounded;            (first writer wins;   |
//!    insert or redispatch)                              drops counted)        PUBLISH on a win)    |
//!                                                                                                  v
//!  this node's stick table <--learn-- subscriber task <------------ PUBLISH PREFIX:events --- other nodes
//! ```
//!
//! - A new entry is claimed with SET NX and a TTL of the stick timeout: the first node to place
//!   a client decides for all. A node whose claim lost rewrites its own entry to the winner's
//!   backend (its connections already open stay where they are: the connection table keeps a
//!   connection's backend, whatever the stick table says).
//! - A redispatch (the client's backend failed) replaces the key only if it still names the
//!   failed backend, so concurrent redispatches on several nodes agree on the first.
//! - The sweep refreshes the keys of entries in use, at most once per quarter timeout each, so
//!   Redis expires a key no earlier than the nodes expire the entry, and tells the other nodes
//!   (one message per batch), which keep their own entries of those clients alive as long: a
//!   client whose connections all reach one node does not expire on the others.
//! - Operator changes to the table (`table set/delete/flush`) and, with `--all-nodes`, to
//!   backends are published to every node.
//! - Redis down or slow: forwarding never waits for it (the data path knows nothing of Redis).
//!   Updates wait in a bounded queue; after a reconnect the node resyncs: it claims every live
//!   local entry (NX: what others decided meanwhile wins) and loads the keys it lacks. A node
//!   that starts loads the keys before it attaches (bounded by `load_timeout`).
//!
//! Guarantees are those of Redis pub/sub plus resync: eventual, with a lag measured in
//! `sticky_lb_shared_replication_lag_seconds`. Two nodes that place one new client in the same
//! instant may send its first connections to different backends; the loser's later
//! connections follow the winner.

mod link;
mod local;
pub mod record;
mod stats;

pub(crate) use link::connect;
pub use local::{BackendView, Directory, Placed, ServiceView, unix_ms, unix_ms_of};
pub use stats::{LAG_BUCKETS, Stats};

use crate::{config::SharedTableConfig, control::Request, dataplane::PinDir};
use anyhow::{Context, Result};
use std::{
    collections::VecDeque,
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{info, warn};

/// What this node tells Redis and the other nodes, in the order it happened.
#[derive(Clone, Debug)]
pub enum Update {
    /// A placement the data path made (or a live entry a resync pushes): claim it.
    Claim(Placed),
    /// An operator's `table set`: written whatever Redis held.
    Set(Placed),
    /// An operator's `table delete`.
    Delete { service: String, client: IpAddr },
    /// An operator's `table flush` of one service.
    Flush { service: String },
    /// Entries in use: their keys' TTLs are renewed (a key gone from Redis is claimed again).
    Refresh(Vec<Placed>),
    /// An operator command given with `--all-nodes`, as its control request.
    Operator(Request),
}

/// The outgoing updates while Redis is away or slow: bounded, the overflow counted and left
/// to the next resync.
struct Outgoing {
    queue: Mutex<VecDeque<Update>>,
    capacity: usize,
    ready: Notify,
}

impl Outgoing {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Update>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// State the tasks share.
struct Inner {
    node: String,
    keys: record::Keys,
    client: redis::Client,
    pins: PinDir,
    directory: Mutex<Arc<Directory>>,
    outgoing: Outgoing,
    /// Set when updates were lost (queue overflow, a failed connection): the link task resyncs
    /// before it sends anything else.
    resync_wanted: AtomicBool,
    /// Counts the command connection's failures. A Redis that went away without closing the
    /// connections (a partition, a host that died) leaves the subscription silent forever: the
    /// subscription subscribes again whenever this moves.
    link_failures: tokio::sync::watch::Sender<u64>,
    /// The newest operator-log entry this node has seen (applied, or was there before it
    /// started): `None` until the subscription first reads the log.
    operator_seen: Mutex<Option<(u64, u64)>>,
    /// Operator requests from other nodes, for the controller's main loop.
    operator: tokio::sync::mpsc::Sender<Request>,
    stats: Arc<Stats>,
}

impl Inner {
    fn directory(&self) -> Arc<Directory> {
        self.directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Queues `update`; a full queue drops it (counted) and asks for a resync.
    fn push(&self, update: Update) {
        {
            let mut queue = self.outgoing.lock();
            if queue.len() >= self.outgoing.capacity {
                Stats::add(&self.stats.events_dropped, 1);
                self.resync_wanted.store(true, Ordering::Relaxed);
                return;
            }
            queue.push_back(update);
        }
        self.outgoing.ready.notify_one();
    }

    fn want_resync(&self) {
        self.resync_wanted.store(true, Ordering::Relaxed);
        self.outgoing.ready.notify_one();
    }
}

/// The running shared table: its tasks and the handle the controller talks to them through.
pub struct SharedTable {
    config: SharedTableConfig,
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl SharedTable {
    /// Starts the tasks (data-path events, Redis commands, the subscription) for the pinned
    /// data path at `pins`. Returns at once: connecting is the link task's job, and Redis
    /// being away delays nothing here.
    ///
    /// Errors: a Redis URL that does not parse (validation refuses those first), or the
    /// pinned event ring that cannot be opened.
    pub fn start(
        config: &SharedTableConfig,
        node: &str,
        pins: &PinDir,
        directory: Directory,
        operator: tokio::sync::mpsc::Sender<Request>,
    ) -> Result<SharedTable> {
        let client = redis::Client::open(config.redis.as_str())
            .with_context(|| format!("shared_table.redis: {}", config.redis))?;
        let inner = Arc::new(Inner {
            node: node.to_string(),
            keys: record::Keys::new(&config.key_prefix),
            client,
            pins: pins.clone(),
            directory: Mutex::new(Arc::new(directory)),
            outgoing: Outgoing {
                queue: Mutex::new(VecDeque::new()),
                capacity: config.queue,
                ready: Notify::new(),
            },
            resync_wanted: AtomicBool::new(true),
            link_failures: tokio::sync::watch::Sender::new(0),
            operator_seen: Mutex::new(None),
            operator,
            stats: Arc::new(Stats::default()),
        });
        let events = link::EventReader::open(pins)?;
        let tasks = vec![
            tokio::spawn(events.run(inner.clone())),
            tokio::spawn(link::commands(inner.clone())),
            tokio::spawn(link::subscription(inner.clone())),
        ];
        info!(
            "shared table: node {node}, Redis {} (keys {}:stick:*)",
            config.redis_for_logs(),
            config.key_prefix
        );
        Ok(SharedTable {
            config: config.clone(),
            inner,
            tasks,
        })
    }

    /// Loads the keys of the shared services this node's table lacks, before the data path is
    /// attached; gives up after `config.load_timeout` (the resync after the start catches up).
    /// Returns the entries written.
    pub async fn preload(
        config: &SharedTableConfig,
        pins: &PinDir,
        directory: &Directory,
    ) -> Result<u64> {
        let client = redis::Client::open(config.redis.as_str())
            .with_context(|| format!("shared_table.redis: {}", config.redis))?;
        let keys = record::Keys::new(&config.key_prefix);
        let load = link::load(&client, &keys, pins, directory);
        match tokio::time::timeout(config.load_timeout, load).await {
            Ok(result) => result,
            Err(_) => anyhow::bail!(
                "not done within {} (shared_table.load_timeout)",
                humantime::format_duration(config.load_timeout)
            ),
        }
    }

    pub fn config(&self) -> &SharedTableConfig {
        &self.config
    }

    pub fn node(&self) -> &str {
        &self.inner.node
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.inner.stats.clone()
    }

    /// The shared services as the controller's applied state now has them.
    pub fn set_directory(&self, directory: Directory) {
        *self
            .inner
            .directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(directory);
    }

    pub fn directory(&self) -> Arc<Directory> {
        self.inner.directory()
    }

    /// Queues an update for Redis and the other nodes (bounded; never waits).
    pub fn send(&self, update: Update) {
        self.inner.push(update);
    }

    /// Stops the tasks (queued updates are dropped; the next start resyncs).
    pub fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        if !self.inner.outgoing.lock().is_empty() {
            warn!("shared table stopped with updates not yet sent; the next start resyncs");
        }
    }
}

impl Drop for SharedTable {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// How long one Redis command (or pipeline) may take before the connection counts as failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
