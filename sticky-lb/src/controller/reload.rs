//! Reload (`sticky-lb reload`, SIGHUP): re-read the config, refuse what a running data path
//! cannot take, and reconcile to it. Nothing waits for the network here: new backends' MACs are
//! asked for in the background and they come up when the neighbour table answers.

use super::{Controller, desired::Desired, plan::Summary};
use crate::config::Config;
use log::warn;

impl Controller {
    /// Re-reads the config and reconciles to it. On any error nothing has changed.
    pub(super) fn reload(&mut self) -> Result<Summary, String> {
        let new = Config::load(&self.config_path, true).map_err(|e| format!("config error: {e}"))?;
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
        let desired = Desired::new(new, self.desired.changes.clone());
        let summary = self.reconcile(desired)?;
        self.ask_neighbours();
        Ok(summary)
    }
}
