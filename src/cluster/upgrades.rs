//! `fleet upgrade`, `fleet rollback` and `fleet upgrade --status` in cluster mode: the same
//! driver as on one host (`upgrade::driver`), speaking the cluster's commands, so each step
//! happens where the agent runs (its backup on that node's disk) and the per-agent versions
//! go into the desired state, where a moved agent keeps them. The record lives in etcd
//! (`u/records/<fleet>`), so any node shows it; a lock on the driving node's lease
//! (`u/locks/<fleet>`) keeps two rollouts of one fleet apart and shows when the driver is
//! gone. A rollout whose driver died is not resumed by itself: its status says so and
//! `fleet rollback` puts back what it moved.

use super::declared::imperative;
use super::front::Front;
use super::{bounded, Etcd};
use crate::messages::command::Reply;
use crate::node::NodeHandle;
use crate::upgrade::driver::{Driver, Via};
use crate::upgrade::{self, Plan, Rollout, UpgradeRecord};
use crate::FleetError;

impl Front {
    pub async fn save_upgrade(&self, rec: &UpgradeRecord) -> Result<(), FleetError> {
        let bytes = serde_json::to_vec(rec).map_err(FleetError::internal)?;
        self.etcd
            .put(self.etcd.keys.upgrade(&rec.fleet), bytes, None)
            .await
    }

    async fn load_upgrade(&self, fleet: &str) -> Result<Option<UpgradeRecord>, FleetError> {
        let mut c = self.etcd.client.clone();
        let r = bounded(c.get(self.etcd.keys.upgrade(fleet), None)).await?;
        match r.kvs().first() {
            None => Ok(None),
            Some(kv) => {
                serde_json::from_slice(kv.value())
                    .map(Some)
                    .map_err(|e| FleetError::Cluster {
                        reason: format!(
                            "fleet {fleet}'s upgrade record in etcd is unreadable ({e})"
                        ),
                    })
            }
        }
    }

    /// The fleet's version in its doc (what `upgrade::set_fleet_version` does on one host).
    pub async fn set_fleet_version(
        &self,
        local: &NodeHandle,
        fleet: &str,
        version: Option<String>,
    ) -> Result<(), FleetError> {
        let default =
            crate::provision::default_version(local.context().config.openclaw_bin.as_deref());
        self.etcd
            .update_fleet(fleet, |old| {
                let mut doc = old.ok_or_else(|| FleetError::NoSuchFleet {
                    fleet: fleet.into(),
                })?;
                upgrade::set_fleet_version(&mut doc.spec, version.clone(), default.clone());
                Ok(Some(doc))
            })
            .await
    }

    /// Checks that the fleet can be rolled out now and takes its lock.
    async fn begin(&self, local: &NodeHandle, fleet: &str, what: &str) -> Result<(), FleetError> {
        let snap = self.etcd.snapshot(false).await?;
        let Some((doc, _)) = snap.fleets.get(fleet) else {
            return Err(FleetError::NoSuchFleet {
                fleet: fleet.into(),
            });
        };
        imperative(doc, format!("fleet {fleet}'s OpenClaw version"))?;
        if !doc.spec.runs_openclaw() {
            return Err(FleetError::invalid(
                what,
                format!("fleet {fleet} runs its own command, not OpenClaw"),
            ));
        }
        if local.cluster_front().is_none() {
            return Err(FleetError::internal("cluster mode without its front door"));
        }
        let lease = self.lease.load(std::sync::atomic::Ordering::SeqCst);
        if lease == 0 {
            return Err(FleetError::Cluster {
                reason: "this node holds no cluster lease now; nothing was changed".into(),
            });
        }
        let key = self.etcd.keys.upgrade_lock(fleet);
        if !self
            .etcd
            .create_on_lease(key, self.cfg.node_name.clone(), lease)
            .await?
        {
            return Err(FleetError::invalid(
                what,
                format!("an upgrade or rollback of {fleet} is under way (fleet upgrade {fleet} --status)"),
            ));
        }
        Ok(())
    }

    /// Runs the driver in a task of its own (a client that goes away does not stop a
    /// rollout half-way), then gives the lock back.
    async fn drive(
        &self,
        local: &NodeHandle,
        rec: UpgradeRecord,
        rollback: Option<Option<String>>,
    ) -> Result<Reply, FleetError> {
        let fleet = rec.fleet.clone();
        let front = local
            .cluster_front()
            .ok_or_else(|| FleetError::internal("cluster mode without its front door"))?;
        if let Err(e) = self.save_upgrade(&rec).await {
            unlock(&self.etcd, &fleet).await;
            return Err(e);
        }
        let via = Via::Cluster {
            front,
            local: local.clone(),
        };
        let d = Driver::new(via, local.context(), rec);
        let etcd = self.etcd.clone();
        let r = tokio::spawn(async move {
            let rec = match rollback {
                Some(fleet_version) => d.roll_back_all(fleet_version).await,
                None => d.run().await,
            };
            unlock(&etcd, &fleet).await;
            rec
        })
        .await
        .map_err(FleetError::internal)?;
        Ok(Reply::Upgrade(Box::new(r)))
    }

    pub(super) async fn upgrade(
        &self,
        local: &NodeHandle,
        fleet: &str,
        plan: Plan,
    ) -> Result<Reply, FleetError> {
        let bin = local.context().config.openclaw_bin.clone();
        crate::provision::resolve_openclaw_version(bin.as_deref(), Some(&plan.to))
            .map_err(|e| FleetError::invalid("--to", e.to_string()))?;
        self.begin(local, fleet, "fleet upgrade").await?;
        let snap = match self.etcd.snapshot(false).await {
            Ok(s) => s,
            Err(e) => {
                unlock(&self.etcd, fleet).await;
                return Err(e);
            }
        };
        let Some((doc, _)) = snap.fleets.get(fleet) else {
            unlock(&self.etcd, fleet).await;
            return Err(FleetError::NoSuchFleet {
                fleet: fleet.into(),
            });
        };
        let mut rec = upgrade::new_record(
            &doc.spec,
            plan,
            crate::provision::default_version(bin.as_deref()),
        );
        rec.node = Some(self.cfg.node_name.clone());
        self.drive(local, rec, None).await
    }

    pub(super) async fn rollback(
        &self,
        local: &NodeHandle,
        fleet: &str,
    ) -> Result<Reply, FleetError> {
        self.begin(local, fleet, "fleet rollback").await?;
        let rec = match self.load_upgrade(fleet).await {
            Ok(Some(r)) if r.state != Rollout::RolledBack => r,
            other => {
                unlock(&self.etcd, fleet).await;
                return Err(match other {
                    Err(e) => e,
                    Ok(None) => FleetError::invalid(
                        "fleet rollback",
                        format!("fleet {fleet} has no upgrade to roll back"),
                    ),
                    Ok(Some(_)) => FleetError::invalid(
                        "fleet rollback",
                        format!("the last upgrade of {fleet} is rolled back already"),
                    ),
                });
            }
        };
        let fleet_version = rec.fleet_version.clone();
        let mut rec = rec;
        rec.node = Some(self.cfg.node_name.clone());
        self.drive(local, rec, Some(fleet_version)).await
    }

    pub(super) async fn upgrade_status(&self, fleet: &str) -> Result<Reply, FleetError> {
        let snap = self.etcd.snapshot(false).await?;
        if !snap.fleets.contains_key(fleet) {
            return Err(FleetError::NoSuchFleet {
                fleet: fleet.into(),
            });
        }
        let Some(mut rec) = self.load_upgrade(fleet).await? else {
            return Ok(super::front::done(format!(
                "fleet {fleet} has never been upgraded"
            )));
        };
        if matches!(rec.state, Rollout::Running | Rollout::RollingBack) {
            let mut c = self.etcd.client.clone();
            let held = bounded(c.get(self.etcd.keys.upgrade_lock(fleet), None)).await?;
            if held.kvs().is_empty() {
                rec.state = Rollout::Interrupted;
                rec.reason = Some(format!(
                    "the node driving it ({}) left the cluster mid-way; `fleet rollback {fleet}` puts back what it moved",
                    rec.node.as_deref().unwrap_or("unknown")
                ));
            }
        }
        Ok(Reply::Upgrade(Box::new(rec)))
    }
}

async fn unlock(etcd: &Etcd, fleet: &str) {
    let _ = etcd.delete(etcd.keys.upgrade_lock(fleet)).await;
}
