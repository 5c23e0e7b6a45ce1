//! PortAllocator: leases a block of ports to each agent. Holds the leases; the choice of a
//! block is `ports::Leases::allocate` (plain, tested), the check for ports bound by other
//! processes reads /proc/net once per request. Leases persist through the registry.

use crate::messages::ports::PortsMsg;
use crate::metrics::Metrics;
use crate::ports::{listening_ports, Leases, PortRange};
use ractor::{Actor, ActorProcessingErr, ActorRef};

pub struct PortAllocator;

pub struct PortsRuntime {
    range: PortRange,
    leases: Leases,
    metrics: Metrics,
}

impl PortsRuntime {
    fn update_gauges(&self) {
        let leased: i64 = self.leases.iter().map(|(_, _, l)| l.stride as i64).sum();
        self.metrics.leases_used.set(self.leases.len() as i64);
        self.metrics
            .ports_free
            .set(self.range.len() as i64 - leased);
    }
}

impl Actor for PortAllocator {
    type Msg = PortsMsg;
    type State = PortsRuntime;
    type Arguments = (PortRange, Metrics);

    async fn pre_start(
        &self,
        _myself: ActorRef<PortsMsg>,
        (range, metrics): (PortRange, Metrics),
    ) -> Result<PortsRuntime, ActorProcessingErr> {
        let rt = PortsRuntime {
            range,
            leases: Leases::default(),
            metrics,
        };
        rt.update_gauges();
        Ok(rt)
    }

    async fn handle(
        &self,
        _myself: ActorRef<PortsMsg>,
        msg: PortsMsg,
        rt: &mut PortsRuntime,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PortsMsg::Allocate {
                fleet,
                agent,
                stride,
                reply,
            } => {
                // One read of /proc/net/{tcp,udp}{,6}: cheap, and never blocks on the network.
                let busy = listening_ports();
                let r = rt
                    .leases
                    .allocate(&fleet, &agent, stride, rt.range, &|p| busy.contains(&p));
                let _ = reply.send(r);
            }
            PortsMsg::AllocateMany {
                fleet,
                agents,
                stride,
                reply,
            } => {
                let busy = listening_ports();
                let mut got = Vec::with_capacity(agents.len());
                let mut err = None;
                for a in &agents {
                    match rt
                        .leases
                        .allocate(&fleet, a, stride, rt.range, &|p| busy.contains(&p))
                    {
                        Ok(l) => got.push(l),
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                    }
                }
                if let Some(e) = err {
                    for a in agents.iter().take(got.len()) {
                        rt.leases.release(&fleet, a);
                    }
                    let _ = reply.send(Err(e));
                } else {
                    let _ = reply.send(Ok(got));
                }
            }
            PortsMsg::Restore {
                fleet,
                agent,
                lease,
                reply,
            } => {
                let _ = reply.send(rt.leases.insert(&fleet, &agent, lease));
            }
            PortsMsg::Reallocate {
                fleet,
                agent,
                stride,
                reply,
            } => {
                let busy = listening_ports();
                let old = rt.leases.release(&fleet, &agent);
                let taken = |p: u16| busy.contains(&p) || old.is_some_and(|l| l.contains(p));
                let r = rt.leases.allocate(&fleet, &agent, stride, rt.range, &taken);
                if r.is_err() {
                    if let Some(l) = old {
                        let _ = rt.leases.insert(&fleet, &agent, l);
                    }
                }
                let _ = reply.send(r);
            }
            PortsMsg::Release { fleet, agent } => {
                rt.leases.release(&fleet, &agent);
            }
            PortsMsg::List { reply } => {
                let v = rt
                    .leases
                    .iter()
                    .map(|(f, a, l)| (f.to_string(), a.to_string(), l))
                    .collect();
                let _ = reply.send(v);
            }
            PortsMsg::Free { stride, reply } => {
                // Read-only: answered below, no gauge change.
                let used: u64 = rt
                    .leases
                    .iter()
                    .map(|(_, _, l)| (l.stride as u64).div_ceil(stride.max(1) as u64))
                    .sum();
                let total = rt.range.blocks(stride) as u64;
                let _ = reply.send(total.saturating_sub(used));
            }
        }
        rt.update_gauges();
        Ok(())
    }
}
