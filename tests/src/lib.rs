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

pub mod dns;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod fleet;
pub mod systemd;
pub mod upstream;

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
        if cfg!(feature = "etcd") {
            build.args(["--features", "signpost-control-plane/etcd"]);
        }
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
/// A client of a control plane's HTTP API: it trusts only the CA in `ca`.
pub fn control_plane_client(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    api_client()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .build()
        .unwrap()
}

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

/// How an agent's process is started: the command that runs its program
/// (a wrapper may come first), to which the harness adds `agent --config
/// …`, the log and `RUST_LOG`.
pub type Launcher = std::sync::Arc<dyn Fn(&Path) -> Command + Send + Sync>;

/// A running `signpost agent`.
pub struct Agent {
    child: Option<Child>,
    /// The processes started by a handover (`signpost restart`,
    /// SIGUSR2): not this test's children; the last one serves.
    successors: Vec<Pid>,
    /// The program started (a copy, for upgrade tests).
    program: PathBuf,
    /// How it is started, when not directly.
    launcher: Option<Launcher>,
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
        Self::start_program(signpost_bin(), node, extra_config).await
    }

    /// Starts `program` (a copy of `signpost`, for upgrade tests) as
    /// node `node`.
    pub async fn start_program(program: &Path, node: &str, extra_config: &str) -> Agent {
        Self::launch(program, None, node, extra_config).await
    }

    /// Starts an agent as node `node` through `launcher` (each start
    /// after a stop, too).
    pub async fn start_launched(node: &str, extra_config: &str, launcher: Launcher) -> Agent {
        Self::launch(signpost_bin(), Some(launcher), node, extra_config).await
    }

    async fn launch(
        program: &Path,
        launcher: Option<Launcher>,
        node: &str,
        extra_config: &str,
    ) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("services.d")).unwrap();
        rustls::crypto::ring::default_provider()
            .install_default()
            .ok();
        let addr = free_addr();
        let mut agent = Agent {
            child: None,
            successors: Vec::new(),
            program: program.to_path_buf(),
            launcher,
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

    /// Writes `agent.yaml` with `extra_config` (as [`Agent::start`]
    /// takes it), for a start or a reload.
    pub fn write_config(&mut self, extra_config: &str) {
        self.extra_config = extra_config.to_string();
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
    }

    async fn spawn(&mut self) {
        self.write_config(&self.extra_config.clone());
        let log = std::fs::File::create(self.dir.path().join("agent.log")).unwrap();
        let mut command = match &self.launcher {
            Some(launcher) => launcher(&self.program),
            None => Command::new(&self.program),
        };
        let child = command
            .args(["agent", "--config"])
            .arg(self.config_path())
            .env("RUST_LOG", "signpost_agent=debug,info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start signpost");
        self.child = Some(child);
        // Open to every token (as in Consul), whatever acl.default_policy.
        let url = format!("{}/v1/status/leader", self.base());
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

    /// The ID of the agent process that serves.
    pub fn pid(&self) -> Pid {
        match self.successors.last() {
            Some(pid) => *pid,
            None => Pid::from_raw(self.child.as_ref().unwrap().id() as i32),
        }
    }

    /// Records that process `pid` took over (`signpost restart`, SIGUSR2)
    /// from the one that served: that one's ID, to watch it drain.
    pub fn taken_over_by(&mut self, pid: i32) -> Pid {
        let previous = self.pid();
        self.successors.push(Pid::from_raw(pid));
        previous
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

    /// SIGKILL (no chance to flush anything), to every process this
    /// agent ran as.
    pub fn kill(&mut self) {
        for pid in self.successors.drain(..) {
            kill(pid, Signal::SIGKILL).ok();
        }
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

    /// Starts another replica of `first`'s store (in `extra_config`),
    /// with a copy of `first`'s CA (as an operator copies it) and a server
    /// certificate of its own signed by it.
    pub async fn start_replica(first: &ControlPlane, extra_config: &str) -> ControlPlane {
        Self::launch(
            extra_config,
            Some(&first.dir.path().join("data").join("tls")),
        )
        .await
    }

    /// Starts a control plane; `extra_config` is added to its YAML
    /// configuration (its `grpc:` and `http:` sections get their `listen`).
    pub async fn start_with(extra_config: &str) -> ControlPlane {
        Self::launch(extra_config, None).await
    }

    /// Starts a control plane on fresh addresses and directory, with
    /// `extra_config` in its configuration, the CA copied from `tls_from`
    /// or its own, and a server certificate (`init-tls`).
    async fn launch(extra_config: &str, tls_from: Option<&Path>) -> ControlPlane {
        rustls::crypto::ring::default_provider()
            .install_default()
            .ok();
        let dir = tempfile::tempdir().unwrap();
        let (grpc, http) = (free_addr(), free_addr());
        let config = dir.path().join("control-plane.yaml");
        std::fs::write(
            &config,
            format!(
                "data_dir: {}\nagent_tokens: [{AGENT_TOKEN}]\n{}",
                dir.path().join("data").display(),
                with_line(
                    &with_line(extra_config, "grpc", &format!("listen: {grpc}")),
                    "http",
                    &format!("listen: {http}")
                )
            ),
        )
        .unwrap();
        if let Some(from) = tls_from {
            let to = dir.path().join("data").join("tls");
            std::fs::create_dir_all(&to).unwrap();
            for file in ["ca.pem", "ca-key.pem"] {
                std::fs::copy(from.join(file), to.join(file)).unwrap();
            }
        }
        {
            let out = Command::new(control_plane_bin())
                .arg("--config")
                .arg(&config)
                .args([
                    "init-tls",
                    "--name",
                    "localhost",
                    "--name",
                    &grpc.ip().to_string(),
                    "--name",
                    &http.ip().to_string(),
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "init-tls failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let ca = dir.path().join("data").join("tls").join("ca.pem");
        let client = control_plane_client(&ca);
        let mut cp = ControlPlane {
            child: None,
            grpc,
            http,
            dir,
            client,
        };
        cp.spawn().await;
        cp
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("data").join("tls").join("ca.pem")
    }

    /// `path` on the HTTP API (HTTPS; its certificate names the address).
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.http)
    }

    /// A client of the HTTP API: it trusts the control plane's CA.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The CLI's flags to reach this control plane's HTTP API.
    pub fn cli_flags(&self) -> Vec<String> {
        vec![
            "--control-plane".to_string(),
            self.http.to_string(),
            "--ca-file".to_string(),
            self.ca_file().display().to_string(),
        ]
    }

    /// The agent configuration that joins this control plane with `token`.
    pub fn agent_config(&self, token: &str) -> String {
        format!(
            // A generous first-lookup wait: it ends as soon as the snapshot
            // comes, and a loaded test machine must not make it miss.
            "control_plane:\n  addresses: [\"{}\"]\n  ca_file: {}\n  token: {token}\n  first_lookup_wait: 10s\n  http: https://{}\n",
            self.grpc,
            self.ca_file().display(),
            self.http
        )
    }

    async fn spawn(&mut self) {
        // The CA may have been replaced (a rotation).
        self.client = control_plane_client(&self.ca_file());
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
        let url = self.url("/v1/nodes");
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
        Response::from(self.client.get(self.url(path)).send().await.unwrap()).await
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
