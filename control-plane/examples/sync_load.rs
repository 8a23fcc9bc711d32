//! A load tool for the control plane: opens N real gRPC sessions (TLS,
//! token) as simulated agents subscribed to one service, then has one more
//! session flip that service's check K times, and measures how long each
//! change takes to reach every subscriber and how many bytes each receives.
//!
//!   cargo run --release -p signpost-control-plane --example sync_load -- \
//!     --grpc 127.0.0.1:8300 --ca ca.pem --token T --agents 2000 --changes 50
//!
//! With several `--grpc` (replicas sharing a store), the publisher is on
//! the first and the subscribers are spread over the others (over all of
//! them if there is one).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use signpost_core::model::Health;
use signpost_proto::sync_client::SyncClient;
use signpost_proto::{
    AgentMessage, Check, Delta, FullState, Hello, Instance, Subscribe, agent_message,
    control_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

#[derive(Parser)]
struct Args {
    /// A replica's gRPC address (repeat for several).
    #[arg(long, required = true)]
    grpc: Vec<String>,
    #[arg(long)]
    ca: std::path::PathBuf,
    #[arg(long)]
    token: String,
    #[arg(long, default_value_t = 50)]
    agents: usize,
    #[arg(long, default_value_t = 50)]
    changes: u64,
    /// Sessions share this many HTTP/2 connections (a real agent has one
    /// each; thousands of TLS connections from one process are what the
    /// file-descriptor limit allows).
    #[arg(long, default_value_t = 64)]
    connections: usize,
}

const SERVICE: &str = "bench-svc";

fn msg(body: agent_message::Body) -> AgentMessage {
    AgentMessage { body: Some(body) }
}

fn instance(status: Health) -> Instance {
    let mut check = Check {
        id: "service:bench-1".into(),
        name: "bench".into(),
        ..Check::default()
    };
    check.set_health(status);
    Instance {
        id: "bench-1".into(),
        name: SERVICE.into(),
        address: "127.0.0.1".into(),
        port: 9000,
        checks: vec![check],
        weight_passing: 1,
        weight_warning: 1,
        ..Instance::default()
    }
}

async fn open(
    channel: Channel,
    token: &str,
    node: String,
) -> (
    mpsc::Sender<AgentMessage>,
    tonic::Streaming<signpost_proto::ControlMessage>,
) {
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut client = SyncClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", auth.clone());
        Ok(r)
    });
    let (tx, rx) = mpsc::channel(64);
    tx.send(msg(agent_message::Body::Hello(Hello {
        node,
        address: "127.0.0.1".into(),
        ..Hello::default()
    })))
    .await
    .unwrap();
    tx.send(msg(agent_message::Body::FullState(FullState::default())))
        .await
        .unwrap();
    let inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, inbound)
}

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
    // Channels to each replica; subscribers use those of the replicas
    // after the first (the publisher's), when there are several.
    let mut by_replica: Vec<Vec<Channel>> = Vec::new();
    let per_replica = (args.connections / args.grpc.len()).max(1);
    for grpc in &args.grpc {
        let host = grpc.rsplit_once(':').unwrap().0.to_string();
        let mut channels = Vec::new();
        for _ in 0..per_replica {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca))
                .domain_name(host.clone());
            let channel = Endpoint::from_shared(format!("https://{grpc}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            channels.push(channel);
        }
        by_replica.push(channels);
    }
    let publisher_channel = by_replica[0][0].clone();
    let channels: Vec<Channel> = if by_replica.len() > 1 {
        by_replica[1..].iter().flatten().cloned().collect()
    } else {
        by_replica[0].clone()
    };
    // index -> (sent at, receipts, bytes)
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let received: Arc<Mutex<Vec<(u64, Instant, usize)>>> = Arc::default();
    let mut senders = Vec::new();
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(args.agents);
    for i in 0..args.agents {
        let (tx, mut inbound) = open(
            channels[i % channels.len()].clone(),
            &args.token,
            format!("sim-{i}"),
        )
        .await;
        tx.send(msg(agent_message::Body::Subscribe(Subscribe {
            services: [(SERVICE.to_string(), 0)].into(),
        })))
        .await
        .unwrap();
        let (received, ready) = (received.clone(), ready_tx.clone());
        tokio::spawn(async move {
            let mut first = true;
            while let Ok(Some(m)) = inbound.message().await {
                if let Some(control_message::Body::Update(u)) = &m.body {
                    if first {
                        first = false;
                        ready.send(()).await.ok();
                        continue;
                    }
                    let bytes = prost::Message::encoded_len(&m);
                    received
                        .lock()
                        .unwrap()
                        .push((u.index, Instant::now(), bytes));
                }
            }
        });
        senders.push(tx);
    }
    let (publisher, mut pub_in) =
        open(publisher_channel, &args.token, "sim-publisher".into()).await;
    tokio::spawn(async move { while let Ok(Some(_)) = pub_in.message().await {} });
    // Every subscriber got its (empty) snapshot before the first change.
    publisher
        .send(msg(agent_message::Body::Delta(Delta {
            upserts: vec![instance(Health::Passing)],
            ..Delta::default()
        })))
        .await
        .unwrap();
    for _ in 0..args.agents {
        ready_rx.recv().await;
    }
    // A line for the script to count the store's writes of the
    // registrations apart from the flips'.
    println!("registered: {} agents and the publisher", args.agents);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    received.lock().unwrap().clear();
    let mut last_index_seen = 0u64;
    for n in 0..args.changes {
        let status = if n % 2 == 0 {
            Health::Critical
        } else {
            Health::Passing
        };
        let at = Instant::now();
        publisher
            .send(msg(agent_message::Body::Delta(Delta {
                upserts: vec![instance(status)],
                ..Delta::default()
            })))
            .await
            .unwrap();
        // Wait for every subscriber to see this change (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = {
                let r = received.lock().unwrap();
                let newest = r.iter().map(|(i, _, _)| *i).max().unwrap_or(0);
                let count = r
                    .iter()
                    .filter(|(i, _, _)| *i == newest && newest > last_index_seen)
                    .count();
                (newest, count)
            };
            if got.1 >= args.agents {
                sent.lock().unwrap().insert(got.0, at);
                last_index_seen = got.0;
                break;
            }
            if Instant::now() > deadline {
                println!(
                    "change {n}: only {} of {} agents in 10s",
                    got.1, args.agents
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = sent.lock().unwrap();
    let received = received.lock().unwrap();
    let mut latencies: Vec<Duration> = received
        .iter()
        .filter_map(|(i, t, _)| sent.get(i).map(|s| t.saturating_duration_since(*s)))
        .collect();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    let bytes: usize = received.iter().map(|(_, _, b)| *b).sum();
    println!(
        "agents: {}, changes measured: {}, deliveries: {}",
        args.agents,
        sent.len(),
        latencies.len()
    );
    if !latencies.is_empty() {
        println!(
            "propagation (publisher send -> subscriber receive): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            latencies[latencies.len() - 1].as_secs_f64() * 1e3
        );
        println!(
            "bytes per agent per change (protobuf message): {:.0}",
            bytes as f64 / latencies.len() as f64
        );
    }
    drop(senders);
}
