//! The session-token store of `stick: {token: ...}` services against a real Redis: two stores
//! stand for two balancer nodes sharing it. First writer wins across nodes, TTLs are the stick
//! timeout and renewed at most once per quarter timeout (whichever node sees the token),
//! re-placements off a failed backend agree on the first, evacuating a backend removes only its
//! tokens, and a Redis that dies or hangs is skipped (cache, local claims, the token hash) and
//! gets the claims made meanwhile once it answers again. Needs root (a namespace of its own,
//! where Redis listens and the stores connect).

use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use sticky_lb::http::token::{Claim, Lookup, TokenStats, TokenStore, fallback, new_token};
use sticky_lb_tests::netns::{NetNs, in_netns, require_root, unique_tag};
use sticky_lb_tests::redis::{REDIS_PORT, RedisServer};

/// Redis's address, on the namespace's loopback.
const REDIS_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const PREFIX: &str = "slbtest";
const SVC: &str = "web";
/// The stick timeout of most tests (long: nothing may expire while they run).
const TIMEOUT: Duration = Duration::from_secs(300);
/// Bound of anything a test waits for: a hang guard, not a speed requirement.
const HANG: Duration = Duration::from_secs(15);

/// A namespace with Redis in it. Fields drop in order: Redis first, then the namespace.
struct Lab {
    redis: RedisServer,
    ns: NetNs,
}

impl Lab {
    fn start(test: &str) -> Lab {
        require_root();
        let ns = NetNs::new(format!("slb-{}", unique_tag(test))).expect("namespace");
        ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
        ns.ip(&["addr", "add", "198.18.0.1/32", "dev", "lo"])
            .expect("address");
        let redis = RedisServer::start(ns.name(), REDIS_ADDR, REDIS_PORT).expect("redis");
        Lab { redis, ns }
    }

    fn key(&self, token: &str) -> String {
        format!("{PREFIX}:token:{SVC}:{token}")
    }

    fn pttl(&self, token: &str) -> i64 {
        let text = self.redis.command(&["PTTL", &self.key(token)]).unwrap();
        text.parse()
            .unwrap_or_else(|_| panic!("PTTL answered {text:?}"))
    }

    fn value(&self, token: &str) -> String {
        self.redis.command(&["GET", &self.key(token)]).unwrap()
    }
}

/// Runs `body` on this thread inside the lab's namespace (so the stores' sockets are created
/// there), on a runtime of its own.
fn in_lab<T>(ns: &str, body: impl Future<Output = T>) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    in_netns(ns, || runtime.block_on(body))
}

/// Fails the test instead of hanging it.
async fn bounded<T>(what: &str, work: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG, work)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {HANG:?}"))
}

/// A store for node `node`, up.
async fn node(url: &str, node: &str) -> TokenStore {
    let store =
        TokenStore::new(url, PREFIX, node, 10_000, Arc::new(TokenStats::default())).expect("store");
    assert!(store.wait_up(HANG).await, "{node}: store never came up");
    store
}

fn found(backend: &str) -> Lookup {
    Lookup::Found(backend.to_string())
}

fn count(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(Relaxed)
}

#[test]
fn two_nodes_claiming_one_token_agree_on_the_first_writer() {
    let lab = Lab::start("tok_first");
    let url = lab.redis.url();
    in_lab(lab.ns.name(), async {
        let (a, b) = (node(&url, "lbA").await, node(&url, "lbB").await);
        let token = new_token();
        assert_eq!(a.claim(SVC, &token, "b1", TIMEOUT).await, Claim::Won);
        assert_eq!(
            b.claim(SVC, &token, "b2", TIMEOUT).await,
            Claim::Lost("b1".into())
        );
        assert_eq!(a.lookup(SVC, &token, TIMEOUT).await, found("b1"));
        assert_eq!(b.lookup(SVC, &token, TIMEOUT).await, found("b1"));
        let value = lab.value(&token);
        assert!(
            value.starts_with("b1\t") && value.ends_with("\tlbA"),
            "{value:?}"
        );

        // Both nodes place the same new tokens at the same time, on different backends.
        let n = 200;
        for _ in 0..n {
            let token = new_token();
            let (x, y) = bounded(
                "two claims",
                // Polled together: both claims are in flight at once.
                async {
                    tokio::join!(
                        a.claim(SVC, &token, "b1", TIMEOUT),
                        b.claim(SVC, &token, "b2", TIMEOUT)
                    )
                },
            )
            .await;
            match (&x, &y) {
                (Claim::Won, Claim::Lost(w)) => assert_eq!(w, "b1"),
                (Claim::Lost(w), Claim::Won) => assert_eq!(w, "b2"),
                _ => panic!("{token}: {x:?} and {y:?}"),
            }
            let winner = x.backend("b1").to_string();
            assert_eq!(b.lookup(SVC, &token, TIMEOUT).await, found(&winner));
            assert_eq!(a.lookup(SVC, &token, TIMEOUT).await, found(&winner));
        }
        let (sa, sb) = (a.stats(), b.stats());
        assert_eq!(count(&sa.claims_won) + count(&sb.claims_won), n + 1);
        assert_eq!(count(&sa.claims_lost) + count(&sb.claims_lost), n + 1);
        assert_eq!(count(&sa.store_errors) + count(&sb.store_errors), 0);
    });
}

#[test]
fn ttl_is_the_stick_timeout_renewed_at_most_once_per_quarter_by_any_node() {
    // 8 s: a quarter is 2 s, the same as the cache's trust window.
    let timeout = Duration::from_secs(8);
    let lab = Lab::start("tok_ttl");
    let url = lab.redis.url();
    in_lab(lab.ns.name(), async {
        let (a, b) = (node(&url, "lbA").await, node(&url, "lbB").await);
        let token = new_token();
        let placed = Instant::now();
        assert_eq!(a.claim(SVC, &token, "b1", timeout).await, Claim::Won);
        let pttl = lab.pttl(&token);
        assert!(pttl > 6000 && pttl <= 8000, "PTTL {pttl} after the claim");

        // Within the first quarter: one node from its cache, the other from Redis; neither
        // renews the key.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(a.lookup(SVC, &token, timeout).await, found("b1"));
        assert_eq!(b.lookup(SVC, &token, timeout).await, found("b1"));
        assert_eq!(count(&a.stats().refreshes), 0);
        assert_eq!(count(&b.stats().refreshes), 0);
        assert!(lab.pttl(&token) <= 7500, "renewed within the first quarter");

        // A quarter later: the first node to look renews it...
        tokio::time::sleep_until((placed + Duration::from_millis(2500)).into()).await;
        assert_eq!(a.lookup(SVC, &token, timeout).await, found("b1"));
        assert_eq!(count(&a.stats().refreshes), 1);
        let pttl = lab.pttl(&token);
        assert!(pttl > 7500, "PTTL {pttl}: not renewed");
        // ... and the other, whose own knowledge says it is due, asks Redis, sees that it was
        // renewed, and leaves it.
        let b_store_hits = count(&b.stats().store_hits);
        assert_eq!(b.lookup(SVC, &token, timeout).await, found("b1"));
        assert_eq!(count(&b.stats().store_hits), b_store_hits + 1);
        assert_eq!(count(&b.stats().refreshes), 0);
        // The renewing node's next lookup is its cache's again.
        let a_hits = count(&a.stats().cache_hits);
        assert_eq!(a.lookup(SVC, &token, timeout).await, found("b1"));
        assert_eq!(count(&a.stats().cache_hits), a_hits + 1);
        assert_eq!(count(&a.stats().refreshes), 1);
    });
}

#[test]
fn replace_moves_a_token_only_off_the_backend_it_still_names() {
    let lab = Lab::start("tok_repl");
    let url = lab.redis.url();
    in_lab(lab.ns.name(), async {
        let (a, b) = (node(&url, "lbA").await, node(&url, "lbB").await);
        let token = new_token();
        assert_eq!(a.claim(SVC, &token, "b1", TIMEOUT).await, Claim::Won);
        // Not off the backend it names: nothing changes.
        assert_eq!(
            b.replace(SVC, &token, "b2", "b3", TIMEOUT).await,
            Claim::Lost("b1".into())
        );
        assert!(lab.value(&token).starts_with("b1\t"));

        // b1 failed: both nodes move the token off it at once; the first move stands.
        let (x, y) = bounded("two replaces", async {
            tokio::join!(
                a.replace(SVC, &token, "b1", "b2", TIMEOUT),
                b.replace(SVC, &token, "b1", "b3", TIMEOUT)
            )
        })
        .await;
        let winner = match (&x, &y) {
            (Claim::Won, Claim::Lost(w)) if w == "b2" => "b2",
            (Claim::Lost(w), Claim::Won) if w == "b3" => "b3",
            _ => panic!("{x:?} and {y:?}"),
        };
        assert!(lab.value(&token).starts_with(&format!("{winner}\t")));
        assert_eq!(a.lookup(SVC, &token, TIMEOUT).await, found(winner));
        assert_eq!(b.lookup(SVC, &token, TIMEOUT).await, found(winner));
        assert_eq!(count(&a.stats().replaces) + count(&b.stats().replaces), 1);
        assert_eq!(
            count(&a.stats().replaces_lost) + count(&b.stats().replaces_lost),
            2
        );

        // A token gone from the store (expired, deleted) is simply placed.
        let gone = new_token();
        assert_eq!(a.replace(SVC, &gone, "b1", "b2", TIMEOUT).await, Claim::Won);
        assert_eq!(b.lookup(SVC, &gone, TIMEOUT).await, found("b2"));
    });
}

#[test]
fn flush_backend_evacuates_only_that_backends_tokens() {
    let lab = Lab::start("tok_flush");
    let url = lab.redis.url();
    in_lab(lab.ns.name(), async {
        let (a, b) = (node(&url, "lbA").await, node(&url, "lbB").await);
        let backends = ["b1", "b2", "b3"];
        let mut web = Vec::new();
        for i in 0..30 {
            let token = new_token();
            let backend = backends[i % 3];
            assert_eq!(a.claim(SVC, &token, backend, TIMEOUT).await, Claim::Won);
            web.push((token, backend));
        }
        let mut shop = Vec::new();
        for _ in 0..5 {
            let token = new_token();
            assert_eq!(a.claim("shop", &token, "b1", TIMEOUT).await, Claim::Won);
            shop.push(token);
        }

        assert_eq!(
            bounded("flush_backend", a.flush_backend(SVC, "b1"))
                .await
                .unwrap(),
            10
        );
        let left = a.list(SVC, 1000).await.unwrap();
        assert_eq!(left.len(), 20);
        assert!(left.iter().all(|e| e.backend != "b1"), "{left:?}");
        assert!(left.iter().all(|e| e.ttl_ms.is_some_and(|t| t <= 300_000)));
        let shop_left = b.list("shop", 1000).await.unwrap();
        assert_eq!(shop_left.len(), 5);
        assert!(shop_left.iter().all(|e| e.backend == "b1"));
        // The evacuating node forgets them at once (not after its cache's trust window).
        for (token, backend) in &web {
            let expected = if *backend == "b1" {
                Lookup::Absent
            } else {
                found(backend)
            };
            assert_eq!(a.lookup(SVC, token, TIMEOUT).await, expected, "{token}");
        }

        assert_eq!(a.flush(SVC).await.unwrap(), 20);
        assert!(a.list(SVC, 1000).await.unwrap().is_empty());
        assert_eq!(a.lookup(SVC, &web[1].0, TIMEOUT).await, Lookup::Absent);
        assert_eq!(b.list("shop", 1000).await.unwrap().len(), 5);
        assert_eq!(a.lookup("shop", &shop[0], TIMEOUT).await, found("b1"));
    });
}

#[test]
fn operators_list_get_and_delete_tokens() {
    let lab = Lab::start("tok_ops");
    let url = lab.redis.url();
    in_lab(lab.ns.name(), async {
        let (a, b) = (node(&url, "lbA").await, node(&url, "lbB").await);
        let token = new_token();
        let before_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert_eq!(a.claim(SVC, &token, "b1", TIMEOUT).await, Claim::Won);
        let entry = b
            .get(SVC, &token)
            .await
            .unwrap()
            .expect("the token is stored");
        assert_eq!(
            (
                entry.token.as_str(),
                entry.backend.as_str(),
                entry.node.as_str()
            ),
            (token.as_str(), "b1", "lbA")
        );
        assert!(entry.created_ms >= before_ms, "{entry:?}");
        assert!(
            entry.ttl_ms.is_some_and(|t| t > 0 && t <= 300_000),
            "{entry:?}"
        );
        let listed = b.list(SVC, 100).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (
                &listed[0].token,
                &listed[0].backend,
                &listed[0].node,
                listed[0].created_ms
            ),
            (&entry.token, &entry.backend, &entry.node, entry.created_ms)
        );

        let mut more: Vec<String> = (0..10).map(|_| new_token()).collect();
        for t in &more {
            a.claim(SVC, t, "b2", TIMEOUT).await;
        }
        let five = a.list(SVC, 5).await.unwrap();
        assert_eq!(five.len(), 5);
        let all = a.list(SVC, 100).await.unwrap();
        more.push(token.clone());
        more.sort();
        assert_eq!(
            all.iter().map(|e| e.token.clone()).collect::<Vec<_>>(),
            more
        );

        assert_eq!(b.lookup(SVC, &token, TIMEOUT).await, found("b1"));
        assert!(a.delete(SVC, &token).await.unwrap());
        assert_eq!(a.get(SVC, &token).await.unwrap(), None);
        assert_eq!(a.lookup(SVC, &token, TIMEOUT).await, Lookup::Absent);
        assert!(!a.delete(SVC, &token).await.unwrap());

        // A value written by hand, without a TTL: its backend counts.
        lab.redis
            .command(&["SET", &lab.key("by-hand"), "b7"])
            .unwrap();
        let entry = a.get(SVC, "by-hand").await.unwrap().unwrap();
        assert_eq!((entry.backend.as_str(), entry.ttl_ms), ("b7", None));
        assert_eq!(a.lookup(SVC, "by-hand", TIMEOUT).await, found("b7"));
        // Served from the cache from then on, and left without a TTL.
        let hits = count(&a.stats().cache_hits);
        assert_eq!(a.lookup(SVC, "by-hand", TIMEOUT).await, found("b7"));
        assert_eq!(count(&a.stats().cache_hits), hits + 1);
        assert_eq!(lab.pttl("by-hand"), -1);
    });
}

#[test]
fn a_killed_redis_is_skipped_and_gets_the_claims_made_meanwhile() {
    let mut lab = Lab::start("tok_kill");
    let url = lab.redis.url();
    let ns = lab.ns.name().to_string();
    in_lab(&ns, async {
        let (a, b) = (node(&url, "lbA").await, node(&url, "lbB").await);
        let old = new_token();
        assert_eq!(a.claim(SVC, &old, "b1", TIMEOUT).await, Claim::Won);

        lab.redis.kill();
        // The first request finds Redis gone; the node does not know the token.
        assert_eq!(
            bounded("lookup", b.lookup(SVC, &old, TIMEOUT)).await,
            Lookup::StoreDown
        );
        assert!(!b.is_up());
        assert!(b.stats().store_down.load(Relaxed));
        // From then on requests do not even try Redis.
        let commands = count(&b.stats().store_commands);
        for _ in 0..50 {
            let token = new_token();
            assert_eq!(b.lookup(SVC, &token, TIMEOUT).await, Lookup::StoreDown);
        }
        assert_eq!(count(&b.stats().store_commands), commands);
        // The node that placed the token still knows it.
        assert_eq!(
            bounded("lookup", a.lookup(SVC, &old, TIMEOUT)).await,
            found("b1")
        );

        // A new token is routed by its hash, the same on both nodes, and its placement is kept
        // here until Redis is back.
        let backends = ["b1", "b2", "b3"];
        let new = new_token();
        let chosen = backends[b.fallback(&new, &backends).unwrap()];
        assert_eq!(backends[fallback(&new, &backends).unwrap()], chosen);
        assert_eq!(count(&b.stats().fallback_routings), 1);
        assert_eq!(
            bounded("claim", b.claim(SVC, &new, chosen, TIMEOUT)).await,
            Claim::StoreDown
        );
        assert_eq!(b.lookup(SVC, &new, TIMEOUT).await, found(chosen));
        // One token placed differently on the two nodes while Redis is away.
        let both = new_token();
        assert_eq!(
            bounded("claim", a.claim(SVC, &both, "b1", TIMEOUT)).await,
            Claim::StoreDown
        );
        assert_eq!(b.claim(SVC, &both, "b2", TIMEOUT).await, Claim::StoreDown);
        assert_eq!(a.lookup(SVC, &both, TIMEOUT).await, found("b1"));
        assert_eq!(b.lookup(SVC, &both, TIMEOUT).await, found("b2"));

        // Redis comes back, empty: each node claims what it placed meanwhile before it uses
        // Redis again.
        lab.redis.restart().expect("redis restart");
        assert!(a.wait_up(HANG).await && b.wait_up(HANG).await);
        assert!(!b.stats().store_down.load(Relaxed));
        let value = lab.value(&new);
        assert!(
            value.starts_with(&format!("{chosen}\t")) && value.ends_with("\tlbB"),
            "{value:?}"
        );
        assert_eq!(count(&b.stats().pending_claimed), 2);
        assert_eq!(count(&a.stats().pending_claimed), 1);
        // The first write-back won; both nodes now send the token there.
        let stored = lab.value(&both);
        let winner = stored.split('\t').next().unwrap().to_string();
        assert_eq!(a.lookup(SVC, &both, TIMEOUT).await, found(&winner));
        assert_eq!(b.lookup(SVC, &both, TIMEOUT).await, found(&winner));
        assert_eq!(a.lookup(SVC, &new, TIMEOUT).await, found(chosen));
        // What Redis lost and a node still caches (the old token, on the node that placed
        // it) is written back as well, with the TTL it had left: it keeps its backend, on
        // every node, past the cache's trust.
        tokio::time::sleep(sticky_lb::http::token::CACHE_TRUST).await;
        assert_eq!(a.lookup(SVC, &old, TIMEOUT).await, found("b1"));
        assert_eq!(b.lookup(SVC, &old, TIMEOUT).await, found("b1"));
        let ttl = lab.pttl(&old);
        assert!(ttl > 0 && ttl <= TIMEOUT.as_millis() as i64, "{ttl}");
        assert_eq!(count(&a.stats().restored), 1);
        assert_eq!(count(&b.stats().restored), 0);
    });
}

/// Sends SIGCONT to a stopped process when dropped, also when the test fails.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: a signal to the Redis process this test started.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

#[test]
fn a_hung_redis_costs_one_timeout_then_is_skipped() {
    let lab = Lab::start("tok_hung");
    let url = lab.redis.url();
    in_lab(lab.ns.name(), async {
        let a = node(&url, "lbA").await;
        let token = new_token();
        assert_eq!(a.claim(SVC, &token, "b1", TIMEOUT).await, Claim::Won);

        let pid = lab.redis.pid();
        // SAFETY: a signal to the Redis process this test started.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        let resume = Resume(pid);
        // Redis accepts nothing and answers nothing: the request's timeout takes the store
        // down, and the request is answered all the same.
        assert_eq!(
            bounded("lookup", a.lookup(SVC, &new_token(), TIMEOUT)).await,
            Lookup::StoreDown
        );
        assert!(!a.is_up());
        assert!(count(&a.stats().store_errors) >= 1);
        let commands = count(&a.stats().store_commands);
        for _ in 0..20 {
            assert_eq!(
                a.lookup(SVC, &new_token(), TIMEOUT).await,
                Lookup::StoreDown
            );
        }
        assert_eq!(a.lookup(SVC, &token, TIMEOUT).await, found("b1"));
        assert_eq!(count(&a.stats().store_commands), commands);

        drop(resume);
        assert!(a.wait_up(HANG).await, "the store never came back");
        tokio::time::sleep(sticky_lb::http::token::CACHE_TRUST).await;
        let hits = count(&a.stats().store_hits);
        assert_eq!(a.lookup(SVC, &token, TIMEOUT).await, found("b1"));
        assert_eq!(count(&a.stats().store_hits), hits + 1);
    });
}
