//! What survives a restart (SIGTERM or SIGKILL) in `data_dir/state.json`,
//! what happens to a corrupt state file, and the `signpost` commands that
//! talk to a running agent or check a configuration.

use std::path::Path;

use serde_json::{Value, json};
use signpost_tests::{Agent, free_addr, signpost};

async fn put_json_ok(agent: &Agent, path: &str, body: Value) {
    let r = agent.put(path, Some(body)).await;
    assert!(r.status.is_success(), "PUT {path}: {} {}", r.status, r.text);
}

async fn put_ok(agent: &Agent, path: &str) {
    let r = agent.put(path, None).await;
    assert!(r.status.is_success(), "PUT {path}: {} {}", r.status, r.text);
}

/// Runs the CLI against `agent` (blocking: the agent is another process).
fn cli(agent: &Agent, args: &[&str]) -> (i32, String, String) {
    let addr = agent.addr.to_string();
    let mut args = args.to_vec();
    args.extend(["--http-addr", &addr]);
    signpost(&args)
}

fn cli_ok(agent: &Agent, args: &[&str]) -> String {
    let (code, stdout, stderr) = cli(agent, args);
    assert_eq!(code, 0, "signpost {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

async fn register(agent: &Agent, service: Value) {
    put_json_ok(agent, "/v1/agent/service/register", service).await;
}

/// `source` of service `id` in `/v1/signpost/services` ("api" or "file").
async fn source(agent: &Agent, id: &str) -> Option<Value> {
    let view = agent.get("/v1/signpost/services").await.json();
    view["services"]
        .as_array()?
        .iter()
        .find(|s| s["id"] == id)
        .map(|s| s["source"].clone())
}

async fn checks(agent: &Agent) -> Value {
    agent.get("/v1/agent/checks").await.json()
}

async fn services(agent: &Agent) -> Value {
    agent.get("/v1/agent/services").await.json()
}

fn state_file(agent: &Agent) -> std::path::PathBuf {
    agent.data_dir().join("state.json")
}

/// Waits until `state.json` holds everything `ready` looks for.
async fn wait_state(agent: &Agent, what: &str, ready: impl Fn(&Value) -> bool) {
    agent
        .eventually(what, || async {
            let text = std::fs::read_to_string(state_file(agent)).ok()?;
            let state: Value = serde_json::from_str(&text).ok()?;
            ready(&state).then_some(())
        })
        .await
}

fn persisted_service_ids(state: &Value) -> Vec<&str> {
    let services = state["services"].as_array().map(Vec::as_slice);
    let services = services.unwrap_or_default().iter();
    services.filter_map(|s| s["id"].as_str()).collect()
}

/// A service with a TTL check `service:<id>` that stays valid for 10 minutes.
fn ttl_service(id: &str, tags: &[&str]) -> Value {
    json!({"ID": id, "Name": id, "Port": 9000, "Tags": tags, "Check": {"TTL": "10m"}})
}

#[tokio::test]
async fn api_registrations_and_maintenance_survive_a_restart() {
    let mut agent = Agent::start("").await;
    register(&agent, ttl_service("api-web", &["blue"])).await;
    put_json_ok(
        &agent,
        "/v1/agent/check/register",
        json!({"ID": "api-web-extra", "Name": "extra", "ServiceID": "api-web", "TTL": "10m"}),
    )
    .await;
    put_json_ok(
        &agent,
        "/v1/agent/check/register",
        json!({"ID": "node-tcp", "Name": "node tcp", "TCP": "127.0.0.1:1", "Interval": "10s"}),
    )
    .await;
    put_ok(
        &agent,
        "/v1/agent/service/maintenance/api-web?enable=true&reason=deploying%20v2",
    )
    .await;
    put_ok(
        &agent,
        "/v1/agent/maintenance?enable=true&reason=kernel%20upgrade",
    )
    .await;

    assert_eq!(agent.stop().await, Some(0));
    agent.restart().await;

    let s = &services(&agent).await["api-web"];
    assert_eq!(s["Service"], "api-web");
    assert_eq!(s["Port"], 9000);
    assert_eq!(s["Tags"], json!(["blue"]));
    let c = checks(&agent).await;
    for id in ["service:api-web", "api-web-extra"] {
        assert_eq!(c[id]["ServiceID"], "api-web", "{id}: {c}");
    }
    assert_eq!(c["node-tcp"]["Type"], "tcp");
    assert_eq!(c["node-tcp"]["ServiceID"], "");
    assert_eq!(c["_service_maintenance:api-web"]["Notes"], "deploying v2");
    assert_eq!(c["_service_maintenance:api-web"]["Status"], "critical");
    assert_eq!(c["_node_maintenance"]["Notes"], "kernel upgrade");

    // Leaving maintenance is remembered too.
    put_ok(&agent, "/v1/agent/service/maintenance/api-web?enable=false").await;
    put_ok(&agent, "/v1/agent/maintenance?enable=false").await;
    assert_eq!(agent.stop().await, Some(0));
    agent.restart().await;
    let c = checks(&agent).await;
    assert!(c.get("_service_maintenance:api-web").is_none(), "{c}");
    assert!(c.get("_node_maintenance").is_none(), "{c}");
    assert!(services(&agent).await.get("api-web").is_some());
}

#[tokio::test]
async fn ttl_status_and_output_survive_a_restart_within_the_ttl() {
    let mut agent = Agent::start("").await;
    register(&agent, ttl_service("worker", &[])).await;
    register(&agent, ttl_service("queue", &[])).await;
    put_ok(&agent, "/v1/agent/check/pass/service:worker?note=fine").await;
    put_json_ok(
        &agent,
        "/v1/agent/check/update/service:queue",
        json!({"Status": "warning", "Output": "backlog 900"}),
    )
    .await;

    assert_eq!(agent.stop().await, Some(0));
    agent.restart().await;

    let c = checks(&agent).await;
    assert_eq!(c["service:worker"]["Status"], "passing", "{c}");
    assert_eq!(c["service:worker"]["Output"], "fine");
    assert_eq!(c["service:queue"]["Status"], "warning", "{c}");
    assert_eq!(c["service:queue"]["Output"], "backlog 900");
}

#[tokio::test]
async fn ttl_that_ran_out_while_stopped_turns_critical_after_restart() {
    let mut agent = Agent::start("").await;
    register(
        &agent,
        json!({"ID": "brief", "Name": "brief", "Check": {"TTL": "1s"}}),
    )
    .await;
    put_ok(&agent, "/v1/agent/check/pass/service:brief?note=alive").await;
    assert_eq!(agent.stop().await, Some(0));
    // Stay down longer than the TTL (a lower bound, not a speed limit).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    agent.restart().await;

    agent.wait_check("service:brief", "critical").await;
    let output = checks(&agent).await["service:brief"]["Output"].clone();
    assert!(output.as_str().unwrap().contains("TTL expired"), "{output}");
}

#[tokio::test]
async fn state_written_before_sigkill_is_restored() {
    let mut agent = Agent::start("").await;
    register(&agent, ttl_service("killed", &["k"])).await;
    put_ok(&agent, "/v1/agent/check/pass/service:killed?note=pre-kill").await;
    put_ok(
        &agent,
        "/v1/agent/service/maintenance/killed?enable=true&reason=draining",
    )
    .await;
    wait_state(
        &agent,
        "state.json with the service, TTL and maintenance",
        |s| {
            persisted_service_ids(s).contains(&"killed")
                && s.to_string().contains("pre-kill")
                && s.to_string().contains("draining")
        },
    )
    .await;

    agent.kill();
    agent.restart().await;

    assert_eq!(services(&agent).await["killed"]["Tags"], json!(["k"]));
    let c = checks(&agent).await;
    assert_eq!(c["service:killed"]["Status"], "passing", "{c}");
    assert_eq!(c["service:killed"]["Output"], "pre-kill");
    assert_eq!(c["_service_maintenance:killed"]["Notes"], "draining");
}

#[tokio::test]
async fn corrupt_state_file_is_moved_aside_and_the_agent_starts() {
    let mut agent = Agent::start("").await;
    register(&agent, ttl_service("lost", &[])).await;
    assert_eq!(agent.stop().await, Some(0));
    let garbage = "{\"version\": 1, \"services\": [ this is not json";
    std::fs::write(state_file(&agent), garbage).unwrap();

    agent.restart().await;
    let aside: Vec<_> = std::fs::read_dir(agent.data_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("/state.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read_to_string(&aside[0]).unwrap(), garbage);
    assert_eq!(
        agent.metric("signpost_agent_state_corrupt_total").await,
        1.0
    );
    assert!(services(&agent).await.get("lost").is_none());

    // The agent keeps working and persisting.
    register(&agent, ttl_service("fresh", &[])).await;
    assert_eq!(agent.stop().await, Some(0));
    agent.restart().await;
    assert!(services(&agent).await.get("fresh").is_some());
    assert_eq!(
        agent.metric("signpost_agent_state_corrupt_total").await,
        0.0
    );
}

#[tokio::test]
async fn services_from_files_are_not_persisted() {
    let mut agent = Agent::start("").await;
    agent.write_service_file(
        "filed.yaml",
        "service:\n  name: filed\n  port: 7000\n  checks:\n    - ttl: 10m\n",
    );
    register(&agent, ttl_service("api-one", &[])).await;
    agent
        .eventually("the file's service", || async {
            services(&agent).await.get("filed").map(|_| ())
        })
        .await;
    // Status and maintenance of a file's service are the agent's to keep.
    put_ok(&agent, "/v1/agent/check/pass/service:filed?note=file%20ok").await;
    put_ok(
        &agent,
        "/v1/agent/service/maintenance/filed?enable=true&reason=file%20maint",
    )
    .await;
    wait_state(&agent, "state.json with the API service", |s| {
        persisted_service_ids(s) == ["api-one"]
    })
    .await;

    assert_eq!(agent.stop().await, Some(0));
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(state_file(&agent)).unwrap()).unwrap();
    assert_eq!(persisted_service_ids(&state), ["api-one"]);
    agent.restart().await;
    let s = services(&agent).await;
    assert!(
        s.get("filed").is_some() && s.get("api-one").is_some(),
        "{s}"
    );
    assert_eq!(source(&agent, "filed").await, Some(json!("file")));
    assert_eq!(source(&agent, "api-one").await, Some(json!("api")));
    let c = checks(&agent).await;
    assert_eq!(c["service:filed"]["Status"], "passing", "{c}");
    assert_eq!(c["service:filed"]["Output"], "file ok");
    assert_eq!(c["_service_maintenance:filed"]["Notes"], "file maint");

    // Without its file, the service does not come back.
    assert_eq!(agent.stop().await, Some(0));
    std::fs::remove_file(agent.services_dir().join("filed.yaml")).unwrap();
    agent.restart().await;
    let s = services(&agent).await;
    assert!(s.get("filed").is_none(), "{s}");
    assert!(s.get("api-one").is_some(), "{s}");
    let c = checks(&agent).await;
    assert!(c.get("_service_maintenance:filed").is_none(), "{c}");
    assert!(c.get("service:filed").is_none(), "{c}");
}

#[tokio::test]
async fn cli_lists_services_and_checks() {
    let agent = Agent::start("").await;
    register(
        &agent,
        json!({"ID": "cli-web", "Name": "web", "Port": 8080,
            "Check": {"TTL": "10m", "Status": "passing"}}),
    )
    .await;

    let out = cli_ok(&agent, &["services"]);
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "NAME", "ADDRESS", "STATUS", "CHECKS", "SOURCE"]
    );
    let row = |out: &str| -> Vec<String> {
        out.lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .find(|cells| cells.first().map(String::as_str) == Some("cli-web"))
            .unwrap_or_else(|| panic!("no cli-web row in:\n{out}"))
    };
    let cells = row(&out);
    assert_eq!(cells[1], "web");
    assert_eq!(cells[2], format!("{}:8080", agent.addr.ip()));
    assert_eq!(cells[3], "passing");
    assert_eq!(cells[5], "api");

    put_ok(&agent, "/v1/agent/check/fail/service:cli-web?note=down").await;
    let out = cli_ok(&agent, &["services"]);
    assert_eq!(row(&out)[3], "critical");

    let out = cli_ok(&agent, &["services", "--json"]);
    let body: Value = serde_json::from_str(&out).expect("services --json is JSON");
    let entry = body["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "cli-web")
        .unwrap();
    assert_eq!(entry["status"], "critical");

    let out = cli_ok(&agent, &["checks"]);
    let line = out
        .lines()
        .find(|l| l.starts_with("service:cli-web "))
        .unwrap_or_else(|| panic!("{out}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        &cells[..5],
        ["service:cli-web", "cli-web", "ttl", "critical", "down"]
    );
    let out = cli_ok(&agent, &["checks", "--json"]);
    let body: Value = serde_json::from_str(&out).expect("checks --json is JSON");
    assert_eq!(body["service:cli-web"]["Status"], "critical");
}

#[tokio::test]
async fn cli_registers_and_deregisters_services_from_a_file() {
    let mut agent = Agent::start("").await;
    let file = agent.dir.path().join("reg.yaml");
    std::fs::write(
        &file,
        "services:\n  - name: reg-a\n    port: 81\n    tags: [x]\n    checks:\n      - ttl: 10m\n  \
         - name: reg-b\n    port: 82\n",
    )
    .unwrap();
    let out = cli_ok(&agent, &["register", file.to_str().unwrap()]);
    assert!(out.contains("registered reg-a"), "{out}");
    assert!(out.contains("registered reg-b"), "{out}");

    for id in ["reg-a", "reg-b"] {
        assert_eq!(source(&agent, id).await, Some(json!("api")), "{id}");
    }
    assert_eq!(services(&agent).await["reg-a"]["Tags"], json!(["x"]));
    assert_eq!(checks(&agent).await["service:reg-a"]["Type"], "ttl");

    let out = cli_ok(&agent, &["deregister", "reg-a"]);
    assert!(out.contains("deregistered reg-a"), "{out}");
    let s = services(&agent).await;
    assert!(s.get("reg-a").is_none() && s.get("reg-b").is_some(), "{s}");
    assert!(checks(&agent).await.get("service:reg-a").is_none());

    // Registered through the API, so it is remembered.
    assert_eq!(agent.stop().await, Some(0));
    agent.restart().await;
    let s = services(&agent).await;
    assert!(s.get("reg-a").is_none() && s.get("reg-b").is_some(), "{s}");

    // A broken file is refused with its position, and nothing registers.
    let bad = agent.dir.path().join("bad-reg.yaml");
    std::fs::write(&bad, "service:\n  name: reg-c\n  prot: 1\n").unwrap();
    let (code, _, stderr) = cli(&agent, &["register", bad.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains(&format!("{}:3:", bad.display())),
        "{stderr}"
    );
    assert!(services(&agent).await.get("reg-c").is_none());
}

#[tokio::test]
async fn cli_maintenance_for_a_service_and_the_node() {
    let agent = Agent::start("").await;
    register(&agent, ttl_service("m-web", &[])).await;

    cli_ok(
        &agent,
        &["maint", "m-web", "--enable", "--reason", "disk swap"],
    );
    let c = checks(&agent).await;
    assert_eq!(c["_service_maintenance:m-web"]["Notes"], "disk swap");
    assert_eq!(c["_service_maintenance:m-web"]["ServiceID"], "m-web");
    let out = cli_ok(&agent, &["services"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("m-web ") && l.contains("maintenance")),
        "{out}"
    );

    cli_ok(&agent, &["maint", "--enable", "--reason", "kernel upgrade"]);
    assert_eq!(
        checks(&agent).await["_node_maintenance"]["Notes"],
        "kernel upgrade"
    );

    cli_ok(&agent, &["maint", "m-web", "--disable"]);
    let c = checks(&agent).await;
    assert!(c.get("_service_maintenance:m-web").is_none(), "{c}");
    assert!(c.get("_node_maintenance").is_some(), "{c}");
    cli_ok(&agent, &["maint", "--disable"]);
    assert!(checks(&agent).await.get("_node_maintenance").is_none());

    // An unknown service is an error the user sees.
    let (code, _, stderr) = cli(&agent, &["maint", "nope", "--enable"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("nope"), "{stderr}");
}

#[test]
fn cli_against_a_dead_address_fails_naming_it() {
    // Nothing listens there once free_addr's probe listener is gone.
    let addr = free_addr().to_string();
    for command in [&["services"][..], &["checks"], &["deregister", "x"]] {
        let mut args = command.to_vec();
        args.extend(["--http-addr", &addr]);
        let (code, stdout, stderr) = signpost(&args);
        assert_ne!(code, 0, "{args:?}: {stdout}");
        assert!(stderr.contains(&addr), "{args:?}: {stderr}");
    }
}

/// Asserts `stderr` names `file:line:col:` for a numeric column.
fn assert_position(stderr: &str, file: &Path, line: u32) {
    let prefix = format!("{}:{line}:", file.display());
    let at = stderr
        .find(&prefix)
        .unwrap_or_else(|| panic!("{prefix:?} not in {stderr:?}"));
    let rest = &stderr[at + prefix.len()..];
    let column = rest.split(':').next().unwrap_or("");
    assert!(
        column.parse::<u32>().is_ok_and(|c| c > 0) && rest.len() > column.len(),
        "no column after {prefix:?} in {stderr:?}"
    );
}

#[test]
fn agent_refuses_a_bad_config_with_exit_64_and_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let cases = [
        ("zone: a\nnode_nmae: x\n", 2, "node_nmae"),
        (
            "zone: a\nchecks:\n  fast_recheck_spacing: 10 s\n",
            3,
            "10 s",
        ),
        ("zone: a\napi:\n  listen: 127.0.0.1\n", 3, "address"),
    ];
    for (text, line, needle) in cases {
        std::fs::write(&bad, text).unwrap();
        for extra in [&[][..], &["--validate"]] {
            let mut args = vec!["agent", "--config", bad.to_str().unwrap()];
            args.extend(extra);
            let (code, _, stderr) = signpost(&args);
            assert_eq!(code, 64, "{text:?} {extra:?}: {stderr}");
            assert_position(&stderr, &bad, line);
            assert!(stderr.contains(needle), "{stderr}");
        }
    }
}

#[test]
fn validate_checks_the_config_and_the_service_files() {
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("services.d");
    std::fs::create_dir_all(&services).unwrap();
    std::fs::write(
        services.join("web.yaml"),
        "service:\n  name: web\n  port: 80\n  checks:\n    - tcp: 127.0.0.1:80\n      interval: 5s\n",
    )
    .unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "node_name: v1\ndata_dir: {}\nservices_dir: {}\napi:\n  listen: {}\n",
            dir.path().join("data").display(),
            services.display(),
            free_addr()
        ),
    )
    .unwrap();
    let (code, stdout, stderr) =
        signpost(&["agent", "--config", config.to_str().unwrap(), "--validate"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("valid"), "{stdout}");

    let broken = services.join("broken.yaml");
    std::fs::write(
        &broken,
        "service:\n  name: api\n  checks:\n    - tcp: 127.0.0.1:81\n      interval: soon\n",
    )
    .unwrap();
    let (code, _, stderr) =
        signpost(&["agent", "--config", config.to_str().unwrap(), "--validate"]);
    assert_eq!(code, 64, "{stderr}");
    assert_position(&stderr, &broken, 5);
    assert!(stderr.contains("soon"), "{stderr}");
    assert!(!stderr.contains("web.yaml"), "{stderr}");
}

/// A service file names its program's systemd unit (`drain: {unit: …}`):
/// `signpost drain --unit` (what `--self` finds from the unit's
/// `ExecStop=`) puts that unit's instances in maintenance, and
/// `signpost maint --unit … --disable` (its `ExecStartPost=`) brings them
/// back; a unit no file names is an error, and so is a bad unit name in
/// a file, with its line.
#[tokio::test]
async fn a_units_instances_are_drained_and_brought_back_by_its_name() {
    let agent = Agent::start("").await;
    agent.write_service_file(
        "shop.yaml",
        "services:\n  - name: shop\n    id: shop-1\n    port: 8080\n    drain:\n      unit: shop.service\n      timeout: 5s\n  - name: other\n    port: 8081\n",
    );
    agent
        .eventually("shop-1 registered", || async {
            source(&agent, "shop-1").await.map(drop)
        })
        .await;
    let out = cli_ok(&agent, &["drain", "--unit", "shop.service"]);
    assert!(out.contains("shop-1 is in maintenance"), "{out}");
    let c = checks(&agent).await;
    assert!(c.get("_service_maintenance:shop-1").is_some(), "{c}");
    assert!(c.get("_service_maintenance:other").is_none(), "{c}");
    cli_ok(&agent, &["maint", "--unit", "shop.service", "--disable"]);
    assert!(
        checks(&agent)
            .await
            .get("_service_maintenance:shop-1")
            .is_none()
    );

    let (code, _, err) = cli(&agent, &["drain", "--unit", "nothing.service"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no service file on this agent names unit nothing.service"),
        "{err}"
    );
    // This test does not run in shop.service: --self finds no instance
    // (or no unit at all).
    let (code, _, err) = cli(&agent, &["drain", "--self"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("does not run in a systemd service unit")
            || err.contains("no service file on this agent names unit"),
        "{err}"
    );

    agent.write_service_file(
        "bad.yaml",
        "services:\n  - name: bad\n    port: 1\n    drain:\n      unit: not a unit\n",
    );
    let (code, out, err) = signpost(&[
        "agent",
        "--config",
        agent.config_path().to_str().unwrap(),
        "--validate",
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("bad.yaml:5:7") && err.contains("is not a systemd service unit's name"),
        "{err}"
    );
}
