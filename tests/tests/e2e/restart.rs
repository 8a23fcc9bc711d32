//! Restarts, upgrades and reloads of the agent while programs use it: a
//! new process takes over the listening sockets (`signpost restart`,
//! SIGUSR2 as the package's upgrade sends it), the old one finishes what
//! it has and exits; `systemctl restart` leaves them in systemd's file
//! descriptor store for the next process (systemd emulated:
//! [`signpost_tests::systemd`]); `SIGHUP` applies a changed
//! `agent.yaml`. Measured with real load generators (wrk, dnsperf) and a
//! real Redis subscription held through the proxy.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use signpost_tests::systemd::{Systemd, socket_inodes};
use signpost_tests::upstream::{Upstream, bind, vip};
use signpost_tests::{AGENT_TOKEN, Agent, ControlPlane, FlipServer, signpost};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _};

/// The agent's YAML: its own VIP range (fixed: a reload cannot move it),
/// and the proxy defaults the reloads change.
fn config(range: &str, retries: u32, timeout_ms: u32) -> String {
    format!(
        "drain_timeout: 2m\ndns:\n  recursors: []\nproxy:\n  vip_range: {range}\n  defaults:\n    retries: {retries}\n    timeout: {timeout_ms}ms\n"
    )
}

fn range() -> String {
    format!("127.75.{}.0/24", rand::random_range(0..=255u8))
}

/// A load generator's run, stopped with SIGINT (both print their
/// figures then).
struct Load {
    child: Child,
    what: &'static str,
}

impl Load {
    fn start(what: &'static str, program: &str, args: &[&str]) -> Load {
        let child = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program} (install it): {e}"));
        Load { child, what }
    }

    fn finish(self) -> String {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT).unwrap();
        let out = self.child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{}:\n{text}", self.what);
        text
    }
}

/// wrk with keep-alive and wrk with a new connection per request on
/// `url`, and dnsperf at a fixed rate on `dns` with `queries` (written to
/// `dir`), until [`UnderLoad::finish`].
struct UnderLoad {
    keep_alive: Load,
    close: Load,
    dnsperf: Load,
}

impl UnderLoad {
    fn start(url: &str, dns: SocketAddr, queries: &str, dir: &Path) -> UnderLoad {
        let file = dir.join("queries.txt");
        std::fs::write(&file, queries).unwrap();
        let (dns_ip, dns_port) = (dns.ip().to_string(), dns.port().to_string());
        let keep_alive = Load::start("wrk, keep-alive", "wrk", &["-t1", "-c8", "-d600s", url]);
        let close = Load::start(
            "wrk, a connection per request",
            "wrk",
            &["-t1", "-c4", "-d600s", "-H", "Connection: close", url],
        );
        let dnsperf = Load::start(
            "dnsperf",
            "dnsperf",
            &[
                "-s",
                &dns_ip,
                "-p",
                &dns_port,
                "-d",
                file.to_str().unwrap(),
                "-l",
                "600",
                "-Q",
                "1000",
                "-t",
                "2",
            ],
        );
        UnderLoad {
            keep_alive,
            close,
            dnsperf,
        }
    }

    /// Stops the load and checks that requests were made and none
    /// failed (a socket error or a non-2xx answer), and that queries were
    /// answered and none was lost.
    fn finish(self) {
        let keep_alive = self.keep_alive.finish();
        let close = self.close.finish();
        let dnsperf = self.dnsperf.finish();
        assert!(wrk_requests("keep-alive", &keep_alive) > 0);
        assert!(wrk_requests("a connection per request", &close) > 0);
        assert!(
            dnsperf.contains("Queries lost:         0 "),
            "queries timed out:\n{dnsperf}"
        );
        assert!(!dnsperf.contains("Queries completed:    0 "), "{dnsperf}");
    }
}

/// wrk's request count, after checking that none failed.
fn wrk_requests(what: &str, out: &str) -> u64 {
    assert!(
        !out.contains("Socket errors") && !out.contains("Non-2xx"),
        "{what}: requests failed:\n{out}"
    );
    out.lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .and_then(|(n, _)| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("{what}: no request count in\n{out}"))
}

/// The serving process's pid, as the agent reports it.
async fn serving_pid(agent: &Agent) -> i32 {
    agent.get("/v1/signpost/status").await.json()["pid"]
        .as_i64()
        .unwrap() as i32
}

fn alive(pid: Pid) -> bool {
    // Signal 0: is it there (a zombie has no /proc/<pid>/exe to read).
    kill(pid, None).is_ok() && std::fs::read_link(format!("/proc/{pid}/exe")).is_ok()
}

async fn gone(agent: &Agent, pid: Pid, what: &str) {
    agent
        .eventually(what, || async { (!alive(pid)).then_some(()) })
        .await;
}

/// `signpost restart`, on the agent: the new process's pid. (Off the
/// test's runtime, which serves the upstreams.)
async fn restart(agent: &Agent) -> i32 {
    let addr = agent.addr.to_string();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || signpost(&["--http-addr", &addr, "restart"]))
            .await
            .unwrap();
    assert_eq!(code, 0, "signpost restart: {out}{err}\n{}", agent.log());
    assert!(out.contains("restarted"), "{out}");
    out.split(['(', ')']).nth(1).unwrap().parse().unwrap()
}

/// `signpost restart`, then waits until the old process (which has no
/// L4 connection to keep) is gone, so that the API answers from the new
/// one only.
async fn restart_and_wait(agent: &mut Agent) {
    let new = restart(agent).await;
    let old = agent.taken_over_by(new);
    gone(
        agent,
        old,
        "the old process, with no connection left, to exit",
    )
    .await;
    assert_eq!(serving_pid(agent).await, new);
}

/// A service file: `web` (HTTP) and the L4 service `tcp` at `addr`.
fn web_and_tcp(web: &Upstream, tcp: &str, addr: SocketAddr) -> String {
    format!(
        "services:\n{}  - name: {tcp}\n    address: {}\n    port: {}\n    protocol: tcp\n",
        web.entry("web", "http"),
        addr.ip(),
        addr.port()
    )
}

/// A Redis subscriber through the VIP, and what it receives.
struct Subscriber {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Subscriber {
    fn start(at: SocketAddr) -> Subscriber {
        let mut child = tokio::process::Command::new("redis-cli")
            .args(["-h", &at.ip().to_string(), "-p", &at.port().to_string()])
            .args(["SUBSCRIBE", "news"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("cannot run redis-cli (install redis-tools)");
        let stdout = child.stdout.take().unwrap();
        Subscriber {
            child,
            lines: tokio::io::BufReader::new(stdout).lines(),
        }
    }

    /// Waits for `message` on the subscription (redis-cli prints each
    /// message as three lines: "message", the channel, the payload).
    async fn receives(&mut self, message: &str) {
        let wait = tokio::time::timeout(signpost_tests::PATIENCE, async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                if line == message {
                    return;
                }
            }
            panic!("the subscription ended before {message:?}");
        });
        wait.await
            .unwrap_or_else(|_| panic!("{message:?} never reached the subscriber"));
    }
}

fn publish(redis: SocketAddr, message: &str) -> String {
    let out = Command::new("redis-cli")
        .args([
            "-h",
            &redis.ip().to_string(),
            "-p",
            &redis.port().to_string(),
        ])
        .args(["PUBLISH", "news", message])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A Redis server on a loopback address of its own.
async fn redis_server(dir: &Path) -> (tokio::process::Child, SocketAddr) {
    let addr = bind(0).await.local_addr().unwrap();
    let child = tokio::process::Command::new("redis-server")
        .args([
            "--bind",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
        ])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir)
        .kill_on_drop(true)
        .stdout(Stdio::null())
        .spawn()
        .expect("cannot run redis-server (install redis-server)");
    (child, addr)
}

/// Under wrk (keep-alive, and a new connection per request) and dnsperf
/// at a fixed rate: `signpost restart`, an upgrade to another program
/// file (replaced as dpkg does, then SIGUSR2 as the package's postinst
/// sends), and 20 reloads that change retries and timeouts fail no
/// request and lose no query; a Redis subscription made through the
/// proxy before the restart still delivers after all of it; each old
/// process exits once its last connection is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs wrk, dnsperf, redis-server and redis-cli"]
async fn restarts_upgrades_and_reloads_under_load_drop_nothing() {
    let work = tempfile::tempdir().unwrap();
    let program = work.path().join("signpost");
    std::fs::copy(signpost_tests::signpost_bin(), &program).unwrap();
    let range = range();
    let mut agent = Agent::start_program(&program, "restart-node", &config(&range, 2, 15000)).await;
    let web = Upstream::start("web", 0).await;
    let (_redis, redis) = redis_server(work.path()).await;
    agent.write_service_file("services.yaml", &web_and_tcp(&web, "cache", redis));
    let web_vip = vip(&agent, "web", web.addr.port()).await;
    let cache_vip = vip(&agent, "cache", redis.port()).await;
    let mut subscriber = Subscriber::start(cache_vip);
    agent
        .eventually("the subscription to be made", || async {
            (publish(redis, "hello") == "1").then_some(())
        })
        .await;
    subscriber.receives("hello").await;

    let load = UnderLoad::start(
        &format!("http://{web_vip}/"),
        agent.dns_addr(),
        "web.service.internal A\ncache.service.internal A\n",
        work.path(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A restart: the new process serves, the old one keeps the
    // subscription's connection (drain_timeout) and nothing else.
    let first = restart(&agent).await;
    let original = agent.taken_over_by(first);
    agent
        .eventually("the new process to answer the API", || async {
            (serving_pid(&agent).await == first).then_some(())
        })
        .await;
    assert!(alive(original), "the old process keeps its L4 connection");

    // An upgrade: the program file is replaced by another one (renamed
    // over it, as dpkg does), and SIGUSR2 restarts into it.
    let upgraded = work.path().join("signpost.new");
    let mut bytes = std::fs::read(&program).unwrap();
    bytes.extend_from_slice(b"\nsignpost test build 2\n");
    std::fs::write(&upgraded, &bytes).unwrap();
    std::fs::set_permissions(
        &upgraded,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::rename(&upgraded, &program).unwrap();
    kill(Pid::from_raw(first), Signal::SIGUSR2).unwrap();
    let second = agent
        .eventually("the upgraded process to serve", || async {
            let pid = serving_pid(&agent).await;
            (pid != first).then_some(pid)
        })
        .await;
    agent.taken_over_by(second);
    let exe = std::fs::read_link(format!("/proc/{second}/exe")).unwrap();
    assert_eq!(exe, program, "the new process runs the new file");
    assert_eq!(std::fs::read(&exe).unwrap(), bytes);
    gone(
        &agent,
        Pid::from_raw(first),
        "the first successor, with no connection left, to exit",
    )
    .await;

    // 20 reloads, each changing retries and the request timeout.
    for n in 1..=20u32 {
        agent.write_config(&config(&range, n % 4, 15000 + n * 100));
        let before = agent
            .metric("signpost_agent_config_reloads_total{result=\"applied\"}")
            .await;
        kill(agent.pid(), Signal::SIGHUP).unwrap();
        agent
            .eventually("the reload to be applied", || async {
                let now = agent
                    .metric("signpost_agent_config_reloads_total{result=\"applied\"}")
                    .await;
                (now > before).then_some(())
            })
            .await;
    }

    load.finish();

    // The subscription made before it all still delivers.
    assert_eq!(publish(redis, "after the restarts"), "1");
    subscriber.receives("after the restarts").await;
    assert!(
        alive(original),
        "the original process still serves the subscription"
    );
    subscriber.child.kill().await.unwrap();
    gone(
        &agent,
        original,
        "the original process to exit once its last connection closed",
    )
    .await;
    assert_eq!(serving_pid(&agent).await, second);
}

/// `systemctl restart` under wrk (keep-alive, and a new connection per
/// request) and dnsperf, with systemd emulated: the agent keeps every
/// socket it serves in the unit's file descriptor store; on SIGTERM it
/// finds the restart job queued for its unit, does not drain the node
/// (which never goes into maintenance), answers DNS until it exits, and
/// the next process, started only then as systemd starts it, serves from
/// the very same sockets: no request fails, no query is lost. An L4
/// connection open at a restart keeps its old process for the grace
/// (3s) at most, then is cut. Without a restart job, SIGTERM drains the
/// node as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs wrk, dnsperf and root (systemd is emulated in a cgroup)"]
async fn a_restart_by_systemd_keeps_the_sockets_and_drops_nothing() {
    // Dropped last: the agent's processes are gone by then.
    let systemd = Systemd::start();
    let cp = ControlPlane::start().await;
    let work = tempfile::tempdir().unwrap();
    let node = "systemd-node";
    let extra = format!(
        "{}{}",
        config(&range(), 2, 15000),
        cp.agent_config(AGENT_TOKEN)
    );
    let mut agent = Agent::start_launched(node, &extra, systemd.launcher()).await;
    let web = Upstream::start("web", 0).await;
    let echo = bind(0).await;
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(signpost_tests::upstream::serve_echo(echo));
    agent.write_service_file("services.yaml", &web_and_tcp(&web, "echo", echo_addr));
    let web_vip = vip(&agent, "web", web.addr.port()).await;
    let echo_vip = vip(&agent, "echo", echo_addr.port()).await;
    let vip_stored = format!("vip {web_vip}").replace(':', "_");
    agent
        .eventually("the VIP's sockets in systemd's store", || async {
            systemd
                .stored()
                .iter()
                .any(|(name, _)| *name == vip_stored)
                .then_some(())
        })
        .await;
    agent
        .eventually("the control plane to know the instance", || async {
            let entries = cp.get("/v1/catalog/service/web").await.json();
            (entries.as_array().map(Vec::len) == Some(1)).then_some(())
        })
        .await;
    let first = agent.pid().as_raw();
    assert!(
        systemd.ready().contains(&(first as u32)),
        "{:?}",
        systemd.messages()
    );

    let load = UnderLoad::start(
        &format!("http://{web_vip}/"),
        agent.dns_addr(),
        "web.service.internal A\n",
        work.path(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Watches the control plane for the node's maintenance meanwhile.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (client, url, watching) = (
            cp.client().clone(),
            cp.url(&format!("/v1/health/node/{node}")),
            watching.clone(),
        );
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while watching.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(answer) = client.get(&url).send().await
                    && let Ok(checks) = answer.json::<serde_json::Value>().await
                {
                    seen.extend(
                        checks
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|c| c["CheckID"] == "_node_maintenance")
                            .cloned(),
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen
        })
    };

    // `systemctl restart`: the job is queued, SIGTERM; systemd starts the
    // unit again once the process has exited.
    let stored = systemd.stored();
    systemd.queue_restart(true);
    let asked = std::time::Instant::now();
    assert_eq!(agent.stop().await, Some(0), "{}", agent.log());
    let stopped = asked.elapsed();
    let old_log = agent.log();
    systemd.queue_restart(false);
    agent.restart().await;
    let serving = asked.elapsed();
    eprintln!("SIGTERM to exit: {stopped:?}; SIGTERM to the next process answering: {serving:?}");
    let second = agent.pid().as_raw();
    assert_ne!(second, first);
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.finish();
    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    let maintenance = watcher.await.unwrap();

    assert!(
        old_log.contains("systemd restarts the agent and keeps its listening sockets"),
        "{old_log}"
    );
    assert!(
        !old_log.contains("draining this node's instances")
            && !old_log.contains("node maintenance mode changed"),
        "{old_log}"
    );
    assert!(maintenance.is_empty(), "maintenance seen: {maintenance:?}");
    assert!(
        systemd.systemctl_calls().contains(&format!(
            "list-jobs --no-legend --plain --no-pager {}",
            systemd.unit
        )),
        "{}",
        systemd.systemctl_calls()
    );
    // The next process serves from the very sockets systemd kept, and
    // the store holds the same ones still.
    let open = socket_inodes(second);
    for (name, inode) in &stored {
        assert!(
            open.contains(inode),
            "{name} (socket {inode}) is not open in the new process"
        );
    }
    for name in ["api", "dns/udp", "dns/tcp", "liveness", vip_stored.as_str()] {
        assert!(stored.iter().any(|(n, _)| n == name), "{name}: {stored:?}");
    }
    let mut before = stored.clone();
    let mut after = systemd.stored();
    before.sort();
    after.sort();
    assert_eq!(before, after);
    agent
        .eventually("the new process to say it is ready", || async {
            systemd.ready().contains(&(second as u32)).then_some(())
        })
        .await;

    // An L4 connection through the proxy keeps the old process for the
    // grace, then is cut; the next process serves the VIP.
    let mut held = echoes(echo_vip, b"before").await;
    systemd.queue_restart(true);
    let asked = std::time::Instant::now();
    assert_eq!(agent.stop().await, Some(0), "{}", agent.log());
    let stopped = asked.elapsed();
    assert!(
        (Duration::from_millis(2500)..Duration::from_secs(8)).contains(&stopped),
        "exited after {stopped:?}\n{}",
        agent.log()
    );
    assert!(agent.log().contains("l4_grace=3s"), "{}", agent.log());
    let mut rest = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(1), held.read_to_end(&mut rest)).await;
    assert!(cut.is_ok(), "the connection was not cut: {cut:?}");
    systemd.queue_restart(false);
    agent.restart().await;
    echoes(echo_vip, b"after").await;

    // No restart job: SIGTERM is a stop for good, and drains the node
    // (once connected: there is nothing to drain otherwise).
    agent
        .eventually("the new process to reach the control plane", || async {
            let status = agent.get("/v1/signpost/status").await.json();
            (status["control_plane"]["connected"] == true).then_some(())
        })
        .await;
    assert_eq!(agent.stop().await, Some(0), "{}", agent.log());
    let log = agent.log();
    assert!(
        log.contains("stopping for good") && log.contains("this node's instances are drained"),
        "{log}"
    );
}

/// A connection to `addr` that echoed `message`.
async fn echoes(addr: SocketAddr, message: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(message).await.unwrap();
    let mut back = vec![0u8; message.len()];
    tokio::time::timeout(signpost_tests::PATIENCE, stream.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, message);
    stream
}

/// A new process that cannot start (here: `agent.yaml` broken since the
/// old one started) leaves the old one serving: `signpost restart`
/// fails and says why, and DNS and the proxy keep answering.
#[tokio::test]
async fn a_restart_whose_new_process_fails_leaves_the_old_one_serving() {
    let range = range();
    let mut agent = Agent::start(&config(&range, 2, 15000)).await;
    let web = Upstream::start("web", 0).await;
    agent.write_service_file(
        "web.yaml",
        &format!("services:\n{}", web.entry("web", "http")),
    );
    let web_vip = vip(&agent, "web", web.addr.port()).await;
    let pid = serving_pid(&agent).await;
    std::fs::write(
        agent.config_path(),
        "proxy:\n  vip_range: [not, a, range]\n",
    )
    .unwrap();
    let (code, out, err) = signpost(&["--http-addr", &agent.addr.to_string(), "restart"]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("ended before taking over"), "{err}");
    assert_eq!(serving_pid(&agent).await, pid);
    let answer = reqwest::get(format!("http://{web_vip}/")).await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), "web");
    // Fixed, the next restart works.
    agent.write_config(&config(&range, 2, 15000));
    restart_and_wait(&mut agent).await;
}

/// Checks keep their status across a restart: a passing check whose
/// endpoint has since failed is still passing in the new process until
/// its own runs say otherwise (failures_before_critical), where without
/// the saved status it would start critical and flap the instance.
#[tokio::test]
async fn checks_keep_their_status_across_a_restart() {
    let agent_config = config(&range(), 2, 15000);
    let mut agent = Agent::start(&agent_config).await;
    let target = FlipServer::start(200).await;
    agent.write_service_file(
        "web.yaml",
        &format!(
            "services:\n  - name: web\n    port: 8080\n    checks:\n      - id: web-http\n        http: {}\n        interval: 1s\n        failures_before_critical: 1000\n",
            target.url()
        ),
    );
    agent.wait_check("web-http", "passing").await;
    target.set(500);
    // Asked of the new process only: the old one, which ran the check,
    // is gone.
    restart_and_wait(&mut agent).await;
    assert_eq!(
        agent.check_status("web-http").await.as_deref(),
        Some("passing")
    );
    let health = agent.get("/v1/health/checks/web").await.json();
    assert_eq!(health[0]["Status"], "passing", "{health}");
}
