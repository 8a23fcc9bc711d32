//! Node identity: a token bound to a node joins as that node only, and
//! agents get short-lived client certificates that rotate under a live
//! stream; a forged, expired or another node's certificate is refused.

use super::*;
use signpost_proto::sync_client::SyncClient;
use signpost_proto::{AgentMessage, Hello, agent_message};
use signpost_tests::Agent;
use tokio_stream::StreamExt as _;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

async fn nodes(cp: &ControlPlane, admin: &str) -> Vec<String> {
    let r = cp
        .client()
        .get(cp.url("/v1/nodes"))
        .header("X-Consul-Token", admin)
        .send()
        .await
        .unwrap();
    let nodes: Value = r.json().await.unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["Node"].as_str().unwrap().to_string())
        .collect()
}

async fn audit(cp: &ControlPlane, admin: &str) -> Vec<Value> {
    let r = cp
        .client()
        .get(cp.url("/v1/audit?limit=1000"))
        .header("X-Consul-Token", admin)
        .send()
        .await
        .unwrap();
    r.json().await.unwrap()
}

#[tokio::test]
async fn an_agent_token_cannot_join_as_another_node() {
    let cp = ControlPlane::start().await;
    let admin = bootstrap(&cp);
    let (accessor, host_a) = node_token(&cp, &admin, "host-a").await;
    let impostor = Agent::start_named("host-b", &cp.agent_config(&host_a)).await;
    impostor
        .eventually("the refusal on the agent's side", || async {
            impostor
                .log()
                .contains("may not register as node \\\"host-b\\\"")
                .then_some(())
        })
        .await;
    let entry = impostor
        .eventually("the refusal in the audit log", || async {
            audit(&cp, &admin)
                .await
                .into_iter()
                .find(|e| e["action"] == "agent.session" && e["target"] == "host-b")
        })
        .await;
    assert_eq!(entry["who"], accessor.as_str());
    assert_eq!(entry["outcome"], "denied: needs node write");
    assert!(cp.log().contains("agent stream refused"), "{}", cp.log());

    // The node it is bound to joins.
    let host = Agent::start_named("host-a", &cp.agent_config(&host_a)).await;
    host.eventually("host-a to join", || async {
        nodes(&cp, &admin)
            .await
            .contains(&"host-a".to_string())
            .then_some(())
    })
    .await;
    assert!(!nodes(&cp, &admin).await.contains(&"host-b".to_string()));
}

/// Opens a session as `node` with `token` (and `identity`, a certificate
/// and key in PEM); Ok once the control plane welcomed it.
async fn session(
    cp: &ControlPlane,
    token: &str,
    node: &str,
    identity: Option<(String, String)>,
) -> Result<(), String> {
    let ca = std::fs::read(cp.ca_file()).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{}", cp.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut client = SyncClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    });
    let hello = AgentMessage {
        body: Some(agent_message::Body::Hello(Hello {
            node: node.to_string(),
            address: "127.0.0.1".to_string(),
            ..Hello::default()
        })),
    };
    let mut inbound = client
        .session(tokio_stream::iter([hello]).chain(tokio_stream::pending()))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    match inbound.message().await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("closed".to_string()),
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// A client certificate for `node` signed by `issuer`, valid from
/// `not_before` to `not_after` (Unix seconds): certificate and key PEM.
fn client_cert<S: rcgen::SigningKey>(
    issuer: &rcgen::Issuer<'_, S>,
    node: &str,
    not_before: i64,
    not_after: i64,
) -> (String, String) {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, node);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + std::time::Duration::from_secs(not_before as u64);
    params.not_after = epoch + std::time::Duration::from_secs(not_after as u64);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn forged_expired_and_other_nodes_client_certificates_are_refused() {
    let cp = ControlPlane::start().await;
    let admin = bootstrap(&cp);
    let (_, host_a) = node_token(&cp, &admin, "host-a").await;
    let tls = cp.dir.path().join("data").join("tls");
    let ca = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(tls.join("ca.pem")).unwrap(),
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(tls.join("ca-key.pem")).unwrap())
            .unwrap(),
    )
    .unwrap();
    let mut forger = rcgen::CertificateParams::default();
    forger.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let forged_ca = rcgen::Issuer::new(forger, rcgen::KeyPair::generate().unwrap());

    let valid = client_cert(&ca, "host-a", now() - 60, now() + 3600);
    assert_eq!(
        session(&cp, &host_a, "host-a", Some(valid.clone())).await,
        Ok(())
    );
    assert_eq!(
        session(&cp, &host_a, "host-a", None).await,
        Ok(()),
        "the token alone still joins"
    );

    let forged = client_cert(&forged_ca, "host-a", now() - 60, now() + 3600);
    let e = session(&cp, &host_a, "host-a", Some(forged))
        .await
        .unwrap_err();
    assert!(!e.is_empty());
    let expired = client_cert(&ca, "host-a", now() - 7200, now() - 3600);
    let e = session(&cp, &host_a, "host-a", Some(expired))
        .await
        .unwrap_err();
    assert!(!e.is_empty());

    // Another node's certificate, even with a token that may write any
    // node: refused, and audited.
    let e = session(&cp, signpost_tests::AGENT_TOKEN, "host-b", Some(valid))
        .await
        .unwrap_err();
    assert!(
        e.contains("PermissionDenied") && e.contains("host-a"),
        "{e}"
    );
    let refused = audit(&cp, &admin).await.into_iter().any(|e| {
        e["action"] == "agent.session"
            && e["target"] == "host-b"
            && e["outcome"] == "denied: client certificate of another node"
    });
    assert!(refused);
}

#[tokio::test]
async fn client_certificates_rotate_under_a_live_stream_and_lose_nothing() {
    let cp = ControlPlane::start_with("grpc:\n  client_cert_ttl: 9s\n").await;
    let admin = bootstrap(&cp);
    let (_, cert_a) = node_token(&cp, &admin, "cert-a").await;
    let mut a = Agent::start_named("cert-a", &cp.agent_config(&cert_a)).await;
    let b = Agent::start_named("cert-b", &cp.agent_config(signpost_tests::AGENT_TOKEN)).await;
    let issued = |log: &str| {
        log.lines()
            .filter(|l| l.contains("client certificate issued") && l.contains("cert-a"))
            .count()
    };
    // Renewed at two thirds of 9 s: three certificates on one stream.
    a.eventually("three certificates for cert-a", || async {
        (issued(&cp.log()) >= 3).then_some(())
    })
    .await;
    let connected = |log: &str| {
        log.lines()
            .filter(|l| l.contains("agent connected") && l.contains("node=cert-a"))
            .count()
    };
    assert_eq!(
        connected(&cp.log()),
        1,
        "the stream stayed up:\n{}",
        cp.log()
    );
    assert!(a.log().contains("client certificate renewed"));
    let file = a.data_dir().join("tls").join("agent.pem");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A change made now still reaches the other host.
    let r = a
        .put(
            "/v1/agent/service/register",
            Some(json!({"Name": "rotated", "Port": 9000})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    b.eventually("rotated on cert-b", || async {
        let r = b.get("/v1/catalog/service/rotated").await;
        (r.json().as_array()?.len() == 1).then_some(())
    })
    .await;

    // The next connection presents the certificate.
    a.restart().await;
    a.eventually("cert-a back with its certificate", || async {
        cp.log()
            .lines()
            .any(|l| {
                l.contains("agent connected")
                    && l.contains("node=cert-a")
                    && l.contains("client_cert=true")
            })
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_rotated_ca_is_taken_up_without_locking_agents_out() {
    let mut cp = ControlPlane::start().await;
    let admin = bootstrap(&cp);
    let (_, secret) = node_token(&cp, &admin, "rot-a").await;
    // The agent's own copy of the CA, which the rotation adds to.
    let agent_ca = cp.dir.path().join("agent-ca.pem");
    std::fs::copy(cp.ca_file(), &agent_ca).unwrap();
    let config = format!(
        "control_plane:\n  addresses: [\"{}\"]\n  ca_file: {}\n  token: {secret}\n  http: {}\n",
        cp.grpc,
        agent_ca.display(),
        cp.http
    );
    let mut a = Agent::start_named("rot-a", &config).await;
    a.eventually("a first certificate", || async {
        a.log().contains("client certificate renewed").then_some(())
    })
    .await;

    // A new CA and server certificate; the agents' CA file gets the new
    // CA too; then the control plane moves to the new files.
    let fresh = cp.dir.path().join("new-tls");
    let out = std::process::Command::new(signpost_tests::control_plane_bin())
        .arg("--config")
        .arg(cp.dir.path().join("control-plane.yaml"))
        .arg("init-tls")
        .arg("--dir")
        .arg(&fresh)
        .args(["--name", &cp.grpc.ip().to_string()])
        .args(["--name", &cp.http.ip().to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let both = format!(
        "{}{}",
        std::fs::read_to_string(&agent_ca).unwrap(),
        std::fs::read_to_string(fresh.join("ca.pem")).unwrap()
    );
    std::fs::write(&agent_ca, both).unwrap();
    cp.kill();
    let tls = cp.dir.path().join("data").join("tls");
    for file in ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"] {
        std::fs::copy(fresh.join(file), tls.join(file)).unwrap();
    }
    cp.restart().await;

    // The old certificate is refused once; the agent joins with its token
    // and gets one from the new CA, which its next connection presents.
    a.eventually("a certificate from the new CA", || async {
        cp.log()
            .lines()
            .any(|l| l.contains("client certificate issued") && l.contains("node=rot-a"))
            .then_some(())
    })
    .await;
    assert!(
        a.log().contains("trying with the token alone"),
        "{}",
        a.log()
    );
    // Operator actions through the agent reach the control plane's new
    // certificate too.
    let r = signpost_tests::api_client()
        .build()
        .unwrap()
        .get(format!("{}/v1/acl/tokens", a.base()))
        .header("X-Consul-Token", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    a.restart().await;
    a.eventually("rot-a connected with its new certificate", || async {
        cp.log()
            .lines()
            .any(|l| {
                l.contains("agent connected")
                    && l.contains("node=rot-a")
                    && l.contains("client_cert=true")
            })
            .then_some(())
    })
    .await;
}
