//! Propagation and failure detection across real hosts: the namespace
//! fleet of `signpost_tests::fleet` (a control plane and one agent per
//! host, each with the packaged configuration), release binaries.
//!
//! - register on A → visible on B: A registers a new instance of `web`
//!   through its API (and deregisters it before the next); each watcher
//!   host holds a blocking query on `/v1/health/service/web` and the time
//!   is taken when it returns with the new instance.
//! - health flip on A → visible on B: the same for A's check going
//!   critical or passing.
//! - host death → failed: a host with an instance loses its link (no FIN,
//!   no reset) and everything on it dies; the time until the control
//!   plane calls it failed, and until B's view shows it critical.
//! - the peer: etcd (`/usr/bin/etcd`, Debian's etcd-server), one member on
//!   the control plane's host; A puts a key through etcd's JSON gateway,
//!   B holds a watch on it, and the time is taken when B's watch stream
//!   delivers the put (matched by revision). Skipped without etcd.
//!
//! Usage (root): `cargo run --release -p signpost-tests --example
//! fleet_bench -- [CHANGES] [WATCHERS] [DEATHS]` (defaults 200, 5, 5).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use std::path::Path;

use serde_json::{Value, json};
use signpost_tests::fleet::{Agent, Fleet, Host};

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .map_or(default, |a| a.parse().expect("arguments are numbers"))
}

/// Watches on `agent`'s host with blocking queries from `index` until
/// `seen` holds for its health entries of `web`; when it did, taken on
/// that host as the answer arrives.
fn watch(
    agent: &Agent,
    mut index: u64,
    seen: impl Fn(&Value) -> bool + Send + 'static,
) -> tokio::task::JoinHandle<Instant> {
    agent.host.spawn(async move {
        let client = http();
        loop {
            let url = format!("http://127.0.0.1:8500/v1/health/service/web?index={index}&wait=30s");
            let r = client.get(url).send().await.unwrap();
            index = r.headers()["X-Consul-Index"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let body: Value = r.json().await.unwrap();
            if seen(&body) {
                return Instant::now();
            }
        }
    })
}

fn has_instance(entries: &Value, id: &str) -> bool {
    entries
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["Service"]["ID"] == id)
}

fn check_is(entries: &Value, id: &str, status: &str) -> bool {
    entries.as_array().unwrap().iter().any(|e| {
        e["Service"]["ID"] == id
            && e["Checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["ServiceID"] == id && c["Status"] == status)
    })
}

/// p50, p99 and max of `samples`, in milliseconds.
fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    format!(
        "{} samples: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        samples.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

/// Makes `change` on A (which says when it started) and times it to each
/// watcher; B first.
async fn propagate(
    watchers: &[Agent],
    change: impl std::future::Future<Output = Instant>,
    seen: impl Fn(&Value) -> bool + Clone + Send + 'static,
) -> Vec<Duration> {
    let mut waits = Vec::new();
    for w in watchers {
        let index = w.get("/v1/health/service/web").await.index();
        waits.push(watch(w, index, seen.clone()));
    }
    let started = change.await;
    let mut times = Vec::new();
    for wait in waits {
        times.push(wait.await.unwrap() - started);
    }
    times
}

/// etcd's row: put on A, watch event on B, `changes` times. One script,
/// as `main` is: start a member, measure, stop it.
async fn etcd(cp: &Host, a: &Host, b: &Host, changes: usize) -> Option<Vec<Duration>> {
    let etcd = Path::new("/usr/bin/etcd");
    if !etcd.exists() {
        println!("etcd: /usr/bin/etcd not found (apt install etcd-server): no peer row");
        return None;
    }
    let client = format!("http://{}:2379", cp.ip);
    let data = cp.dir.join("etcd");
    cp.start_process(
        "etcd",
        etcd,
        &[
            "--name",
            "bench",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "bench=http://127.0.0.1:2380",
        ],
    );
    let health = format!("{client}/health");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !b
        .run({
            let health = health.clone();
            async move {
                http()
                    .get(health)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await
    {
        assert!(
            Instant::now() < deadline,
            "etcd did not start:\n{}",
            cp.log("etcd")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The key "bench" and the value "v", base64 as the gateway wants them.
    const KEY: &str = "YmVuY2g=";
    const VALUE: &str = "dg==";
    // B's watch: every event's revision, with when it arrived on B.
    let (events, mut arrived) = tokio::sync::mpsc::unbounded_channel::<(i64, Instant)>();
    let url = format!("{client}/v3/watch");
    b.spawn(async move {
        let mut r = http()
            .post(url)
            .body(json!({"create_request": {"key": KEY}}).to_string())
            .send()
            .await
            .unwrap();
        let mut pending = Vec::new();
        // Until etcd stops (then the stream breaks off).
        while let Ok(Some(chunk)) = r.chunk().await {
            let now = Instant::now();
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let Ok(message) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                for event in message["result"]["events"].as_array().into_iter().flatten() {
                    let revision = event["kv"]["mod_revision"]
                        .as_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    if events.send((revision, now)).is_err() {
                        return;
                    }
                }
            }
        }
    });
    // Let the watch be created before the first put.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let put = format!("{client}/v3/kv/put");
    let on_a = http();
    let mut times = Vec::new();
    for _ in 0..changes {
        let (put, on_a) = (put.clone(), on_a.clone());
        let (revision, started): (i64, Instant) = a
            .run(async move {
                let request = on_a
                    .post(put)
                    .body(json!({"key": KEY, "value": VALUE}).to_string());
                let started = Instant::now();
                let r: Value = request.send().await.unwrap().json().await.unwrap();
                let revision = r["header"]["revision"].as_str().unwrap().parse().unwrap();
                (revision, started)
            })
            .await;
        loop {
            let (seen, at) = arrived.recv().await.expect("the etcd watch ended");
            if seen == revision {
                times.push(at - started);
                break;
            }
        }
    }
    cp.kill_process("etcd");
    Some(times)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A `PUT` on A's API with `client` (made once: making one costs more than
/// the change), run on A; when it started, taken there just before it is
/// sent.
async fn put_on_a(
    a: &Agent,
    client: &reqwest::Client,
    path: String,
    body: Option<Value>,
) -> Instant {
    let client = client.clone();
    a.host
        .run(async move {
            let mut request = client.put(format!("http://127.0.0.1:8500{path}"));
            if let Some(body) = body {
                request = request.body(body.to_string());
            }
            let started = Instant::now();
            let r = request.send().await.unwrap();
            assert!(r.status().is_success(), "{path}: {}", r.status());
            started
        })
        .await
}

/// The benchmark, as a script: the steps of one run in the order they
/// happen (set up, measure, report), read top to bottom; longer than the
/// project's other functions on purpose.
#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let changes = arg(1, 200);
    let watcher_count = arg(2, 5).max(1);
    let deaths = arg(3, 5);
    let fleet = Fleet::new();
    let cp = fleet.control_plane(&[]).await;
    let a = fleet.agent("a", &cp, cp.grpc, "").await;
    let mut watchers = Vec::new();
    for i in 0..watcher_count {
        let name = format!("{}", (b'b' + i as u8) as char);
        watchers.push(fleet.agent(&name, &cp, cp.grpc, "upstreams: [web]\n").await);
    }
    let b = &watchers[0];
    println!(
        "fleet: control plane + {} agent hosts (namespaces, packaged configuration)",
        watcher_count + 1
    );
    let ttl = |id: &str| {
        json!({"ID": id, "Name": "web", "Port": 8080,
        "Check": {"TTL": "10m", "Status": "passing"}})
    };

    // Register on A -> visible on the watchers.
    let mut on_b = Vec::new();
    let mut on_all = Vec::new();
    let on_a = http();
    a.register(ttl("web-0")).await;
    for i in 1..=changes {
        let id = format!("web-{i}");
        let register = put_on_a(
            &a,
            &on_a,
            "/v1/agent/service/register".to_string(),
            Some(ttl(&id)),
        );
        let seen_id = id.clone();
        let times = propagate(&watchers, register, move |e| has_instance(e, &seen_id)).await;
        on_b.push(times[0]);
        on_all.extend(times);
        // Gone again before the next, so every change is alike.
        let gone = put_on_a(
            &a,
            &on_a,
            format!("/v1/agent/service/deregister/{id}"),
            None,
        );
        propagate(&watchers, gone, move |e| !has_instance(e, &id)).await;
    }
    println!("register on A -> visible on B: {}", summary(&mut on_b));
    println!(
        "register on A -> visible on each of {watcher_count} watchers: {}",
        summary(&mut on_all)
    );

    // Health flips of web-0 on A.
    let mut on_b = Vec::new();
    let mut on_all = Vec::new();
    for i in 0..changes {
        let (verb, status) = if i % 2 == 0 {
            ("fail", "critical")
        } else {
            ("pass", "passing")
        };
        let flip = put_on_a(
            &a,
            &on_a,
            format!("/v1/agent/check/{verb}/service:web-0"),
            None,
        );
        let times = propagate(&watchers, flip, move |e| check_is(e, "web-0", status)).await;
        on_b.push(times[0]);
        on_all.extend(times);
    }
    println!("health flip on A -> visible on B: {}", summary(&mut on_b));
    println!(
        "health flip on A -> visible on each of {watcher_count} watchers: {}",
        summary(&mut on_all)
    );

    // The peer: the same kind of change through etcd.
    if let Some(mut etcd) = etcd(&cp.host, &a.host, &b.host, changes).await {
        println!("etcd put on A -> watch event on B: {}", summary(&mut etcd));
    }

    // Host deaths.
    let mut failed = Vec::new();
    let mut critical_on_b = Vec::new();
    for k in 0..deaths {
        let name = format!("dead{k}");
        let dying = fleet.agent(&name, &cp, cp.grpc, "").await;
        dying.register(ttl(&format!("web-{name}"))).await;
        b.eventually("the dying host's instance on b", || async {
            (b.check_status("web", &name, "serfHealth").await.as_deref() == Some("passing"))
                .then_some(())
        })
        .await;
        let died = Instant::now();
        dying.host.power_off();
        let mut failed_at = None;
        let mut critical_at = None;
        while failed_at.is_none() || critical_at.is_none() {
            if failed_at.is_none() && cp.status(&name).await.as_deref() == Some("failed") {
                failed_at = Some(died.elapsed());
            }
            if critical_at.is_none()
                && b.check_status("web", &name, "serfHealth").await.as_deref() == Some("critical")
            {
                critical_at = Some(died.elapsed());
            }
            assert!(
                died.elapsed() < Duration::from_secs(120),
                "{name} never failed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        failed.push(failed_at.unwrap());
        critical_on_b.push(critical_at.unwrap());
    }
    if deaths > 0 {
        let list = |d: &[Duration]| {
            d.iter()
                .map(|d| format!("{:.2}", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "host death -> failed on the control plane (s): {}",
            list(&failed)
        );
        println!("host death -> critical on B (s): {}", list(&critical_on_b));
    }
}
