//! A load tool for the web console: opens N real gRPC sessions (TLS,
//! token) as simulated agents, each reporting `--per-agent` instances
//! spread over `--services` services (every one with a check), then
//! measures how long the requests the console's pages make take over the
//! HTTP API (HTTPS, the admin token): the page itself, the services
//! summary, a service's page, the nodes, the commands, the first change
//! notice of the event stream.
//!
//!   cargo run --release -p signpost-control-plane --example console_load -- \
//!     --grpc 127.0.0.1:8300 --http https://127.0.0.1:8700 --ca ca.pem --token T \
//!     --admin ADMIN --agents 2000 --per-agent 10

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use clap::Parser;
use signpost_core::model::Health;
use signpost_proto::sync_client::SyncClient;
use signpost_proto::{AgentMessage, Check, FullState, Hello, Instance, agent_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    grpc: String,
    /// The control plane's HTTP API, e.g. https://127.0.0.1:8700.
    #[arg(long)]
    http: String,
    #[arg(long)]
    ca: std::path::PathBuf,
    /// The agents' token.
    #[arg(long)]
    token: String,
    /// A management token, for the console's requests.
    #[arg(long)]
    admin: String,
    #[arg(long, default_value_t = 2000)]
    agents: usize,
    #[arg(long, default_value_t = 10)]
    per_agent: usize,
    #[arg(long, default_value_t = 500)]
    services: usize,
    /// Requests timed per page.
    #[arg(long, default_value_t = 50)]
    requests: usize,
    #[arg(long, default_value_t = 64)]
    connections: usize,
}

fn instances(agent: usize, args: &Args) -> Vec<Instance> {
    (0..args.per_agent)
        .map(|k| {
            let n = agent * args.per_agent + k;
            let service = format!("svc-{}", n % args.services);
            let mut check = Check {
                id: format!("service:{service}-{n}"),
                name: "http".into(),
                output: "HTTP GET http://10.0.0.1:9000/health: 200 OK".into(),
                ..Check::default()
            };
            // Some critical, some warning: the summary counts them.
            check.set_health(match n % 20 {
                0 => Health::Critical,
                1 => Health::Warning,
                _ => Health::Passing,
            });
            Instance {
                id: format!("{service}-{n}"),
                name: service,
                address: format!(
                    "10.{}.{}.{}",
                    (agent >> 16) & 255,
                    (agent >> 8) & 255,
                    agent & 255
                ),
                port: 9000 + u32::try_from(k).unwrap(),
                tags: vec!["v1".into(), format!("shard-{}", n % 8)],
                checks: vec![check],
                weight_passing: 1,
                weight_warning: 1,
                ..Instance::default()
            }
        })
        .collect()
}

async fn open(
    channel: Channel,
    token: &str,
    node: String,
    zone: String,
    state: FullState,
) -> mpsc::Sender<AgentMessage> {
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut client = SyncClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", auth.clone());
        Ok(r)
    });
    let (tx, rx) = mpsc::channel(8);
    let hello = Hello {
        node,
        address: "127.0.0.1".into(),
        zone,
        version: "bench".into(),
        ..Hello::default()
    };
    tx.send(AgentMessage {
        body: Some(agent_message::Body::Hello(hello)),
    })
    .await
    .unwrap();
    tx.send(AgentMessage {
        body: Some(agent_message::Body::FullState(state)),
    })
    .await
    .unwrap();
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
    tx
}

/// The steps of one run, read top to bottom: sessions, then timings.
#[tokio::main]
async fn main() {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let args = Args::parse();
    let ca = std::fs::read(&args.ca).unwrap();
    let host = args.grpc.rsplit_once(':').unwrap().0.to_string();
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca))
            .domain_name(host.clone());
        let channel = Endpoint::from_shared(format!("https://{}", args.grpc))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        channels.push(channel);
    }
    let mut sessions = Vec::new();
    for i in 0..args.agents {
        let state = FullState {
            instances: instances(i, &args),
            ..FullState::default()
        };
        let zone = format!("zone-{}", i % 3);
        sessions.push(
            open(
                channels[i % channels.len()].clone(),
                &args.token,
                format!("sim-{i}"),
                zone,
                state,
            )
            .await,
        );
    }
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .no_proxy()
        .build()
        .unwrap();
    let base = args.http.trim_end_matches('/').to_string();
    let get = |path: String| {
        let (client, url, admin) = (client.clone(), format!("{base}{path}"), args.admin.clone());
        async move {
            let r = client
                .get(url)
                .header("X-Consul-Token", admin)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.status());
            r.bytes().await.unwrap().len()
        }
    };
    // Every instance in the catalog before anything is timed.
    let want = args.agents * args.per_agent;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let body = client
            .get(format!("{base}/v1/ui/services"))
            .header("X-Consul-Token", &args.admin)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let services: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        let have: u64 = services
            .iter()
            .map(|s| s["Instances"].as_u64().unwrap())
            .sum();
        if have as usize >= want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {have} of {want} instances after 120s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "catalog: {} nodes, {} instances, {} services",
        args.agents, want, args.services
    );
    let pages: Vec<(&str, String)> = vec![
        ("console page (/ui/)", "/ui/".to_string()),
        (
            "services summary (/v1/ui/services)",
            "/v1/ui/services".to_string(),
        ),
        (
            "a service (/v1/health/service/svc-7)",
            "/v1/health/service/svc-7".to_string(),
        ),
        ("nodes (/v1/nodes)", "/v1/nodes".to_string()),
        ("commands (/v1/commands)", "/v1/commands".to_string()),
        (
            "token (/v1/acl/token/self)",
            "/v1/acl/token/self".to_string(),
        ),
    ];
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>10}",
        "request", "p50 ms", "p99 ms", "max ms", "bytes"
    );
    for (name, path) in pages {
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..args.requests {
            let started = Instant::now();
            bytes = get(path.clone()).await;
            times.push(started.elapsed());
        }
        times.sort();
        let pct = |p: f64| times[((times.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0;
        println!(
            "{name:<40} {:>9.1} {:>9.1} {:>9.1} {bytes:>10}",
            pct(0.5),
            pct(0.99),
            pct(1.0)
        );
    }
    // The event stream: time to its first change notice.
    let mut times = Vec::new();
    for _ in 0..args.requests.min(20) {
        let started = Instant::now();
        let mut r = client
            .get(format!("{base}/v1/ui/events"))
            .header("X-Consul-Token", &args.admin)
            .send()
            .await
            .unwrap();
        let chunk = r.chunk().await.unwrap().unwrap_or_default();
        assert!(String::from_utf8_lossy(&chunk).contains("change"));
        times.push(started.elapsed());
    }
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0;
    println!(
        "{:<40} {:>9.1} {:>9.1} {:>9.1}",
        "first change notice (/v1/ui/events)",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    drop(sessions);
}
