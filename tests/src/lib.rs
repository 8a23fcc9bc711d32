//! End-to-end test support: start the real `signpost` binary on its own
//! loopback address, talk to it over HTTP like a user, and stop, kill or
//! restart it.
//!
//! Each [`Agent`] gets a random 127.x.y.z address (all of 127.0.0.0/8 is
//! local on Linux) and a free port on it, its own temporary data and
//! service directories, and is killed when dropped.
//!
//! What crosses hosts runs in [`fleet`]: one network namespace per host,
//! each agent with the packaged configuration.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;

pub mod fleet;

/// Upper bound for things that should happen "soon"; a test that reaches
/// it fails. It is a safety net, not a speed assertion.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `f` every 50 ms until it returns `Some`; fails after `patience`
/// with `what` and what `context` says (a log).
pub async fn poll<T, F, Fut>(
    what: &str,
    patience: Duration,
    context: impl Fn() -> String,
    mut f: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `signpost` binary, built on first use so that `cargo test` alone
/// works from a clean checkout.
pub fn signpost_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| bin_dir().join("signpost"))
}

fn bin_dir() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/<test-binary>
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut build = Command::new(cargo);
        build.args([
            "build",
            "-q",
            "-p",
            "signpost-agent",
            "-p",
            "signpost-control-plane",
            "--bins",
        ]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        // The variables cargo sets for this test process (CARGO_PKG_*,
        // CARGO_MANIFEST_DIR, ...) would make build scripts rerun and the
        // outer and inner builds rebuild each other's crates.
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| {
                k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR"
            }) {
                build.env_remove(key);
            }
        }
        if let Some(target) = profile_dir.parent() {
            build.env("CARGO_TARGET_DIR", target);
        }
        let status = build.status().expect("cannot run cargo to build signpost");
        assert!(status.success(), "building the signpost binary failed");
        profile_dir
    })
}

/// The `signpost-control-plane` binary (built with `signpost`).
pub fn control_plane_bin() -> PathBuf {
    bin_dir().join("signpost-control-plane")
}

/// A random loopback address with a free port on it.
pub fn free_addr() -> SocketAddr {
    loop {
        // Never inside 127.77.0.0/16, the agents' default VIP range.
        let ip = Ipv4Addr::new(
            127,
            rand::random_range(78..250),
            rand::random(),
            rand::random_range(1..255),
        );
        if let Ok(listener) = TcpListener::bind((ip, 0)) {
            return listener.local_addr().unwrap();
        }
    }
}

/// Waits until `url` answers 200 from the process `child` (named `what`);
/// fails with its log if it exits first or never answers.
async fn wait_answering(
    child: &mut Child,
    client: &reqwest::Client,
    url: &str,
    what: &str,
    log: &Path,
) {
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited with {status} before answering:\n{}", log());
        }
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not answer:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A client for Signpost's HTTP APIs: no proxy, and idle connections
/// dropped after 500 ms, well within the APIs' `header_timeout` (which
/// also closes idle keep-alive connections, at most 1 s in these tests),
/// as a client of any server that closes idle connections should: a
/// request sent on a connection the server is closing fails.
pub fn api_client() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .pool_idle_timeout(Duration::from_millis(500))
}

/// `yaml` with `line` added first to its top-level `section`, which is
/// made if it has none.
fn with_line(yaml: &str, section: &str, line: &str) -> String {
    let header = format!("{section}:\n");
    match yaml.find(&header) {
        Some(at) if at == 0 || yaml[..at].ends_with('\n') => {
            let (head, tail) = yaml.split_at(at + header.len());
            format!("{head}  {line}\n{tail}")
        }
        _ if yaml.is_empty() || yaml.ends_with('\n') => format!("{yaml}{header}  {line}\n"),
        _ => format!("{yaml}\n{header}  {line}\n"),
    }
}

/// A running `signpost agent`.
pub struct Agent {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub node: String,
    extra_config: String,
    http: reqwest::Client,
}

impl Agent {
    /// Starts an agent; `extra_config` is appended to its YAML config
    /// (e.g. "checks:\n  enable_exec: true\n").
    pub async fn start(extra_config: &str) -> Agent {
        Self::start_named("test-node", extra_config).await
    }

    /// Starts an agent whose node is called `node`.
    pub async fn start_named(node: &str, extra_config: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("services.d")).unwrap();
        rustls::crypto::ring::default_provider()
            .install_default()
            .ok();
        let addr = free_addr();
        let mut agent = Agent {
            child: None,
            addr,
            dir,
            node: node.to_string(),
            extra_config: extra_config.to_string(),
            http: api_client().build().unwrap(),
        };
        agent.spawn().await;
        agent
    }

    pub fn services_dir(&self) -> PathBuf {
        self.dir.path().join("services.d")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.yaml")
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The agent's DNS server: port 8600 on the agent's own loopback
    /// address.
    pub fn dns_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr.ip(), 8600)
    }

    async fn spawn(&mut self) {
        // `dns.listen` and `api.listen` go into the test's own `dns:` and
        // `api:` sections, if any.
        let extra = with_line(
            &self.extra_config,
            "dns",
            &format!("listen: {}", self.dns_addr()),
        );
        let extra = with_line(&extra, "api", &format!("listen: {}", self.addr));
        let config = format!(
            "node_name: {}\ndata_dir: {}\nservices_dir: {}\nadvertise_addr: {}\n{}",
            self.node,
            self.data_dir().display(),
            self.services_dir().display(),
            self.addr.ip(),
            extra
        );
        std::fs::write(self.config_path(), config).unwrap();
        let log = std::fs::File::create(self.dir.path().join("agent.log")).unwrap();
        let child = Command::new(signpost_bin())
            .args(["agent", "--config"])
            .arg(self.config_path())
            .env("RUST_LOG", "signpost_agent=debug,info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start signpost");
        self.child = Some(child);
        let url = format!("{}/v1/agent/self", self.base());
        let log = self.dir.path().join("agent.log");
        wait_answering(
            self.child.as_mut().unwrap(),
            &self.http,
            &url,
            "agent",
            &log,
        )
        .await;
    }

    /// The agent's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The agent's process ID.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    /// SIGTERM, then waits for the exit; returns the exit code.
    pub async fn stop(&mut self) -> Option<i32> {
        kill(self.pid(), Signal::SIGTERM).unwrap();
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "agent did not stop on SIGTERM");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL (no chance to flush anything).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// Stops (SIGTERM) and starts again on the same address and directories.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.stop().await;
        }
        self.spawn().await;
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        kill(self.pid(), Signal::SIGTERM).unwrap();
    }

    /// Waits for the process to exit after a signal; returns its code.
    pub async fn wait_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "agent did not exit");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn get(&self, path: &str) -> Response {
        Response::from(
            self.http
                .get(format!("{}{path}", self.base()))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn put(&self, path: &str, body: Option<Value>) -> Response {
        let mut request = self.http.put(format!("{}{path}", self.base()));
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        Response::from(request.send().await.unwrap()).await
    }

    /// The value of one sample in `/metrics`, e.g.
    /// `signpost_agent_check_fast_rechecks_total{outcome="blip"}`; 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").await.text;
        text.lines()
            .find_map(|line| {
                line.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }

    /// Writes a service file into the watched directory atomically (as
    /// editors and config management do).
    pub fn write_service_file(&self, name: &str, content: &str) {
        let tmp = self.services_dir().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, self.services_dir().join(name)).unwrap();
    }

    /// Polls `f` until it returns `Some`, or fails after [`PATIENCE`].
    pub async fn eventually<T, F, Fut>(&self, what: &str, f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        poll(what, PATIENCE, || format!("agent log:\n{}", self.log()), f).await
    }

    /// The status of one check as `/v1/agent/checks` shows it.
    pub async fn check_status(&self, id: &str) -> Option<String> {
        let checks = self.get("/v1/agent/checks").await.json();
        checks
            .get(id)
            .map(|c| c["Status"].as_str().unwrap().to_string())
    }

    /// Waits until check `id` has `status`.
    pub async fn wait_check(&self, id: &str, status: &str) {
        self.eventually(&format!("check {id} to be {status}"), || async {
            (self.check_status(id).await.as_deref() == Some(status)).then_some(())
        })
        .await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A response read whole.
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Response {
    async fn from(r: reqwest::Response) -> Response {
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        Response {
            status,
            headers,
            text,
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }

    pub fn index(&self) -> u64 {
        self.headers
            .get("X-Consul-Index")
            .unwrap_or_else(|| panic!("no X-Consul-Index header"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// Runs `signpost` with arguments (a CLI command) and returns (code, stdout, stderr).
pub fn signpost(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(signpost_bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A local HTTP server whose `/health` answers with the status the test
/// sets, counting requests.
pub struct FlipServer {
    pub addr: SocketAddr,
    pub status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    pub hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FlipServer {
    pub async fn start(status: u16) -> FlipServer {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
        let code = Arc::new(AtomicU16::new(status));
        let hits = Arc::new(AtomicUsize::new(0));
        let (c, h) = (code.clone(), hits.clone());
        let app = axum::Router::new().route(
            "/health",
            axum::routing::any(move || {
                let (c, h) = (c.clone(), h.clone());
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    let code = axum::http::StatusCode::from_u16(c.load(Ordering::SeqCst)).unwrap();
                    (code, format!("status {}", code.as_u16()))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind((free_addr().ip(), 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FlipServer {
            addr,
            status: code,
            hits,
            task,
        }
    }

    pub fn set(&self, status: u16) {
        self.status
            .store(status, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("http://{}/health", self.addr)
    }

    /// Stops accepting and closes the listener (the service "dies").
    pub fn kill(&self) {
        self.task.abort();
    }
}

/// The token test control planes accept.
pub const AGENT_TOKEN: &str = "test-agent-token-0123456789";

/// A running `signpost-control-plane` with its own CA (made by `init-tls`).
pub struct ControlPlane {
    child: Option<Child>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub dir: tempfile::TempDir,
    client: reqwest::Client,
}

impl ControlPlane {
    pub async fn start() -> ControlPlane {
        Self::start_with("").await
    }

    /// Starts a control plane; `extra_config` is appended to its YAML
    /// configuration (top-level sections other than `grpc` and `http`).
    pub async fn start_with(extra_config: &str) -> ControlPlane {
        rustls::crypto::ring::default_provider()
            .install_default()
            .ok();
        let dir = tempfile::tempdir().unwrap();
        let (grpc, http) = (free_addr(), free_addr());
        let config = dir.path().join("control-plane.yaml");
        std::fs::write(
            &config,
            format!(
                "data_dir: {}\nagent_tokens: [{AGENT_TOKEN}]\ngrpc:\n  listen: {grpc}\nhttp:\n  listen: {http}\n{extra_config}",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let out = Command::new(control_plane_bin())
            .arg("--config")
            .arg(&config)
            .args([
                "init-tls",
                "--name",
                "localhost",
                "--name",
                &grpc.ip().to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init-tls failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cp = ControlPlane {
            child: None,
            grpc,
            http,
            dir,
            client: api_client().build().unwrap(),
        };
        cp.spawn().await;
        cp
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("data").join("tls").join("ca.pem")
    }

    /// The agent configuration that joins this control plane with `token`.
    pub fn agent_config(&self, token: &str) -> String {
        format!(
            // A generous first-lookup wait: it ends as soon as the snapshot
            // comes, and a loaded test machine must not make it miss.
            "control_plane:\n  addresses: [\"{}\"]\n  ca_file: {}\n  token: {token}\n  first_lookup_wait: 10s\n",
            self.grpc,
            self.ca_file().display()
        )
    }

    async fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("control-plane.log")).unwrap();
        let child = Command::new(control_plane_bin())
            .arg("--config")
            .arg(self.dir.path().join("control-plane.yaml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let url = format!("http://{}/v1/nodes", self.http);
        let log = self.dir.path().join("control-plane.log");
        wait_answering(
            self.child.as_mut().unwrap(),
            &self.client,
            &url,
            "control plane",
            &log,
        )
        .await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("control-plane.log")).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> Response {
        Response::from(
            self.client
                .get(format!("http://{}{path}", self.http))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// The control plane's process ID.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("the control plane is running")
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// Starts again on the same addresses and files.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A DNS client for an agent's DNS server ([`Agent::dns_addr`]): hickory's
/// client for queries as resolvers make them, and raw messages over plain
/// sockets where a test needs control over the exact packet.
pub mod dns {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::time::{Duration, Instant};

    use hickory_net::client::{Client, ClientHandle};
    use hickory_net::runtime::TokioRuntimeProvider;
    use hickory_net::tcp::TcpClientStream;
    use hickory_net::udp::UdpClientStream;
    use hickory_proto::op::{Edns, Message, Query};
    use hickory_proto::rr::{DNSClass, Name, RecordType};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::PATIENCE;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Transport {
        Udp,
        Tcp,
    }

    /// `name` as a fully qualified DNS name (a final dot is optional).
    pub fn name(name: &str) -> Name {
        let fqdn = if name.ends_with('.') {
            name.to_string()
        } else {
            format!("{name}.")
        };
        Name::from_ascii(&fqdn).unwrap_or_else(|e| panic!("bad DNS name {name:?}: {e}"))
    }

    /// Asks the server at `addr` for `name`/`rtype` with hickory's client,
    /// as a stub resolver does: RD set, and EDNS with a UDP size of 1232
    /// bytes (the client's default). Fails the test if no answer comes.
    pub async fn query(
        addr: SocketAddr,
        name: &str,
        rtype: RecordType,
        over: Transport,
    ) -> Message {
        let qname = self::name(name);
        let provider = TokioRuntimeProvider::default();
        let response = match over {
            Transport::Udp => {
                // Re-sent only after 5s of silence: a slow answer is not
                // asked for twice (which would skew counts in tests).
                let stream = UdpClientStream::builder(addr, provider)
                    .with_timeout(Some(PATIENCE))
                    .with_retry_interval_floor(5_000)
                    .build();
                let (mut client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
                tokio::spawn(background);
                client.query(qname, DNSClass::IN, rtype).await
            }
            Transport::Tcp => {
                let (connect, sender) = TcpClientStream::new(addr, None, Some(PATIENCE), provider);
                let stream = connect
                    .await
                    .unwrap_or_else(|e| panic!("cannot connect to the DNS server {addr}: {e}"));
                let (mut client, background) =
                    Client::<TokioRuntimeProvider>::with_timeout(stream, sender, PATIENCE);
                tokio::spawn(background);
                client.query(qname, DNSClass::IN, rtype).await
            }
        };
        response
            .unwrap_or_else(|e| {
                panic!("no answer to {name} {rtype} over {over:?} from {addr}: {e}")
            })
            .into_message()
    }

    /// A query for `name`/`rtype` with RD set, advertising a UDP size of
    /// `edns` bytes when given; without EDNS the classic 512-byte limit
    /// applies.
    pub fn request(name: &str, rtype: RecordType, edns: Option<u16>) -> Message {
        let mut message = Message::query();
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(self::name(name), rtype));
        if let Some(size) = edns {
            let mut opt = Edns::new();
            opt.set_max_payload(size);
            message.set_edns(opt);
        }
        message
    }

    /// Sends `request` exactly as built (UDP: re-sent every 5s until
    /// answered, as resolvers do; TCP: with its 2-byte length prefix) and
    /// returns the answer and its size on the wire.
    pub async fn exchange(
        addr: SocketAddr,
        request: &Message,
        over: Transport,
    ) -> (Message, usize) {
        let wire = request.to_vec().unwrap();
        let id = request.metadata.id;
        let bytes = match over {
            Transport::Udp => {
                let any = match addr.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                };
                let socket = tokio::net::UdpSocket::bind((any, 0)).await.unwrap();
                let deadline = Instant::now() + PATIENCE;
                let mut buf = vec![0u8; 65535];
                'send: loop {
                    assert!(Instant::now() < deadline, "no UDP answer from {addr}");
                    socket.send_to(&wire, addr).await.unwrap();
                    let resend = Instant::now() + Duration::from_secs(5);
                    loop {
                        let left = resend.saturating_duration_since(Instant::now());
                        let Ok(got) = tokio::time::timeout(left, socket.recv_from(&mut buf)).await
                        else {
                            continue 'send;
                        };
                        let (n, from) = got.unwrap();
                        if from == addr && n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                            break 'send buf[..n].to_vec();
                        }
                    }
                }
            }
            Transport::Tcp => tokio::time::timeout(PATIENCE, async {
                let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let len = u16::try_from(wire.len()).unwrap();
                tcp.write_all(&len.to_be_bytes()).await.unwrap();
                tcp.write_all(&wire).await.unwrap();
                let len = tcp.read_u16().await.unwrap();
                let mut body = vec![0u8; usize::from(len)];
                tcp.read_exact(&mut body).await.unwrap();
                body
            })
            .await
            .unwrap_or_else(|_| panic!("no TCP answer from {addr}")),
        };
        let message = Message::from_vec(&bytes)
            .unwrap_or_else(|e| panic!("undecodable answer from {addr} ({e}): {bytes:02x?}"));
        (message, bytes.len())
    }
}

/// Upstream instances for proxy tests, and clients that reach a service
/// through its VIP name as a program on the host does.
pub mod upstream {
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, SocketAddr};
    use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use hickory_proto::rr::{RData, RecordType};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinSet;

    use crate::Agent;
    use crate::dns::{Transport, query};

    /// A status that makes an [`Upstream`] accept requests and never answer.
    pub const HANG: u16 = 0;

    /// An HTTP/1.1 instance on its own loopback address: reads the request
    /// body, then answers with its name (and the body's length in
    /// `x-body-length`), or with the status the test sets, after the delay
    /// the test sets; closes each connection after one answer when the
    /// test says so.
    pub struct Upstream {
        pub addr: SocketAddr,
        name: String,
        status: Arc<AtomicU16>,
        delay_ms: Arc<AtomicU64>,
        close: Arc<AtomicBool>,
        hits: Arc<AtomicUsize>,
        connections: Arc<AtomicUsize>,
        open: Arc<AtomicUsize>,
        tasks: Arc<Mutex<JoinSet<()>>>,
    }

    impl Upstream {
        /// Starts one on a fresh loopback address, on `port` (0: any).
        pub async fn start(name: &str, port: u16) -> Upstream {
            let listener = bind(port).await;
            let addr = listener.local_addr().unwrap();
            let status = Arc::new(AtomicU16::new(200));
            let delay_ms = Arc::new(AtomicU64::new(0));
            let close = Arc::new(AtomicBool::new(false));
            let hits = Arc::new(AtomicUsize::new(0));
            let connections = Arc::new(AtomicUsize::new(0));
            let open = Arc::new(AtomicUsize::new(0));
            let tasks = Arc::new(Mutex::new(JoinSet::new()));
            let (s, d, c, h, t, n) = (
                status.clone(),
                delay_ms.clone(),
                close.clone(),
                hits.clone(),
                tasks.clone(),
                name.to_string(),
            );
            let (accepted, still_open) = (connections.clone(), open.clone());
            tasks.lock().unwrap().spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    still_open.fetch_add(1, Ordering::SeqCst);
                    let closed = still_open.clone();
                    let (s, d, c, h, n) = (s.clone(), d.clone(), c.clone(), h.clone(), n.clone());
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (s, d, c, h, n) =
                                (s.clone(), d.clone(), c.clone(), h.clone(), n.clone());
                            async move {
                                h.fetch_add(1, Ordering::SeqCst);
                                let (head, body) = req.into_parts();
                                // Read whole before any answer, as most
                                // applications do.
                                let received = http_body_util::BodyExt::collect(body)
                                    .await
                                    .map(|b| b.to_bytes().len())
                                    .unwrap_or_default();
                                let code = s.load(Ordering::SeqCst);
                                if code == HANG {
                                    std::future::pending::<()>().await;
                                }
                                let delay = d.load(Ordering::SeqCst);
                                if delay > 0 {
                                    tokio::time::sleep(Duration::from_millis(delay)).await;
                                }
                                let attempt = head
                                    .headers
                                    .get("x-signpost-attempt")
                                    .map(|v| v.to_str().unwrap().to_string())
                                    .unwrap_or_default();
                                let body = http_body_util::Full::new(bytes::Bytes::from(n));
                                let mut response = hyper::Response::builder()
                                    .status(code)
                                    .header("x-attempt-seen", attempt)
                                    .header("x-body-length", received);
                                if c.load(Ordering::SeqCst) {
                                    response = response.header("connection", "close");
                                }
                                let response = response.body(body).unwrap();
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        },
                    );
                    t.lock().unwrap().spawn(async move {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                        closed.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            });
            Upstream {
                addr,
                name: name.to_string(),
                status,
                delay_ms,
                close,
                hits,
                connections,
                open,
                tasks,
            }
        }

        pub fn set_status(&self, code: u16) {
            self.status.store(code, Ordering::SeqCst);
        }

        pub fn set_delay(&self, ms: u64) {
            self.delay_ms.store(ms, Ordering::SeqCst);
        }

        /// From now on, close each connection after its answer (or not).
        pub fn set_close(&self, close: bool) {
            self.close.store(close, Ordering::SeqCst);
        }

        pub fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }

        /// Connections accepted so far.
        pub fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }

        /// Connections open now (closed by either side: not counted).
        pub fn open(&self) -> usize {
            self.open.load(Ordering::SeqCst)
        }

        /// Dies like a killed process: the listener and every connection close.
        pub fn kill(&self) {
            self.tasks.lock().unwrap().abort_all();
        }

        /// Its service-file entry.
        pub fn entry(&self, service: &str, protocol: &str) -> String {
            format!(
                "  - name: {service}\n    id: {}\n    address: {}\n    port: {}\n    protocol: {protocol}\n",
                self.name,
                self.addr.ip(),
                self.addr.port()
            )
        }
    }

    /// A listener on a fresh loopback address, on `port` (0: any).
    pub async fn bind(port: u16) -> TcpListener {
        loop {
            let ip = crate::free_addr().ip();
            if let Ok(l) = TcpListener::bind((ip, port)).await {
                return l;
            }
        }
    }

    /// Serves the standard gRPC health service on `listener`, with
    /// `service` serving ("" is the server as a whole).
    pub async fn serve_grpc_health(listener: TcpListener, service: &'static str) {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(service, tonic_health::ServingStatus::Serving)
            .await;
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    }

    /// Echoes every connection on `listener` back to its sender.
    pub async fn serve_echo(listener: TcpListener) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    }

    /// `n` upstreams serving the same port, as a service's instances do.
    pub async fn upstreams(prefix: &str, n: usize) -> Vec<Upstream> {
        let first = Upstream::start(&format!("{prefix}-1"), 0).await;
        let port = first.addr.port();
        let mut all = vec![first];
        for i in 2..=n {
            all.push(Upstream::start(&format!("{prefix}-{i}"), port).await);
        }
        all
    }

    /// An agent configuration for proxy tests: a VIP range of its own
    /// (tests run side by side), no DNS recursors, and `proxy` (YAML lines
    /// under `proxy:`, indented by two spaces).
    pub fn proxy_config(proxy: &str) -> String {
        let range = format!("127.76.{}.0/24", rand::random_range(0..=255u8));
        format!("dns:\n  recursors: []\nproxy:\n  vip_range: {range}\n{proxy}")
    }

    /// Resolves `name` with the agent's DNS, as an application does.
    pub async fn resolve(agent: &Agent, name: &str) -> Option<Ipv4Addr> {
        let m = query(agent.dns_addr(), name, RecordType::A, Transport::Udp).await;
        m.answers.iter().find_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
    }

    /// The service's VIP once the agent knows the service and its proxy
    /// listens on `port` there.
    pub async fn vip(agent: &Agent, service: &str, port: u16) -> SocketAddr {
        let name = format!("{service}.service.internal");
        let ip = agent
            .eventually(&format!("{name} to resolve"), || async {
                resolve(agent, &name).await
            })
            .await;
        let addr = SocketAddr::from((ip, port));
        agent
            .eventually(&format!("a listener on {addr}"), || async {
                TcpStream::connect(addr).await.ok().map(|_| ())
            })
            .await;
        addr
    }

    /// An HTTP client that reaches `host` at `addr`, the way a program that
    /// resolved the name does.
    pub fn client(host: &str, addr: SocketAddr) -> reqwest::Client {
        client_builder(host, addr).build().unwrap()
    }

    /// [`client`]'s settings, for a test to add its own.
    pub fn client_builder(host: &str, addr: SocketAddr) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .no_proxy()
            .resolve(host, addr)
            .timeout(Duration::from_secs(30))
    }

    /// A client for `service`'s VIP on `port` (found through the agent's
    /// DNS), and the URL of the service's root there.
    pub async fn vip_client(agent: &Agent, service: &str, port: u16) -> (reqwest::Client, String) {
        let addr = vip(agent, service, port).await;
        let host = format!("{service}.service.internal");
        let url = format!("http://{host}:{port}/");
        (client(&host, addr), url)
    }

    /// GETs `url` `n` times; returns the bodies (instance names) by count.
    pub async fn spread(client: &reqwest::Client, url: &str, n: usize) -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for _ in 0..n {
            let r = client.get(url).send().await.unwrap();
            let reason = r.headers().get("x-signpost-error").cloned();
            assert_eq!(r.status(), 200, "{url}: {reason:?}");
            *seen.entry(r.text().await.unwrap()).or_insert(0) += 1;
        }
        seen
    }
}
