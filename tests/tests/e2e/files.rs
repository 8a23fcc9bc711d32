//! Service files in `services_dir`: picked up, updated and removed while
//! the agent runs; a broken file is reported with its position and its
//! last good version keeps serving; two files cannot claim the same id.

use serde_json::Value;
use signpost_tests::{Agent, signpost};

/// `/v1/agent/services` entry of `id`, if registered.
async fn service(agent: &Agent, id: &str) -> Option<Value> {
    agent
        .get("/v1/agent/services")
        .await
        .json()
        .get(id)
        .cloned()
}

/// The tags of service `id`, if registered.
async fn tags(agent: &Agent, id: &str) -> Option<Vec<String>> {
    let s = service(agent, id).await?;
    let tags = serde_json::from_value(s["Tags"].clone());
    Some(tags.unwrap_or_else(|e| panic!("Tags of {id} are not a list of strings ({e}): {s}")))
}

/// Waits until service `id` is registered with exactly `expected` tags.
async fn wait_tags(agent: &Agent, id: &str, expected: &[&str]) {
    agent
        .eventually(&format!("service {id} with tags {expected:?}"), || async {
            (tags(agent, id).await? == expected).then_some(())
        })
        .await
}

/// The `files[]` entry of `/v1/signpost/services` for the file `name` in
/// the services directory.
async fn file_report(agent: &Agent, name: &str) -> Option<Value> {
    let path = agent.services_dir().join(name).display().to_string();
    let body = agent.get("/v1/signpost/services").await.json();
    body["files"]
        .as_array()?
        .iter()
        .find(|f| f["path"] == path.as_str())
        .cloned()
}

/// Waits until file `name` is reported with an error, and returns it.
async fn wait_file_error(agent: &Agent, name: &str) -> String {
    agent
        .eventually(&format!("an error reported for {name}"), || async {
            file_report(agent, name).await?["error"]
                .as_str()
                .map(str::to_string)
        })
        .await
}

/// Waits until file `name` is reported as loaded without error.
async fn wait_file_ok(agent: &Agent, name: &str) {
    agent
        .eventually(&format!("{name} loaded without error"), || async {
            file_report(agent, name).await?["error"]
                .is_null()
                .then_some(())
        })
        .await
}

/// The entry of service `id` in `/v1/signpost/services`.
async fn signpost_service(agent: &Agent, id: &str) -> Option<Value> {
    let body = agent.get("/v1/signpost/services").await.json();
    body["services"]
        .as_array()?
        .iter()
        .find(|s| s["id"] == id)
        .cloned()
}

fn web(tags: &str) -> String {
    format!("service:\n  name: web\n  port: 8080\n  tags: [{tags}]\n")
}

#[tokio::test]
async fn new_file_is_served_and_edits_update_it() {
    let agent = Agent::start("").await;
    assert!(service(&agent, "web").await.is_none());

    agent.write_service_file("web.yaml", &web("v1"));
    wait_tags(&agent, "web", &["v1"]).await;
    let s = service(&agent, "web").await.unwrap();
    assert_eq!(s["Service"], "web");
    assert_eq!(s["Port"], 8080);
    wait_file_ok(&agent, "web.yaml").await;
    let entry = signpost_service(&agent, "web").await.unwrap();
    assert_eq!(entry["source"], "file");
    assert_eq!(
        entry["file"],
        agent.services_dir().join("web.yaml").display().to_string()
    );

    agent.write_service_file("web.yaml", &web("v2, canary"));
    wait_tags(&agent, "web", &["v2", "canary"]).await;
    assert_eq!(
        agent.metric("signpost_agent_service_file_errors").await,
        0.0
    );
}

#[tokio::test]
async fn unchanged_service_keeps_its_check_status_when_the_file_changes() {
    let agent = Agent::start("").await;
    let file = |b_tags: &str| {
        format!(
            "services:\n  - name: a\n    port: 1001\n    checks:\n      - ttl: 10m\n  \
             - name: b\n    port: 1002\n    tags: [{b_tags}]\n    checks:\n      - ttl: 10m\n"
        )
    };
    agent.write_service_file("ab.yaml", &file("one"));
    wait_tags(&agent, "b", &["one"]).await;
    assert_eq!(
        agent.check_status("service:a").await.as_deref(),
        Some("critical")
    );
    let r = agent
        .put("/v1/agent/check/pass/service:a?note=warmed%20up", None)
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    agent.wait_check("service:a", "passing").await;

    agent.write_service_file("ab.yaml", &file("two"));
    wait_tags(&agent, "b", &["two"]).await;
    let checks = agent.get("/v1/agent/checks").await.json();
    assert_eq!(checks["service:a"]["Status"], "passing");
    assert_eq!(checks["service:a"]["Output"], "warmed up");
    assert!(service(&agent, "a").await.is_some());
}

/// Writes a good file, then `broken`; the error names the file and
/// `line`, the old version keeps serving; a fixed file clears the error.
async fn broken_file_keeps_last_good_version(broken: &str, line: u32, needle: &str) {
    let agent = Agent::start("").await;
    agent.write_service_file("web.yaml", &web("good"));
    wait_tags(&agent, "web", &["good"]).await;
    wait_file_ok(&agent, "web.yaml").await;

    agent.write_service_file("web.yaml", broken);
    let error = wait_file_error(&agent, "web.yaml").await;
    let path = agent.services_dir().join("web.yaml").display().to_string();
    let position = format!("{path}:{line}:");
    assert!(error.starts_with(&position), "{error:?} vs {position:?}");
    let column = error[position.len()..].split(':').next().unwrap_or("");
    assert!(column.parse::<u32>().is_ok_and(|c| c > 0), "{error}");
    assert!(error.contains(needle), "{error}");
    assert_eq!(
        agent.metric("signpost_agent_service_file_errors").await,
        1.0
    );
    // The last good version keeps serving, untouched.
    assert_eq!(tags(&agent, "web").await, Some(vec!["good".to_string()]));
    let report = file_report(&agent, "web.yaml").await;
    assert_eq!(
        report.map(|r| r["services"].clone()),
        Some(serde_json::json!(["web"]))
    );

    agent.write_service_file("web.yaml", &web("fixed"));
    wait_tags(&agent, "web", &["fixed"]).await;
    wait_file_ok(&agent, "web.yaml").await;
    assert_eq!(
        agent.metric("signpost_agent_service_file_errors").await,
        0.0
    );
}

#[tokio::test]
async fn yaml_syntax_error_is_reported_and_last_good_version_serves() {
    let broken = "service:\n  name: web\n  port: 8080\n  tags: [bad\n";
    broken_file_keeps_last_good_version(broken, 4, "[").await;
}

#[tokio::test]
async fn unknown_key_is_reported_and_last_good_version_serves() {
    let broken = "service:\n  name: web\n  port: 8080\n  tags: [bad]\n  prot: 8081\n";
    broken_file_keeps_last_good_version(broken, 5, "prot").await;
}

#[tokio::test]
async fn bad_duration_is_reported_and_last_good_version_serves() {
    let broken = "service:\n  name: web\n  port: 8080\n  tags: [bad]\n  checks:\n    \
                  - tcp: 127.0.0.1:8080\n      interval: soon\n";
    broken_file_keeps_last_good_version(broken, 7, "soon").await;
}

#[tokio::test]
async fn deleting_a_file_removes_its_services() {
    let agent = Agent::start("").await;
    agent.write_service_file(
        "pair.yaml",
        "services:\n  - name: left\n    port: 1\n  - name: right\n    port: 2\n",
    );
    agent.write_service_file("keep.yaml", "service:\n  name: keep\n  port: 3\n");
    for id in ["left", "right", "keep"] {
        wait_tags(&agent, id, &[]).await;
    }

    std::fs::remove_file(agent.services_dir().join("pair.yaml")).unwrap();
    agent
        .eventually("the deleted file's services to go", || async {
            // Its services go first, then its report.
            let services = agent.get("/v1/agent/services").await.json();
            let gone = services.get("left").is_none() && services.get("right").is_none();
            (gone && file_report(&agent, "pair.yaml").await.is_none()).then_some(())
        })
        .await;
    assert!(service(&agent, "keep").await.is_some());
}

#[tokio::test]
async fn newer_file_claiming_an_existing_id_is_in_error_and_original_serves() {
    let agent = Agent::start("").await;
    agent.write_service_file("a.yaml", "service:\n  name: shared\n  tags: [from-a]\n");
    wait_tags(&agent, "shared", &["from-a"]).await;
    wait_file_ok(&agent, "a.yaml").await;

    agent.write_service_file("b.yaml", "service:\n  name: shared\n  tags: [from-b]\n");
    let error = wait_file_error(&agent, "b.yaml").await;
    let a_path = agent.services_dir().join("a.yaml").display().to_string();
    let b_path = agent.services_dir().join("b.yaml").display().to_string();
    assert!(error.contains(&a_path), "{error}");
    assert!(error.contains(&b_path), "{error}");
    assert!(error.contains("shared"), "{error}");
    assert!(
        file_report(&agent, "a.yaml").await.unwrap()["error"].is_null(),
        "the original file is not in error"
    );
    assert_eq!(tags(&agent, "shared").await.unwrap(), ["from-a"]);
    assert_eq!(
        signpost_service(&agent, "shared").await.unwrap()["file"],
        a_path
    );
    assert_eq!(
        agent.metric("signpost_agent_service_file_errors").await,
        1.0
    );

    // Editing the newer file does not let it take the id over either.
    let refusals = r#"signpost_agent_service_file_loads_total{outcome="error"}"#;
    let before = agent.metric(refusals).await;
    agent.write_service_file("b.yaml", "service:\n  name: shared\n  tags: [from-b2]\n");
    agent
        .eventually("b.yaml's new content to be refused", || async {
            (agent.metric(refusals).await > before).then_some(())
        })
        .await;
    assert!(wait_file_error(&agent, "b.yaml").await.contains(&a_path));
    assert_eq!(tags(&agent, "shared").await.unwrap(), ["from-a"]);
}

/// A file refused for a duplicate id is retried when the other owner goes.
#[tokio::test]
async fn deleting_the_original_file_lets_the_other_claimant_serve() {
    let agent = Agent::start("").await;
    agent.write_service_file("a.yaml", "service:\n  name: shared\n  tags: [from-a]\n");
    wait_tags(&agent, "shared", &["from-a"]).await;
    agent.write_service_file("b.yaml", "service:\n  name: shared\n  tags: [from-b]\n");
    wait_file_error(&agent, "b.yaml").await;

    std::fs::remove_file(agent.services_dir().join("a.yaml")).unwrap();
    // The conflict is gone: b.yaml is the only file defining the id.
    wait_tags(&agent, "shared", &["from-b"]).await;
    wait_file_ok(&agent, "b.yaml").await;
}

#[tokio::test]
async fn file_present_at_start_is_loaded_before_the_api_answers() {
    let mut agent = Agent::start("").await;
    assert_eq!(agent.stop().await, Some(0));
    agent.write_service_file("web.yaml", &web("at-start"));
    agent.write_service_file("broken.yaml", "service:\n  name: other\n  prot: 1\n");

    agent.restart().await;
    // No waiting: the first answer already has them.
    assert_eq!(tags(&agent, "web").await.unwrap(), ["at-start"]);
    let report = file_report(&agent, "broken.yaml").await.unwrap();
    let path = agent
        .services_dir()
        .join("broken.yaml")
        .display()
        .to_string();
    let error = report["error"].as_str().unwrap();
    assert!(error.starts_with(&format!("{path}:3:")), "{error}");
    assert!(service(&agent, "other").await.is_none());
}

#[tokio::test]
async fn signpost_services_shows_file_errors() {
    let agent = Agent::start("").await;
    agent.write_service_file("web.yaml", &web("good"));
    wait_tags(&agent, "web", &["good"]).await;
    agent.write_service_file("web.yaml", "service:\n  name: web\n  prot: 1\n");
    let error = wait_file_error(&agent, "web.yaml").await;

    let addr = agent.addr.to_string();
    let (code, stdout, stderr) =
        tokio::task::spawn_blocking(move || signpost(&["services", "--http-addr", &addr]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&error), "{stdout}");
    let path = agent.services_dir().join("web.yaml").display().to_string();
    assert!(stdout.contains(&format!("{path}:3:")), "{stdout}");
    // The service of the last good version is still listed.
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().next() == Some("web")),
        "{stdout}"
    );
}

#[tokio::test]
async fn partly_refused_file_reports_only_what_it_serves_and_retries() {
    let agent = Agent::start("").await;
    let with_check = |name: &str, check: &str| {
        format!("service:\n  name: {name}\n  checks:\n    - id: {check}\n      ttl: 10m\n")
    };
    agent.write_service_file("a.yaml", &with_check("s1", "shared-check"));
    wait_tags(&agent, "s1", &[]).await;
    agent.write_service_file("b.yaml", &with_check("s2", "shared-check"));
    let error = wait_file_error(&agent, "b.yaml").await;
    assert!(error.contains("shared-check"), "{error}");
    assert!(service(&agent, "s2").await.is_none());
    assert_eq!(
        file_report(&agent, "b.yaml").await.unwrap()["services"],
        serde_json::json!([])
    );
    agent.write_service_file("a.yaml", &with_check("s1", "own-check"));
    wait_tags(&agent, "s2", &[]).await;
    wait_file_ok(&agent, "b.yaml").await;
}
