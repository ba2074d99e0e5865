//! What the controller knows that the maps do not: names, weights, the attach mode and which id
//! belongs to which service and backend. Written to `/run/sticky-lb/[<netns>/]<interface>.json`
//! on every change; read by `table show` and `status`, and by the next controller so a restart
//! keeps every id (stick entries hold backend ids: new ids would move clients).

use crate::config::{Config, format_mac};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};
use sticky_lb_common::{BackendId, MAX_BACKENDS, ServiceId};

const RUN_DIR: &str = "/run/sticky-lb";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuntimeState {
    pub interface: String,
    pub netns: Option<String>,
    /// `native` or `generic`.
    pub xdp_mode: String,
    /// The controller's pid; `status` says whether it still runs.
    pub pid: u32,
    pub config: String,
    /// Slots per Maglev table copy and services the Maglev array holds: fixed when the maps
    /// were created, reused by every later controller of the same pins.
    #[serde(default)]
    pub maglev_stride: u32,
    #[serde(default)]
    pub maglev_services: u32,
    pub services: Vec<ServiceRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub id: ServiceId,
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub policy: String,
    pub forwarding: String,
    pub stick_timeout_ms: u64,
    pub client_mask: u8,
    pub maglev_table_size: u32,
    pub backends: Vec<BackendRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendRecord {
    pub id: BackendId,
    pub name: String,
    pub address: Ipv4Addr,
    pub mac: Option<String>,
    pub weight: u32,
    /// `up`, `drain`, `down`, `disabled`.
    pub state: String,
    /// What the operator set at run time: `enabled`, `drain` or `disabled`.
    #[serde(default = "enabled")]
    pub admin: String,
    /// Added with `backend add`, not from the config.
    #[serde(default)]
    pub from_api: bool,
    /// Left the config and drains until its clients' entries expire and its connections close.
    #[serde(default)]
    pub retiring: bool,
}

fn enabled() -> String {
    "enabled".into()
}

/// Path of the state file for an interface (in a namespace).
pub fn path(netns: Option<&str>, interface: &str) -> PathBuf {
    let mut path = PathBuf::from(RUN_DIR);
    if let Some(netns) = netns {
        path.push(netns);
    }
    path.join(format!("{interface}.json"))
}

/// Interfaces with a state file under the run directory (for commands given no `--interface`).
pub fn known_interfaces(netns: Option<&str>) -> Vec<String> {
    let mut dir = PathBuf::from(RUN_DIR);
    if let Some(netns) = netns {
        dir.push(netns);
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".json")
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

impl RuntimeState {
    pub fn read(path: &Path) -> Result<RuntimeState> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Writes atomically (temporary file, then rename) so readers never see half a file.
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }

    pub fn service(&self, id: ServiceId) -> Option<&ServiceRecord> {
        self.services.iter().find(|s| s.id == id)
    }

    pub fn backend(&self, id: BackendId) -> Option<(&ServiceRecord, &BackendRecord)> {
        self.services
            .iter()
            .find_map(|s| s.backends.iter().find(|b| b.id == id).map(|b| (s, b)))
    }
}

/// Ids for every service and backend of a config: kept from the previous run where the name
/// matches, fresh (never used by the previous run) otherwise.
pub fn assign_ids(
    config: &Config,
    previous: Option<&RuntimeState>,
) -> Vec<(ServiceId, Vec<BackendId>)> {
    let old_services: Vec<&ServiceRecord> = previous
        .map(|p| p.services.iter().collect())
        .unwrap_or_default();
    let mut used_services: BTreeSet<ServiceId> = BTreeSet::new();
    let mut used_backends: BTreeSet<BackendId> = old_services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.id))
        .collect();
    // First pass: keep the ids of names that survive.
    let kept: Vec<(Option<ServiceId>, Vec<Option<BackendId>>)> = config
        .services
        .iter()
        .map(|service| {
            let old = old_services.iter().find(|s| s.name == service.name);
            let sid = old.map(|s| s.id);
            if let Some(id) = sid {
                used_services.insert(id);
            }
            let bids = service
                .backends
                .iter()
                .map(|b| {
                    old.and_then(|s| s.backends.iter().find(|ob| ob.name == b.name))
                        .map(|ob| ob.id)
                })
                .collect();
            (sid, bids)
        })
        .collect();
    // Second pass: fresh ids for the rest, lowest free first; backends avoid ids the previous run
    // used (a stick entry may still name them) unless the id space runs out.
    let kept_backends: BTreeSet<BackendId> = kept
        .iter()
        .flat_map(|(_, b)| b.iter().flatten().copied())
        .collect();
    let mut next_service = 0;
    let mut next_backend = 0;
    kept.into_iter()
        .map(|(sid, bids)| {
            let sid = sid.unwrap_or_else(|| {
                while used_services.contains(&next_service) {
                    next_service += 1;
                }
                used_services.insert(next_service);
                next_service
            });
            let bids = bids
                .into_iter()
                .map(|bid| {
                    bid.unwrap_or_else(|| {
                        while next_backend < MAX_BACKENDS && used_backends.contains(&next_backend) {
                            next_backend += 1;
                        }
                        if next_backend >= MAX_BACKENDS {
                            // Out of never-used ids: recycle one no current backend holds.
                            used_backends = kept_backends.clone();
                            next_backend = 0;
                            while used_backends.contains(&next_backend) {
                                next_backend += 1;
                            }
                        }
                        used_backends.insert(next_backend);
                        next_backend
                    })
                })
                .collect();
            (sid, bids)
        })
        .collect()
}

pub fn mac_string(mac: Option<[u8; 6]>) -> Option<String> {
    mac.as_ref().map(format_mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(services: &[(&str, &[&str])]) -> Config {
        let mut text = String::from("interface: lo\nservices:\n");
        for (i, (name, backends)) in services.iter().enumerate() {
            text += &format!(
                "  - name: {name}\n    vip: 198.18.0.{}\n    port: 80\n    backends:\n",
                100 + i
            );
            for (j, b) in backends.iter().enumerate() {
                text += &format!(
                    "      - name: {b}\n        address: 198.18.{i}.{}\n",
                    10 + j
                );
            }
        }
        Config::parse(&text, false).unwrap()
    }

    fn state(config: &Config, ids: &[(ServiceId, Vec<BackendId>)]) -> RuntimeState {
        RuntimeState {
            interface: "lo".into(),
            netns: None,
            xdp_mode: "generic".into(),
            pid: 1,
            config: String::new(),
            maglev_stride: 65537,
            maglev_services: 16,
            services: config
                .services
                .iter()
                .zip(ids)
                .map(|(s, (sid, bids))| ServiceRecord {
                    id: *sid,
                    name: s.name.clone(),
                    vip: s.vip,
                    port: s.port,
                    policy: "ip-hash".into(),
                    forwarding: "dsr".into(),
                    stick_timeout_ms: 1000,
                    client_mask: 32,
                    maglev_table_size: 65537,
                    backends: s
                        .backends
                        .iter()
                        .zip(bids)
                        .map(|(b, id)| BackendRecord {
                            id: *id,
                            name: b.name.clone(),
                            address: b.address,
                            mac: None,
                            weight: 1,
                            state: "up".into(),
                            admin: "enabled".into(),
                            from_api: false,
                            retiring: false,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn restart_keeps_ids_and_new_backends_get_unused_ids() {
        let first = config(&[("web", &["a", "b", "c"]), ("api", &["x"])]);
        let ids = assign_ids(&first, None);
        assert_eq!(ids, vec![(0, vec![0, 1, 2]), (1, vec![3])]);
        let previous = state(&first, &ids);
        // b removed, d added, services listed in another order.
        let second = config(&[("api", &["x"]), ("web", &["a", "c", "d"])]);
        let ids = assign_ids(&second, Some(&previous));
        assert_eq!(ids, vec![(1, vec![3]), (0, vec![0, 2, 4])]);
    }
}
