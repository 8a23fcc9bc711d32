//! The agent starts, answers, and stops cleanly on SIGTERM.

use signpost_tests::Agent;

#[tokio::test]
async fn starts_answers_and_stops_on_sigterm() {
    let mut agent = Agent::start("").await;
    let me = agent.get("/v1/agent/self").await.json();
    assert_eq!(me["Config"]["NodeName"], "test-node");
    assert_eq!(agent.stop().await, Some(0));
}
