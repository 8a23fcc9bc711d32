//! The control plane under bad input: operator requests only to operator
//! paths, a lost catalog that drops nothing, agent streams that send
//! garbage.

use super::*;

/// Sends `request` as raw bytes (so that nothing normalises its path) and
/// returns the status line and the body.
async fn raw_http(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

#[tokio::test]
async fn operator_requests_reach_only_operator_paths_and_cannot_flood_or_forge_the_audit() {
    use reqwest::Method;
    let cp = ControlPlane::start_with("audit:\n  max_size: 4096\n  max_files: 2\n").await;
    let agent = Agent::start_named(
        "operator-node",
        &cp.agent_config(signpost_tests::AGENT_TOKEN),
    )
    .await;
    let data = cp.dir.path().join("data");
    let admin = std::fs::read_to_string(data.join("bootstrap-token"))
        .unwrap()
        .trim()
        .to_string();

    // A path that leaves the operator paths is not forwarded.
    let answer = raw_http(
        agent.addr,
        "GET /v1/acl/../../metrics HTTP/1.1\r\nHost: x\r\nX-Consul-Token: junk\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains("not an operator path"), "{answer}");
    assert!(!answer.contains("signpost_control_plane"), "{answer}");

    // The bearer scheme in any case, through the agent and directly.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for (client, url, scheme) in [
        (
            &http,
            format!("http://{}/v1/acl/tokens", agent.addr),
            "bearer",
        ),
        (cp.client(), cp.url("/v1/acl/tokens"), "BEARER"),
    ] {
        let r = client
            .get(&url)
            .header("Authorization", format!("{scheme} {admin}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme} at {url}");
    }

    // A flood of requests with a junk token: each refused, the audit
    // log gets the first and then one entry with the count.
    for _ in 0..300 {
        let r = http
            .post(format!("http://{}/v1/commands", agent.addr))
            .header("X-Consul-Token", "junk")
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let denied_lines = || {
        std::fs::read_to_string(data.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("denied"))
            .count()
    };
    assert!(denied_lines() <= 2, "{} lines", denied_lines());
    let counted = agent
        .eventually("the refusals counted in the audit log", || async {
            let (_, audit) = cp_call(&cp, Method::GET, "/v1/audit?limit=1000", None).await;
            audit.as_array()?.iter().find_map(|e| {
                e["reason"]
                    .as_str()?
                    .strip_suffix(" more requests without a valid token were refused")?
                    .parse::<u32>()
                    .ok()
            })
        })
        .await;
    assert!(counted >= 298, "{counted}");

    // A value with a newline stays on its line of the log.
    let (_, reader) = cp_call(
        &cp,
        Method::PUT,
        "/v1/acl/token",
        Some(json!({"Role": "read"})),
    )
    .await;
    let reader = reader["SecretID"].as_str().unwrap().to_string();
    let answer = cp
        .client()
        .delete(cp.url("/v1/acl/token/abc%0Aforged-line"))
        .header("X-Consul-Token", &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 403);
    let log = agent
        .eventually("the refusal in the control plane's log", || async {
            let log = cp.log();
            log.contains("abc\\nforged-line").then_some(log)
        })
        .await;
    assert!(!log.lines().any(|l| l.starts_with("forged-line")), "{log}");

    // The audit log is rotated at its size and keeps two old files.
    for n in 0..60 {
        let (status, _) = cp_call(
            &cp,
            Method::PUT,
            "/v1/acl/token",
            Some(json!({"Role": "read", "Description": format!("token {n}")})),
        )
        .await;
        assert_eq!(status, 200);
    }
    let size = |name: &str| std::fs::metadata(data.join(name)).map(|m| m.len());
    assert!(size("audit.jsonl").unwrap() <= 4096);
    assert!(size("audit.jsonl.1").unwrap() <= 4096);
    assert!(size("audit.jsonl.2").is_ok());
    assert!(
        size("audit.jsonl.3").is_err(),
        "only two rotated files are kept"
    );
}

/// The node names of `service`'s instances in `agent`'s view.
async fn nodes_of(agent: &Agent, service: &str) -> Vec<String> {
    let body = agent
        .get(&format!("/v1/health/service/{service}"))
        .await
        .json();
    let mut nodes: Vec<String> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Node"]["Node"].as_str().unwrap().to_string())
        .collect();
    nodes.sort();
    nodes
}

#[tokio::test]
async fn a_control_plane_that_lost_its_catalog_lets_agents_report_before_dropping_anything() {
    use nix::sys::signal::{Signal, kill};
    use signpost_tests::AGENT_TOKEN;

    let mut cp = ControlPlane::start_with("restore_grace: 5s\n").await;
    let join = cp.agent_config(AGENT_TOKEN);
    let provider = Agent::start_named("provider", &join).await;
    let consumer = Agent::start_named("consumer", &format!("{join}upstreams: [web]\n")).await;
    let late = Agent::start_named("late", &join).await;
    provider.write_service_file("web.yaml", "service:\n  name: web\n  port: 8080\n");
    consumer
        .eventually("web from the provider", || async {
            (nodes_of(&consumer, "web").await == ["provider"]).then_some(())
        })
        .await;

    // The control plane comes back without its catalog while the provider
    // cannot report (stopped).
    cp.kill();
    let _ = std::fs::remove_file(cp.dir.path().join("data").join("catalog.pb"));
    kill(provider.pid(), Signal::SIGSTOP).unwrap();
    cp.restart().await;
    let nodes = cp.get("/v1/nodes").await;
    assert!(
        nodes.headers.contains_key("x-signpost-warm-up"),
        "{:?}",
        nodes.headers
    );

    // A new instance reaches the consumer after its resubscription...
    late.write_service_file("web.yaml", "service:\n  name: web\n  port: 8081\n");
    consumer
        .eventually("web from the late node", || async {
            nodes_of(&consumer, "web")
                .await
                .contains(&"late".to_string())
                .then_some(())
        })
        .await;
    // ...and the provider's instance is still there.
    assert_eq!(nodes_of(&consumer, "web").await, ["late", "provider"]);

    // Once the warm-up is over, what nobody reported is gone...
    consumer
        .eventually(
            "the provider's instance dropped after the warm-up",
            || async { (nodes_of(&consumer, "web").await == ["late"]).then_some(()) },
        )
        .await;
    assert!(
        !cp.get("/v1/nodes")
            .await
            .headers
            .contains_key("x-signpost-warm-up")
    );
    // ...until it reports again.
    kill(provider.pid(), Signal::SIGCONT).unwrap();
    consumer
        .eventually("the provider back", || async {
            (nodes_of(&consumer, "web").await == ["late", "provider"]).then_some(())
        })
        .await;
}

/// A gRPC session with the control plane as an agent with a valid token
/// would open it, sending `first` as its first message; returns the
/// sender for more and the control plane's side of the stream.
async fn agent_session(
    cp: &ControlPlane,
    first: signpost_proto::AgentMessage,
) -> (
    tokio::sync::mpsc::Sender<signpost_proto::AgentMessage>,
    Result<tonic::Streaming<signpost_proto::ControlMessage>, tonic::Status>,
) {
    use signpost_proto::sync_client::SyncClient;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};

    let ca = std::fs::read(cp.ca_file()).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", cp.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token = format!("Bearer {}", signpost_tests::AGENT_TOKEN);
    let mut client =
        SyncClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", token.parse().unwrap());
            Ok(request)
        })
        .max_encoding_message_size(64 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(first).await.unwrap();
    let session = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner);
    (tx, session)
}

fn hello(node: &str) -> signpost_proto::AgentMessage {
    use signpost_proto::{AgentMessage, Hello, agent_message::Body};
    AgentMessage {
        body: Some(Body::Hello(Hello {
            node: node.to_string(),
            address: "127.0.0.1".to_string(),
            zone: "default".to_string(),
            datacenter: "dc1".to_string(),
            ..Hello::default()
        })),
    }
}

/// Reads the stream until it ends with an error; the error.
async fn ended_with(
    stream: &mut tonic::Streaming<signpost_proto::ControlMessage>,
) -> tonic::Status {
    loop {
        let next = tokio::time::timeout(signpost_tests::PATIENCE, stream.message())
            .await
            .unwrap_or_else(|_| panic!("the stream stays open"));
        match next {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error"),
            Err(status) => return status,
        }
    }
}

/// Opens a session as `node` with a good Hello, reports `instance` as its
/// whole state, and returns the error the stream ends with.
async fn full_state_refused(
    cp: &ControlPlane,
    node: &str,
    instance: signpost_proto::Instance,
) -> tonic::Status {
    use signpost_proto::{AgentMessage, FullState, agent_message::Body};
    let (tx, session) = agent_session(cp, hello(node)).await;
    let mut stream = session.unwrap();
    tx.send(AgentMessage {
        body: Some(Body::FullState(FullState {
            instances: vec![instance],
            node_checks: Vec::new(),
        })),
    })
    .await
    .unwrap();
    ended_with(&mut stream).await
}

#[tokio::test]
async fn an_agent_stream_that_sends_garbage_is_closed_and_audited() {
    use reqwest::Method;
    use signpost_proto::Instance;

    let cp = ControlPlane::start().await;

    // A Hello that names no node anyone could use: refused at once.
    let (_tx, refused) = agent_session(&cp, hello("two words")).await;
    let status = match refused {
        Err(status) => status,
        Ok(mut stream) => ended_with(&mut stream).await,
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    assert!(status.message().contains("Hello.node"), "{status}");

    // A port no instance can have, after a good Hello.
    let bad = Instance {
        id: "web-1".to_string(),
        name: "web".to_string(),
        port: 70_000,
        ..Instance::default()
    };
    let status = full_state_refused(&cp, "garbage-node", bad).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    assert!(status.message().contains("70000 is not a port"), "{status}");
    let (_, audit) = cp_call(&cp, Method::GET, "/v1/audit?limit=100", None).await;
    let closed = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "agent.session" && e["who"] == "garbage-node")
        .unwrap_or_else(|| panic!("not audited: {audit}"));
    assert!(
        closed["outcome"].as_str().unwrap().contains("not a port"),
        "{closed}"
    );
    // Nothing of it was taken in.
    let services = cp.get("/v1/catalog/services").await.json();
    assert!(services.get("web").is_none(), "{services}");

    // A message larger than an agent may send ends the stream too.
    let huge = Instance {
        id: "web-1".to_string(),
        name: "web".to_string(),
        port: 80,
        meta: [("k".to_string(), "x".repeat(5 << 20))].into(),
        ..Instance::default()
    };
    let status = full_state_refused(&cp, "large-node", huge).await;
    assert_ne!(status.code(), tonic::Code::Ok, "{status}");

    // The control plane serves on.
    let agent =
        Agent::start_named("good-node", &cp.agent_config(signpost_tests::AGENT_TOKEN)).await;
    agent
        .eventually("the good agent joined", || async {
            let nodes = cp.get("/v1/nodes").await.json();
            nodes
                .as_array()?
                .iter()
                .any(|n| n["Node"] == "good-node" && n["Status"] == "alive")
                .then_some(())
        })
        .await;
}
