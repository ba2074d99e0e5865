//! The shared table's tasks: reading the data path's events, sending updates to Redis (and
//! resyncing), and following the other nodes' messages.

use super::{
    COMMAND_TIMEOUT, Inner, Stats, Update,
    local::{self, Directory, Learned, LocalTable, Placed},
    record::{CLAIM_SCRIPT, Keys, Message, Placement, placed_head, stream_id},
};
use crate::dataplane::{PinDir, open_pinned};
use anyhow::{Context, Result, bail};
use aya::maps::{MapData, RingBuf};
use futures_util::StreamExt;
use redis::{AsyncConnectionConfig, ServerErrorKind, Value, aio::MultiplexedConnection};
use std::{
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};
use sticky_lb_common::{StickEvent, map_names};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{debug, info, warn};

/// Updates sent in one pipeline.
const BATCH: usize = 256;
/// Keys a resync reads per SCAN step.
const SCAN_COUNT: usize = 1000;
/// Operator commands the log keeps (about: `MAXLEN ~`): a node away for more than that many
/// `--all-nodes` commands misses the oldest (it says so).
const OPERATOR_LOG_LEN: usize = 1000;
/// How long the command connection stays idle before it checks Redis is there (PING).
const IDLE_PING: Duration = Duration::from_secs(1);
/// Waits between reconnection attempts: doubled from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_LAST: Duration = Duration::from_secs(2);

/// The data path's event ring, readable as a tokio file descriptor.
pub(super) struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventReader {
    pub(super) fn open(pins: &PinDir) -> Result<EventReader> {
        let ring: RingBuf<MapData> =
            open_pinned(pins, map_names::EVENTS).context("opening the stick event ring")?;
        // SAFETY: the ring owns its file descriptor, which stays open and the same until the
        // AsyncFd (which owns the ring) is dropped.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("watching the stick event ring: {e}"))?;
        Ok(EventReader { ring })
    }

    /// Turns every event into a claim, by name, until the task is aborted.
    pub(super) async fn run(mut self, inner: Arc<Inner>) {
        loop {
            let mut guard = match self.ring.readable_mut().await {
                Ok(guard) => guard,
                Err(e) => {
                    warn!("shared table: the stick event ring failed: {e}");
                    return;
                }
            };
            let directory = inner.directory();
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() < size_of::<StickEvent>() {
                    continue;
                }
                // SAFETY: the data path writes whole `StickEvent`s; read unaligned to be safe.
                let event: StickEvent =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<StickEvent>()) };
                Stats::add(&inner.stats.events_read, 1);
                if let Some(placed) = local::placed(&directory, &event) {
                    inner.push(Update::Claim(placed));
                }
            }
            guard.clear_ready();
        }
    }
}

/// A multiplexed connection to `client`'s Redis: connecting and every answer bounded by
/// [`COMMAND_TIMEOUT`] (a command that takes longer fails, and so does the connection's user).
pub(crate) async fn connect(client: &redis::Client) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// The command connection: connects (again, with backoff), resyncs, then sends the queued
/// updates in pipelines. A failed pipeline goes back to the front of the queue.
pub(super) async fn commands(inner: Arc<Inner>) {
    let mut backoff = BACKOFF_FIRST;
    let mut was_up = false;
    loop {
        let mut con = match connect(&inner.client).await {
            Ok(con) => con,
            Err(e) => {
                Stats::add(&inner.stats.redis_errors, 1);
                if was_up || backoff == BACKOFF_FIRST {
                    warn!("shared table: Redis unreachable ({e}); serving from the local table");
                }
                was_up = false;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_LAST);
                continue;
            }
        };
        backoff = BACKOFF_FIRST;
        was_up = true;
        inner.stats.connected.store(true, Ordering::Relaxed);
        inner.resync_wanted.store(true, Ordering::Relaxed);
        if let Err(e) = serve(&inner, &mut con).await {
            Stats::add(&inner.stats.redis_errors, 1);
            warn!("shared table: Redis connection failed ({e:#}); reconnecting");
            inner.link_failures.send_modify(|n| *n += 1);
        }
        inner.stats.connected.store(false, Ordering::Relaxed);
        tokio::time::sleep(BACKOFF_FIRST).await;
    }
}

/// One connection's life: script, resyncs, batches.
async fn serve(inner: &Arc<Inner>, con: &mut MultiplexedConnection) -> Result<()> {
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(CLAIM_SCRIPT)
        .query_async(con)
        .await
        .context("SCRIPT LOAD")?;
    let mut table = LocalTable::open(&inner.pins)?;
    loop {
        if inner.resync_wanted.swap(false, Ordering::Relaxed)
            && let Err(e) = resync(inner, con, &sha, &mut table).await
        {
            inner.resync_wanted.store(true, Ordering::Relaxed);
            return Err(e.context("resync"));
        }
        let batch: Vec<Update> = {
            let mut queue = inner.outgoing.lock();
            let n = queue.len().min(BATCH);
            queue.drain(..n).collect()
        };
        if batch.is_empty() {
            // Woken by a new update or a resync request. A second without either: the
            // connection is asked whether Redis is still there (a partition closes nothing, and
            // only a command times out), so a dead Redis is noticed within about 2 s.
            if tokio::time::timeout(IDLE_PING, inner.outgoing.ready.notified())
                .await
                .is_err()
            {
                let _: String = redis::cmd("PING").query_async(con).await.context("PING")?;
            }
            continue;
        }
        if let Err(e) = send(inner, con, &sha, &mut table, &batch).await {
            let mut queue = inner.outgoing.lock();
            for update in batch.into_iter().rev() {
                if queue.len() >= inner.outgoing.capacity {
                    Stats::add(&inner.stats.events_dropped, 1);
                    inner.resync_wanted.store(true, Ordering::Relaxed);
                    continue;
                }
                queue.push_front(update);
            }
            return Err(e);
        }
    }
}

/// How one update's pipeline results are read.
enum Expect {
    Claim(Placed),
    Refresh(Placed),
}

fn claim_cmd(
    pipe: &mut redis::Pipeline,
    keys: &Keys,
    node: &str,
    sha: &str,
    placed: &Placed,
    previous: Option<&str>,
) {
    let placement = Placement {
        backend: placed.backend.clone(),
        created_ms: placed.created_ms,
        node: node.to_string(),
    };
    pipe.cmd("EVALSHA")
        .arg(sha)
        .arg(1)
        .arg(keys.stick(&placed.service, placed.client))
        .arg(placement.encode())
        .arg(placed.ttl_ms.max(1))
        .arg(previous.unwrap_or(""))
        .arg(keys.channel())
        .arg(placed_head(node, &placed.service, placed.client));
}

/// Adds to `pipe` the publication of `message` to every node (its answer ignored).
fn publish(pipe: &mut redis::Pipeline, keys: &Keys, message: &Message) {
    pipe.cmd("PUBLISH")
        .arg(keys.channel())
        .arg(message.encode())
        .ignore();
}

/// Sends a batch as one pipeline (a flush first scans its keys) and acts on the answers.
async fn send(
    inner: &Arc<Inner>,
    con: &mut MultiplexedConnection,
    sha: &str,
    table: &mut LocalTable,
    batch: &[Update],
) -> Result<()> {
    let keys = &inner.keys;
    let node = inner.node.as_str();
    let mut pipe = redis::pipe();
    let mut expect = Vec::new();
    let mut commands = 0u64;
    for update in batch {
        match update {
            Update::Claim(placed) => {
                claim_cmd(
                    &mut pipe,
                    keys,
                    node,
                    sha,
                    placed,
                    placed.previous.as_deref(),
                );
                expect.push(Expect::Claim(placed.clone()));
                commands += 1;
            }
            Update::Set(placed) => {
                let placement = Placement {
                    backend: placed.backend.clone(),
                    created_ms: placed.created_ms,
                    node: node.to_string(),
                };
                pipe.cmd("SET")
                    .arg(keys.stick(&placed.service, placed.client))
                    .arg(placement.encode())
                    .arg("PX")
                    .arg(placed.ttl_ms.max(1))
                    .ignore();
                let message = Message::Placed {
                    node: node.to_string(),
                    service: placed.service.clone(),
                    client: placed.client,
                    placement,
                    ttl_ms: placed.ttl_ms,
                };
                publish(&mut pipe, keys, &message);
                commands += 2;
            }
            Update::Delete { service, client } => {
                pipe.cmd("DEL").arg(keys.stick(service, *client)).ignore();
                let message = Message::Deleted {
                    node: node.to_string(),
                    service: service.clone(),
                    client: *client,
                };
                publish(&mut pipe, keys, &message);
                commands += 2;
            }
            Update::Flush { service } => {
                commands += delete_matching(con, &keys.stick_pattern(service)).await?;
                let message = Message::Flushed {
                    node: node.to_string(),
                    service: service.clone(),
                };
                publish(&mut pipe, keys, &message);
                commands += 1;
            }
            Update::Refresh(entries) => {
                for placed in entries {
                    pipe.cmd("PEXPIRE")
                        .arg(keys.stick(&placed.service, placed.client))
                        .arg(placed.ttl_ms.max(1));
                    expect.push(Expect::Refresh(placed.clone()));
                    commands += 1;
                }
                // The other nodes keep their entries of these clients alive as long: one
                // message per service of the batch.
                let mut by_service: std::collections::BTreeMap<&str, Vec<&Placed>> =
                    Default::default();
                for placed in entries {
                    by_service.entry(&placed.service).or_default().push(placed);
                }
                for (service, placed) in by_service {
                    let message = Message::Refreshed {
                        node: node.to_string(),
                        service: service.to_string(),
                        ttl_ms: placed[0].ttl_ms,
                        entries: placed
                            .iter()
                            .map(|p| (p.client, p.backend.clone(), p.created_ms))
                            .collect(),
                    };
                    publish(&mut pipe, keys, &message);
                    commands += 1;
                }
            }
            Update::Operator(request) => {
                // Logged first (a node away now reads it when it is back), then published.
                let request = serde_json::to_string(request)?;
                let id: String = redis::cmd("XADD")
                    .arg(keys.operator_log())
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(OPERATOR_LOG_LEN)
                    .arg("*")
                    .arg("node")
                    .arg(node)
                    .arg("request")
                    .arg(&request)
                    .query_async(con)
                    .await
                    .context("XADD")?;
                let message = Message::Operator {
                    node: node.to_string(),
                    id,
                    request,
                };
                publish(&mut pipe, keys, &message);
                commands += 2;
            }
        }
    }
    // Only claims and refreshes answer; every other command is `ignore`d in the pipeline.
    Stats::add(&inner.stats.redis_commands, commands);
    // Each command's answer on its own: one command Redis refuses (a key of another type under
    // our prefix, say) costs that update, not the batch.
    pipe.ignore_errors();
    let answers: Vec<Value> = pipe.query_async(con).await.context("pipeline")?;
    if answers
        .iter()
        .any(|a| matches!(a, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript)))
    {
        // Redis lost the script (restarted, SCRIPT FLUSH): the batch goes back to the queue
        // and is sent again once the next connection has loaded it.
        bail!("Redis no longer has the claim script");
    }
    if answers.len() != expect.len() {
        bail!(
            "pipeline: {} answers for {} commands",
            answers.len(),
            expect.len()
        );
    }
    let directory = inner.directory();
    for (answer, expected) in answers.into_iter().zip(expect) {
        match expected {
            Expect::Claim(placed) => settle_claim(inner, table, &directory, &placed, answer),
            Expect::Refresh(placed) => match answer {
                Value::Int(1) => Stats::add(&inner.stats.refreshes, 1),
                // The key is gone from Redis (it restarted empty, or an operator flushed it
                // meanwhile): this node still uses the entry, so it claims it again.
                _ => inner.push(Update::Claim(Placed {
                    previous: None,
                    ..placed
                })),
            },
        }
    }
    Ok(())
}

/// Acts on a claim's answer: nil, this node's placement now stands everywhere; otherwise the
/// placement that stands, which this node's entry is rewritten to (or, when that backend does
/// not take clients here, claimed over as a redispatch).
fn settle_claim(
    inner: &Arc<Inner>,
    table: &mut LocalTable,
    directory: &Directory,
    placed: &Placed,
    answer: Value,
) {
    let winner = match answer {
        Value::Nil => {
            Stats::add(&inner.stats.events_sent, 1);
            return;
        }
        Value::BulkString(bytes) => String::from_utf8(bytes)
            .ok()
            .and_then(|text| Placement::decode(&text)),
        Value::ServerError(e) => {
            // Not shared (counted); the entry serves here, and the next refresh claims it again.
            Stats::add(&inner.stats.redis_errors, 1);
            Stats::add(&inner.stats.events_dropped, 1);
            warn!(
                "shared table: Redis refused the claim of {} {}: {e:?}",
                placed.service, placed.client
            );
            return;
        }
        _ => None,
    };
    let Some(winner) = winner else {
        // A value this version cannot read: claim over it as a redispatch would.
        return;
    };
    if winner.backend == placed.backend {
        return;
    }
    match table.learn(
        directory,
        &placed.service,
        placed.client,
        &winner.backend,
        winner.created_ms,
        placed.ttl_ms,
    ) {
        Learned::Written => {
            Stats::add(&inner.stats.claims_lost, 1);
            debug!(
                "shared table: {} {} -> {} (placed by {} first; this node chose {})",
                placed.service, placed.client, winner.backend, winner.node, placed.backend
            );
        }
        // The winner's message usually arrives before this answer and has already rewritten
        // the entry: the claim was lost all the same.
        Learned::Same => Stats::add(&inner.stats.claims_lost, 1),
        Learned::Ignored => {
            // The winner's backend does not take clients here (down or disabled on this node):
            // this node's choice replaces it, as a redispatch off that backend.
            if directory
                .by_name(&placed.service)
                .is_some_and(|s| s.backend_named(&winner.backend).is_none_or(|b| !b.serves))
                && placed.previous.as_deref() != Some(winner.backend.as_str())
            {
                inner.push(Update::Claim(Placed {
                    previous: Some(winner.backend),
                    ..placed.clone()
                }));
            }
        }
    }
}

/// One `SCAN` step from `cursor` over the keys matching `pattern`: the next cursor (0 when
/// done) and the keys found.
async fn scan(
    con: &mut MultiplexedConnection,
    pattern: &str,
    cursor: u64,
) -> Result<(u64, Vec<String>)> {
    redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(SCAN_COUNT)
        .query_async(con)
        .await
        .context("SCAN")
}

/// Deletes every key matching `pattern` (SCAN + DEL in steps); the commands sent.
async fn delete_matching(con: &mut MultiplexedConnection, pattern: &str) -> Result<u64> {
    let mut cursor: u64 = 0;
    let mut commands = 0;
    loop {
        let (next, found) = scan(con, pattern, cursor).await?;
        commands += 1;
        if !found.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(&found)
                .query_async(con)
                .await
                .context("DEL")?;
            commands += 1;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(commands)
}

/// After a (re)connect or lost updates: claims every live local entry (what another node
/// decided meanwhile wins, and this node's entry follows it), then loads the keys this node
/// lacks.
async fn resync(
    inner: &Arc<Inner>,
    con: &mut MultiplexedConnection,
    sha: &str,
    table: &mut LocalTable,
) -> Result<()> {
    let started = std::time::Instant::now();
    let directory = inner.directory();
    let live = table.live(&directory)?;
    let mut pushed = 0;
    for chunk in live.chunks(BATCH) {
        let batch: Vec<Update> = chunk
            .iter()
            .filter_map(|(key, entry, left_ms)| {
                let service = directory.by_id(key.service)?;
                Some(Update::Claim(Placed {
                    service: service.name.clone(),
                    client: service.client(key),
                    backend: service.backend_name(entry.backend)?.to_string(),
                    previous: None,
                    created_ms: local::unix_ms_of(entry.created_ns),
                    ttl_ms: (*left_ms).max(1),
                }))
            })
            .collect();
        pushed += batch.len();
        send(inner, con, sha, table, &batch).await?;
    }
    let (loaded, commands) = pull(con, &inner.keys, table, &directory).await?;
    Stats::add(&inner.stats.redis_commands, commands);
    Stats::add(&inner.stats.entries_written, loaded);
    Stats::add(&inner.stats.resyncs, 1);
    info!(
        "shared table: resynced with Redis in {} ms: {pushed} local entries claimed, {loaded} loaded",
        started.elapsed().as_millis()
    );
    Ok(())
}

/// Writes every key of the shared services into `table` where it names another backend or
/// the entry is absent; returns (entries written, commands sent).
async fn pull(
    con: &mut MultiplexedConnection,
    keys: &Keys,
    table: &mut LocalTable,
    directory: &Directory,
) -> Result<(u64, u64)> {
    let mut written = 0;
    let mut commands = 0;
    for service in &directory.services {
        let head = keys.stick_head(&service.name);
        let pattern = keys.stick_pattern(&service.name);
        let mut cursor: u64 = 0;
        loop {
            let (next, found) = scan(con, &pattern, cursor).await?;
            commands += 1;
            if !found.is_empty() {
                let mut pipe = redis::pipe();
                for key in &found {
                    pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
                }
                let answers: Vec<(Option<String>, i64)> = {
                    let flat: Vec<Value> = pipe.query_async(con).await.context("GET/PTTL")?;
                    flat.chunks(2)
                        .map(|pair| {
                            let value = match &pair[0] {
                                Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
                                _ => None,
                            };
                            let ttl = match pair.get(1) {
                                Some(Value::Int(t)) => *t,
                                _ => -2,
                            };
                            (value, ttl)
                        })
                        .collect()
                };
                commands += 2 * found.len() as u64;
                for (key, (value, ttl)) in found.iter().zip(answers) {
                    let (Some(client), Some(placement)) = (
                        key.strip_prefix(&head)
                            .and_then(|c| c.parse::<IpAddr>().ok()),
                        value.as_deref().and_then(Placement::decode),
                    ) else {
                        continue;
                    };
                    if ttl <= 0 {
                        continue;
                    }
                    if table.learn(
                        directory,
                        &service.name,
                        client,
                        &placement.backend,
                        placement.created_ms,
                        ttl as u64,
                    ) == Learned::Written
                    {
                        written += 1;
                    }
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok((written, commands))
}

/// Loads the keys of the shared services into the pinned table: a node's start, before it
/// attaches. Returns the entries written.
pub(super) async fn load(
    client: &redis::Client,
    keys: &Keys,
    pins: &PinDir,
    directory: &Directory,
) -> Result<u64> {
    let mut con = connect(client).await.context("connecting")?;
    let mut table = LocalTable::open(pins)?;
    Ok(pull(&mut con, keys, &mut table, directory).await?.0)
}

/// The subscription: writes what other nodes publish into this node's table, hands operator
/// commands to the controller, and asks for a resync whenever it (re)subscribes (messages sent
/// while it was away are lost to pub/sub).
pub(super) async fn subscription(inner: Arc<Inner>) {
    let mut backoff = BACKOFF_FIRST;
    let channel = inner.keys.channel();
    loop {
        let subscribed = async {
            let mut pubsub = inner.client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            redis::RedisResult::Ok(pubsub)
        };
        let pubsub = match tokio::time::timeout(COMMAND_TIMEOUT * 2, subscribed).await {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(_)) | Err(_) => {
                Stats::add(&inner.stats.redis_errors, 1);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_LAST);
                continue;
            }
        };
        backoff = BACKOFF_FIRST;
        inner.want_resync();
        // Subscribed first, then the log read: a command logged meanwhile comes both ways and
        // is applied once.
        if let Err(e) = catch_up_operator_log(&inner).await {
            Stats::add(&inner.stats.redis_errors, 1);
            warn!("shared table: reading the operator log: {e:#}");
        }
        let mut table = match LocalTable::open(&inner.pins) {
            Ok(table) => table,
            Err(e) => {
                warn!("shared table: {e:#}");
                return;
            }
        };
        let mut messages = pubsub.into_on_message();
        // The command connection's failures: one while subscribed means Redis may be gone
        // without this connection knowing (nothing is ever sent on it).
        let mut link_failures = inner.link_failures.subscribe();
        link_failures.mark_unchanged();
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                _ = link_failures.changed() => {
                    warn!("shared table: the command connection failed; subscribing again");
                    break;
                }
            };
            let Some(message) = message else {
                Stats::add(&inner.stats.redis_errors, 1);
                warn!("shared table: subscription lost; subscribing again");
                break;
            };
            let Ok(text) = message.get_payload::<String>() else {
                continue;
            };
            let Some(message) = Message::decode(&text) else {
                debug!("shared table: unreadable message ignored");
                continue;
            };
            if message.node() == inner.node {
                continue;
            }
            receive(&inner, &mut table, message);
        }
        tokio::time::sleep(BACKOFF_FIRST).await;
    }
}

fn receive(inner: &Arc<Inner>, table: &mut LocalTable, message: Message) {
    let directory = inner.directory();
    match message {
        Message::Placed {
            service,
            client,
            placement,
            ttl_ms,
            ..
        } => {
            Stats::add(&inner.stats.events_received, 1);
            if table.learn(
                &directory,
                &service,
                client,
                &placement.backend,
                placement.created_ms,
                ttl_ms,
            ) == Learned::Written
            {
                Stats::add(&inner.stats.entries_written, 1);
                let lag_ms = local::unix_ms().saturating_sub(placement.created_ms);
                inner.stats.lag.observe(lag_ms as f64 / 1000.0);
            }
        }
        Message::Refreshed {
            service,
            ttl_ms,
            entries,
            ..
        } => {
            for (client, backend, created_ms) in entries {
                table.keep_alive(&directory, &service, client, &backend, created_ms, ttl_ms);
            }
        }
        Message::Deleted {
            node,
            service,
            client,
        } => {
            if table.forget(&directory, &service, client) {
                info!("shared table: {service} {client} deleted (table delete on {node})");
            }
        }
        Message::Flushed { node, service } => {
            let pins = inner.pins.clone();
            tokio::task::spawn_blocking(move || {
                match LocalTable::open(&pins).and_then(|mut t| t.flush(&directory, &service)) {
                    Ok(n) => info!(
                        "shared table: {service}: {n} entries deleted (table flush on {node})"
                    ),
                    Err(e) => warn!("shared table: flush of {service} from {node}: {e:#}"),
                }
            });
        }
        Message::Operator { node, id, request } => apply_operator(inner, &node, &id, request),
    }
}

/// Records operator-log entry `id` as seen; whether it was new (an entry read from the log
/// and again from the channel is applied once).
fn first_sight(inner: &Inner, id: &str) -> bool {
    let Some(id) = stream_id(id) else {
        return true;
    };
    let mut seen = inner
        .operator_seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if seen.is_some_and(|seen| id <= seen) {
        return false;
    }
    *seen = Some(id);
    true
}

/// After a (re)subscription: applies the `--all-nodes` commands logged since the newest this
/// node has seen (while it was cut off from Redis); the first time, only notes where the log
/// ends (a node that starts takes its state from its config and state file, not from history).
async fn catch_up_operator_log(inner: &Arc<Inner>) -> Result<()> {
    let mut con = connect(&inner.client).await.context("connecting")?;
    let log = inner.keys.operator_log();
    let seen = *inner
        .operator_seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some((ms, seq)) = seen else {
        let last: Value = redis::cmd("XREVRANGE")
            .arg(&log)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut con)
            .await
            .context("XREVRANGE")?;
        let newest = log_entries(last).first().map(|e| e.0).unwrap_or((0, 0));
        first_sight(inner, &format!("{}-{}", newest.0, newest.1));
        return Ok(());
    };
    let missed: Value = redis::cmd("XRANGE")
        .arg(&log)
        .arg(format!("({ms}-{seq}"))
        .arg("+")
        .arg("COUNT")
        .arg(OPERATOR_LOG_LEN)
        .query_async(&mut con)
        .await
        .context("XRANGE")?;
    for ((ms, seq), node, request) in log_entries(missed) {
        receive_operator(inner, &format!("{ms}-{seq}"), &node, request);
    }
    Ok(())
}

/// An operator command from the log or the channel: applied here unless this node sent it or
/// has seen it.
fn receive_operator(inner: &Arc<Inner>, id: &str, node: &str, request: String) {
    if node == inner.node {
        first_sight(inner, id);
        return;
    }
    apply_operator(inner, node, id, request);
}

/// The entries of an `XRANGE`/`XREVRANGE` answer: (id, node, request); malformed ones skipped.
fn log_entries(answer: Value) -> Vec<((u64, u64), String, String)> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let Value::Array(entries) = answer else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| {
            let Value::Array(parts) = entry else {
                return None;
            };
            let id = stream_id(&text(parts.first()?)?)?;
            let Value::Array(fields) = parts.get(1)? else {
                return None;
            };
            let mut node = None;
            let mut request = None;
            for pair in fields.chunks(2) {
                match (pair.first().and_then(text).as_deref(), pair.get(1)) {
                    (Some("node"), Some(v)) => node = text(v),
                    (Some("request"), Some(v)) => request = text(v),
                    _ => {}
                }
            }
            Some((id, node?, request?))
        })
        .collect()
}

/// An `--all-nodes` command from another node (its log id `id`): handed to the controller's
/// main loop once, however often it arrives.
fn apply_operator(inner: &Inner, node: &str, id: &str, request: String) {
    if !first_sight(inner, id) {
        return;
    }
    match serde_json::from_str::<crate::control::Request>(&request) {
        Ok(request) => {
            info!("shared table: operator command from {node}: {request:?}");
            if inner.operator.try_send(request).is_err() {
                warn!("shared table: operator command from {node} dropped (controller busy)");
            }
        }
        Err(e) => warn!("shared table: unreadable operator command from {node}: {e}"),
    }
}
