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
        let Some(dir) = apply else {
            return now(Reply::Webhooks {
                format,
                routes,
                config: text,
                applied: None,
            });
        };
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
        let writer = self.front_door_writer.clone();
        Ok(Outcome::Later(Box::pin(async move {
            let r = tokio::task::spawn_blocking(move || {
                let _one = writer.lock().unwrap_or_else(|e| e.into_inner());
                webhooks::apply(&dir, format, &text, &reload).map(|p| (p, text))
            })
            .await;
            match r {
                Ok(Ok((p, text))) => Reply::Webhooks {
                    format,
                    routes,
                    config: text,
                    applied: Some(p.display().to_string()),
                },
                Ok(Err(e)) => Reply::Error(FleetError::invalid("--apply", e)),
                Err(e) => Reply::Error(FleetError::internal(e)),
            }
        })))
    }

    /// After a save: when the routes differ from what the proxy was last given, write them and
    /// reload it, off the actor. One writer at a time, and it always writes the newest routes
    /// (a slow reload never lets an older set overwrite a newer one). A proxy that refuses the
    /// reload keeps running its old config; the file holds the new routes, and the next save
    /// tries the reload again.
    pub(super) fn sync_front_door(&self) {
        let (Some(door), Some(base)) = (
            self.ctx.config.front_door.clone(),
            self.ctx.config.public_url.clone(),
        ) else {
            return;
        };
        let routes = routes(&self.data);
        {
            let mut st = self.front_door.lock().unwrap_or_else(|e| e.into_inner());
            if st.wanted.as_ref() == Some(&routes) {
                return;
            }
            st.wanted = Some(routes);
        }
        let state = self.front_door.clone();
        let writer = self.front_door_writer.clone();
        tokio::task::spawn_blocking(move || {
            let _one = writer.lock().unwrap_or_else(|e| e.into_inner());
            let wanted = {
                let st = state.lock().unwrap_or_else(|e| e.into_inner());
                match &st.wanted {
                    Some(w) if st.applied.as_ref() != Some(w) => w.clone(),
                    _ => return,
                }
            };
            let text = webhooks::render(door.format, &base, &wanted);
            let r = webhooks::apply(&door.dir, door.format, &text, &door.reload);
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            match r {
                Ok(p) => {
                    tracing::info!(path = %p.display(), routes = wanted.len(), "front door updated");
                    st.applied = Some(wanted);
                }
                Err(e) => {
                    tracing::error!(error = %e, "front door not updated");
                    st.applied = None;
                    if st.wanted.as_ref() == Some(&wanted) {
                        st.wanted = None;
                    }
                }
            }
        });
    }
}

/// What the front door was asked for and what it last took.
#[derive(Default)]
pub struct FrontDoorState {
    wanted: Option<Vec<Route>>,
    applied: Option<Vec<Route>>,
}
