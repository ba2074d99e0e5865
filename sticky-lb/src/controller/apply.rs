//! Applies a validated plan to the data path, in the plan's order. If a write fails, the
//! previous model is written back whole (tables rewritten, new ids cleared, removed services
//! restored), so the previous state keeps serving and the caller can say why.

use super::{
    model::ServiceSlot,
    plan::{Change, Plan},
};
use anyhow::Result;
use sticky_lb_common::{Backend, BackendId, FEATURE_NAT, Forwarding, Service, ServiceKey};

/// The writes a plan makes; implemented by [`crate::dataplane::Dataplane`] and, in tests, by a
/// model that can be told to fail.
pub(super) trait DataPath {
    fn reset_counters(&mut self, id: BackendId) -> Result<()>;
    fn write_backend(&mut self, id: BackendId, entry: &Backend) -> Result<()>;
    /// Writes `slots` and `service` into their inactive copies and swaps them in; fills in the
    /// ring fields of `service`.
    fn publish(
        &mut self,
        key: &ServiceKey,
        service: &mut Service,
        slots: &[BackendId],
    ) -> Result<()>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()>;
    /// After a failed write: forget any cache of what the tables hold.
    fn forget_written(&mut self);
    /// What the data path looks for beyond services (`FEATURE_*` bits).
    fn set_features(&mut self, features: u32) -> Result<()>;
}

/// The `FEATURE_*` bits services need: NAT replies are looked for while a NAT service exists.
fn features(services: &[ServiceSlot]) -> u32 {
    match services
        .iter()
        .any(|s| s.params.forwarding == Forwarding::Nat as u8)
    {
        true => FEATURE_NAT,
        false => 0,
    }
}

impl DataPath for crate::dataplane::Dataplane {
    fn reset_counters(&mut self, id: BackendId) -> Result<()> {
        self.reset_backend_counters(id)
    }

    fn write_backend(&mut self, id: BackendId, entry: &Backend) -> Result<()> {
        Ok(self.backends.set(id, entry, 0)?)
    }

    fn publish(
        &mut self,
        key: &ServiceKey,
        service: &mut Service,
        slots: &[BackendId],
    ) -> Result<()> {
        self.publish_service(key, service, slots)
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        crate::dataplane::Dataplane::remove_service(self, key)
    }

    fn forget_written(&mut self) {
        crate::dataplane::Dataplane::forget_written(self)
    }

    fn set_features(&mut self, features: u32) -> Result<()> {
        crate::dataplane::Dataplane::set_features(self, features)
    }
}

/// A failed apply: which write failed, and whether the previous state was restored.
#[derive(Debug)]
pub(super) struct ApplyError {
    pub step: String,
    pub error: anyhow::Error,
    /// `None` if restoring worked; otherwise why it did not (the data path may then be between
    /// the two states).
    pub restore: Option<anyhow::Error>,
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {:#}", self.step, self.error)?;
        match &self.restore {
            None => write!(f, "; the previous state was restored and keeps serving"),
            Some(e) => write!(
                f,
                "; restoring the previous state failed too ({e:#}): the data path may hold part of the change"
            ),
        }
    }
}

/// Writes `plan`'s changes. On success `plan.next` holds the published ring fields.
pub(super) fn apply(
    dp: &mut impl DataPath,
    previous: &[ServiceSlot],
    plan: &mut Plan,
) -> Result<(), ApplyError> {
    // Features a new service needs are on before it is published, and those only a removed one
    // needed go once it is gone.
    let wanted = features(&plan.next);
    let result = dp
        .set_features(wanted | features(previous))
        .map_err(|e| ("turning data-path features on".to_string(), e))
        .and_then(|()| write(dp, &mut plan.next, &plan.changes))
        .and_then(|()| {
            dp.set_features(wanted)
                .map_err(|e| ("turning data-path features off".to_string(), e))
        });
    let Err((step, error)) = result else {
        return Ok(());
    };
    let restore = restore(dp, previous, plan).err();
    Err(ApplyError {
        step,
        error,
        restore,
    })
}

fn write(
    dp: &mut impl DataPath,
    next: &mut [ServiceSlot],
    changes: &[Change],
) -> Result<(), (String, anyhow::Error)> {
    for change in changes {
        let result = match change {
            Change::ResetCounters(id) => dp.reset_counters(*id),
            Change::WriteBackend(id, entry) => dp.write_backend(*id, entry),
            Change::Publish(i) => {
                let s = &mut next[*i];
                let slots = s.table();
                let mut params = s.params;
                let result = dp.publish(&s.key, &mut params, &slots);
                if result.is_ok() {
                    s.params = params;
                }
                result
            }
            Change::RemoveService(key) => dp.remove_service(key),
            Change::ClearBackend(id) => dp.write_backend(*id, &Backend::UNUSED),
        };
        if let Err(e) = result {
            return Err((describe(change, next), e));
        }
    }
    Ok(())
}

fn describe(change: &Change, next: &[ServiceSlot]) -> String {
    match change {
        Change::ResetCounters(id) => format!("resetting the counters of backend id {id}"),
        Change::WriteBackend(id, _) => format!("writing backend id {id}"),
        Change::Publish(i) => format!("publishing service {}", next[*i].name()),
        Change::RemoveService(_) => "removing a service from the index".to_string(),
        Change::ClearBackend(id) => format!("clearing backend id {id}"),
    }
}

/// Writes `previous` back whole: its backends, every table (from scratch), its services in the
/// index; then clears ids only the plan introduced and removes services only the plan added.
fn restore(dp: &mut impl DataPath, previous: &[ServiceSlot], plan: &Plan) -> Result<()> {
    dp.forget_written();
    let mut first_error = None;
    let mut note = |r: Result<()>| {
        if let Err(e) = r {
            first_error.get_or_insert(e);
        }
    };
    for s in previous {
        for b in &s.backends {
            note(dp.write_backend(b.id, &b.entry(s.id())));
        }
    }
    for s in previous {
        let mut params = s.params;
        note(dp.publish(&s.key, &mut params, &s.table()));
    }
    for s in &plan.next {
        if !previous.iter().any(|p| p.key == s.key) {
            note(dp.remove_service(&s.key));
        }
        for b in &s.backends {
            if !previous
                .iter()
                .any(|p| p.backends.iter().any(|pb| pb.id == b.id))
            {
                note(dp.write_backend(b.id, &Backend::UNUSED));
            }
        }
    }
    note(dp.set_features(features(previous)));
    match first_error {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        desired::{Desired, Observed},
        ids::IdBook,
        plan::plan,
    };
    use super::*;
    use crate::config::Config;
    use std::collections::BTreeMap;

    /// The data path as maps: backends, published tables per key; fails the `fail_at`-th write.
    #[derive(Default)]
    struct Model {
        backends: BTreeMap<BackendId, Backend>,
        /// Tables by (VIP, port).
        tables: BTreeMap<([u32; 4], u16, u8), Vec<BackendId>>,
        writes: usize,
        fail_at: Option<usize>,
    }

    impl Model {
        fn step(&mut self) -> Result<()> {
            self.writes += 1;
            if Some(self.writes) == self.fail_at {
                anyhow::bail!("injected failure");
            }
            Ok(())
        }
    }

    impl DataPath for Model {
        fn reset_counters(&mut self, _: BackendId) -> Result<()> {
            self.step()
        }
        fn write_backend(&mut self, id: BackendId, entry: &Backend) -> Result<()> {
            self.step()?;
            self.backends.insert(id, *entry);
            Ok(())
        }
        fn publish(
            &mut self,
            key: &ServiceKey,
            _: &mut Service,
            slots: &[BackendId],
        ) -> Result<()> {
            self.step()?;
            self.tables
                .insert((key.vip, key.port, key.family), slots.to_vec());
            Ok(())
        }
        fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
            self.step()?;
            self.tables.remove(&(key.vip, key.port, key.family));
            Ok(())
        }
        fn forget_written(&mut self) {}

        fn set_features(&mut self, _features: u32) -> Result<()> {
            Ok(())
        }
    }

    fn desired(services: &[(&str, &[&str])]) -> Desired {
        let mut text = "interface: lo\nbackend_removal: immediate\nservices:\n".to_string();
        for (i, (name, backends)) in services.iter().enumerate() {
            text += &format!(
                "  - name: {name}\n    vip: 198.18.0.{}\n    port: 80\n    maglev_table_size: 13\n    health_check: {{type: none}}\n    backends:\n",
                100 + i
            );
            for (j, b) in backends.iter().enumerate() {
                text += &format!(
                    "      - {{name: {b}, address: 198.18.{i}.{}, mac: '02:00:00:00:00:0{}'}}\n",
                    j + 1,
                    j + 1
                );
            }
        }
        Desired::new(Config::parse(&text, false).unwrap(), Default::default())
    }

    /// Issue: a failed step must leave the previous state serving. Every write of a plan that
    /// adds a service, adds a backend and removes another is failed in turn; after each, the
    /// model holds exactly what the previous plan wrote.
    #[test]
    fn a_failure_at_any_write_restores_the_previous_state() {
        let before = desired(&[("web", &["a", "b"])]);
        let after = desired(&[("web", &["a", "c"]), ("api", &["x"])]);
        let mut healthy = Model::default();
        let mut p0 = plan(
            &[],
            &IdBook::default(),
            &before,
            &Observed::default(),
            super::super::plan::tests::cx(1),
        )
        .unwrap();
        apply(&mut healthy, &[], &mut p0).unwrap();
        let writes = {
            let mut probe = Model {
                backends: healthy.backends.clone(),
                tables: healthy.tables.clone(),
                ..Default::default()
            };
            let mut p1 = plan(
                &p0.next,
                &p0.ids,
                &after,
                &Observed::default(),
                super::super::plan::tests::cx(2),
            )
            .unwrap();
            apply(&mut probe, &p0.next, &mut p1).unwrap();
            assert_eq!(probe.tables.len(), 2);
            probe.writes
        };
        assert!(writes >= 6, "{writes}");
        for fail_at in 1..=writes {
            let mut dp = Model {
                backends: healthy.backends.clone(),
                tables: healthy.tables.clone(),
                writes: 0,
                fail_at: Some(fail_at),
            };
            let mut p1 = plan(
                &p0.next,
                &p0.ids,
                &after,
                &Observed::default(),
                super::super::plan::tests::cx(2),
            )
            .unwrap();
            let e = apply(&mut dp, &p0.next, &mut p1).unwrap_err();
            assert!(e.restore.is_none(), "write {fail_at}: {e}");
            assert!(e.to_string().contains("injected failure"));
            let live: BTreeMap<_, _> = dp
                .backends
                .iter()
                .filter(|(_, b)| **b != Backend::UNUSED)
                .map(|(k, v)| (*k, *v))
                .collect();
            assert_eq!(
                live, healthy.backends,
                "backends after a failure at write {fail_at}"
            );
            assert_eq!(
                dp.tables, healthy.tables,
                "tables after a failure at write {fail_at}"
            );
        }
    }
}
