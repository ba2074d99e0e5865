//! Reload (`sticky-lb reload`, SIGHUP): re-read the config, refuse what a running data path
//! cannot take, observe the backends it adds (MAC, first health check; bounded, off the main
//! loop), then reconcile to it. A new backend takes clients only once it is known to answer.

use super::{
    Controller,
    desired::Desired,
    first_look::{first_look, new_backends},
    requests::Pending,
    startup,
};
use crate::{config::Config, control::Reply};
use tokio::sync::oneshot;
use tracing::{info, warn};

impl Controller {
    /// Starts a reload: checks the config now, looks at the backends it adds on a task, and
    /// finishes in [`Controller::finish_reload`]. `reply` is `None` for SIGHUP.
    /// systemd hears RELOADING=1 now and READY=1 when the reload is over, applied or not.
    pub(super) fn begin_reload(&mut self, reply: Option<oneshot::Sender<Reply>>) {
        startup::notify_reloading();
        let desired = match self.reloaded() {
            Ok(desired) => desired,
            Err(e) => {
                warn!("reload refused, nothing changed: {e}");
                startup::notify_ready();
                if let Some(reply) = reply {
                    let _ = reply.send(Reply::error(format!(
                        "reload refused, nothing changed: {e}"
                    )));
                }
                return;
            }
        };
        // A tunnel service's packets must fit the interface's MTU once encapsulated; source
        // NAT may take the interface's address.
        self.observed.read_interface(&desired.config.interface);
        let new = new_backends(&self.services, &desired);
        self.reloads_started += 1;
        let generation = self.reloads_started;
        let neighbours = self.neighbours.clone();
        let pending = self.pending_tx.clone();
        tokio::spawn(async move {
            let looks = first_look(neighbours, new).await;
            let _ = pending
                .send(Pending::Reload {
                    desired: Box::new(desired),
                    looks,
                    generation,
                    reply,
                })
                .await;
        });
    }

    /// The config as a desired state, if a running data path can take it.
    fn reloaded(&self) -> Result<Desired, String> {
        let new =
            Config::load(&self.config_path, true).map_err(|e| format!("config error: {e}"))?;
        let old = self.config();
        // Changes that need new maps or a new attachment cannot be applied to a running one.
        if new.interface != old.interface {
            return Err(format!(
                "interface changed ({} -> {}): restart the controller",
                old.interface, new.interface
            ));
        }
        if new.stick_table_size != old.stick_table_size
            || new.flow_table_size != old.flow_table_size
        {
            return Err(
                "stick_table_size or flow_table_size changed: map sizes are fixed while running (`sticky-lb detach`, then run)"
                    .into(),
            );
        }
        if new.xdp_mode != old.xdp_mode {
            warn!(
                "xdp_mode changes apply only when the program is attached anew; keeping {}",
                self.mode
            );
        }
        Ok(Desired::new(new, self.desired.changes.clone()))
    }

    /// Applies a reload whose new backends were looked at.
    pub(super) fn finish_reload(
        &mut self,
        desired: Desired,
        generation: u64,
        reply: Option<oneshot::Sender<Reply>>,
    ) -> ReloadDone {
        let result = if generation < self.reloads_applied {
            Err("a later reload was applied first".to_string())
        } else {
            // The run-time changes as they are now: an operator's drain, add or remove made
            // while this reload looked at its new backends stays.
            self.reconcile(Desired::new(desired.config, self.desired.changes.clone()))
        };
        let source = if reply.is_some() {
            "reload"
        } else {
            "reload (SIGHUP)"
        };
        let answer = match result {
            Ok(summary) => {
                self.reloads_applied = generation;
                info!("{source}: {summary}");
                self.warn_about_preferred_vips();
                Reply::ok(format!("reloaded: {summary}"))
            }
            Err(e) => {
                warn!("{source} refused, nothing changed: {e}");
                Reply::error(format!("reload refused, nothing changed: {e}"))
            }
        };
        ReloadDone {
            applied: answer.ok,
            reply: reply.map(|r| (r, answer)),
        }
    }
}

/// A reload that went through the plan. The main loop moves the metrics listener if the reload
/// was applied, then tells systemd (READY=1) and the operator: both hear of it only once
/// everything is in place.
pub(super) struct ReloadDone {
    pub applied: bool,
    reply: Option<(oneshot::Sender<Reply>, Reply)>,
}

impl ReloadDone {
    pub(super) fn answer(self) {
        startup::notify_ready();
        if let Some((reply, answer)) = self.reply {
            let _ = reply.send(answer);
        }
    }
}
