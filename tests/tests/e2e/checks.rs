//! Health checks end to end: the real agent probes real HTTP(S), TCP and
//! gRPC servers and real processes started by these tests, and the results
//! show in the API as Consul shows them (status, output, thresholds, fast
//! re-check, TTL expiry, reaping, blocking queries).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Method, Uri};
use serde_json::{Value, json};
use signpost_tests::{Agent, FlipServer, PATIENCE, free_addr};

const NO_FAST_RECHECK: &str = "checks:\n  fast_recheck_count: 0\n";
const EXEC: &str = "checks:\n  enable_exec: true\n";

async fn register(agent: &Agent, service: Value) {
    let r = agent.put("/v1/agent/service/register", Some(service)).await;
    assert_eq!(r.status.as_u16(), 200, "register refused: {}", r.text);
}

/// One check as `/v1/agent/checks` shows it.
async fn check(agent: &Agent, id: &str) -> Value {
    let checks = agent.get("/v1/agent/checks").await.json();
    checks
        .get(id)
        .unwrap_or_else(|| panic!("no check {id} in {checks}"))
        .clone()
}

/// Waits until check `id` has `status` and an output `want` accepts;
/// returns that output.
async fn wait_output(agent: &Agent, id: &str, status: &str, want: impl Fn(&str) -> bool) -> String {
    agent
        .eventually(
            &format!("check {id} {status} with the expected output"),
            || async {
                let c = agent.get("/v1/agent/checks").await.json();
                let c = c.get(id)?;
                let output = c["Output"].as_str()?;
                (c["Status"] == status && want(output)).then(|| output.to_string())
            },
        )
        .await
}

/// Polls the status of check `id` until it is `last`; returns the distinct
/// statuses seen on the way, in order, starting with `from` when the caller
/// has already seen that one (a change may come before the first poll).
async fn statuses_until(agent: &Agent, id: &str, from: Option<&str>, last: &str) -> Vec<String> {
    let seen = RefCell::new(from.into_iter().map(String::from).collect::<Vec<_>>());
    let seen_ref = &seen;
    agent
        .eventually(
            &format!("check {id} to become {last}"),
            move || async move {
                let status = agent.check_status(id).await?;
                let mut seen = seen_ref.borrow_mut();
                if seen.last() != Some(&status) {
                    seen.push(status.clone());
                }
                (status == last).then_some(())
            },
        )
        .await;
    seen.into_inner()
}

/// Serves `app` on a fresh loopback address.
async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((free_addr().ip(), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A server whose `/health` answers the i-th request with `codes[i]` and
/// 200 "fine" after them; returns its URL and the count of requests.
async fn scripted_server(codes: &[u16]) -> (String, Arc<AtomicUsize>) {
    let codes = codes.to_vec();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/health",
        axum::routing::any(move || {
            let (h, codes) = (h.clone(), codes.clone());
            async move {
                let n = h.fetch_add(1, Ordering::SeqCst);
                let code = codes.get(n).copied().unwrap_or(200);
                let code = axum::http::StatusCode::from_u16(code).unwrap();
                (
                    code,
                    if code.is_success() {
                        "fine"
                    } else {
                        "not fine"
                    },
                )
            }
        }),
    );
    let url = format!("http://{}/health", serve(app).await);
    (url, hits)
}

#[tokio::test]
async fn http_check_follows_the_server_status_and_its_death() {
    let agent = Agent::start("").await;
    let server = FlipServer::start(200).await;
    let url = server.url();
    register(
        &agent,
        json!({"Name": "web", "Port": server.addr.port(),
               "Check": {"HTTP": url, "Interval": "1s"}}),
    )
    .await;

    let ok = wait_output(&agent, "service:web", "passing", |_| true).await;
    assert_eq!(ok, format!("HTTP GET {url}: 200 OK Output: status 200"));
    assert_eq!(check(&agent, "service:web").await["Type"], "http");

    server.set(429);
    let busy = wait_output(&agent, "service:web", "warning", |_| true).await;
    assert_eq!(
        busy,
        format!("HTTP GET {url}: 429 Too Many Requests Output: status 429")
    );

    server.set(503);
    let down = wait_output(&agent, "service:web", "critical", |_| true).await;
    assert_eq!(
        down,
        format!("HTTP GET {url}: 503 Service Unavailable Output: status 503")
    );

    server.set(200);
    agent.wait_check("service:web", "passing").await;

    server.kill();
    let dead = wait_output(&agent, "service:web", "critical", |_| true).await;
    assert!(dead.starts_with(&format!("HTTP GET {url}: ")), "{dead}");
    assert!(!dead.contains("Output:"), "no response, no body: {dead}");
}

/// What the recording server saw of one request.
struct Seen {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: String,
}

#[tokio::test]
async fn http_check_sends_method_headers_body_and_honours_disable_redirects() {
    let agent = Agent::start("").await;
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let record = seen.clone();
    let app = axum::Router::new()
        .route(
            "/seen",
            axum::routing::any(
                move |method: Method, uri: Uri, headers: HeaderMap, body: String| {
                    let record = record.clone();
                    async move {
                        record.lock().unwrap().push(Seen {
                            method,
                            path: uri.path().to_string(),
                            headers,
                            body,
                        });
                        "seen"
                    }
                },
            ),
        )
        .route(
            "/moved",
            axum::routing::get(|| async { axum::response::Redirect::temporary("/ok") }),
        )
        .route("/ok", axum::routing::get(|| async { "ok" }));
    let base = format!("http://{}", serve(app).await);
    register(
        &agent,
        json!({"Name": "api", "Checks": [
            {"HTTP": format!("{base}/seen"), "Interval": "1s", "Method": "POST",
             "Header": {"X-Probe": ["a", "b"], "Authorization": ["Bearer t0ken"],
                        "Host": ["svc.example"]},
             "Body": "ping"},
            {"HTTP": format!("{base}/moved"), "Interval": "1s"},
            {"HTTP": format!("{base}/moved"), "Interval": "1s", "DisableRedirects": true},
        ]}),
    )
    .await;

    let out = wait_output(&agent, "service:api:1", "passing", |_| true).await;
    assert_eq!(out, format!("HTTP POST {base}/seen: 200 OK Output: seen"));
    {
        let seen = seen.lock().unwrap();
        let first = seen.first().expect("the server saw the probe");
        assert_eq!(first.path, "/seen");
        assert_eq!(first.method, Method::POST);
        assert_eq!(first.body, "ping");
        let probe: Vec<_> = first.headers.get_all("x-probe").iter().collect();
        assert_eq!(probe, ["a", "b"]);
        assert_eq!(first.headers["authorization"], "Bearer t0ken");
        assert_eq!(first.headers["accept"], "text/plain, text/*, */*");
        assert_eq!(first.headers["user-agent"], "Signpost Health Check");
        assert_eq!(first.headers["host"], "svc.example");
    }

    let followed = wait_output(&agent, "service:api:2", "passing", |_| true).await;
    assert_eq!(
        followed,
        format!("HTTP GET {base}/moved: 200 OK Output: ok")
    );
    let kept = wait_output(&agent, "service:api:3", "critical", |o| !o.is_empty()).await;
    assert!(
        kept.starts_with(&format!("HTTP GET {base}/moved: 307 Temporary Redirect")),
        "{kept}"
    );
}

/// A throwaway self-signed certificate (CN/SAN `signpost-test`, 100 years).
const TEST_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBoTCCAUegAwIBAgIUERBpuE0idM3TZpppIjP7zWbJ0R0wCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNc2lnbnBvc3QtdGVzdDAgFw0yNjExMjIwMzEyMTFaGA8yMTI2
MTAyOTAzMTIxMVowGDEWMBQGA1UEAwwNc2lnbnBvc3QtdGVzdDBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABD4ymqUEuQ6rGWmrYYMJlyLYD1B9+jUgdwE+2vdyVmaL
44QD78mr7uFzwvb/YIEZAovsMyHQDaYFEsGATZKyFEyjbTBrMB0GA1UdDgQWBBSl
nYXunnddXbv/98LgnrM3XEj6RTAfBgNVHSMEGDAWgBSlnYXunnddXbv/98LgnrM3
XEj6RTAPBgNVHRMBAf8EBTADAQH/MBgGA1UdEQQRMA+CDXNpZ25wb3N0LXRlc3Qw
CgYIKoZIzj0EAwIDSAAwRQIgG4T2PT97bS8jjC/o03LA/8wyu71mcfE2nEmYDubg
GDQCIQCJOdi2oz6onLQahgoKSJZ7XN5NocSOBbSHwInk/SwXKQ==
-----END CERTIFICATE-----
";
const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgprWu5A8W5I/Q1zmw
9eP/g2s3Ylh/fF6qePFzl9sd8mihRANCAAQ+MpqlBLkOqxlpq2GDCZci2A9Qffo1
IHcBPtr3clZmi+OEA+/Jq+7hc8L2/2CBGQKL7DMh0A2mBRLBgE2SshRM
-----END PRIVATE KEY-----
";

/// The request line, Host header and SNI server name of HTTPS requests.
type SeenTls = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

/// An HTTPS server (HTTP/1.1 over rustls, one request per connection) that
/// answers 200 "secure" to everything.
fn https_server() -> (SocketAddr, SeenTls) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::io::{Read, Write};

    let cert = CertificateDer::from_pem_slice(TEST_CERT.as_bytes()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(TEST_KEY.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    let config = Arc::new(config);
    let listener = std::net::TcpListener::bind((free_addr().ip(), 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = SeenTls::default();
    let record = seen.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (config, record) = (config.clone(), record.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => return, // e.g. the client refused the cert
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&request);
                let line = head.lines().next().unwrap_or_default().to_string();
                let host = head
                    .lines()
                    .find_map(|l| l.to_lowercase().strip_prefix("host:").map(str::to_string))
                    .unwrap_or_default();
                let sni = tls.conn.server_name().map(str::to_string);
                record
                    .lock()
                    .unwrap()
                    .push((line, host.trim().to_string(), sni));
                let response =
                    "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nsecure";
                if tls.write_all(response.as_bytes()).is_ok() {
                    tls.conn.send_close_notify();
                    tls.flush().ok();
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn https_check_passes_with_tls_skip_verify_only() {
    let agent = Agent::start("").await;
    let (addr, seen) = https_server();
    let url = format!("https://{addr}/health");
    let sni_url = format!("https://{addr}/sni");
    register(
        &agent,
        json!({"Name": "tls", "Checks": [
            {"HTTP": url, "Interval": "1s", "TLSSkipVerify": true},
            {"HTTP": url, "Interval": "1s", "Status": "passing"},
            {"HTTP": sni_url, "Interval": "1s", "TLSSkipVerify": true,
             "TLSServerName": "signpost-test"},
        ]}),
    )
    .await;
    let ok = wait_output(&agent, "service:tls:1", "passing", |_| true).await;
    assert_eq!(ok, format!("HTTP GET {url}: 200 OK Output: secure"));
    // Verified against the system roots, the self-signed cert is refused.
    let refused = wait_output(&agent, "service:tls:2", "critical", |_| true).await;
    assert!(
        refused.starts_with(&format!("HTTP GET {url}: ")),
        "{refused}"
    );
    assert!(
        refused.to_lowercase().contains("certificate"),
        "the output should say why: {refused}"
    );
    // TLSServerName is the SNI sent (the URL names an IP, which has none).
    let named = wait_output(&agent, "service:tls:3", "passing", |_| true).await;
    assert!(named.ends_with("/sni: 200 OK Output: secure"), "{named}");
    // The output names the URL as configured, not the one rewritten for SNI.
    assert_eq!(named, format!("HTTP GET {sni_url}: 200 OK Output: secure"));
    let seen = seen.lock().unwrap();
    let named: Vec<_> = seen
        .iter()
        .filter(|(line, _, _)| line.starts_with("GET /sni "))
        .collect();
    assert!(!named.is_empty());
    for (_, host, sni) in named {
        assert_eq!(sni.as_deref(), Some("signpost-test"));
        assert_eq!(host, &addr.to_string(), "the Host header stays the URL's");
    }
}

#[tokio::test]
async fn tcp_check_from_a_service_file_passes_until_the_listener_closes() {
    let agent = Agent::start("").await;
    let listener = tokio::net::TcpListener::bind((free_addr().ip(), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    agent.write_service_file(
        "db.yaml",
        &format!(
            "service:\n  name: db\n  port: {}\n  checks:\n    - tcp: {addr}\n      interval: 1s\n",
            addr.port()
        ),
    );
    let ok = wait_output(&agent, "service:db", "passing", |_| true).await;
    assert_eq!(ok, format!("TCP connect {addr}: Success"));
    assert_eq!(check(&agent, "service:db").await["Type"], "tcp");

    drop(listener);
    let down = wait_output(&agent, "service:db", "critical", |_| true).await;
    assert!(down.starts_with(&format!("dial tcp {addr}: ")), "{down}");
    assert!(down.to_lowercase().contains("refused"), "{down}");
}

#[tokio::test]
async fn grpc_check_follows_the_serving_status() {
    use tonic_health::ServingStatus;
    let agent = Agent::start("").await;
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("payments", ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind((free_addr().ip(), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    register(
        &agent,
        json!({"Name": "payments", "Port": addr.port(), "Protocol": "grpc",
               "Check": {"GRPC": format!("{addr}/payments"), "Interval": "1s"}}),
    )
    .await;
    let ok = wait_output(&agent, "service:payments", "passing", |_| true).await;
    assert_eq!(ok, format!("gRPC check {addr}/payments: success"));

    reporter
        .set_service_status("payments", ServingStatus::NotServing)
        .await;
    let down = wait_output(&agent, "service:payments", "critical", |_| true).await;
    assert!(down.contains("NOT_SERVING"), "{down}");

    reporter
        .set_service_status("payments", ServingStatus::Serving)
        .await;
    agent.wait_check("service:payments", "passing").await;
}

#[tokio::test]
async fn exec_checks_map_exit_codes_and_time_out() {
    let agent = Agent::start(EXEC).await;
    let sh = |script: &str| json!(["/bin/sh", "-c", script]);
    register(
        &agent,
        json!({"Name": "job", "Checks": [
            {"Args": sh("echo all fine"), "Interval": "1s"},
            {"Args": sh("echo degraded >&2; exit 1"), "Interval": "1s"},
            {"Args": sh("echo broken; exit 2"), "Interval": "1s"},
            {"Args": sh("echo started; sleep 30"), "Interval": "1s", "Timeout": "500ms",
             "Status": "passing"},
        ]}),
    )
    .await;
    let ok = wait_output(&agent, "service:job:1", "passing", |_| true).await;
    assert_eq!(ok, "all fine\n");
    let warn = wait_output(&agent, "service:job:2", "warning", |_| true).await;
    assert_eq!(warn, "degraded\n");
    // Checks start critical: wait for the output of a run.
    let bad = wait_output(&agent, "service:job:3", "critical", |o| !o.is_empty()).await;
    assert_eq!(bad, "broken\n");
    let slow = wait_output(&agent, "service:job:4", "critical", |_| true).await;
    assert!(slow.starts_with("Timed out"), "{slow}");
    assert_eq!(check(&agent, "service:job:4").await["Type"], "script");
}

#[tokio::test]
async fn exec_checks_are_refused_unless_enabled() {
    let agent = Agent::start("").await;
    let r = agent
        .put(
            "/v1/agent/service/register",
            Some(json!({"Name": "job", "Check": {"Args": ["/bin/true"], "Interval": "1s"}})),
        )
        .await;
    assert_eq!(r.status.as_u16(), 400, "{}", r.text);
    assert!(r.text.contains("checks.enable_exec"), "{}", r.text);
    let services = agent.get("/v1/agent/services").await.json();
    assert!(services.get("job").is_none(), "{services}");

    register(&agent, json!({"Name": "web"})).await;
    let r = agent
        .put(
            "/v1/agent/check/register",
            Some(json!({"Name": "script", "ServiceID": "web",
                        "Args": ["/bin/true"], "Interval": "1s"})),
        )
        .await;
    assert_eq!(r.status.as_u16(), 400, "{}", r.text);
    assert!(r.text.contains("checks.enable_exec"), "{}", r.text);
    let checks = agent.get("/v1/agent/checks").await.json();
    assert!(checks.get("script").is_none(), "{checks}");
}

#[tokio::test]
async fn ttl_check_expires_with_its_last_output() {
    let agent = Agent::start("").await;
    // 3s: long enough that the check is surely still passing when read
    // back right after the pass, even on a loaded machine.
    register(&agent, json!({"Name": "worker", "Check": {"TTL": "3s"}})).await;
    assert_eq!(
        agent.check_status("service:worker").await.as_deref(),
        Some("critical")
    );

    let passed_at = Instant::now();
    let r = agent
        .put("/v1/agent/check/pass/service:worker?note=alive", None)
        .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text);
    let c = check(&agent, "service:worker").await;
    assert_eq!(c["Status"], "passing");
    assert_eq!(c["Output"], "alive");
    assert_eq!(c["Type"], "ttl");

    let expired = wait_output(&agent, "service:worker", "critical", |_| true).await;
    assert!(
        passed_at.elapsed() >= Duration::from_secs(3),
        "expired before its TTL"
    );
    assert_eq!(
        expired,
        "TTL expired (last output before timeout follows): alive"
    );
}

#[tokio::test]
async fn failures_before_warning_and_critical_go_warning_first() {
    let agent = Agent::start(NO_FAST_RECHECK).await;
    let server = FlipServer::start(200).await;
    register(
        &agent,
        json!({"Name": "web", "Check": {"HTTP": server.url(), "Interval": "1s",
               "FailuresBeforeWarning": 1, "FailuresBeforeCritical": 3}}),
    )
    .await;
    agent.wait_check("service:web", "passing").await;

    server.set(503);
    let seen = statuses_until(&agent, "service:web", Some("passing"), "critical").await;
    let failed = agent
        .metric(r#"signpost_agent_check_probes_total{type="http",result="critical"}"#)
        .await;
    assert_eq!(seen, ["passing", "warning", "critical"]);
    assert!(failed >= 3.0, "critical after {failed} failures");
    let c = check(&agent, "service:web").await;
    assert!(c["Output"].as_str().unwrap().contains("503"), "{c}");
    let changes = |s: &str| format!(r#"signpost_agent_check_status_changes_total{{status="{s}"}}"#);
    assert_eq!(agent.metric(&changes("warning")).await, 1.0);
    assert_eq!(agent.metric(&changes("critical")).await, 1.0);
}

#[tokio::test]
async fn success_before_passing_needs_consecutive_successes() {
    let agent = Agent::start(NO_FAST_RECHECK).await;
    // Success, failure (resets the count), then successes.
    let (url, hits) = scripted_server(&[200, 503]).await;
    register(
        &agent,
        json!({"Name": "web", "Check": {"HTTP": url, "Interval": "1s",
               "SuccessBeforePassing": 2}}),
    )
    .await;
    let seen = statuses_until(&agent, "service:web", None, "passing").await;
    let answered = hits.load(Ordering::SeqCst);
    assert_eq!(seen, ["critical", "passing"]);
    assert!(answered >= 4, "passing after {answered} probes");
}

#[tokio::test]
async fn fast_recheck_does_not_count_a_single_blip() {
    let agent = Agent::start("").await;
    let (url, hits) = scripted_server(&[500]).await;
    register(
        &agent,
        json!({"Name": "web", "Check": {"HTTP": url, "Interval": "3s", "Status": "passing"}}),
    )
    .await;

    agent
        .eventually("the blip and its re-check", || async {
            (hits.load(Ordering::SeqCst) >= 2).then_some(())
        })
        .await;
    let blips = r#"signpost_agent_check_fast_rechecks_total{outcome="blip"}"#;
    agent
        .eventually("the blip to be counted", || async {
            (agent.metric(blips).await >= 1.0).then_some(())
        })
        .await;
    assert_eq!(agent.metric(blips).await, 1.0);
    let c = check(&agent, "service:web").await;
    assert_eq!(c["Status"], "passing");
    assert_eq!(c["Output"], format!("HTTP GET {url}: 200 OK Output: fine"));
    let criticals = r#"signpost_agent_check_status_changes_total{status="critical"}"#;
    assert_eq!(agent.metric(criticals).await, 0.0);
    let confirmed = r#"signpost_agent_check_fast_rechecks_total{outcome="confirmed"}"#;
    assert_eq!(agent.metric(confirmed).await, 0.0);
}

#[tokio::test]
async fn fast_recheck_confirms_a_real_death_at_once() {
    let agent = Agent::start("").await;
    let server = FlipServer::start(200).await;
    server.kill();
    agent
        .eventually("the server to be gone", || async {
            tokio::net::TcpStream::connect(server.addr)
                .await
                .is_err()
                .then_some(())
        })
        .await;
    // A 20s interval: the first probe comes after a stagger below 20s, the
    // second tick 20s after it; critical in between is the re-checks' doing.
    register(
        &agent,
        json!({"Name": "web", "Check": {"HTTP": server.url(), "Interval": "20s",
               "Status": "passing"}}),
    )
    .await;
    let seen = statuses_until(&agent, "service:web", None, "critical").await;
    assert_eq!(seen, ["passing", "critical"]);
    let confirmed = r#"signpost_agent_check_fast_rechecks_total{outcome="confirmed"}"#;
    assert_eq!(agent.metric(confirmed).await, 1.0);
    let blips = r#"signpost_agent_check_fast_rechecks_total{outcome="blip"}"#;
    assert_eq!(agent.metric(blips).await, 0.0);
    // Every probe run counts: the first one and fast_recheck_count (3)
    // re-checks, so the death was confirmed without a later interval tick.
    let probes = agent
        .metric(r#"signpost_agent_check_probes_total{type="http",result="critical"}"#)
        .await;
    assert_eq!(probes, 4.0, "critical probes counted");
}

#[tokio::test]
async fn service_critical_too_long_is_deregistered() {
    let agent = Agent::start("").await;
    let closed = free_addr();
    let listener = tokio::net::TcpListener::bind((free_addr().ip(), 0))
        .await
        .unwrap();
    let open = listener.local_addr().unwrap();
    let registered_at = Instant::now();
    register(
        &agent,
        json!({"Name": "doomed", "Check": {"TCP": closed.to_string(), "Interval": "1s",
               "DeregisterCriticalServiceAfter": "1s"}}),
    )
    .await;
    register(
        &agent,
        json!({"Name": "keeper", "Check": {"TCP": open.to_string(), "Interval": "1s",
               "DeregisterCriticalServiceAfter": "1s", "Status": "passing"}}),
    )
    .await;
    agent
        .eventually("the critical service to be deregistered", || async {
            let services = agent.get("/v1/agent/services").await.json();
            services.get("doomed").is_none().then_some(())
        })
        .await;
    assert!(
        registered_at.elapsed() >= Duration::from_secs(1),
        "deregistered before it was critical for 1s"
    );
    let checks = agent.get("/v1/agent/checks").await.json();
    assert!(checks.get("service:doomed").is_none(), "{checks}");
    let services = agent.get("/v1/agent/services").await.json();
    assert!(services.get("keeper").is_some(), "{services}");
    assert_eq!(
        agent.check_status("service:keeper").await.as_deref(),
        Some("passing")
    );
}

#[tokio::test]
async fn blocking_health_query_wakes_on_a_status_change() {
    let agent = Agent::start("").await;
    let server = FlipServer::start(200).await;
    register(
        &agent,
        json!({"Name": "web", "Check": {"HTTP": server.url(), "Interval": "1s"}}),
    )
    .await;
    agent.wait_check("service:web", "passing").await;
    let before = agent.get("/v1/health/service/web").await;
    let index = before.index();

    let blocked = format!("/v1/health/service/web?index={index}&wait=5m");
    let (after, ()) = tokio::time::timeout(PATIENCE, async {
        tokio::join!(agent.get(&blocked), async {
            // Let the query block first.
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.set(503);
        })
    })
    .await
    .expect("the blocking query did not wake on the status change");
    assert_eq!(after.status.as_u16(), 200, "{}", after.text);
    assert!(after.index() > index, "{} <= {index}", after.index());
    let body = after.json();
    let checks = body[0]["Checks"].as_array().unwrap();
    let web = checks
        .iter()
        .find(|c| c["CheckID"] == "service:web")
        .unwrap_or_else(|| panic!("no service:web in {body}"));
    assert_eq!(web["Status"], "critical", "{web}");
}
