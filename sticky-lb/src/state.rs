//! What the controller knows that the maps do not: names, weights, the attach mode and which id
//! belongs to which service and backend. Written to `/run/sticky-lb/[<netns>/]<interface>.json`
//! on every change; read by `table show` and `status`, and by the next controller so a restart
//! keeps every id (stick entries hold backend ids: new ids would move clients).

use crate::config::format_mac;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};
use sticky_lb_common::{BackendId, ServiceId};

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
    /// Ids of backends and services taken out, with the time they were (CLOCK_MONOTONIC_COARSE,
    /// ns): stick entries and connections may still name them, so no new backend or service
    /// gets one until a sweep has seen none naming it. Kept across restarts for that reason.
    #[serde(default)]
    pub retired_backends: BTreeMap<BackendId, u64>,
    #[serde(default)]
    pub retired_services: BTreeMap<ServiceId, u64>,
    /// What operators changed at run time, by service and backend name (kept across reloads and
    /// restarts with `runtime_changes: keep`).
    #[serde(default)]
    pub runtime_changes: BTreeMap<String, BTreeMap<String, BackendChange>>,
}

/// What an operator changed about one backend at run time (the control socket).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendChange {
    /// `enabled`, `drain` or `disabled`, when set at run time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    /// A weight set at run time, with the config's weight when it was set: a reload that brings
    /// a new config weight drops it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<WeightChange>,
    /// The backend was added with `backend add` (it is not in the config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added: Option<AddedBackend>,
    /// The backend was taken out with `backend remove` (it may still be in the config).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightChange {
    pub weight: u32,
    pub config_weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedBackend {
    pub address: IpAddr,
    pub weight: u32,
    /// `aa:bb:cc:dd:ee:ff` when given; resolved from the neighbour table otherwise.
    #[serde(default)]
    pub mac: Option<String>,
    /// NAT: the port it listens on, when not the service's.
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub id: ServiceId,
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    /// `tcp` (the XDP data path) or `http` (the proxy); older state files have no field: tcp.
    #[serde(default = "tcp")]
    pub mode: String,
    pub policy: String,
    pub forwarding: String,
    /// What the mode sends from: a tunnel's source prefix, source NAT's address and ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarding_detail: Option<String>,
    pub stick_timeout_ms: u64,
    pub client_mask: u8,
    pub maglev_table_size: u32,
    pub backends: Vec<BackendRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendRecord {
    pub id: BackendId,
    pub name: String,
    pub address: IpAddr,
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
    /// The health checks' last verdict (a restart starts from it instead of assuming up).
    #[serde(default)]
    pub healthy: Option<bool>,
    /// The port the data path sends to (a NAT backend's own; else the service's).
    #[serde(default)]
    pub port: Option<u16>,
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
            create_run_dir(dir)?;
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

/// Creates the run directory (and a namespace's folder in it) readable by root only, like the
/// systemd unit's `RuntimeDirectoryMode=0700`: it holds the control socket and the state.
pub fn create_run_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

pub fn mac_string(mac: Option<[u8; 6]>) -> Option<String> {
    mac.as_ref().map(format_mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state file written before IPv6: addresses are plain strings, read as `IpAddr` now.
    const IPV4_STATE: &str = r#"{
  "interface": "eth0", "netns": null, "xdp_mode": "native", "pid": 1, "config": "/etc/sticky-lb.yaml",
  "services": [{
    "id": 0, "name": "web", "vip": "198.18.0.100", "port": 80, "policy": "ip-hash",
    "forwarding": "dsr", "stick_timeout_ms": 1800000, "client_mask": 24, "maglev_table_size": 65537,
    "backends": [{"id": 0, "name": "a", "address": "198.18.0.11", "mac": null, "weight": 1, "state": "up"}]
  }],
  "runtime_changes": {"web": {"b": {"added": {"address": "198.18.0.12", "weight": 1}}}}
}"#;

    #[test]
    fn an_ipv4_state_file_still_loads_and_ipv6_round_trips() {
        let mut state: RuntimeState = serde_json::from_str(IPV4_STATE).unwrap();
        assert_eq!(state.services[0].vip, IpAddr::from([198, 18, 0, 100]));
        assert_eq!(
            state.services[0].backends[0].address.to_string(),
            "198.18.0.11"
        );
        assert_eq!(
            state.runtime_changes["web"]["b"]
                .added
                .as_ref()
                .unwrap()
                .address,
            IpAddr::from([198, 18, 0, 12])
        );
        state.services[0].vip = "2001:db8::100".parse().unwrap();
        let text = serde_json::to_string(&state).unwrap();
        assert!(text.contains(r#""vip":"2001:db8::100""#), "{text}");
        let again: RuntimeState = serde_json::from_str(&text).unwrap();
        assert_eq!(again.services[0].vip, state.services[0].vip);
    }
}

fn tcp() -> String {
    "tcp".into()
}
