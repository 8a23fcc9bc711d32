//! Reloading a running agent's configuration: SIGHUP and `signpost
//! reload` apply DNS settings, proxy policies and the log level at once,
//! on the connections already open; a bad file is refused with its
//! position and changes nothing; a listen address is reported as needing
//! a restart, not applied.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use bytes::Bytes;
use hickory_proto::rr::RecordType;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, kill};
use serde_json::Value;
use signpost_tests::dns::{self, Transport};
use signpost_tests::upstream::{Upstream, proxy_config, vip};
use signpost_tests::{Agent, free_addr, signpost};

/// The TTL of the agent's answer for `web.service.internal` (UDP, so a
/// cached answer would show).
async fn web_ttl(agent: &Agent) -> u32 {
    let answer = dns::query(
        agent.dns_addr(),
        "web.service.internal",
        RecordType::A,
        Transport::Udp,
    )
    .await;
    answer.answers.first().expect("an A record").ttl
}

/// GET / on `connection`: the status and the body.
async fn get(connection: &mut SendRequest<Empty<Bytes>>) -> (u16, String) {
    let request = hyper::Request::get("/")
        .header("host", "web.service.internal")
        .body(Empty::new())
        .unwrap();
    let response = connection.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn edit_config(agent: &Agent, edit: impl FnOnce(String) -> String) {
    let path = agent.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(text)).unwrap();
}

/// `signpost reload` against `agent`: (exit code, stdout, stderr).
fn reload_cli(agent: &Agent, json: bool) -> (i32, String, String) {
    let addr = agent.addr.to_string();
    let mut args = vec!["reload", "--http-addr", &addr];
    if json {
        args.push("--json");
    }
    signpost(&args)
}

#[tokio::test]
async fn a_reload_applies_dns_proxy_and_log_settings_and_refuses_a_bad_file() {
    // The instance answers after 1s; the policy gives a try 300ms.
    let web = Upstream::start("web-1", 0).await;
    web.set_delay(1000);
    let agent = Agent::start(&proxy_config(
        "  defaults:\n    try_timeout: 300ms\n    retries: 0\n",
    ))
    .await;
    agent.write_service_file(
        "web.yaml",
        &format!("services:\n{}", web.entry("web", "http")),
    );
    let addr = vip(&agent, "web", web.addr.port()).await;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut connection, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(driver);
    assert_eq!(get(&mut connection).await.0, 504, "the try timeout cuts it");
    assert_eq!(web_ttl(&agent).await, 5, "the default dns.ttl");

    // Longer tries, a longer TTL, and only warnings in the log; SIGHUP.
    edit_config(&agent, |text| {
        let text = text
            .replace("try_timeout: 300ms", "try_timeout: 10s")
            .replacen("dns:\n", "dns:\n  ttl: 42s\n", 1);
        format!("{text}log:\n  level: warn\n")
    });
    kill(agent.pid(), Signal::SIGHUP).unwrap();
    agent
        .eventually("the reloaded dns.ttl in answers", || async {
            (web_ttl(&agent).await == 42).then_some(())
        })
        .await;
    // On the connection opened before the reload.
    assert_eq!(get(&mut connection).await, (200, "web-1".to_string()));
    let applied = "signpost_agent_config_reloads_total{result=\"applied\"}";
    assert_eq!(agent.metric(applied).await, 1.0);

    // At warn, an API registration (info) is not logged any more.
    let logged_before = agent.log().len();
    let r = agent
        .put(
            "/v1/agent/service/register",
            Some(serde_json::json!({"Name": "quiet", "Port": 9000})),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);

    // A file that does not parse: refused with its position, exit
    // non-zero, and the configuration in force keeps serving.
    let valid = std::fs::read_to_string(agent.config_path()).unwrap();
    let bad_line = valid.lines().count() + 1;
    edit_config(&agent, |text| format!("{text}dns_ttl: 1s\n"));
    let (code, _, stderr) = reload_cli(&agent, false);
    assert_ne!(code, 0, "{stderr}");
    let position = format!("{}:{bad_line}:1", agent.config_path().display());
    assert!(stderr.contains(&position), "{position} in: {stderr}");
    assert!(stderr.contains("dns_ttl"), "{stderr}");
    assert_eq!(web_ttl(&agent).await, 42);
    assert_eq!(get(&mut connection).await, (200, "web-1".to_string()));
    let refused = "signpost_agent_config_reloads_total{result=\"refused\"}";
    assert_eq!(agent.metric(refused).await, 1.0);
    let log = agent.log()[logged_before..].to_string();
    assert!(log.contains("configuration reload refused"), "{log}");
    assert!(
        !log.contains("service registered through the API"),
        "info lines at log.level warn:\n{log}"
    );

    // A new api.listen takes a restart: reported, not applied.
    let moved = free_addr();
    std::fs::write(
        agent.config_path(),
        valid.replace(
            &format!("listen: {}\n", agent.addr),
            &format!("listen: {moved}\n"),
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = reload_cli(&agent, true);
    assert_eq!(code, 0, "{stderr}");
    let answer: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        answer["restart_required"],
        serde_json::json!(["api.listen"])
    );
    assert_eq!(answer["applied"], serde_json::json!([]));
    assert_eq!(answer["unchanged"], false);
    assert!(
        tokio::net::TcpStream::connect(moved).await.is_err(),
        "nothing listens on the new address"
    );
    assert!(agent.get("/v1/agent/self").await.status.is_success());
    let (code, stdout, _) = reload_cli(&agent, false);
    assert_eq!(code, 0);
    assert!(stdout.contains("needs a restart: api.listen"), "{stdout}");
}
