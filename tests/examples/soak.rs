//! A soak: a control plane and two agents (release binaries, loopback)
//! under churn, load and floods for a while, with their memory and open
//! file descriptors sampled every 10 s.
//!
//! - churn on agent A: a service registered and deregistered every
//!   100 ms (50 names), a TTL check of `flappy` flipped every 200 ms, an
//!   operator command (a harmless timeout policy on `web`) created and
//!   revoked every 5 s;
//! - load on agent B (well-behaved clients, every failure counted): 8 HTTP
//!   clients through B's proxy to `web` (two instances on A's side), and
//!   DNS queries for `web` and `flappy` over UDP;
//! - floods every 10 s (misbehaving clients, not counted): 300 connections
//!   that never send a byte to the VIP, to B's API and to B's DNS over
//!   TCP, held until the agent closes them.
//!
//! Prints a line per sample (RSS in MiB and open descriptors of each
//! process) and a summary: requests and queries made and failed, and the
//! growth of RSS and descriptors from the first sample after warm-up
//! (60 s) to the last.
//!
//! Usage: `cargo run --release -p signpost-tests --example soak --
//! [SECONDS]` (default 600); `bench/soak.sh` wraps it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use serde_json::json;
use signpost_tests::upstream::{Upstream, client, proxy_config, vip};
use signpost_tests::{AGENT_TOKEN, Agent, ControlPlane};

const WARM_UP: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    failed_requests: AtomicU64,
    queries: AtomicU64,
    failed_queries: AtomicU64,
    churn: AtomicU64,
    churn_failed: AtomicU64,
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// One UDP query; whether a NOERROR answer with records came back.
async fn dns_ok(server: SocketAddr, name: &str, id: u16) -> bool {
    let mut message = Message::query();
    message.metadata.id = id;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(&message.to_vec().unwrap(), server)
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf)).await
    else {
        return false;
    };
    Message::from_vec(&buf[..n])
        .is_ok_and(|m| m.metadata.response_code == ResponseCode::NoError && !m.answers.is_empty())
}

/// Opens `n` connections to `addr` that never send anything and holds
/// them until the other end closes them (or 60 s pass).
fn flood(addr: SocketAddr, n: usize) {
    tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..n {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
                    .await
            {
                held.push(s);
            }
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(held);
    });
}

/// Well-behaved HTTP clients through B's proxy to `web`, each failure
/// counted.
fn http_load(
    counts: &Arc<Counts>,
    stop: &Arc<AtomicBool>,
    vip: SocketAddr,
    port: u16,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..8)
        .map(|_| {
            let (counts, stop) = (counts.clone(), stop.clone());
            let http = client("web.service.internal", vip);
            let url = format!("http://web.service.internal:{port}/");
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    counts.requests.fetch_add(1, Ordering::Relaxed);
                    let ok = matches!(http.get(&url).send().await, Ok(r) if r.status() == 200);
                    if !ok {
                        counts.failed_requests.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect()
}

/// A well-behaved DNS client asking B for `web` and `flappy` in a loop,
/// each failure counted.
fn dns_load(
    counts: &Arc<Counts>,
    stop: &Arc<AtomicBool>,
    dns: SocketAddr,
) -> tokio::task::JoinHandle<()> {
    let (counts, stop) = (counts.clone(), stop.clone());
    tokio::spawn(async move {
        let mut id = 0u16;
        while !stop.load(Ordering::Relaxed) {
            for name in ["web.service.internal.", "flappy.service.internal."] {
                id = id.wrapping_add(1);
                counts.queries.fetch_add(1, Ordering::Relaxed);
                if !dns_ok(dns, name, id).await {
                    counts.failed_queries.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    })
}

/// Churn on agent A every 100 ms: registrations and deregistrations, TTL
/// flips, and a policy command created and revoked on the control plane.
fn churn(
    counts: &Arc<Counts>,
    stop: &Arc<AtomicBool>,
    a_base: String,
    cp_http: SocketAddr,
    admin: String,
) -> tokio::task::JoinHandle<()> {
    let (counts, stop) = (counts.clone(), stop.clone());
    tokio::spawn(async move {
        let http = signpost_tests::api_client().build().unwrap();
        let mut n = 0u64;
        let mut command: Option<String> = None;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let name = format!("churn-{}", n % 50);
            let register = json!({"ID": name, "Name": name, "Port": 1000 + n % 50,
                "Check": {"TTL": "1h", "Status": "passing"}});
            let mut calls = vec![
                http.put(format!("{a_base}/v1/agent/service/register"))
                    .json(&register),
                http.put(format!(
                    "{a_base}/v1/agent/service/deregister/churn-{}",
                    (n + 25) % 50
                )),
            ];
            if n.is_multiple_of(2) {
                let flip = if n.is_multiple_of(4) { "fail" } else { "pass" };
                calls.push(http.put(format!("{a_base}/v1/agent/check/{flip}/flappy-ttl")));
            }
            for call in calls {
                counts.churn.fetch_add(1, Ordering::Relaxed);
                // A deregistration of a name not registered yet is a 404.
                if !matches!(call.send().await, Ok(r) if r.status().is_success() || r.status() == 404)
                {
                    counts.churn_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            if n.is_multiple_of(50) {
                counts.churn.fetch_add(1, Ordering::Relaxed);
                let ok = match command.take() {
                    Some(id) => http
                        .delete(format!("http://{cp_http}/v1/commands/{id}"))
                        .header("X-Consul-Token", &admin)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success()),
                    None => {
                        let created = http
                            .post(format!("http://{cp_http}/v1/commands"))
                            .header("X-Consul-Token", &admin)
                            .json(
                                &json!({"action": {"kind": "policy", "policy": {"timeout": "30s"}},
                                "target": {"service": "web"}, "reason": "soak", "ttl": "10m"}),
                            )
                            .send()
                            .await;
                        match created {
                            Ok(r) if r.status().is_success() => {
                                let body: serde_json::Value = r.json().await.unwrap_or_default();
                                command = body["id"].as_str().map(str::to_string);
                                command.is_some()
                            }
                            _ => false,
                        }
                    }
                };
                if !ok {
                    counts.churn_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// The soak, as a script: start, load, sample every 10 s, report; read
/// top to bottom.
#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .map_or(600, |a| a.parse().expect("SECONDS is a number"));
    let cp = ControlPlane::start().await;
    let join = cp.agent_config(AGENT_TOKEN);
    let a = Agent::start_named("soak-a", &format!("{join}{}", proxy_config(""))).await;
    let b = Agent::start_named(
        "soak-b",
        &format!("{join}upstreams: [web, flappy]\n{}", proxy_config("")),
    )
    .await;

    let web1 = Upstream::start("web-1", 0).await;
    let web2 = Upstream::start("web-2", web1.addr.port()).await;
    a.write_service_file(
        "web.yaml",
        &format!(
            "services:\n{}{}",
            web1.entry("web", "http"),
            web2.entry("web", "http")
        ),
    );
    let r = a
        .put(
            "/v1/agent/service/register",
            Some(
                json!({"ID": "flappy", "Name": "flappy", "Port": 9, "Address": "127.0.0.9",
                "Check": {"CheckID": "flappy-ttl", "TTL": "1h", "Status": "passing"}}),
            ),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    let web_vip = vip(&b, "web", web1.addr.port()).await;
    let admin = std::fs::read_to_string(cp.dir.path().join("data").join("bootstrap-token"))
        .unwrap()
        .trim()
        .to_string();

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = http_load(&counts, &stop, web_vip, web1.addr.port());
    tasks.push(dns_load(&counts, &stop, b.dns_addr()));
    tasks.push(churn(&counts, &stop, a.base(), cp.http, admin));

    let pids = [
        ("cp", cp.pid()),
        ("agent-a", a.pid().as_raw() as u32),
        ("agent-b", b.pid().as_raw() as u32),
    ];
    println!(
        "{:>6}  {}",
        "t (s)",
        pids.iter()
            .map(|(n, _)| format!("{n:>9} MiB {n:>9} fds"))
            .collect::<Vec<_>>()
            .join("  ")
    );
    let start = Instant::now();
    let mut after_warm_up: Option<Vec<(f64, usize)>> = None;
    let mut last = Vec::new();
    while start.elapsed() < Duration::from_secs(seconds) {
        flood(web_vip, 300);
        flood(b.addr, 300);
        flood(b.dns_addr(), 300);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let sample: Vec<(f64, usize)> = pids.iter().map(|(_, p)| (rss_mib(*p), fds(*p))).collect();
        println!(
            "{:>6}  {}",
            start.elapsed().as_secs(),
            sample
                .iter()
                .map(|(rss, fd)| format!("{rss:>13.1} {fd:>13}"))
                .collect::<Vec<_>>()
                .join("  ")
        );
        if after_warm_up.is_none() && start.elapsed() >= WARM_UP {
            after_warm_up = Some(sample.clone());
        }
        last = sample;
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
    println!(
        "requests: {} made, {} failed; DNS queries: {} made, {} failed; churn calls: {} made, {} failed",
        c(&counts.requests),
        c(&counts.failed_requests),
        c(&counts.queries),
        c(&counts.failed_queries),
        c(&counts.churn),
        c(&counts.churn_failed)
    );
    if let Some(first) = after_warm_up {
        for ((name, _), ((rss0, fd0), (rss1, fd1))) in pids.iter().zip(first.iter().zip(&last)) {
            println!(
                "{name}: RSS {rss0:.1} -> {rss1:.1} MiB ({:+.1}), descriptors {fd0} -> {fd1} ({:+})",
                rss1 - rss0,
                *fd1 as i64 - *fd0 as i64
            );
        }
    }
}
