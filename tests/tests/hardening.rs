//! Bad input is refused where it enters, with a clear error, and nothing
//! that works is lost on the way: durations beyond any clock, background
//! tasks that stop, directories that go away.

#![allow(clippy::unwrap_used)] // test helpers: a panic is a test failure

use serde_json::{Value, json};
use signpost_tests::{Agent, signpost};

/// A duration that fits a `u64` of seconds but no clock (Go refuses it too).
const HUGE: &str = "3000000000000000h";

async fn service(agent: &Agent, id: &str) -> Option<Value> {
    let services = agent.get("/v1/agent/services").await.json();
    services.get(id).cloned()
}

/// Waits until service `id` is registered.
async fn wait_service(agent: &Agent, id: &str) {
    agent
        .eventually(&format!("service {id}"), || async {
            service(agent, id).await.map(|_| ())
        })
        .await;
}

/// The error reported for service file `name`, once there is one.
async fn file_error(agent: &Agent, name: &str) -> String {
    let path = agent.services_dir().join(name).display().to_string();
    agent
        .eventually(&format!("an error for {name}"), || async {
            let body = agent.get("/v1/signpost/services").await.json();
            body["files"]
                .as_array()?
                .iter()
                .find(|f| f["path"] == path.as_str())?["error"]
                .as_str()
                .map(str::to_string)
        })
        .await
}

#[tokio::test]
async fn a_duration_too_large_for_any_clock_is_refused_everywhere_and_the_agent_lives_on() {
    let mut agent = Agent::start("").await;

    // A service file: refused with its position; the watcher carries on.
    agent.write_service_file(
        "huge.yaml",
        &format!("service:\n  name: huge\n  port: 1\n  checks:\n    - ttl: {HUGE}\n"),
    );
    let error = file_error(&agent, "huge.yaml").await;
    assert!(error.contains("huge.yaml:5:"), "{error}");
    assert!(error.contains("too large"), "{error}");
    agent.write_service_file("later.yaml", "service:\n  name: later\n  port: 2\n");
    wait_service(&agent, "later").await;
    assert!(service(&agent, "huge").await.is_none());

    // The API: as text and as nanoseconds, in every duration of a check.
    for check in [
        json!({"TTL": HUGE}),
        json!({"TTL": u64::MAX}),
        json!({"TTL": "10s", "DeregisterCriticalServiceAfter": HUGE}),
        json!({"TCP": "127.0.0.1:1", "Interval": HUGE}),
        json!({"TCP": "127.0.0.1:1", "Interval": "10s", "Timeout": u64::MAX}),
    ] {
        let body = json!({"ID": "api-huge", "Name": "api-huge", "Port": 3, "Check": check});
        let r = agent.put("/v1/agent/service/register", Some(body)).await;
        assert_eq!(r.status, 400, "{check}: {}", r.text);
        assert!(r.text.contains("too large"), "{check}: {}", r.text);
    }
    assert!(service(&agent, "api-huge").await.is_none());

    // --validate refuses what the agent refuses.
    let config = agent.config_path();
    let (code, _, stderr) =
        signpost(&["agent", "--config", config.to_str().unwrap(), "--validate"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("huge.yaml:5:"), "{stderr}");

    // And a restart is a restart, not a crash loop.
    agent.restart().await;
    wait_service(&agent, "later").await;
    assert_eq!(
        agent
            .metric("signpost_agent_task_restarts_total{task=\"service file watcher\"}")
            .await,
        0.0,
        "nothing had to be started again"
    );
}

#[tokio::test]
async fn a_services_dir_removed_and_made_again_is_watched_again() {
    let agent = Agent::start("").await;
    agent.write_service_file("web.yaml", "service:\n  name: web\n  port: 80\n");
    wait_service(&agent, "web").await;

    std::fs::remove_dir_all(agent.services_dir()).unwrap();
    agent
        .eventually("the watcher to notice and be started again", || async {
            let restarts = agent
                .metric("signpost_agent_task_restarts_total{task=\"service file watcher\"}")
                .await;
            (restarts >= 1.0).then_some(())
        })
        .await;
    assert!(
        agent.log().contains("is gone: its services keep serving"),
        "{}",
        agent.log()
    );
    // Meanwhile what it had keeps serving.
    assert!(service(&agent, "web").await.is_some());

    std::fs::create_dir_all(agent.services_dir()).unwrap();
    agent.write_service_file("api.yaml", "service:\n  name: api\n  port: 81\n");
    wait_service(&agent, "api").await;
    // The directory came back without web.yaml: web is gone with its file.
    agent
        .eventually("web to go with its file", || async {
            service(&agent, "web").await.is_none().then_some(())
        })
        .await;
}
