//! The supervision tree: one file per actor. Actors decide; the modules they call do the work.

pub mod agent;
pub mod fleet;
pub mod logs;
pub mod node;
pub mod ports;

/// Calls `actor` and waits at most `timeout`; an actor that is gone or too slow is an error
/// naming `who`, never a made-up answer.
pub async fn call_t<M, T>(
    actor: &ractor::ActorRef<M>,
    msg: impl FnOnce(ractor::RpcReplyPort<T>) -> M,
    timeout: std::time::Duration,
    who: &str,
) -> Result<T, crate::FleetError>
where
    M: ractor::Message,
    T: Send + 'static,
{
    match actor.call(msg, Some(timeout)).await {
        Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
        Ok(ractor::rpc::CallResult::Timeout) => Err(crate::FleetError::Timeout {
            what: format!("{who} to answer"),
        }),
        _ => Err(crate::FleetError::internal(format!("{who} is not running"))),
    }
}
