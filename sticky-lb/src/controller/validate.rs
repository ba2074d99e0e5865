//! Checks a plan against what the running data path can hold before anything is written: table
//! sizes, service ids, least-connections candidates and service index placement. Pure, like the
//! plan: the service index is a copy read beforehand.

use super::plan::{Change, Plan};
use crate::{config::Policy, service_index::ServiceIndex};
use sticky_lb_common::{MAX_LEAST_CONN_BACKENDS, MAX_SERVICES, SERVICE_SOURCE_NAT};

/// What the loaded data path has room for (fixed when its maps were created).
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// Slots per Maglev table copy.
    pub maglev_stride: u32,
    /// Services the Maglev array has room for.
    pub maglev_services: u32,
}

/// `Ok` if every write of `plan` fits; otherwise the first reason it does not, naming the
/// service.
pub(super) fn validate(plan: &Plan, limits: Limits, index: &ServiceIndex) -> Result<(), String> {
    for s in &plan.next {
        if s.config.maglev_table_size > limits.maglev_stride {
            return Err(format!(
                "service {}: maglev_table_size {} exceeds the running data path's {} (`sticky-lb detach`, then run, makes new maps)",
                s.name(),
                s.config.maglev_table_size,
                limits.maglev_stride
            ));
        }
        if s.id() >= limits.maglev_services.min(MAX_SERVICES) {
            return Err(format!(
                "service {}: id {} does not fit the running data path, which has room for {} services",
                s.name(),
                s.id(),
                limits.maglev_services
            ));
        }
        if s.params.flags & SERVICE_SOURCE_NAT != 0 && s.params.nat_source == [0; 4] {
            return Err(format!(
                "service {}: source_nat: true, but the interface has no {} address to translate to (give source_nat.address)",
                s.name(),
                s.family()
            ));
        }
        // The data path scans at most this many candidates per least-connections pick.
        let candidates = s.backends.iter().filter(|b| !b.retiring).count();
        if s.config.policy == Policy::LeastConn && candidates > MAX_LEAST_CONN_BACKENDS as usize {
            return Err(format!(
                "service {}: least-conn services take at most {MAX_LEAST_CONN_BACKENDS} backends ({candidates} wanted)",
                s.name()
            ));
        }
    }
    // Placement, in the order apply writes: new services first, then removals.
    let mut index = index.clone();
    for change in &plan.changes {
        if let Change::Publish(i) = change {
            let s = &plan.next[*i];
            index
                .insert(&s.key)
                .map_err(|full| format!("service {}: {full}", s.name()))?;
        }
    }
    for change in &plan.changes {
        if let Change::RemoveService(key) = change {
            index.remove(key);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{
        desired::{Desired, Observed},
        ids::IdBook,
        plan::plan,
    };
    use super::*;
    use crate::{config::Config, service_index::probe_sequence};
    use std::net::Ipv4Addr;
    use sticky_lb_common::{SERVICE_INDEX_PROBES, ServiceKey};

    const LIMITS: Limits = Limits {
        maglev_stride: 65537,
        maglev_services: 16,
    };

    fn key(vip: Ipv4Addr) -> ServiceKey {
        ServiceKey {
            vip: sticky_lb_common::addr::words(&vip.into()),
            port: 80u16.to_be(),
            protocol: 6,
            family: 0,
        }
    }

    fn desired(vips: &[Ipv4Addr], extra: &str) -> Desired {
        let mut text = "interface: lo\nservices:\n".to_string();
        for (i, vip) in vips.iter().enumerate() {
            text += &format!(
                "  - name: s{i}\n    vip: {vip}\n    port: 80\n{extra}    health_check: {{type: none}}\n    backends:\n      - {{name: a, address: 198.19.{i}.1}}\n"
            );
        }
        Desired::new(Config::parse(&text, false).unwrap(), Default::default())
    }

    /// Issue: a service whose index chain is full must refuse the whole change.
    #[test]
    fn a_service_with_no_free_index_slot_refuses_the_plan() {
        let home = |v: Ipv4Addr| probe_sequence(&key(v)).next().unwrap();
        let first = Ipv4Addr::new(198, 18, 0, 1);
        let vips: Vec<Ipv4Addr> = (1u32..65536)
            .map(|n| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + n))
            .filter(|v| home(*v) == home(first))
            .take(SERVICE_INDEX_PROBES as usize + 1)
            .collect();
        let fits = desired(&vips[..SERVICE_INDEX_PROBES as usize], "");
        let p = plan(
            &[],
            &IdBook::default(),
            &fits,
            &Observed::default(),
            super::super::plan::tests::cx(1),
        )
        .unwrap();
        validate(&p, LIMITS, &ServiceIndex::empty()).unwrap();
        let over = desired(&vips, "");
        let p = plan(
            &[],
            &IdBook::default(),
            &over,
            &Observed::default(),
            super::super::plan::tests::cx(1),
        )
        .unwrap();
        let e = validate(&p, LIMITS, &ServiceIndex::empty()).unwrap_err();
        assert!(
            e.starts_with("service s4: the service index has no free slot"),
            "{e}"
        );
    }

    #[test]
    fn least_conn_services_refuse_more_candidates_than_the_data_path_scans() {
        let mut text = "interface: lo\nservices:\n  - name: web\n    vip: 198.18.0.100\n    port: 80\n    policy: least-conn\n    backends:\n".to_string();
        for i in 0..MAX_LEAST_CONN_BACKENDS {
            text += &format!("      - {{name: b{i}, address: 198.18.1.{}}}\n", i + 1);
        }
        let mut d = Desired::new(Config::parse(&text, false).unwrap(), Default::default());
        let p = plan(
            &[],
            &IdBook::default(),
            &d,
            &Observed::default(),
            super::super::plan::tests::cx(1),
        )
        .unwrap();
        validate(&p, LIMITS, &ServiceIndex::empty()).unwrap();
        // One more added at run time.
        d.change("web", "extra").added = Some(crate::state::AddedBackend {
            address: Ipv4Addr::new(198, 18, 2, 1).into(),
            weight: 1,
            mac: None,
            port: None,
        });
        let p = plan(
            &[],
            &IdBook::default(),
            &d,
            &Observed::default(),
            super::super::plan::tests::cx(1),
        )
        .unwrap();
        let e = validate(&p, LIMITS, &ServiceIndex::empty()).unwrap_err();
        assert!(e.contains("at most 32 backends (33 wanted)"), "{e}");
    }

    #[test]
    fn a_table_larger_than_the_running_arrays_is_refused() {
        let d = desired(
            &[Ipv4Addr::new(198, 18, 0, 100)],
            "    maglev_table_size: 131071\n",
        );
        let p = plan(
            &[],
            &IdBook::default(),
            &d,
            &Observed::default(),
            super::super::plan::tests::cx(1),
        )
        .unwrap();
        let e = validate(&p, LIMITS, &ServiceIndex::empty()).unwrap_err();
        assert!(e.contains("maglev_table_size 131071 exceeds"), "{e}");
    }
}
