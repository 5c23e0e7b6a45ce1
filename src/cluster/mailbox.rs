//! Node-to-node requests through etcd, so a command given at any node reaches the node that
//! runs the agent (`logs`, `say`, `agent restore`…) or every node with a share of it
//! (`fleet restart`, a purge). No second channel between hosts: etcd already connects every
//! node, and its access control (TLS client certificates, users) admits the caller.
//!
//! The asker watches `r/<id>`, then puts the request at `m/<node>/<id>` (and any attached
//! bytes at `x/<id>/<n>`), all on its own lease; the asked node watches `m/<node>/`, carries
//! the request out and puts the reply at `r/<id>` on the asker's lease. The asker deletes all
//! of it once answered; if it dies waiting, its lease takes the keys with it.

use super::front::Front;
use super::{bounded, Etcd};
use crate::messages::command::Reply;
use crate::messages::forward::Request;
use crate::node::NodeHandle;
use crate::FleetError;
use etcd_client::{EventType, GetOptions, WatchOptions};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// Largest reply put into etcd (its default `--max-request-bytes` is 1.5 MiB).
const MAX_REPLY_BYTES: usize = 1 << 20;
/// One attached chunk per put, under the same limit.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Largest archive `agent restore` carries through etcd (it stays in etcd's history until
/// compaction); bigger ones are restored on the node itself.
pub const MAX_ATTACHED_BYTES: u64 = 64 << 20;

fn request_id() -> Result<String, FleetError> {
    Ok(crate::provision::generate_token()?[..24].to_string())
}

/// Asks `node` and waits for its answer, at most `wait`. A timeout cannot promise that
/// nothing happened (the node may be carrying it out), and says so.
pub async fn ask(
    etcd: Etcd,
    node: String,
    req: Request,
    blob: Vec<u8>,
    wait: Duration,
) -> Result<Reply, FleetError> {
    let id = request_id()?;
    let reply_key = etcd.keys.reply(&id);
    let request_key = etcd.keys.request(&node, &id);
    let mut c = etcd.client.clone();
    // Watching before asking: the answer cannot come between the two.
    let mut stream = bounded(c.watch(reply_key.clone(), None)).await?;
    let asked = async {
        for (n, chunk) in blob.chunks(CHUNK_BYTES).enumerate() {
            let key = format!("{}{n:06}", etcd.keys.blob(&id));
            etcd.put(key, chunk.to_vec(), Some(req.lease)).await?;
        }
        let bytes = serde_json::to_vec(&req).map_err(FleetError::internal)?;
        etcd.put(request_key.clone(), bytes, Some(req.lease)).await
    };
    let answer = match asked.await {
        Err(e) => Err(e),
        Ok(()) => {
            let wait_for = async {
                let mut poll = tokio::time::interval(Duration::from_secs(2));
                loop {
                    tokio::select! {
                        m = stream.message() => match m {
                            Ok(Some(r)) => {
                                if let Some(kv) = r
                                    .events()
                                    .iter()
                                    .filter(|e| e.event_type() == EventType::Put)
                                    .find_map(|e| e.kv())
                                {
                                    return parse_reply(&node, kv.value());
                                }
                            }
                            // A broken watch: the poll below still sees the answer.
                            _ => poll.reset(),
                        },
                        _ = poll.tick() => {
                            let mut c = etcd.client.clone();
                            if let Ok(r) = bounded(c.get(reply_key.clone(), None)).await {
                                if let Some(kv) = r.kvs().first() {
                                    return parse_reply(&node, kv.value());
                                }
                            }
                        }
                    }
                }
            };
            tokio::time::timeout(wait, wait_for)
                .await
                .unwrap_or_else(|_| {
                    Err(FleetError::Cluster {
                        reason: format!(
                            "node {node} did not answer within {} s; it may still carry the command out",
                            wait.as_secs()
                        ),
                    })
                })
        }
    };
    let mut c = etcd.client.clone();
    let _ = bounded(c.delete(request_key, None)).await;
    let _ = bounded(c.delete(reply_key, None)).await;
    if !blob.is_empty() {
        let opts = etcd_client::DeleteOptions::new().with_prefix();
        let _ = bounded(c.delete(etcd.keys.blob(&id), Some(opts))).await;
    }
    answer
}

fn parse_reply(node: &str, bytes: &[u8]) -> Result<Reply, FleetError> {
    serde_json::from_slice(bytes).map_err(|e| FleetError::Cluster {
        reason: format!("node {node} answered something unreadable ({e})"),
    })
}

/// The attached bytes of request `id`, checked against what the request says they are.
pub async fn attached(
    etcd: &Etcd,
    id: &str,
    chunks: u32,
    bytes: u64,
) -> Result<Vec<u8>, FleetError> {
    if bytes > MAX_ATTACHED_BYTES {
        return Err(FleetError::invalid(
            "restore",
            format!("{bytes} attached bytes, more than {MAX_ATTACHED_BYTES}"),
        ));
    }
    let mut c = etcd.client.clone();
    let r = bounded(c.get(etcd.keys.blob(id), Some(GetOptions::new().with_prefix()))).await?;
    let mut kvs: Vec<_> = r.kvs().iter().collect();
    kvs.sort_by(|a, b| a.key().cmp(b.key()));
    let out: Vec<u8> = kvs
        .iter()
        .flat_map(|kv| kv.value().iter().copied())
        .collect();
    if kvs.len() != chunks as usize || out.len() as u64 != bytes {
        return Err(FleetError::Cluster {
            reason: format!(
                "the attached archive arrived incomplete ({} of {chunks} parts, {} of {bytes} bytes); nothing was changed",
                kvs.len(),
                out.len()
            ),
        });
    }
    Ok(out)
}

/// Serves this node's mailbox until the node shuts down: every request is carried out in a
/// task of its own (a long backup does not hold up a `logs`), each exactly once.
pub async fn serve(node: NodeHandle, etcd: Etcd, front: Arc<Front>) {
    let prefix = etcd.keys.mailbox(front.node_name());
    // Ids taken, until their keys are gone: a re-read after a broken watch sees them again.
    let mut taken: BTreeSet<String> = BTreeSet::new();
    while !node.is_shutting_down() {
        let mut c = etcd.client.clone();
        let Ok(r) = bounded(c.get(prefix.clone(), Some(GetOptions::new().with_prefix()))).await
        else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let revision = r.header().map_or(0, |h| h.revision());
        let present: BTreeSet<String> = r
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).to_string())
            .collect();
        taken.retain(|k| present.contains(k));
        for kv in r.kvs() {
            take(&node, &etcd, &front, &mut taken, kv.key(), kv.value());
        }
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let Ok(mut stream) = bounded(c.watch(prefix.clone(), Some(opts))).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        loop {
            let m = tokio::select! {
                m = stream.message() => m,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {
                    if node.is_shutting_down() { return; }
                    continue;
                }
            };
            match m {
                Ok(Some(r)) if !r.canceled() => {
                    for e in r.events() {
                        let Some(kv) = e.kv() else { continue };
                        if e.event_type() == EventType::Put {
                            take(&node, &etcd, &front, &mut taken, kv.key(), kv.value());
                        } else {
                            taken.remove(&*String::from_utf8_lossy(kv.key()));
                        }
                    }
                }
                _ => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn take(
    node: &NodeHandle,
    etcd: &Etcd,
    front: &Arc<Front>,
    taken: &mut BTreeSet<String>,
    key: &[u8],
    value: &[u8],
) {
    let key = String::from_utf8_lossy(key).to_string();
    if !taken.insert(key.clone()) {
        return;
    }
    let Some(id) = key.rsplit('/').next().map(str::to_string) else {
        return;
    };
    let req: Request = match serde_json::from_slice(value) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(key = %key, error = %e, "an unreadable request in this node's mailbox; ignored");
            return;
        }
    };
    let (node, etcd, front) = (node.clone(), etcd.clone(), front.clone());
    tokio::spawn(async move {
        tracing::info!(from = %req.from, id = %id, "a request from another node");
        let lease = req.lease;
        let reply = front.serve(&node, &id, req).await;
        let mut bytes = serde_json::to_vec(&reply).unwrap_or_default();
        if bytes.len() > MAX_REPLY_BYTES {
            let too_big = Reply::Error(FleetError::Cluster {
                reason: format!(
                    "the answer is {} bytes, more than etcd carries between nodes; ask node {} at its socket {}",
                    bytes.len(),
                    front.node_name(),
                    front.socket()
                ),
            });
            bytes = serde_json::to_vec(&too_big).unwrap_or_default();
        }
        if let Err(e) = etcd.put(etcd.keys.reply(&id), bytes, Some(lease)).await {
            // Most often the asker is gone (its lease with it).
            tracing::debug!(id = %id, error = %e, "the reply to another node's request was not delivered");
        }
    });
}
