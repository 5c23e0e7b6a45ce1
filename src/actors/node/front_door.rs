//! The node's side of webhook channels: the routes its registry implies, the `webhooks`
//! command, and keeping the reverse proxy's config in step after every registry save.

use super::{now, NodeRuntime, Outcome};
use crate::error::FleetError;
use crate::messages::command::Reply;
use crate::registry::RegistryData;
use crate::webhooks::{self, Format, Route};
use std::path::PathBuf;

/// Every webhook route of the registry: each agent with a port lease whose effective config
/// puts a channel in webhook mode, in fleet, agent, channel order.
pub fn routes(data: &RegistryData) -> Vec<Route> {
    let mut out = Vec::new();
    for (fleet, rec) in &data.fleets {
        if !rec.spec.runs_openclaw() {
            continue;
        }
        for (agent, a) in &rec.agents {
            let Some(base) = a.port_base else { continue };
            let template = crate::provision::effective_template(&rec.spec, agent);
            for (channel, port) in webhooks::ports(template.as_ref(), base, a.stride) {
                if let Some(port) = port {
                    out.push(Route {
                        fleet: fleet.clone(),
                        agent: agent.clone(),
                        channel: channel.to_string(),
                        port,
                    });
                }
            }
        }
    }
    out.sort();
    out
}

impl NodeRuntime {
    pub(super) fn webhooks_command(
        &self,
        format: Option<Format>,
        apply: Option<PathBuf>,
    ) -> Result<Outcome, FleetError> {
        let Some(base) = self.ctx.config.public_url.clone() else {
            return Err(FleetError::invalid(
                "webhooks",
                "fleetd was started without --public-url: there is no front door to route",
            ));
        };
        let format = format
            .or(self.ctx.config.front_door.as_ref().map(|f| f.format))
            .unwrap_or(Format::Nginx);
        let routes = routes(&self.data);
        let text = webhooks::render(format, &base, &routes);
        let applied = match apply {
            None => None,
            Some(dir) => {
                if !dir.is_absolute() || !dir.is_dir() {
                    return Err(FleetError::invalid(
                        "--apply",
                        format!("{} is not an existing absolute directory", dir.display()),
                    ));
                }
                let reload = self
                    .ctx
                    .config
                    .front_door
                    .as_ref()
                    .filter(|f| f.format == format)
                    .map(|f| f.reload.clone())
                    .unwrap_or_else(|| format.default_reload());
                let p = webhooks::apply(&dir, format, &text, &reload)
                    .map_err(|e| FleetError::invalid("--apply", e))?;
                Some(p.display().to_string())
            }
        };
        now(Reply::Webhooks {
            format,
            routes,
            config: text,
            applied,
        })
    }

    /// After a save: when the routes differ from what the proxy was last given, write them and
    /// reload it (off the actor). A proxy that refuses the reload keeps its old config; the
    /// next change tries again.
    pub(super) fn sync_front_door(&self) {
        let (Some(door), Some(base)) = (
            self.ctx.config.front_door.clone(),
            self.ctx.config.public_url.clone(),
        ) else {
            return;
        };
        let routes = routes(&self.data);
        {
            let mut last = self
                .front_door_routes
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if last.as_ref() == Some(&routes) {
                return;
            }
            *last = Some(routes.clone());
        }
        let shared = self.front_door_routes.clone();
        tokio::task::spawn_blocking(move || {
            let text = webhooks::render(door.format, &base, &routes);
            match webhooks::apply(&door.dir, door.format, &text, &door.reload) {
                Ok(p) => {
                    tracing::info!(path = %p.display(), routes = routes.len(), "front door updated")
                }
                Err(e) => {
                    tracing::error!(error = %e, "front door not updated");
                    // Try again at the next save.
                    *shared.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
            }
        });
    }
}
