//! The embedding example (`examples/embed.rs`) in the test suite: its `run` is compiled in
//! here through a `#[path]` module, so plain `cargo test` exercises what the example shows.
//! It must print the agents' transitions and leave no process of its node behind.

mod common;

#[allow(dead_code)]
#[path = "../examples/embed.rs"]
mod embed;

use common::{marked_pids, STUB};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedding_example_prints_events_and_leaves_no_process() {
    let dir = tempfile::Builder::new()
        .prefix("fleet-embed-test")
        .tempdir()
        .unwrap();
    let mut out = Vec::new();
    let summary = embed::run(
        embed::Options {
            state_dir: dir.path().join("state"),
            agents: 3,
            stub: STUB.into(),
            port_range: Some(common::next_port_range()),
        },
        &mut out,
    )
    .await;
    let text = String::from_utf8_lossy(&out).to_string();
    let summary = summary.unwrap_or_else(|e| panic!("the example failed: {e:#}\n{text}"));

    let events: Vec<&str> = text.lines().filter(|l| l.starts_with("event ")).collect();
    assert_eq!(events.len(), summary.events, "{text}");
    for agent in ["agent-1", "agent-2", "agent-3"] {
        let mine = |to: &str| {
            events
                .iter()
                .filter(|l| l.contains(&format!(" demo/{agent} ")) && l.contains(to))
                .count()
        };
        // agent-1 also went through the example's restart (stopping → provisioning → …).
        let runs = if agent == "agent-1" { 2 } else { 1 };
        assert_eq!(mine("→ running"), runs, "{agent} in\n{text}");
        assert_eq!(mine("→ stopping"), runs, "{agent} in\n{text}");
        assert_eq!(mine("→ stopped"), 1, "{agent} in\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("status demo/agent-2: running pid=")),
        "{text}"
    );
    assert_eq!(
        marked_pids(&format!("{}/", summary.node_id)),
        Vec::<u32>::new(),
        "processes of the example's node still run\n{text}"
    );
}
