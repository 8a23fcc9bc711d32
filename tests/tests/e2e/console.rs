//! The web console in a real browser: `tests/clients/console.py` drives
//! Debian's chromium with Playwright (both installed by `.ci/run`)
//! against a control plane and two agents: log in, see a service's live
//! traffic (from b's proxy), watch it turn critical live, create a block command through the form and watch
//! `applied_by` fill in, revoke it, browse and edit a KV key (and lose
//! to a change made meanwhile), be refused an admin page with an
//! operator token, and see the banner when the control plane goes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::io::Write as _;
use std::process::{Command, Stdio};

use serde_json::json;
use signpost_tests::upstream::{Upstream, vip_client};
use signpost_tests::{AGENT_TOKEN, Agent, ControlPlane, signpost};

use crate::kv::clients::{clients, script};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and Playwright (see .ci/run)"]
async fn the_console_shows_the_fleet_live_and_acts_on_it() {
    let python = clients().join("venv/bin/python");
    assert!(
        python.exists(),
        "Playwright is not installed in {} (see .ci/run)",
        clients().display()
    );
    let cp = ControlPlane::start().await;
    let join = cp.agent_config(AGENT_TOKEN);
    let a = Agent::start_named("a", &join).await;
    let b = Agent::start_named("b", &format!("{join}upstreams: [web]\n")).await;
    let web = Upstream::start("web-1", 0).await;
    let r = a
        .put(
            "/v1/agent/service/register",
            Some(json!({"ID": "web-1", "Name": "web", "Protocol": "http",
                "Address": web.addr.ip().to_string(), "Port": web.addr.port(),
                "Check": {"TTL": "10m", "Status": "passing"}})),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    b.eventually("web on b", || async {
        let body = b.get("/v1/health/service/web?passing").await.json();
        (body.as_array().map_or(0, Vec::len) == 1).then_some(())
    })
    .await;
    let admin = crate::acl::bootstrap(&cp);
    let operator = {
        let flags = cp.cli_flags();
        let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
        args.extend([
            "--token", &admin, "acl", "token", "create", "--role", "operator", "--json",
        ]);
        let (code, out, err) = signpost(&args);
        assert_eq!(code, 0, "{err}");
        let token: serde_json::Value = serde_json::from_str(&out).unwrap();
        token["SecretID"].as_str().unwrap().to_string()
    };
    for (key, value) in [("config/app/greeting", "hello"), ("config/app/old", "x")] {
        let r = cp
            .client()
            .put(cp.url(&format!("/v1/kv/{key}")))
            .header("X-Consul-Token", &admin)
            .body(value)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    // Traffic from b's proxy to web while the browser looks: its figures.
    let (client, url) = vip_client(&b, "web", web.addr.port()).await;
    let load = tokio::spawn(async move {
        loop {
            let _ = client.get(&url).send().await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
    let setup = json!({
        "console": format!("https://{}", cp.http),
        "agent": a.addr.to_string(),
        "admin": admin,
        "operator": operator,
        "instance": web.addr.to_string(),
        "control_plane_pid": cp.pid(),
    });
    let mut child = Command::new(python)
        .arg(script("console.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(setup.to_string().as_bytes())
        .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    load.abort();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("console OK"),
        "{stdout}\n{stderr}\ncontrol plane:\n{}",
        cp.log()
    );
}
