//! What the proxy places requests by: one [`Route`] per `mode: http` service, built from the
//! controller's model after every applied plan and swapped in whole, so a request sees one
//! consistent set of backends from start to end (one in flight keeps the route it started with).

use crate::config::{HttpConfig, Policy, ServiceConfig};
use crate::maglev;
use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};
use sticky_lb_common::BackendState;

/// A backend as the controller's model holds it, in the terms the proxy needs.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendView {
    pub name: String,
    /// Where the proxy connects: the backend's address and its port (its own, or the
    /// service's).
    pub address: SocketAddr,
    pub weight: u32,
    /// From the operator, the health checks and the pool: `Up` takes new clients, `Drain`
    /// keeps its own, `Down` and `Disabled` neither.
    pub state: BackendState,
    /// Interval x rise of its health check: how long a failed backend takes at least to come
    /// back, the `Retry-After` of a `strict` 503 (whole seconds, at least 1).
    pub retry_after_secs: u64,
}

/// A `mode: http` service as the controller's model holds it.
#[derive(Clone, Debug)]
pub struct ServiceView {
    pub config: ServiceConfig,
    pub backends: Vec<BackendView>,
}

impl ServiceView {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn listen(&self) -> SocketAddr {
        SocketAddr::new(self.config.vip, self.config.port)
    }

    pub fn http(&self) -> HttpConfig {
        self.config.http.clone().unwrap_or_default()
    }
}

/// Requests to one backend, kept by the proxy across routes (a backend keeps its counts while
/// routes are rebuilt around it).
#[derive(Debug, Default)]
pub struct BackendLoad {
    /// Requests sent and not yet answered in full (least-conn's measure).
    pub open: AtomicI64,
    /// Requests sent, in all.
    pub requests: AtomicU64,
}

/// One backend in a route.
#[derive(Debug)]
pub struct Backend {
    pub view: BackendView,
    pub load: Arc<BackendLoad>,
}

impl Backend {
    pub fn name(&self) -> &str {
        &self.view.name
    }

    /// Whether requests that name it (by cookie or token) still reach it: up or draining.
    pub fn keeps_sessions(&self) -> bool {
        self.view.state.keeps_stuck_clients()
    }
}

/// Everything a request of one service is placed by.
#[derive(Debug)]
pub struct Route {
    pub config: ServiceConfig,
    pub http: HttpConfig,
    pub backends: Vec<Backend>,
    /// `ip-hash`: Maglev table over the backends that are up (ids are indexes into
    /// `backends`), so every node and every restart places a client address alike.
    table: Option<maglev::Table>,
    /// `least-conn`: where the next scan starts, so backends with equal load take turns
    /// (HAProxy's `leastconn` round-robins among equals) instead of the first listed taking
    /// every new client of an idle service.
    rotation: AtomicUsize,
}

impl Route {
    /// The route for `view`, taking each backend's load counters from `load` (by name).
    pub fn build(view: &ServiceView, load: impl Fn(&str) -> Arc<BackendLoad>) -> Route {
        let backends: Vec<Backend> = view
            .backends
            .iter()
            .map(|b| Backend {
                view: b.clone(),
                load: load(&b.name),
            })
            .collect();
        let table = (view.config.policy == Policy::IpHash).then(|| {
            let members: Vec<maglev::Member<'_>> = backends
                .iter()
                .enumerate()
                .filter(|(_, b)| b.view.state == BackendState::Up && b.view.weight > 0)
                .map(|(i, b)| maglev::Member {
                    id: i as u32,
                    name: &b.view.name,
                    weight: b.view.weight,
                })
                .collect();
            maglev::Table::build(view.config.maglev_table_size, &members)
        });
        Route {
            config: view.config.clone(),
            http: view.http(),
            backends,
            table,
            rotation: AtomicUsize::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The backend named `name`, if the service has it.
    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.view.name == name)
    }

    /// A backend for a request without a session, by the service's policy, among the backends
    /// that take new clients, other than `avoid` (the one that just failed). `None`: no backend
    /// is up.
    ///
    /// `ip-hash`: the Maglev table indexed by a hash of the client address masked to
    /// `stick.client_mask` (the same client, the same backend, on every node); when that
    /// backend is `avoid`, the next up backend in the table. `least-conn`: fewest open requests
    /// per unit of weight, equal loads taking turns.
    pub fn pick(&self, client: IpAddr, avoid: Option<&str>) -> Option<&Backend> {
        let takes = |b: &Backend| {
            b.view.state == BackendState::Up && b.view.weight > 0 && Some(b.name()) != avoid
        };
        match &self.table {
            Some(table) if !table.is_empty() => {
                let hash = client_hash(client, self.config.client_mask());
                // A table without members holds only its empty marker (no index of ours).
                let member = |slot: u32| self.backends.get(slot as usize);
                if let Some(b) = member(table.lookup(hash)).filter(|b| takes(b)) {
                    return Some(b);
                }
                // The one to avoid: the next distinct backend along the table.
                let slots = table.slots();
                let start = hash as usize % slots.len();
                (1..slots.len())
                    .filter_map(|k| member(slots[(start + k) % slots.len()]))
                    .find(|b| takes(b))
            }
            Some(_) => None,
            None => {
                let candidates: Vec<&Backend> = self.backends.iter().filter(|b| takes(b)).collect();
                if candidates.is_empty() {
                    return None;
                }
                let n = candidates.len();
                let start = self.rotation.fetch_add(1, Ordering::Relaxed) % n;
                // open / weight, compared without division; the first minimum from `start`.
                let load = |x: &Backend| x.load.open.load(Ordering::Relaxed).max(0) as u128;
                (0..n)
                    .map(|k| candidates[(start + k) % n])
                    .reduce(|best, b| {
                        if load(b) * (best.view.weight as u128)
                            < load(best) * (b.view.weight as u128)
                        {
                            b
                        } else {
                            best
                        }
                    })
            }
        }
    }

    /// A backend for a token when the store cannot be asked: [`super::token::fallback`]
    /// (rendezvous hashing over backend names) among the backends that take new clients, so
    /// every node picks the same one without asking anyone.
    pub fn pick_by_token(&self, token: &str) -> Option<&Backend> {
        let up: Vec<&Backend> = self
            .backends
            .iter()
            .filter(|b| b.view.state == BackendState::Up && b.view.weight > 0)
            .collect();
        let names: Vec<&str> = up.iter().map(|b| b.name()).collect();
        super::token::fallback(token, &names).map(|i| up[i])
    }

    /// `Retry-After` for a request refused because its backend is down (seconds).
    pub fn retry_after(&self, backend: Option<&Backend>) -> u64 {
        backend.map_or(1, |b| b.view.retry_after_secs.max(1))
    }

    pub fn response_timeout(&self) -> Duration {
        self.http.response_timeout
    }
}

/// The client address masked to `mask` bits, hashed (FNV-1a 64 and murmur3's finaliser, as
/// Maglev's names) and folded to 32 bits for the Maglev table.
fn client_hash(client: IpAddr, mask: u8) -> u32 {
    let masked = match client {
        IpAddr::V4(a) => IpAddr::from(std::net::Ipv4Addr::from(
            u32::from(a) & u32::MAX.checked_shl(32 - mask as u32).unwrap_or(0),
        )),
        IpAddr::V6(a) => IpAddr::from(std::net::Ipv6Addr::from(
            u128::from(a) & u128::MAX.checked_shl(128 - mask as u32).unwrap_or(0),
        )),
    };
    let h = maglev::mix64(maglev::name_hash(&masked.to_string(), CLIENT_SEED));
    (h ^ (h >> 32)) as u32
}

/// Seed of the client-address hash.
const CLIENT_SEED: u64 = 0x636c_6965_6e74_0001;

#[cfg(test)]
mod tests {
    use super::*;

    fn view(policy: &str, states: &[BackendState]) -> ServiceView {
        let yaml = format!(
            "{{name: web, mode: http, vip: 198.18.0.100, port: 80, policy: {policy}, maglev_table_size: 251, backends: []}}"
        );
        let config: ServiceConfig = serde_yaml::from_str(&yaml).unwrap();
        ServiceView {
            config,
            backends: states
                .iter()
                .enumerate()
                .map(|(i, state)| BackendView {
                    name: format!("web-{}", i + 1),
                    address: SocketAddr::from(([198, 18, 0, 11 + i as u8], 8080)),
                    weight: 1,
                    state: *state,
                    retry_after_secs: 4,
                })
                .collect(),
        }
    }

    fn fresh(_: &str) -> Arc<BackendLoad> {
        Arc::default()
    }

    #[test]
    fn ip_hash_keeps_a_client_and_skips_what_is_not_up() {
        use BackendState::*;
        let route = Route::build(&view("ip-hash", &[Up, Up, Up]), fresh);
        let client: IpAddr = "198.18.1.7".parse().unwrap();
        let first = route.pick(client, None).unwrap().name().to_string();
        for _ in 0..10 {
            assert_eq!(route.pick(client, None).unwrap().name(), first);
        }
        let other = route.pick(client, Some(&first)).unwrap();
        assert_ne!(other.name(), first);
        // Clients spread over all three.
        let mut seen = std::collections::BTreeSet::new();
        for h in 1..200u8 {
            let c: IpAddr = format!("198.18.1.{h}").parse().unwrap();
            seen.insert(route.pick(c, None).unwrap().name().to_string());
        }
        assert_eq!(seen.len(), 3);
        let drained = Route::build(&view("ip-hash", &[Drain, Down, Up]), fresh);
        for h in 1..50u8 {
            let c: IpAddr = format!("198.18.1.{h}").parse().unwrap();
            assert_eq!(drained.pick(c, None).unwrap().name(), "web-3");
        }
        let none = Route::build(&view("ip-hash", &[Drain, Disabled]), fresh);
        assert!(none.pick(client, None).is_none());
    }

    #[test]
    fn least_conn_takes_the_fewest_open_requests() {
        use BackendState::*;
        let route = Route::build(&view("least-conn", &[Up, Up, Drain]), fresh);
        let client: IpAddr = "198.18.1.7".parse().unwrap();
        // Idle: the two up backends take turns (the draining one never).
        let turns: Vec<String> = (0..4)
            .map(|_| route.pick(client, None).unwrap().name().to_string())
            .collect();
        assert_eq!(
            turns.iter().filter(|n| *n == "web-1").count(),
            2,
            "{turns:?}"
        );
        assert_eq!(
            turns.iter().filter(|n| *n == "web-2").count(),
            2,
            "{turns:?}"
        );
        route.backends[0].load.open.store(3, Ordering::Relaxed);
        route.backends[1].load.open.store(1, Ordering::Relaxed);
        for _ in 0..3 {
            assert_eq!(route.pick(client, None).unwrap().name(), "web-2");
        }
        assert_eq!(route.pick(client, Some("web-2")).unwrap().name(), "web-1");
    }

    #[test]
    fn token_fallback_is_stable_and_moves_only_the_failed_backends_tokens() {
        use BackendState::*;
        let all = Route::build(&view("least-conn", &[Up, Up, Up]), fresh);
        let less = Route::build(&view("least-conn", &[Up, Down, Up]), fresh);
        let mut moved = 0;
        for t in 0..300 {
            let token = format!("token-{t}");
            let before = all.pick_by_token(&token).unwrap().name().to_string();
            let after = less.pick_by_token(&token).unwrap().name().to_string();
            if before != "web-2" {
                assert_eq!(before, after, "{token}");
            } else {
                moved += 1;
            }
        }
        assert!((60..140).contains(&moved), "{moved} of 300 were on web-2");
    }
}
