//! Session tokens of `stick: {token: ...}` services: token -> backend, kept in the shared store
//! (Redis, `shared_table`) so every balancer node sends a token's requests to the same backend,
//! with a bounded cache on each node in front of it.
//!
//! ```text
//!  request --lookup--> cache (CLOCK, bounded) --stale or missing--> Redis GET + PTTL
//!                        | fresh: answered here          (PEXPIRE when a quarter timeout has passed)
//!  new token --claim--> Redis claim script (first writer wins) --> cache
//!  Redis away: cache (whatever its age), claims made here (pending), else the fallback hash
//! ```
//!
//! - Key `PREFIX:token:SERVICE:TOKEN`, value `BACKEND\tCREATED_MS\tNODE` (the stick keys' format,
//!   [`Placement`]), TTL the service's stick timeout. A claim writes only an absent key, so the
//!   first node to place a token decides for all; a re-placement off a failed backend writes
//!   only while the key still names that backend, so concurrent redispatches on several nodes
//!   agree on the first.
//! - The cache trusts an entry for [`CACHE_TRUST`]; after that the next request revalidates it
//!   (one round trip: `GET` and `PTTL` pipelined). That window is how long another node's
//!   redispatch or an operator's delete on another node may go unseen here.
//! - TTL refresh: a key is renewed (`PEXPIRE`, to the full timeout) when Redis says less than
//!   three quarters of the timeout is left, i.e. at most once per quarter timeout per token,
//!   counted over all nodes (each node reads the key's real PTTL, so one node's refresh stops the
//!   others'). A node that knows an entry is due revalidates it before its trust window ends.
//!   (`GETEX PX` would refresh on every revalidation of every node; `GET` + `PTTL` costs the
//!   same round trip and refreshes only when due.)
//! - Redis must never hold a request up: every call of the request path has
//!   [`REQUEST_TIMEOUT`] in all; the first failure marks the store down, and from then on
//!   requests skip Redis altogether (no timeout paid per request) until the background probe's
//!   PING, once per [`PROBE_INTERVAL`], is answered within [`REQUEST_TIMEOUT`] again. While
//!   down, a token is answered from the cache (however old the entry), else
//!   [`Lookup::StoreDown`]: the caller routes it by [`fallback`], a hash of the token that is the
//!   same on every node. Claims made while down are kept (bounded, [`PENDING_LIMIT`]) and
//!   written, first writer wins as always, before the store counts as up again; so are the
//!   cached placements (a Redis that restarted empty learns again where the tokens in use go,
//!   as the shared stick table's resync does for its entries). For [`SETTLE`] after that,
//!   [`TokenStore::settling`] tells callers that a token Redis does not know may be another
//!   node's claim not written back yet (its probe's round comes up to [`PROBE_INTERVAL`]
//!   later): that node placed it by the hash, so the caller does too.
//! - Connection: one [`MultiplexedConnection`] per store, shared by all requests, replaced by
//!   the probe after a failure (not a `ConnectionManager`: that one reconnects inside the
//!   requests that find it broken, and the point here is that requests never wait for that).
//!
//! Tokens are stored as the client sends them; callers check them with [`acceptable`] first
//! (length and characters), so a client cannot make the balancer write huge keys.

use crate::{
    maglev::{mix64, name_hash},
    shared::{self, record::Keys, record::Placement},
};
use anyhow::{Context, Result, anyhow, bail};
use redis::{RedisResult, Value, aio::MultiplexedConnection};
use std::{
    collections::{BTreeSet, HashMap},
    hash::BuildHasher,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};
use tokio::task::AbortHandle;
use tracing::{info, warn};

/// The most a request's Redis work (one lookup, claim or replace: one or two round trips) may
/// take; then the store counts as down. Redis answers in well under a millisecond on a LAN,
/// so 100 ms only ever fires for a Redis that is gone, hung or overloaded, and bounds what the
/// one request that finds that out pays.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(100);
/// Operator commands (`list`, `get`, `delete`, `flush`, `flush_backend`), the probe's connect
/// and the write-back of pending claims: per command or pipeline.
pub const OPERATOR_TIMEOUT: Duration = shared::COMMAND_TIMEOUT;
/// How long a cached entry is used without asking Redis: within it, another node's redispatch
/// of the token or an operator's delete on another node may go unseen on this node.
pub const CACHE_TRUST: Duration = Duration::from_secs(2);
/// How often the probe PINGs Redis: a store marked down comes back within about this much of
/// Redis answering again, and an idle store notices a silent death within about this much.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long after the store came back [`TokenStore::settling`] holds: other nodes write back
/// their claims within about one [`PROBE_INTERVAL`] of Redis answering; three leave room for
/// their connect and their write.
pub const SETTLE: Duration = Duration::from_secs(3);
/// Claims made while Redis is down, kept to write once it is back (entries); beyond it they
/// are counted in `token_pending_dropped` and only the cache remembers them.
pub const PENDING_LIMIT: usize = 10_000;
/// The longest token accepted (bytes): a 22-character token of ours, or an application's
/// session id, fits many times over.
pub const MAX_TOKEN_LEN: usize = 256;
/// Keys per `SCAN` step, and claims per pipeline when pending claims are written back.
const BATCH: usize = 1000;
/// A cache this large is split in [`SHARDS`] locks, so request threads rarely wait for each
/// other; a smaller one is a single CLOCK (exact bound, and too small to be contended much).
const SHARDED_FROM: usize = 4096;
const SHARDS: usize = 16;

/// Claims a token key, first writer wins (one script, so the check and the write are one step
/// for Redis). KEYS[1]: the token key. ARGV: 1 the placement, 2 the TTL (ms), 3 the backend the
/// token is moved off ('' for a new token).
///
/// A new token is written only if the key is absent; a re-placement only if the key still
/// names the backend it is moved off (or is absent). Returns nil when this write happened,
/// otherwise `{placement that stands, its PTTL}`.
const CLAIM_SCRIPT: &str = r#"
local current = redis.call('GET', KEYS[1])
if current then
  local backend = string.match(current, '^[^\t]*')
  if ARGV[3] == '' or backend ~= ARGV[3] then
    return {current, redis.call('PTTL', KEYS[1])}
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"#;

/// Deletes a token key if it names backend ARGV[1] (a backend's evacuation: a token another
/// node just moved elsewhere stays). Returns the keys deleted (0 or 1).
const DELETE_IF_SCRIPT: &str = r#"
local current = redis.call('GET', KEYS[1])
if current and string.match(current, '^[^\t]*') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// What the store knows of a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Placed on this backend (by name; it may be down or gone here: the caller decides).
    Found(String),
    /// Not placed (never, expired, or deleted): the caller places it and claims it.
    Absent,
    /// Redis is unreachable and this node knows nothing of the token: route it by [`fallback`].
    StoreDown,
}

/// The outcome of [`TokenStore::claim`] and [`TokenStore::replace`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The caller's backend stands (written now, or the key already named it).
    Won,
    /// Another placement came first and stands: this backend.
    Lost(String),
    /// Redis is unreachable: the caller's backend is remembered on this node (its requests go
    /// there) and claimed in Redis once it is back (where a placement made meanwhile wins).
    StoreDown,
}

impl Claim {
    /// The backend the token now goes to, given the one the caller chose.
    pub fn backend<'a>(&'a self, chosen: &'a str) -> &'a str {
        match self {
            Claim::Lost(winner) => winner,
            Claim::Won | Claim::StoreDown => chosen,
        }
    }
}

/// A token as Redis holds it, for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenEntry {
    pub token: String,
    pub backend: String,
    /// When it was placed (Unix ms, the placing node's wall clock; 0 if the value has no time).
    pub created_ms: u64,
    /// The node that placed it ('' if the value does not say).
    pub node: String,
    /// Time left before Redis expires it (ms); `None`: the key has no TTL (written by hand).
    pub ttl_ms: Option<u64>,
}

/// Counters of the token stores (one set may be shared by several stores), read by `/metrics`.
#[derive(Debug, Default)]
pub struct TokenStats {
    /// Lookups asked.
    pub lookups: AtomicU64,
    /// Lookups answered by this node alone (a fresh cache entry, a claim waiting for Redis, or
    /// any cache entry while Redis is down).
    pub cache_hits: AtomicU64,
    /// Lookups answered by Redis with a backend.
    pub store_hits: AtomicU64,
    /// Lookups Redis answered with no entry.
    pub misses: AtomicU64,
    /// Claims of new tokens whose backend stands.
    pub claims_won: AtomicU64,
    /// Claims of new tokens another placement beat.
    pub claims_lost: AtomicU64,
    /// Re-placements off a failed backend that were written.
    pub replaces: AtomicU64,
    /// Re-placements another re-placement (or claim) beat.
    pub replaces_lost: AtomicU64,
    /// Keys whose TTL a lookup renewed.
    pub refreshes: AtomicU64,
    /// Redis commands and connections that failed or timed out.
    pub store_errors: AtomicU64,
    /// Redis commands sent for requests, operators and write-backs (a pipeline counts each
    /// command; the probe's PINGs do not count).
    pub store_commands: AtomicU64,
    /// Requests routed by the fallback hash (the store down and the token unknown here).
    pub fallback_routings: AtomicU64,
    /// Claims made while Redis was down and written to it once it was back.
    pub pending_claimed: AtomicU64,
    /// Claims made while Redis was down that did not fit in the pending set.
    pub pending_dropped: AtomicU64,
    /// Cached placements written to Redis when it answered again, as it no longer had them.
    pub restored: AtomicU64,
    /// Whether a store is down now (requests skip Redis).
    pub store_down: AtomicBool,
}

impl TokenStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// The counters as metric families: (name, help, value).
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let c = |counter: &AtomicU64| counter.load(Relaxed);
        vec![
            ("token_lookups", "Token lookups.", c(&self.lookups)),
            (
                "token_cache_hits",
                "Token lookups answered by this node's cache (or its pending claims).",
                c(&self.cache_hits),
            ),
            (
                "token_store_hits",
                "Token lookups answered by Redis with a backend.",
                c(&self.store_hits),
            ),
            (
                "token_misses",
                "Token lookups Redis answered with no entry.",
                c(&self.misses),
            ),
            (
                "token_claims_won",
                "New tokens whose backend this node placed.",
                c(&self.claims_won),
            ),
            (
                "token_claims_lost",
                "New tokens another placement beat; its backend stands.",
                c(&self.claims_lost),
            ),
            (
                "token_replaces",
                "Tokens moved off a failed backend by this node.",
                c(&self.replaces),
            ),
            (
                "token_replaces_lost",
                "Moves off a failed backend another node made first.",
                c(&self.replaces_lost),
            ),
            (
                "token_refreshes",
                "Token keys whose TTL was renewed.",
                c(&self.refreshes),
            ),
            (
                "token_store_errors",
                "Redis commands and connections of the token store that failed or timed out.",
                c(&self.store_errors),
            ),
            (
                "token_store_commands",
                "Redis commands the token store sent (not counting its PINGs).",
                c(&self.store_commands),
            ),
            (
                "token_fallback_routings",
                "Requests routed by the hash of their token while Redis was down.",
                c(&self.fallback_routings),
            ),
            (
                "token_pending_claimed",
                "Placements made while Redis was down, claimed once it was back.",
                c(&self.pending_claimed),
            ),
            (
                "token_pending_dropped",
                "Placements made while Redis was down that did not fit in the pending set.",
                c(&self.pending_dropped),
            ),
            (
                "token_restored",
                "Cached placements written back to Redis when it answered again, as it no longer had them.",
                c(&self.restored),
            ),
        ]
    }
}

/// The token -> backend store of one balancer node. Cheap to clone (all clones share one
/// connection, cache and probe). The probe task ends when the last clone is dropped.
#[derive(Clone)]
pub struct TokenStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    keys: Keys,
    node: String,
    /// Whether requests may use Redis (`link` holds a connection). Read on every request.
    up: AtomicBool,
    link: Mutex<Link>,
    cache: Cache,
    pending: Mutex<HashMap<String, Pending>>,
    /// `pending.len()`, for the lock-free check of the common case (none).
    pending_len: AtomicUsize,
    claim_script: redis::Script,
    delete_if_script: redis::Script,
    stats: Arc<TokenStats>,
    probe: Mutex<Option<AbortHandle>>,
    /// When the store last came up (see [`TokenStore::settling`]).
    up_since: Mutex<Option<Instant>>,
}

/// The connection requests use, and which one it is: a request that fails on a connection the
/// probe has already replaced does not take the new one down.
struct Link {
    con: Option<MultiplexedConnection>,
    generation: u64,
}

/// A placement made while Redis was down, to claim once it is back.
#[derive(Clone, Debug)]
struct Pending {
    backend: String,
    /// The backend it was moved off (a re-placement), or `None` for a new token.
    previous: Option<String>,
    created_ms: u64,
    ttl_ms: u64,
}

/// What the cache holds of a token.
#[derive(Clone, Debug)]
struct Cached {
    backend: String,
    /// When Redis last confirmed it (or this node wrote it).
    checked: Instant,
    /// When Redis expires the key, as of `checked`; `None`: not known.
    expires: Option<Instant>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(probe) = lock(&self.probe).take() {
            probe.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A TTL in whole milliseconds, at least 1 (`PX 0` is an error).
fn ttl_ms(timeout: Duration) -> u64 {
    (timeout.as_millis() as u64).max(1)
}

/// Whether a key that Redis expires at `expires` (`None`: not known) is due for a TTL refresh:
/// when less than three quarters of `timeout` are left, i.e. a quarter timeout or more after
/// the last refresh. So a token in use is renewed at most once per quarter timeout and never
/// comes closer than three quarters of a timeout to expiring.
pub fn refresh_due(now: Instant, expires: Option<Instant>, timeout: Duration) -> bool {
    match expires {
        None => true,
        Some(expires) => expires.saturating_duration_since(now) <= timeout - timeout / 4,
    }
}

/// The backend named by a stored value: its first tab-separated field (so a value written by
/// hand, `SET key web-1`, counts too). `None` for an empty name.
fn backend_of(value: &str) -> Option<&str> {
    let backend = value.split('\t').next().unwrap_or("");
    (!backend.is_empty()).then_some(backend)
}

/// A PTTL answer as the key's expiry. A key without a TTL (-1: written by hand) never expires
/// and is never renewed: it counts as renewed just now, so the cache serves it like any other.
/// `None` for a key that is gone (-2).
fn expiry(now: Instant, pttl: i64, timeout: Duration) -> Option<Instant> {
    match pttl {
        -1 => Some(now + timeout),
        _ => u64::try_from(pttl)
            .ok()
            .map(|ms| now + Duration::from_millis(ms)),
    }
}

impl TokenStore {
    /// A store on the shared table's Redis (`redis_url`, keys under `key_prefix`) for node
    /// `node` (written into the placements it makes), with a cache of `cache` entries (0: no
    /// cache: every lookup asks Redis), counting into `stats`. Returns at once, the store down:
    /// the probe task (started here, so this must run inside the tokio runtime) connects in the
    /// background, first right away; [`TokenStore::wait_up`] waits for it.
    ///
    /// Errors: a Redis URL that does not parse.
    pub fn new(
        redis_url: &str,
        key_prefix: &str,
        node: &str,
        cache: usize,
        stats: Arc<TokenStats>,
    ) -> Result<TokenStore> {
        let client = redis::Client::open(redis_url)
            .with_context(|| format!("shared_table.redis: {redis_url}"))?;
        stats.store_down.store(true, Relaxed);
        let inner = Arc::new(Inner {
            client,
            keys: Keys::new(key_prefix),
            node: node.to_string(),
            up: AtomicBool::new(false),
            link: Mutex::new(Link {
                con: None,
                generation: 0,
            }),
            cache: Cache::new(cache),
            pending: Mutex::new(HashMap::new()),
            pending_len: AtomicUsize::new(0),
            claim_script: redis::Script::new(CLAIM_SCRIPT),
            delete_if_script: redis::Script::new(DELETE_IF_SCRIPT),
            stats,
            probe: Mutex::new(None),
            up_since: Mutex::new(None),
        });
        let task = tokio::spawn(probe(Arc::downgrade(&inner)));
        *lock(&inner.probe) = Some(task.abort_handle());
        Ok(TokenStore { inner })
    }

    pub fn stats(&self) -> Arc<TokenStats> {
        self.inner.stats.clone()
    }

    /// Whether requests use Redis now (else they skip it: cache, pending claims, fallback).
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Relaxed)
    }

    /// Whether the store came up less than [`SETTLE`] ago: a token Redis does not know may then
    /// be one another node placed while Redis was away (by the hash) and has not written back
    /// yet, so an unknown token is best placed by the hash too.
    pub fn settling(&self) -> bool {
        self.is_up() && lock(&self.inner.up_since).is_some_and(|at| at.elapsed() < SETTLE)
    }

    /// Waits until the store is up, at most `within`; whether it is.
    pub async fn wait_up(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.is_up() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// The backend `token` of `service` is placed on. `timeout` is the service's stick timeout
    /// (the key's TTL, renewed here when due). Never takes much longer than
    /// [`REQUEST_TIMEOUT`], and no time at all while the store is down.
    pub async fn lookup(&self, service: &str, token: &str, timeout: Duration) -> Lookup {
        let inner = &self.inner;
        TokenStats::add(&inner.stats.lookups, 1);
        let key = inner.keys.token(service, token);
        if let Some(backend) = inner.pending_backend(&key) {
            TokenStats::add(&inner.stats.cache_hits, 1);
            return Lookup::Found(backend);
        }
        let now = Instant::now();
        let cached = inner.cache.get(&key);
        // Store down: whatever this node knows, however old, else the caller's fallback.
        let known = |cached: Option<Cached>| match cached {
            Some(cached) => {
                TokenStats::add(&inner.stats.cache_hits, 1);
                Lookup::Found(cached.backend)
            }
            None => Lookup::StoreDown,
        };
        if !inner.up.load(Relaxed) {
            return known(cached);
        }
        if let Some(cached) = &cached
            && now.saturating_duration_since(cached.checked) < CACHE_TRUST
            && !refresh_due(now, cached.expires, timeout)
        {
            TokenStats::add(&inner.stats.cache_hits, 1);
            return Lookup::Found(cached.backend.clone());
        }
        let Some((con, generation)) = inner.connection() else {
            return known(cached);
        };
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        match inner.revalidate(con, &key, timeout, deadline).await {
            Ok(Some((backend, expires))) => {
                TokenStats::add(&inner.stats.store_hits, 1);
                inner.cache.insert(
                    key,
                    Cached {
                        backend: backend.clone(),
                        checked: now,
                        expires,
                    },
                );
                Lookup::Found(backend)
            }
            Ok(None) => {
                TokenStats::add(&inner.stats.misses, 1);
                inner.cache.remove(&key);
                Lookup::Absent
            }
            Err(e) => {
                inner.failed(generation, &e);
                // An entry older than the trust window is still better than a hash.
                known(cached)
            }
        }
    }

    /// Places new token `token` of `service` on `backend`, for `timeout` (the stick timeout),
    /// unless another placement came first. Bounded like [`TokenStore::lookup`].
    pub async fn claim(
        &self,
        service: &str,
        token: &str,
        backend: &str,
        timeout: Duration,
    ) -> Claim {
        self.inner
            .place(service, token, backend, None, timeout)
            .await
    }

    /// Moves `token` off `old_backend` (down or gone) to `new_backend`, only if the store still
    /// names `old_backend` (or nothing): when several nodes move it at once, the first move
    /// stands and the others get [`Claim::Lost`] with its backend.
    pub async fn replace(
        &self,
        service: &str,
        token: &str,
        old_backend: &str,
        new_backend: &str,
        timeout: Duration,
    ) -> Claim {
        self.inner
            .place(service, token, new_backend, Some(old_backend), timeout)
            .await
    }

    /// [`fallback`], counted in `token_fallback_routings`: call it when a request is routed
    /// that way.
    pub fn fallback(&self, token: &str, backends: &[&str]) -> Option<usize> {
        TokenStats::add(&self.inner.stats.fallback_routings, 1);
        fallback(token, backends)
    }

    // Operator commands: each Redis command or pipeline bounded by [`OPERATOR_TIMEOUT`], on
    // the request connection or, while the store is down, a new one; a failure is the
    // caller's error and leaves the store's state alone (the probe judges Redis).

    /// The tokens of `service` in Redis: the first `limit` that `SCAN` finds (in no particular
    /// order), sorted by token. Bypasses the cache.
    pub async fn list(&self, service: &str, limit: usize) -> Result<Vec<TokenEntry>> {
        let inner = &self.inner;
        let head = inner.keys.token_head(service);
        let mut con = inner.operator_connection().await?;
        let mut found = BTreeSet::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys) = inner
                .scan(&mut con, &inner.keys.token_pattern(service), cursor)
                .await?;
            // SCAN may return a key twice; the set keeps it once.
            found.extend(keys);
            if next == 0 || found.len() >= limit {
                break;
            }
            cursor = next;
        }
        let keys: Vec<String> = found.into_iter().take(limit).collect();
        let mut entries = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
            }
            TokenStats::add(&inner.stats.store_commands, 2 * chunk.len() as u64);
            let answers: Vec<(Option<Vec<u8>>, i64)> =
                operator(pipe.query_async(&mut con), "GET/PTTL").await?;
            for (key, (value, pttl)) in chunk.iter().zip(answers) {
                let Some(token) = key.strip_prefix(&head) else {
                    continue;
                };
                if let Some(entry) = entry(token, value.as_deref(), pttl) {
                    entries.push(entry);
                }
            }
        }
        Ok(entries)
    }

    /// Token `token` of `service` as Redis holds it (not the cache).
    pub async fn get(&self, service: &str, token: &str) -> Result<Option<TokenEntry>> {
        let inner = &self.inner;
        let key = inner.keys.token(service, token);
        let mut con = inner.operator_connection().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
        TokenStats::add(&inner.stats.store_commands, 2);
        let (value, pttl): (Option<Vec<u8>>, i64) =
            operator(pipe.query_async(&mut con), "GET/PTTL").await?;
        Ok(entry(token, value.as_deref(), pttl))
    }

    /// Deletes token `token` of `service` (its next request is placed anew); whether it
    /// existed in Redis. Other nodes' caches may use it for up to [`CACHE_TRUST`] more.
    pub async fn delete(&self, service: &str, token: &str) -> Result<bool> {
        let inner = &self.inner;
        let key = inner.keys.token(service, token);
        inner.forget(|k, _| k == key);
        let mut con = inner.operator_connection().await?;
        TokenStats::add(&inner.stats.store_commands, 1);
        let deleted: u64 =
            operator(redis::cmd("DEL").arg(&key).query_async(&mut con), "DEL").await?;
        Ok(deleted > 0)
    }

    /// Evacuates `backend`: deletes every token of `service` placed on it (their next requests
    /// are placed anew). Returns the tokens deleted in Redis.
    pub async fn flush_backend(&self, service: &str, backend: &str) -> Result<usize> {
        let inner = &self.inner;
        let head = inner.keys.token_head(service);
        inner.forget(|k, b| k.starts_with(&head) && b == backend);
        let mut con = inner.operator_connection().await?;
        let sha = operator(inner.delete_if_script.load_async(&mut con), "SCRIPT LOAD").await?;
        let mut deleted = 0;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys) = inner
                .scan(&mut con, &inner.keys.token_pattern(service), cursor)
                .await?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("EVALSHA").arg(&sha).arg(1).arg(key).arg(backend);
                }
                TokenStats::add(&inner.stats.store_commands, keys.len() as u64);
                let answers: Vec<u64> =
                    operator(pipe.query_async(&mut con), "EVALSHA delete-if").await?;
                deleted += answers.iter().sum::<u64>() as usize;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(deleted)
    }

    /// Deletes every token of `service`. Returns the tokens deleted in Redis.
    pub async fn flush(&self, service: &str) -> Result<usize> {
        let inner = &self.inner;
        let head = inner.keys.token_head(service);
        inner.forget(|k, _| k.starts_with(&head));
        let mut con = inner.operator_connection().await?;
        let mut deleted = 0;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys) = inner
                .scan(&mut con, &inner.keys.token_pattern(service), cursor)
                .await?;
            if !keys.is_empty() {
                TokenStats::add(&inner.stats.store_commands, 1);
                let n: u64 = operator(
                    redis::cmd("UNLINK").arg(&keys).query_async(&mut con),
                    "UNLINK",
                )
                .await?;
                deleted += n as usize;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(deleted)
    }
}

/// A stored value and its PTTL as an operator's entry; `None` if the key is gone.
fn entry(token: &str, value: Option<&[u8]>, pttl: i64) -> Option<TokenEntry> {
    let value = String::from_utf8_lossy(value?);
    let (backend, created_ms, node) = match Placement::decode(&value) {
        Some(p) => (p.backend, p.created_ms, p.node),
        None => (backend_of(&value)?.to_string(), 0, String::new()),
    };
    Some(TokenEntry {
        token: token.to_string(),
        backend,
        created_ms,
        node,
        ttl_ms: u64::try_from(pttl).ok(),
    })
}

/// Runs an operator's Redis call within [`OPERATOR_TIMEOUT`].
async fn operator<T>(call: impl Future<Output = RedisResult<T>>, what: &str) -> Result<T> {
    match tokio::time::timeout(OPERATOR_TIMEOUT, call).await {
        Ok(result) => result.with_context(|| what.to_string()),
        Err(_) => bail!("{what}: no answer from Redis within {OPERATOR_TIMEOUT:?}"),
    }
}

impl Inner {
    /// The connection for a request, unless the store is down.
    fn connection(&self) -> Option<(MultiplexedConnection, u64)> {
        if !self.up.load(Relaxed) {
            return None;
        }
        let link = lock(&self.link);
        Some((link.con.clone()?, link.generation))
    }

    /// A request's call on connection `generation` failed: the store is down until the probe
    /// has a connection that answers again.
    fn failed(&self, generation: u64, error: &anyhow::Error) {
        TokenStats::add(&self.stats.store_errors, 1);
        let mut link = lock(&self.link);
        if link.generation != generation || link.con.is_none() {
            return;
        }
        link.con = None;
        self.up.store(false, Relaxed);
        self.stats.store_down.store(true, Relaxed);
        warn!(
            "token store: Redis failed ({error:#}); routing by the cache and the token hash until it answers again"
        );
    }

    /// The backend of a claim made here and not yet written to Redis.
    fn pending_backend(&self, key: &str) -> Option<String> {
        if self.pending_len.load(Relaxed) == 0 {
            return None;
        }
        lock(&self.pending).get(key).map(|p| p.backend.clone())
    }

    /// Remembers a placement made while Redis is down (bounded).
    fn remember(&self, key: String, pending: Pending) {
        let mut map = lock(&self.pending);
        if map.len() >= PENDING_LIMIT && !map.contains_key(&key) {
            TokenStats::add(&self.stats.pending_dropped, 1);
            return;
        }
        map.insert(key, pending);
        self.pending_len.store(map.len(), Relaxed);
    }

    fn unpend(&self, key: &str) {
        if self.pending_len.load(Relaxed) == 0 {
            return;
        }
        let mut map = lock(&self.pending);
        map.remove(key);
        self.pending_len.store(map.len(), Relaxed);
    }

    /// Drops the cache entries and pending claims `(key, backend)` matches.
    fn forget(&self, matches: impl Fn(&str, &str) -> bool) {
        self.cache
            .retain(|key, cached| !matches(key, &cached.backend));
        let mut map = lock(&self.pending);
        map.retain(|key, pending| !matches(key, &pending.backend));
        self.pending_len.store(map.len(), Relaxed);
    }

    /// Reads `key` (and renews its TTL if due), by `deadline`: the backend and the key's
    /// expiry, or `None` if it is absent.
    async fn revalidate(
        &self,
        mut con: MultiplexedConnection,
        key: &str,
        timeout: Duration,
        deadline: tokio::time::Instant,
    ) -> Result<Option<(String, Option<Instant>)>> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
        TokenStats::add(&self.stats.store_commands, 2);
        let (value, pttl): (Option<Vec<u8>>, i64) =
            by(deadline, pipe.query_async(&mut con), "GET/PTTL").await?;
        let now = Instant::now();
        let Some(backend) = value
            .as_deref()
            .map(String::from_utf8_lossy)
            .and_then(|v| backend_of(&v).map(str::to_string))
        else {
            return Ok(None);
        };
        let mut expires = expiry(now, pttl, timeout);
        // Due by what Redis says, not by what this node last knew: a refresh by another node
        // counts, so the key is renewed at most once per quarter timeout whichever node sees it.
        if pttl >= 0 && refresh_due(now, expires, timeout) {
            TokenStats::add(&self.stats.store_commands, 1);
            let renewed: i64 = by(
                deadline,
                redis::cmd("PEXPIRE")
                    .arg(key)
                    .arg(ttl_ms(timeout))
                    .query_async(&mut con),
                "PEXPIRE",
            )
            .await?;
            if renewed == 1 {
                TokenStats::add(&self.stats.refreshes, 1);
                expires = Some(now + timeout);
            }
        }
        Ok(Some((backend, expires)))
    }

    async fn place(
        &self,
        service: &str,
        token: &str,
        backend: &str,
        previous: Option<&str>,
        timeout: Duration,
    ) -> Claim {
        let key = self.keys.token(service, token);
        let created_ms = shared::unix_ms();
        let ttl = ttl_ms(timeout);
        let now = Instant::now();
        let down = |store: &Inner, key: String| {
            store.cache.insert(
                key.clone(),
                Cached {
                    backend: backend.to_string(),
                    checked: now,
                    expires: None,
                },
            );
            store.remember(
                key,
                Pending {
                    backend: backend.to_string(),
                    previous: previous.map(str::to_string),
                    created_ms,
                    ttl_ms: ttl,
                },
            );
            Claim::StoreDown
        };
        let Some((mut con, generation)) = self.connection() else {
            return down(self, key);
        };
        let placement = Placement {
            backend: backend.to_string(),
            created_ms,
            node: self.node.clone(),
        };
        let mut invocation = self.claim_script.key(&key);
        invocation
            .arg(placement.encode())
            .arg(ttl)
            .arg(previous.unwrap_or(""));
        TokenStats::add(&self.stats.store_commands, 1);
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let answer: Value = match by(deadline, invocation.invoke_async(&mut con), "claim").await {
            Ok(answer) => answer,
            Err(e) => {
                self.failed(generation, &e);
                return down(self, key);
            }
        };
        self.unpend(&key);
        let claim = self.settle(key, backend, ttl, answer, now);
        self.count(previous.is_some(), &claim);
        claim
    }

    /// Counts a claim's (or, `replace`, a re-placement's) outcome.
    fn count(&self, replace: bool, claim: &Claim) {
        let counter = match (replace, claim) {
            (false, Claim::Won) => &self.stats.claims_won,
            (false, _) => &self.stats.claims_lost,
            (true, Claim::Won) => &self.stats.replaces,
            (true, _) => &self.stats.replaces_lost,
        };
        TokenStats::add(counter, 1);
    }

    /// Acts on a claim script's answer: caches what stands ([`Claim::Won`] or
    /// [`Claim::Lost`]).
    fn settle(&self, key: String, backend: &str, ttl: u64, answer: Value, now: Instant) -> Claim {
        let (standing, expires) = match answer {
            Value::Nil => (backend.to_string(), Some(now + Duration::from_millis(ttl))),
            Value::Array(parts) => {
                let value = match parts.first() {
                    Some(Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
                    _ => String::new(),
                };
                let pttl = match parts.get(1) {
                    Some(Value::Int(pttl)) => *pttl,
                    _ => -2,
                };
                match backend_of(&value) {
                    Some(winner) => (
                        winner.to_string(),
                        expiry(now, pttl, Duration::from_millis(ttl)),
                    ),
                    // A value with no backend name: nothing sensible stands; route by the
                    // caller's choice and let the next lookup find out.
                    None => (backend.to_string(), None),
                }
            }
            other => {
                TokenStats::add(&self.stats.store_errors, 1);
                warn!("token store: unexpected answer to a claim: {other:?}");
                (backend.to_string(), None)
            }
        };
        self.cache.insert(
            key,
            Cached {
                backend: standing.clone(),
                checked: now,
                expires,
            },
        );
        if standing == backend {
            Claim::Won
        } else {
            Claim::Lost(standing)
        }
    }

    /// The request connection if the store is up, else a new one: operator commands try Redis
    /// even while requests skip it.
    async fn operator_connection(&self) -> Result<MultiplexedConnection> {
        if let Some((con, _)) = self.connection() {
            return Ok(con);
        }
        shared::connect(&self.client)
            .await
            .context("connecting to Redis")
    }

    async fn scan(
        &self,
        con: &mut MultiplexedConnection,
        pattern: &str,
        cursor: u64,
    ) -> Result<(u64, Vec<String>)> {
        TokenStats::add(&self.stats.store_commands, 1);
        operator(
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(BATCH)
                .query_async(con),
            "SCAN",
        )
        .await
    }

    /// One round of the probe: a store that is up PINGs its connection (a Redis that died
    /// without closing it is noticed here rather than by a request); one that is down connects
    /// anew, and comes up once a PING is answered within [`REQUEST_TIMEOUT`] and its pending
    /// claims are written.
    async fn probe_once(&self) {
        if let Some((mut con, generation)) = self.connection() {
            let ping = operator(redis::cmd("PING").query_async::<String>(&mut con), "PING").await;
            if let Err(e) = ping {
                self.failed(generation, &e);
                return;
            }
            // Claims made in the instant between the write-back and coming up.
            if self.pending_len.load(Relaxed) > 0
                && let Err(e) = self.claim_pending(&mut con).await
            {
                self.failed(generation, &e);
            }
            return;
        }
        let mut con = match shared::connect(&self.client).await {
            Ok(con) => con,
            Err(_) => {
                // Counted, not logged: the failure that took the store down was.
                TokenStats::add(&self.stats.store_errors, 1);
                return;
            }
        };
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        if by(
            deadline,
            redis::cmd("PING").query_async::<String>(&mut con),
            "PING",
        )
        .await
        .is_err()
        {
            TokenStats::add(&self.stats.store_errors, 1);
            return;
        }
        let claimed = match self.claim_pending(&mut con).await {
            Ok(claimed) => claimed,
            Err(e) => {
                TokenStats::add(&self.stats.store_errors, 1);
                warn!("token store: writing back the placements made while Redis was away: {e:#}");
                return;
            }
        };
        // Best effort, unlike the pending claims: a write-back that fails (a key of another
        // type under the prefix fails its whole pipeline) must not keep the store down.
        let restored = match self.restore_cached(&mut con).await {
            Ok(restored) => restored,
            Err(e) => {
                TokenStats::add(&self.stats.store_errors, 1);
                warn!("token store: writing back the cached placements: {e:#}");
                0
            }
        };
        {
            let mut link = lock(&self.link);
            link.con = Some(con);
            link.generation += 1;
            *lock(&self.up_since) = Some(Instant::now());
            self.up.store(true, Relaxed);
        }
        self.stats.store_down.store(false, Relaxed);
        info!(
            "token store: Redis answers; {claimed} placements made while it was away claimed, {restored} cached placements it no longer had written back"
        );
    }

    /// Writes the cached placements back to a Redis that answers again, first writer wins (as
    /// a new claim: only a key that is absent is written), each with the TTL it had left: a
    /// Redis that lost its data (restarted empty, or an empty replica took over) learns again
    /// where the tokens in use go, instead of their next requests being placed anew. A key
    /// Redis still has stands, and the cache takes what it names. Entries whose expiry is not
    /// known or has passed are left out. The placement's time is the write's (the original is
    /// not cached). Returns the placements written.
    async fn restore_cached(&self, con: &mut MultiplexedConnection) -> Result<usize> {
        let now = Instant::now();
        let entries: Vec<(String, String, u64)> = self
            .cache
            .entries()
            .into_iter()
            .filter_map(|(key, cached)| {
                Some((key, cached.backend, restorable(now, cached.expires)?))
            })
            .collect();
        if entries.is_empty() {
            return Ok(0);
        }
        let sha = operator(self.claim_script.load_async(con), "SCRIPT LOAD").await?;
        let created_ms = shared::unix_ms();
        let mut written = 0;
        for chunk in entries.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for (key, backend, ttl) in chunk {
                let placement = Placement {
                    backend: backend.clone(),
                    created_ms,
                    node: self.node.clone(),
                };
                pipe.cmd("EVALSHA")
                    .arg(&sha)
                    .arg(1)
                    .arg(key)
                    .arg(placement.encode())
                    .arg(*ttl)
                    .arg("");
            }
            TokenStats::add(&self.stats.store_commands, chunk.len() as u64);
            let answers: Vec<Value> = operator(pipe.query_async(con), "EVALSHA restore").await?;
            if answers.len() != chunk.len() {
                bail!("{} answers for {} restores", answers.len(), chunk.len());
            }
            let now = Instant::now();
            for ((key, backend, ttl), answer) in chunk.iter().zip(answers) {
                written += usize::from(answer == Value::Nil);
                self.settle(key.clone(), backend, *ttl, answer, now);
            }
        }
        TokenStats::add(&self.stats.restored, written as u64);
        Ok(written)
    }

    /// Claims the placements made while Redis was down (first writer wins, as always); what
    /// stands goes into the cache. On failure the claims not answered are kept for the next
    /// attempt. Returns the claims answered.
    async fn claim_pending(&self, con: &mut MultiplexedConnection) -> Result<usize> {
        let taken: Vec<(String, Pending)> = {
            let mut map = lock(&self.pending);
            let taken = map.drain().collect();
            self.pending_len.store(0, Relaxed);
            taken
        };
        if taken.is_empty() {
            return Ok(0);
        }
        let mut done = 0;
        let result = async {
            let sha = operator(self.claim_script.load_async(con), "SCRIPT LOAD").await?;
            for chunk in taken.chunks(BATCH) {
                let mut pipe = redis::pipe();
                for (key, pending) in chunk {
                    let placement = Placement {
                        backend: pending.backend.clone(),
                        created_ms: pending.created_ms,
                        node: self.node.clone(),
                    };
                    pipe.cmd("EVALSHA")
                        .arg(&sha)
                        .arg(1)
                        .arg(key)
                        .arg(placement.encode())
                        .arg(pending.ttl_ms)
                        .arg(pending.previous.as_deref().unwrap_or(""));
                }
                TokenStats::add(&self.stats.store_commands, chunk.len() as u64);
                let answers: Vec<Value> = operator(pipe.query_async(con), "EVALSHA claim").await?;
                if answers.len() != chunk.len() {
                    bail!("{} answers for {} claims", answers.len(), chunk.len());
                }
                let now = Instant::now();
                for ((key, pending), answer) in chunk.iter().zip(answers) {
                    let claim =
                        self.settle(key.clone(), &pending.backend, pending.ttl_ms, answer, now);
                    self.count(pending.previous.is_some(), &claim);
                }
                TokenStats::add(&self.stats.pending_claimed, chunk.len() as u64);
                done += chunk.len();
            }
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = result {
            // Back, unless a newer placement of the same token was made meanwhile.
            let mut map = lock(&self.pending);
            for (key, pending) in taken.into_iter().skip(done) {
                if map.len() < PENDING_LIMIT {
                    map.entry(key).or_insert(pending);
                }
            }
            self.pending_len.store(map.len(), Relaxed);
            return Err(e);
        }
        Ok(done)
    }
}

/// The TTL (ms) a cached placement that Redis expires at `expires` is written back with, or
/// `None` if its expiry is not known or is less than a millisecond away.
fn restorable(now: Instant, expires: Option<Instant>) -> Option<u64> {
    let left = expires?.saturating_duration_since(now).as_millis() as u64;
    (left > 0).then_some(left)
}

/// Runs a request's Redis call, failing at `deadline`.
async fn by<T>(
    deadline: tokio::time::Instant,
    call: impl Future<Output = RedisResult<T>>,
    what: &str,
) -> Result<T> {
    match tokio::time::timeout_at(deadline, call).await {
        Ok(result) => result.with_context(|| what.to_string()),
        Err(_) => Err(anyhow!("{what}: no answer within {REQUEST_TIMEOUT:?}")),
    }
}

/// The probe task: one round per [`PROBE_INTERVAL`], the first at once; ends with the store.
async fn probe(store: Weak<Inner>) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = store.upgrade() else {
            return;
        };
        inner.probe_once().await;
    }
}

/// The backend (an index into `backends`) a token goes to while the store is down: rendezvous
/// hashing (highest random weight; Thaler and Ravishankar, "Using name-based mappings to
/// increase hit rates", IEEE/ACM ToN 1998) over the backends' *names*. Each backend scores
/// `mix64(name_hash(name) ^ token_hash)` and the highest score wins (ties: the smaller name).
///
/// The hashes have fixed constants (FNV-1a 64 and MurmurHash3's finalizer, as the Maglev
/// table's), so every node, whatever its version or start, picks the same backend for the same
/// names, in whatever order they are listed; adding or removing one of n backends moves only
/// about 1/n of the tokens (those it wins or won). Weights are not taken into account: pass
/// the backends that take new clients. `None` when `backends` is empty.
pub fn fallback(token: &str, backends: &[&str]) -> Option<usize> {
    let token_hash = name_hash(token, TOKEN_SEED);
    let mut best: Option<(u64, &str, usize)> = None;
    for (i, name) in backends.iter().enumerate() {
        let score = mix64(name_hash(name, NAME_SEED) ^ token_hash);
        let better = match best {
            None => true,
            Some((top, top_name, _)) => score > top || (score == top && *name < top_name),
        };
        if better {
            best = Some((score, name, i));
        }
    }
    best.map(|(_, _, i)| i)
}

/// Seeds of the fallback's two hashes (fixed: part of what every node must agree on).
const TOKEN_SEED: u64 = 0x746f_6b65_6e00_0001;
const NAME_SEED: u64 = 0x6261_636b_656e_6401;

/// A new session token: 128 bits from the kernel's CSPRNG (`getrandom(2)`, which blocks only
/// until the pool is first seeded at boot), base64url without padding (RFC 4648 section 5):
/// 22 characters of `A-Z a-z 0-9 - _`, safe in a cookie, a header and a Redis key.
///
/// Panics if the kernel refuses randomness (no `getrandom(2)`: Linux before 3.17, which cannot
/// run the data path anyway); a guessable token would let one client take over another's
/// session.
pub fn new_token() -> String {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: writes at most `bytes.len() - filled` bytes into the rest of `bytes`.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            panic!("getrandom(2) failed: {error}");
        }
        filled += n as usize;
    }
    base64url(&bytes)
}

/// Base64url without padding (RFC 4648 section 5).
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        // 1 byte: 2 characters, 2 bytes: 3, 3 bytes: 4.
        for i in 0..=chunk.len() {
            text.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    text
}

/// Whether `token` may be looked up and stored: 1 to [`MAX_TOKEN_LEN`] bytes, each a cookie
/// octet (RFC 6265 section 4.1.1: visible ASCII except `"` `,` `;` `\`). Anything else (a
/// client's junk) is to be treated as no token.
pub fn acceptable(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && !matches!(b, b'"' | b',' | b';' | b'\\'))
}

/// The cache: bounded CLOCK maps (split in shards when large), keyed by the token's Redis key.
/// Keyed hashing (std's `RandomState`), so clients choosing tokens cannot make one shard or
/// bucket long.
struct Cache {
    shards: Box<[Mutex<Clock<Cached>>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Cache {
    /// A cache of about `capacity` entries: exactly that below [`SHARDED_FROM`], else at most
    /// `SHARDS - 1` more (each shard holds `capacity / SHARDS`, rounded up).
    fn new(capacity: usize) -> Cache {
        let shards = if capacity >= SHARDED_FROM { SHARDS } else { 1 };
        let each = capacity.div_ceil(shards);
        Cache {
            shards: (0..shards).map(|_| Mutex::new(Clock::new(each))).collect(),
            hasher: Default::default(),
        }
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Clock<Cached>> {
        let i = if self.shards.len() == 1 {
            0
        } else {
            (self.hasher.hash_one(key) % self.shards.len() as u64) as usize
        };
        lock(&self.shards[i])
    }

    fn get(&self, key: &str) -> Option<Cached> {
        self.shard(key).get(key).cloned()
    }

    fn insert(&self, key: String, value: Cached) {
        self.shard(&key).insert(key, value);
    }

    fn remove(&self, key: &str) {
        self.shard(key).remove(key);
    }

    fn retain(&self, keep: impl Fn(&str, &Cached) -> bool) {
        for shard in &self.shards {
            lock(shard).retain(&keep);
        }
    }

    /// A copy of every entry (a shard at a time: entries added meanwhile may be missed).
    fn entries(&self) -> Vec<(String, Cached)> {
        let mut all = Vec::new();
        for shard in &self.shards {
            let shard = lock(shard);
            all.extend(shard.slots.iter().map(|s| (s.key.clone(), s.value.clone())));
        }
        all
    }
}

/// A map of at most `capacity` entries that evicts by CLOCK (second chance; Corbató 1968): a
/// hand sweeps the slots, clearing each one's referenced bit, and evicts the first whose bit is
/// already clear. Close to LRU for a fraction of the bookkeeping: a hit only sets a bit.
struct Clock<V> {
    index: HashMap<String, usize>,
    slots: Vec<Slot<V>>,
    hand: usize,
    capacity: usize,
}

struct Slot<V> {
    key: String,
    value: V,
    referenced: bool,
}

impl<V> Clock<V> {
    fn new(capacity: usize) -> Clock<V> {
        Clock {
            index: HashMap::new(),
            slots: Vec::new(),
            hand: 0,
            capacity,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len()
    }

    fn get(&mut self, key: &str) -> Option<&V> {
        let &i = self.index.get(key)?;
        let slot = &mut self.slots[i];
        slot.referenced = true;
        Some(&slot.value)
    }

    fn insert(&mut self, key: String, value: V) {
        if self.capacity == 0 {
            return;
        }
        if let Some(&i) = self.index.get(&key) {
            let slot = &mut self.slots[i];
            slot.value = value;
            slot.referenced = true;
            return;
        }
        if self.slots.len() < self.capacity {
            self.index.insert(key.clone(), self.slots.len());
            self.slots.push(Slot {
                key,
                value,
                referenced: false,
            });
            return;
        }
        // Every slot is visited at most twice: the first pass clears all bits.
        while self.slots[self.hand].referenced {
            self.slots[self.hand].referenced = false;
            self.hand = (self.hand + 1) % self.slots.len();
        }
        let i = self.hand;
        self.hand = (i + 1) % self.slots.len();
        let old = std::mem::replace(
            &mut self.slots[i],
            Slot {
                key: key.clone(),
                value,
                referenced: false,
            },
        );
        self.index.remove(&old.key);
        self.index.insert(key, i);
    }

    fn remove(&mut self, key: &str) -> Option<V> {
        let i = self.index.remove(key)?;
        let slot = self.slots.swap_remove(i);
        if let Some(moved) = self.slots.get(i)
            && let Some(at) = self.index.get_mut(&moved.key)
        {
            *at = i;
        }
        if self.hand >= self.slots.len() {
            self.hand = 0;
        }
        Some(slot.value)
    }

    fn retain(&mut self, keep: impl Fn(&str, &V) -> bool) {
        self.slots.retain(|slot| keep(&slot.key, &slot.value));
        self.index = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| (slot.key.clone(), i))
            .collect();
        self.hand = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("web-{i}")).collect()
    }

    fn pick<'a>(token: &str, names: &'a [String]) -> &'a str {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        &names[fallback(token, &refs).unwrap()]
    }

    #[test]
    fn fallback_is_fixed_and_ignores_the_order_of_backends() {
        let refs = ["web-1", "web-2", "web-3", "web-4"];
        // Pinned: a change here sends tokens elsewhere on nodes of different versions.
        let picks: Vec<&str> = ["a", "b", "c", "token-1", "Zm9vYmFyYmF6cXV4cXV1eA"]
            .iter()
            .map(|t| refs[fallback(t, &refs).unwrap()])
            .collect();
        assert_eq!(picks, PINNED_PICKS);
        let reversed = ["web-4", "web-3", "web-2", "web-1"];
        for i in 0..1000 {
            let token = format!("t{i}");
            assert_eq!(
                refs[fallback(&token, &refs).unwrap()],
                reversed[fallback(&token, &reversed).unwrap()]
            );
        }
        assert_eq!(fallback("a", &[]), None);
        assert_eq!(fallback("a", &["only"]), Some(0));
    }

    /// What [`fallback`] picks among web-1..web-4 for the tokens of the test above.
    const PINNED_PICKS: [&str; 5] = ["web-4", "web-2", "web-2", "web-3", "web-2"];

    #[test]
    fn fallback_spreads_tokens_evenly() {
        let names = names(5);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let n = 50_000;
        for i in 0..n {
            *counts.entry(pick(&format!("tok{i}"), &names)).or_default() += 1;
        }
        for name in &names {
            let share = counts[name.as_str()] as f64 / n as f64;
            assert!((share - 0.2).abs() < 0.01, "{name}: {share}");
        }
    }

    #[test]
    fn removing_one_backend_moves_only_its_tokens() {
        let all = names(5);
        let fewer: Vec<String> = all.iter().filter(|n| *n != "web-3").cloned().collect();
        let mut moved = 0;
        let n = 20_000;
        for _ in 0..n {
            let token = new_token();
            let before = pick(&token, &all);
            let after = pick(&token, &fewer);
            if before != "web-3" {
                assert_eq!(before, after, "{token} moved off a backend that stayed");
            } else {
                moved += 1;
            }
        }
        let share = moved as f64 / n as f64;
        assert!((share - 0.2).abs() < 0.015, "{share}");
    }

    #[test]
    fn adding_one_backend_moves_about_one_in_n_plus_one_to_it() {
        let four = names(4);
        let five = names(5);
        let n = 20_000;
        let mut moved = 0;
        for i in 0..n {
            let token = format!("session-{i}");
            let (before, after) = (pick(&token, &four), pick(&token, &five));
            if before != after {
                assert_eq!(after, "web-5", "{token} moved between old backends");
                moved += 1;
            }
        }
        let share = moved as f64 / n as f64;
        assert!((share - 0.2).abs() < 0.015, "{share}");
    }

    #[test]
    fn the_clock_holds_at_most_its_capacity_and_spares_entries_in_use() {
        let mut clock = Clock::new(3);
        for k in ["a", "b", "c"] {
            clock.insert(k.to_string(), k.to_string());
        }
        // "a" is used: the next insert evicts an entry that was not ("b").
        assert!(clock.get("a").is_some());
        clock.insert("d".into(), "d".into());
        assert_eq!(clock.len(), 3);
        assert!(clock.get("a").is_some());
        assert!(clock.get("b").is_none());
        for i in 0..100 {
            clock.insert(format!("k{i}"), String::new());
            assert!(clock.len() <= 3);
        }
        assert_eq!(clock.index.len(), clock.len());
        for (i, slot) in clock.slots.iter().enumerate() {
            assert_eq!(clock.index[&slot.key], i);
        }
        let last = clock.slots[0].key.clone();
        assert!(clock.remove(&last).is_some());
        assert_eq!(clock.len(), 2);
        for (i, slot) in clock.slots.iter().enumerate() {
            assert_eq!(clock.index[&slot.key], i);
        }
        clock.retain(|_, _| false);
        assert_eq!((clock.len(), clock.index.len()), (0, 0));

        let mut none: Clock<u8> = Clock::new(0);
        none.insert("a".into(), 1);
        assert!(none.get("a").is_none());
    }

    #[test]
    fn a_sharded_cache_stays_within_its_bound() {
        let cache = Cache::new(5000);
        let now = Instant::now();
        for i in 0..20_000 {
            cache.insert(
                format!("k{i}"),
                Cached {
                    backend: "b".into(),
                    checked: now,
                    expires: None,
                },
            );
        }
        let held: usize = cache.shards.iter().map(|s| lock(s).len()).sum();
        assert!(held < 5000 + SHARDS, "{held}");
        assert!(held >= 5000 - SHARDS, "{held}");
        cache.retain(|k, _| k.ends_with('7'));
        let held: usize = cache.shards.iter().map(|s| lock(s).len()).sum();
        assert!(held > 0 && held < 1000, "{held}");
    }

    #[test]
    fn a_refresh_is_due_once_a_quarter_timeout_has_passed() {
        let timeout = Duration::from_secs(40);
        let now = Instant::now();
        // Refreshed 9 s ago (31 s left): not due; 10 s ago (30 s left): due.
        assert!(!refresh_due(
            now,
            Some(now + Duration::from_secs(31)),
            timeout
        ));
        assert!(refresh_due(
            now,
            Some(now + Duration::from_secs(30)),
            timeout
        ));
        assert!(refresh_due(now, Some(now), timeout));
        assert!(refresh_due(
            now + Duration::from_secs(1),
            Some(now),
            timeout
        ));
        assert!(refresh_due(now, None, timeout));
        assert!(!refresh_due(now, Some(now + timeout), timeout));
    }

    #[test]
    fn ttl_answers_read_as_expiries() {
        let (now, timeout) = (Instant::now(), Duration::from_secs(60));
        assert_eq!(
            expiry(now, 1500, timeout),
            Some(now + Duration::from_millis(1500))
        );
        // No TTL: counts as renewed now, so not due for a quarter timeout.
        assert_eq!(expiry(now, -1, timeout), Some(now + timeout));
        assert!(!refresh_due(now, expiry(now, -1, timeout), timeout));
        assert_eq!(expiry(now, -2, timeout), None);
    }

    #[test]
    fn new_tokens_are_22_base64url_characters_and_differ() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let token = new_token();
            assert_eq!(token.len(), 22, "{token}");
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
            assert!(acceptable(&token));
            assert!(seen.insert(token));
        }
    }

    #[test]
    fn base64url_matches_rfc_4648_vectors() {
        // RFC 4648 section 10, padding removed.
        for (input, output) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64url(input.as_bytes()), output);
        }
        // The URL-safe characters replace + and /.
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn only_short_cookie_octet_tokens_are_acceptable() {
        assert!(acceptable("abc-_.~!#"));
        assert!(!acceptable(""));
        assert!(!acceptable("a b"));
        assert!(!acceptable("a;b"));
        assert!(!acceptable("a\tb"));
        assert!(!acceptable("é"));
        assert!(acceptable(&"x".repeat(MAX_TOKEN_LEN)));
        assert!(!acceptable(&"x".repeat(MAX_TOKEN_LEN + 1)));
    }

    #[test]
    fn stored_values_name_their_backend() {
        assert_eq!(backend_of("web-1\t17\tlb1"), Some("web-1"));
        assert_eq!(backend_of("web-1"), Some("web-1"));
        assert_eq!(backend_of("\t17\tlb1"), None);
        let e = entry("t", Some(b"web-2\t5\tlb2"), 1000).unwrap();
        assert_eq!(
            (e.backend.as_str(), e.created_ms, e.node.as_str(), e.ttl_ms),
            ("web-2", 5, "lb2", Some(1000))
        );
        assert_eq!(entry("t", Some(b"web-2"), -1).unwrap().ttl_ms, None);
        assert!(entry("t", None, -2).is_none());
    }

    #[test]
    fn cached_placements_are_written_back_with_the_ttl_they_had_left() {
        let now = Instant::now();
        assert_eq!(
            restorable(now, Some(now + Duration::from_millis(1500))),
            Some(1500)
        );
        assert_eq!(restorable(now, Some(now)), None);
        assert_eq!(restorable(now + Duration::from_secs(1), Some(now)), None);
        assert_eq!(restorable(now, None), None);
        let cache = Cache::new(10);
        for (key, expires) in [("a", Some(now + Duration::from_secs(5))), ("b", None)] {
            cache.insert(
                key.into(),
                Cached {
                    backend: "web-1".into(),
                    checked: now,
                    expires,
                },
            );
        }
        let mut entries: Vec<(String, Option<u64>)> = cache
            .entries()
            .into_iter()
            .map(|(k, c)| (k, restorable(now, c.expires)))
            .collect();
        entries.sort();
        assert_eq!(
            entries,
            [("a".to_string(), Some(5000)), ("b".to_string(), None)]
        );
    }

    #[test]
    fn claims_name_where_the_token_goes() {
        assert_eq!(Claim::Won.backend("a"), "a");
        assert_eq!(Claim::StoreDown.backend("a"), "a");
        assert_eq!(Claim::Lost("b".into()).backend("a"), "b");
    }
}
