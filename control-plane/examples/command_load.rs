//! A load tool for operator commands: opens N real gRPC sessions (TLS,
//! token) as simulated agents, then issues K commands through the control
//! plane's HTTP API (an operator token) one at a time, and measures how
//! long each takes from the API call to every agent's receipt of the
//! command set that holds it. Each simulated agent acknowledges what it
//! received, as a real agent does after applying it.
//!
//!   cargo run --release -p signpost-control-plane --example command_load -- \
//!     --grpc 127.0.0.1:8300 --http 127.0.0.1:8700 --ca ca.pem --agent-token T \
//!     --operator-token S --agents 1000 --commands 50

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use signpost_proto::sync_client::SyncClient;
use signpost_proto::{
    AgentMessage, CommandsApplied, FullState, Hello, agent_message, control_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    grpc: String,
    #[arg(long)]
    http: String,
    #[arg(long)]
    ca: std::path::PathBuf,
    #[arg(long)]
    agent_token: String,
    #[arg(long)]
    operator_token: String,
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    #[arg(long, default_value_t = 50)]
    commands: usize,
    /// Sessions share this many HTTP/2 connections (see sync_load).
    #[arg(long, default_value_t = 64)]
    connections: usize,
}

fn msg(body: agent_message::Body) -> AgentMessage {
    AgentMessage { body: Some(body) }
}

/// When each agent first saw each command id.
type Seen = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

/// The benchmark, as a script: the steps of one run in the order they
/// happen (set up, measure, report), read top to bottom; longer than the
/// project's other functions on purpose.
#[tokio::main]
async fn main() {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let args = Args::parse();
    let ca = std::fs::read(&args.ca).unwrap();
    let host = args.grpc.rsplit_once(':').unwrap().0.to_string();
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
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
    let seen: Seen = Arc::default();
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(args.agents);
    let mut senders = Vec::new();
    for i in 0..args.agents {
        let auth: tonic::metadata::MetadataValue<_> =
            format!("Bearer {}", args.agent_token).parse().unwrap();
        let mut client = SyncClient::with_interceptor(
            channels[i % channels.len()].clone(),
            move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", auth.clone());
                Ok(r)
            },
        );
        let (tx, rx) = mpsc::channel(64);
        tx.send(msg(agent_message::Body::Hello(Hello {
            node: format!("sim-{i}"),
            address: "127.0.0.1".into(),
            ..Hello::default()
        })))
        .await
        .unwrap();
        tx.send(msg(agent_message::Body::FullState(FullState::default())))
            .await
            .unwrap();
        let mut inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let (seen, ready, ack) = (seen.clone(), ready_tx.clone(), tx.clone());
        tokio::spawn(async move {
            let mut first = true;
            let mut known: std::collections::HashSet<String> = Default::default();
            while let Ok(Some(m)) = inbound.message().await {
                let Some(control_message::Body::Commands(set)) = m.body else {
                    continue;
                };
                let now = Instant::now();
                if first {
                    first = false;
                    ready.send(()).await.ok();
                }
                let mut ids = Vec::new();
                for json in &set.commands {
                    let command: serde_json::Value = serde_json::from_str(json).unwrap();
                    let id = command["id"].as_str().unwrap().to_string();
                    if known.insert(id.clone()) {
                        seen.lock()
                            .unwrap()
                            .entry(id.clone())
                            .or_default()
                            .push(now);
                    }
                    ids.push(id);
                }
                let applied = CommandsApplied { ids };
                if ack
                    .send(msg(agent_message::Body::CommandsApplied(applied)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        senders.push(tx);
    }
    for _ in 0..args.agents {
        ready_rx.recv().await;
    }
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut latencies: Vec<Duration> = Vec::new();
    let mut incomplete = 0;
    for n in 0..args.commands {
        let body = serde_json::json!({
            "action": {"kind": "circuit", "state": if n % 2 == 0 { "open" } else { "closed" }},
            "target": {"service": format!("bench-{n}")},
            "reason": "benchmark",
            "ttl": "10m",
        });
        let issued = Instant::now();
        let response = http
            .post(format!("http://{}/v1/commands", args.http))
            .header("X-Consul-Token", &args.operator_token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{}",
            response.text().await.unwrap()
        );
        let command: serde_json::Value = response.json().await.unwrap();
        let id = command["id"].as_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = seen.lock().unwrap().get(&id).map_or(0, Vec::len);
            if got >= args.agents {
                break;
            }
            if Instant::now() > deadline {
                println!("command {n}: only {got} of {} agents in 10s", args.agents);
                incomplete += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let seen = seen.lock().unwrap();
        latencies.extend(
            seen.get(&id)
                .into_iter()
                .flatten()
                .map(|t| t.saturating_duration_since(issued)),
        );
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    println!(
        "agents: {}, commands: {}, deliveries: {}, incomplete: {incomplete}",
        args.agents,
        args.commands,
        latencies.len()
    );
    if !latencies.is_empty() {
        println!(
            "issued (API call) -> received by the agent: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            latencies[latencies.len() - 1].as_secs_f64() * 1e3
        );
    }
    drop(senders);
}
