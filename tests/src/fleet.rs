//! A fleet of real hosts on one machine: each host is a Linux network
//! namespace with its own loopback and one address in 198.18.0.0/24 (the
//! RFC 2544 benchmarking range) on a bridge of the fleet's own, and no
//! default route, so nothing can leave the machine. The control plane
//! runs on a host of its own; every agent runs the real binary with the
//! packaged default configuration (`packaging/etc/`), changing only what
//! an operator must set: its node name, where the control plane is, the
//! CA, the token, the directories, and the DNS port when the agent is the
//! host's resolver (`/etc/netns/<ns>/resolv.conf` names it).
//!
//! The bridge lives in a namespace of its own (the fleet's "switch"), so
//! the machine's own firewall never sees the fleet's traffic. Processes
//! start under `ip netns exec`; the test's own servers and clients run on
//! a runtime whose thread entered the host's namespace ([`Host::run`]),
//! so every socket they open is that host's. Names carry the test
//! process's id; a fleet removes its namespaces and processes when
//! dropped (also on a failed test), and leftovers of a killed run are
//! removed when the next fleet starts.
//!
//! Faults: [`Host::power_off`] (link down, then every process killed: no
//! FIN, no RST), [`Host::firewall`] (`iptables` in the host's namespace:
//! partitions, `-m statistic` packet loss), and [`delay_relay`] for added
//! latency (this kernel has no `netem`). Needs root, `ip` and `iptables`.

use std::fs::File;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use serde_json::Value;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::{PATIENCE, Response, control_plane_bin, signpost_bin};

/// The token agents join with.
pub const TOKEN: &str = "fleet-agent-token-0123456789";

/// The fleet's subnet; host `n` (1: the control plane) is `.n`.
const SUBNET: [u8; 3] = [198, 18, 0];

/// The packaged configurations, as installed in `/etc/signpost/`.
const AGENT_YAML: &str = include_str!("../../packaging/etc/agent.yaml");
const CONTROL_PLANE_YAML: &str = include_str!("../../packaging/etc/control-plane.yaml");

/// Runs `ip` (or another command) and fails the test on an error.
fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `text` with the line that starts with `from` replaced by `to`; the
/// line must be there (the packaged file changed otherwise).
fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.lines().any(|l| l.starts_with(from)),
        "the packaged configuration has no line {from:?}"
    );
    text.lines()
        .map(|l| if l.starts_with(from) { to } else { l })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Removes what killed test runs left: namespaces named after a process
/// that no longer exists, with anything still running in them.
fn remove_stale() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let list = run("ip", &["netns", "list"]);
        for line in String::from_utf8_lossy(&list.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            let Some(pid) = name
                .strip_prefix("sp")
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                remove_namespace(name);
            }
        }
    });
}

/// Kills what runs in namespace `name`, then removes it and its
/// `/etc/netns` files.
fn remove_namespace(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .ok();
            }
        }
    }
    Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status()
        .ok();
    std::fs::remove_dir_all(format!("/etc/netns/{name}")).ok();
}

/// A fleet: a switch and the hosts on it.
pub struct Fleet {
    /// Prefix of every namespace name: `sp<pid>-<n>`.
    prefix: String,
    switch: String,
    pub dir: tempfile::TempDir,
    hosts: Mutex<Vec<Arc<Host>>>,
    next: AtomicUsize,
}

impl Fleet {
    pub fn new() -> Fleet {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        rustls::crypto::ring::default_provider()
            .install_default()
            .ok();
        remove_stale();
        let prefix = format!(
            "sp{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::SeqCst)
        );
        let switch = format!("{prefix}-switch");
        run("ip", &["netns", "add", &switch]);
        run(
            "ip",
            &["-n", &switch, "link", "add", "br0", "type", "bridge"],
        );
        run("ip", &["-n", &switch, "link", "set", "br0", "up"]);
        Fleet {
            prefix,
            switch,
            dir: tempfile::tempdir().unwrap(),
            hosts: Mutex::new(Vec::new()),
            next: AtomicUsize::new(1),
        }
    }

    /// A new host called `name`, with the next address.
    pub fn host(&self, name: &str) -> Arc<Host> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let ip = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], u8::try_from(n).unwrap());
        let ns = format!("{}-{name}", self.prefix);
        let port = format!("v-{name}");
        run("ip", &["netns", "add", &ns]);
        run(
            "ip",
            &[
                "link",
                "add",
                "eth0",
                "netns",
                &ns,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &self.switch,
            ],
        );
        run(
            "ip",
            &[
                "-n",
                &self.switch,
                "link",
                "set",
                &port,
                "master",
                "br0",
                "up",
            ],
        );
        run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        run(
            "ip",
            &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        );
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
        // Programs in the namespace resolve through its agent (`ip netns
        // exec` puts this file over /etc/resolv.conf).
        let etc = PathBuf::from(format!("/etc/netns/{ns}"));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (handle, stop) = runtime_in(&ns);
        let host = Arc::new(Host {
            name: name.to_string(),
            ns,
            ip,
            switch: self.switch.clone(),
            port,
            dir,
            handle,
            stop: Mutex::new(Some(stop)),
            processes: Mutex::new(Vec::new()),
        });
        self.hosts.lock().unwrap().push(host.clone());
        host
    }

    /// A control plane on a host of its own, from the packaged
    /// configuration with `changes` made (each replaces the line that
    /// starts with its first part).
    pub async fn control_plane(&self, changes: &[(&str, &str)]) -> ControlPlane {
        let host = self.host("cp");
        let data = host.dir.join("data");
        let mut yaml = edit(
            CONTROL_PLANE_YAML,
            "data_dir:",
            &format!("data_dir: {}", data.display()),
        );
        yaml = edit(&yaml, "agent_tokens:", &format!("agent_tokens: [{TOKEN}]"));
        for (from, to) in changes {
            yaml = edit(&yaml, from, to);
        }
        let config = host.dir.join("control-plane.yaml");
        std::fs::write(&config, yaml).unwrap();
        let out = Command::new(control_plane_bin())
            .arg("--config")
            .arg(&config)
            .args(["init-tls", "--name", &host.ip.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init-tls: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cp = ControlPlane {
            ca: data.join("tls").join("ca.pem"),
            grpc: SocketAddr::from((host.ip, 8300)),
            host,
            config,
        };
        cp.start().await;
        cp
    }

    /// An agent on a new host called `name`, joined to `cp` at `via` (the
    /// control plane's own gRPC address unless a relay is in between),
    /// from the packaged configuration with `settings` appended.
    pub async fn agent(
        &self,
        name: &str,
        cp: &ControlPlane,
        via: SocketAddr,
        settings: &str,
    ) -> Agent {
        let agent = self.agent_stopped(name, cp, via, settings);
        agent.start().await;
        agent
    }

    /// [`Fleet::agent`], configured but not started.
    pub fn agent_stopped(
        &self,
        name: &str,
        cp: &ControlPlane,
        via: SocketAddr,
        settings: &str,
    ) -> Agent {
        let host = self.host(name);
        let services = host.dir.join("services.d");
        std::fs::create_dir_all(&services).unwrap();
        let mut yaml = edit(
            AGENT_YAML,
            "data_dir:",
            &format!("data_dir: {}", host.dir.join("data").display()),
        );
        yaml = edit(
            &yaml,
            "services_dir:",
            &format!("services_dir: {}", services.display()),
        );
        // The agent is the host's resolver (see /etc/netns/<ns>/resolv.conf).
        yaml = edit(&yaml, "  listen: 127.0.0.1:8600", "  listen: 127.0.0.1:53");
        yaml.push_str(&format!(
            "node_name: {name}\ncontrol_plane:\n  addresses: [\"{via}\"]\n  ca_file: {}\n  token: {TOKEN}\n{settings}",
            cp.ca.display()
        ));
        let config = host.dir.join("agent.yaml");
        std::fs::write(&config, yaml).unwrap();
        Agent {
            name: name.to_string(),
            host,
            config,
        }
    }
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet::new()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let hosts = std::mem::take(&mut *self.hosts.lock().unwrap());
        for host in hosts {
            host.stop_everything();
            remove_namespace(&host.ns);
        }
        remove_namespace(&self.switch);
    }
}

/// Starts a thread that enters namespace `ns` and runs a Tokio runtime
/// there until told to stop; its handle, and the stop.
fn runtime_in(ns: &str) -> (Handle, tokio::sync::oneshot::Sender<()>) {
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            let file = File::open(&path).unwrap();
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
            // Threads started from here (the runtime's) are in it too.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            tx.send((runtime.handle().clone(), stop)).unwrap();
            runtime.block_on(async {
                stopped.await.ok();
            });
        })
        .unwrap();
    rx.recv().unwrap()
}

/// One host of the fleet.
pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    switch: String,
    /// Its end of the link on the switch.
    port: String,
    pub dir: PathBuf,
    handle: Handle,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    processes: Mutex<Vec<(String, Child)>>,
}

impl Host {
    /// Runs `task` on this host (its sockets are the host's) and waits
    /// for its result.
    pub async fn run<F>(&self, task: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.spawn(task).await.unwrap()
    }

    /// Starts `task` on this host.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(task)
    }

    /// A listener on `port` of every address of the host.
    pub async fn listen(&self, port: u16) -> tokio::net::TcpListener {
        self.run(async move {
            tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                .await
                .unwrap()
        })
        .await
    }

    /// Runs a command in the host's namespace (as `ip netns exec` does,
    /// with its resolv.conf) and returns its output, whatever its status.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} on {}: {e}", self.name))
    }

    /// Adds a firewall rule (`iptables` arguments after the chain
    /// command, e.g. `-A INPUT -s 198.18.0.1 -j DROP`).
    pub fn firewall(&self, rule: &str) {
        let args: Vec<&str> = rule.split_whitespace().collect();
        let out = self.exec("iptables", &args);
        assert!(
            out.status.success(),
            "iptables {rule} on {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Gives the host another address, `cidr`, on a new interface `name`
    /// (one end of a link to nowhere: this kernel has no dummy interfaces).
    pub fn add_address(&self, name: &str, cidr: &str) {
        let peer = format!("{name}p");
        run(
            "ip",
            &[
                "-n", &self.ns, "link", "add", name, "type", "veth", "peer", "name", &peer,
            ],
        );
        run("ip", &["-n", &self.ns, "addr", "add", cidr, "dev", name]);
        for link in [name, peer.as_str()] {
            run("ip", &["-n", &self.ns, "link", "set", link, "up"]);
        }
    }

    /// Drops everything between this host and `other`, both ways.
    pub fn cut_from(&self, other: &Host) {
        self.firewall(&format!("-A INPUT -s {} -j DROP", other.ip));
        self.firewall(&format!("-A OUTPUT -d {} -j DROP", other.ip));
    }

    /// Drops everything between this host and every other.
    pub fn isolate(&self) {
        self.firewall("-A INPUT -i eth0 -j DROP");
        self.firewall("-A OUTPUT -o eth0 -j DROP");
    }

    /// Removes every firewall rule.
    pub fn heal(&self) {
        self.firewall("-F");
    }

    /// Loses this share of the packets arriving from other hosts.
    pub fn lose(&self, share: f64) {
        self.firewall(&format!(
            "-A INPUT -i eth0 -m statistic --mode random --probability {share} -j DROP"
        ));
    }

    /// Starts `program` in the host's namespace, its stderr in
    /// `<dir>/<what>.log`; killed with the host.
    pub fn start_process(&self, what: &str, program: &Path, args: &[&str]) {
        let log = File::create(self.dir.join(format!("{what}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.processes
            .lock()
            .unwrap()
            .push((what.to_string(), child));
    }

    /// SIGKILLs the process started as `what`.
    pub fn kill_process(&self, what: &str) {
        let mut processes = self.processes.lock().unwrap();
        for (_, child) in processes.iter_mut().filter(|(n, _)| n == what) {
            child.kill().ok();
            child.wait().ok();
        }
        processes.retain(|(n, _)| n != what);
    }

    /// Whether the process started as `what` has exited (and how).
    fn exited(&self, what: &str) -> Option<std::process::ExitStatus> {
        let mut processes = self.processes.lock().unwrap();
        processes
            .iter_mut()
            .find(|(n, _)| n == what)
            .and_then(|(_, child)| child.try_wait().unwrap())
    }

    /// The stderr of the process started as `what`.
    pub fn log(&self, what: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{what}.log"))).unwrap_or_default()
    }

    /// Takes the host's link down (nothing it sends arrives anywhere, not
    /// even a reset), then kills every process and task on it: a power
    /// cut, a kernel panic, a pulled cable.
    pub fn power_off(&self) {
        run(
            "ip",
            &["-n", &self.switch, "link", "set", &self.port, "down"],
        );
        self.stop_everything();
    }

    fn stop_everything(&self) {
        let names: Vec<String> = self
            .processes
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            self.kill_process(&name);
        }
        if let Some(stop) = self.stop.lock().unwrap().take() {
            stop.send(()).ok();
        }
    }

    /// Waits until `url` (on this host) answers 200; fails with the log of
    /// `what` if that process exits first or it never answers.
    async fn wait_answering(&self, url: &str, what: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.exited(what) {
                panic!(
                    "{what} on {} exited with {status}:\n{}",
                    self.name,
                    self.log(what)
                );
            }
            let url = url.to_string();
            let answered = self
                .run(async move {
                    client()
                        .get(url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                })
                .await;
            if answered {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} on {} does not answer:\n{}",
                self.name,
                self.log(what)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

/// `GET`/`PUT` on a host's loopback (run on that host).
async fn call(host: &Host, method: reqwest::Method, url: String, body: Option<Value>) -> Response {
    host.run(async move {
        let mut request = client().request(method, url);
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        Response::from(request.send().await.unwrap()).await
    })
    .await
}

/// The control plane's host and process.
pub struct ControlPlane {
    pub host: Arc<Host>,
    /// The CA agents trust.
    pub ca: PathBuf,
    /// Where agents reach it.
    pub grpc: SocketAddr,
    config: PathBuf,
}

impl ControlPlane {
    /// Starts the process (again) and waits until its API answers.
    pub async fn start(&self) {
        let config = self.config.to_str().unwrap().to_string();
        self.host.start_process(
            "control-plane",
            &control_plane_bin(),
            &["--config", &config],
        );
        self.host
            .wait_answering("http://127.0.0.1:8700/v1/nodes", "control-plane")
            .await;
    }

    pub fn kill(&self) {
        self.host.kill_process("control-plane");
    }

    pub fn log(&self) -> String {
        self.host.log("control-plane")
    }

    pub async fn get(&self, path: &str) -> Response {
        call(
            &self.host,
            reqwest::Method::GET,
            format!("http://127.0.0.1:8700{path}"),
            None,
        )
        .await
    }

    /// Every node's liveness, by name.
    pub async fn statuses(&self) -> std::collections::BTreeMap<String, String> {
        let nodes = self.get("/v1/nodes").await.json();
        nodes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["Node"].as_str().unwrap().to_string(),
                    n["Status"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    pub async fn status(&self, node: &str) -> Option<String> {
        self.statuses().await.remove(node)
    }

    /// Waits until `node` has `status`.
    pub async fn wait_status(&self, node: &str, status: &str) {
        let deadline = Instant::now() + 2 * PATIENCE;
        loop {
            if self.status(node).await.as_deref() == Some(status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{node} never became {status} (now {:?})\ncontrol plane log:\n{}",
                self.status(node).await,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// An agent's host and process.
pub struct Agent {
    pub name: String,
    pub host: Arc<Host>,
    config: PathBuf,
}

impl Agent {
    /// Starts the process (again) and waits until its API answers.
    pub async fn start(&self) {
        let config = self.config.to_str().unwrap().to_string();
        self.host
            .start_process("agent", signpost_bin(), &["agent", "--config", &config]);
        self.host
            .wait_answering("http://127.0.0.1:8500/v1/agent/self", "agent")
            .await;
    }

    pub fn kill(&self) {
        self.host.kill_process("agent");
    }

    /// Adds `address` to the control-plane addresses it tries, after
    /// those it has (takes effect at its next start).
    pub fn add_control_plane_address(&self, address: SocketAddr) {
        let yaml = std::fs::read_to_string(&self.config).unwrap();
        let line = yaml
            .lines()
            .find(|l| l.starts_with("  addresses: ["))
            .unwrap()
            .to_string();
        let more = line.replace(']', &format!(", \"{address}\"]"));
        std::fs::write(&self.config, edit(&yaml, &line, &more)).unwrap();
    }

    /// `signpost agent --validate` on its configuration, on its host.
    pub fn validate(&self) -> Output {
        let config = self.config.to_str().unwrap();
        self.host.exec(
            signpost_bin().to_str().unwrap(),
            &["agent", "--config", config, "--validate"],
        )
    }

    /// Runs the agent to its end (it must refuse to start).
    pub fn run_to_exit(&self) -> Output {
        let config = self.config.to_str().unwrap();
        self.host.exec(
            signpost_bin().to_str().unwrap(),
            &["agent", "--config", config],
        )
    }

    pub fn log(&self) -> String {
        self.host.log("agent")
    }

    pub fn services_dir(&self) -> PathBuf {
        self.host.dir.join("services.d")
    }

    /// `GET` on the agent's local API.
    pub async fn get(&self, path: &str) -> Response {
        call(
            &self.host,
            reqwest::Method::GET,
            format!("http://127.0.0.1:8500{path}"),
            None,
        )
        .await
    }

    /// A `GET` left running (a blocking query), answered later.
    pub fn get_later(&self, path: &str) -> JoinHandle<Response> {
        let url = format!("http://127.0.0.1:8500{path}");
        self.host.spawn(async move {
            let client = reqwest::Client::builder().no_proxy().build().unwrap();
            Response::from(client.get(url).send().await.unwrap()).await
        })
    }

    pub async fn put(&self, path: &str, body: Option<Value>) -> Response {
        call(
            &self.host,
            reqwest::Method::PUT,
            format!("http://127.0.0.1:8500{path}"),
            body,
        )
        .await
    }

    /// Registers a service instance through the API and fails the test if
    /// it is refused.
    pub async fn register(&self, body: Value) {
        let r = self.put("/v1/agent/service/register", Some(body)).await;
        assert!(r.status.is_success(), "{}: {}", self.name, r.text);
    }

    /// The health entries of `service` on node `node`, as this agent
    /// sees them.
    pub async fn entries(&self, service: &str, node: &str) -> Vec<Value> {
        let body = self
            .get(&format!("/v1/health/service/{service}"))
            .await
            .json();
        body.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["Node"]["Node"] == node)
            .cloned()
            .collect()
    }

    /// The status of check `check` of node `node`'s instance of
    /// `service`, as this agent sees it.
    pub async fn check_status(&self, service: &str, node: &str, check: &str) -> Option<String> {
        let entries = self.entries(service, node).await;
        let checks = entries.first()?["Checks"].as_array()?.clone();
        checks
            .iter()
            .find(|c| c["CheckID"] == check)
            .map(|c| c["Status"].as_str().unwrap().to_string())
    }

    /// Polls `f` until it returns `Some`; fails with this agent's log after
    /// [`PATIENCE`].
    pub async fn eventually<T, F, Fut>(&self, what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nagent {} log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Resolves `name` as a program on the host does (getaddrinfo, with
    /// the host's resolv.conf): its first address, if any.
    pub fn resolve(&self, name: &str) -> Option<Ipv4Addr> {
        let out = self.host.exec("getent", &["ahostsv4", name]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .and_then(|a| a.parse().ok())
    }
}

/// A TCP relay on `host` from `listen` to `to` that holds every chunk for
/// `delay` in each direction (the added latency of a long link; this
/// kernel has no `netem`). Runs until the host stops.
pub async fn delay_relay(host: &Host, listen: SocketAddr, to: SocketAddr, delay: Duration) {
    let listener = host
        .run(async move { tokio::net::TcpListener::bind(listen).await.unwrap() })
        .await;
    host.spawn(async move {
        loop {
            let Ok((inbound, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::join!(delay_line(ri, wo, delay), delay_line(ro, wi, delay));
            });
        }
    });
}

/// Copies `from` to `to`, each chunk `delay` after it was read, in order.
async fn delay_line(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(1024);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due = tokio::time::Instant::now() + delay;
                    if tx.send((due, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        to.shutdown().await.ok();
    };
    tokio::join!(reader, writer);
}

/// An HTTP instance on `host` at `port` (all addresses): `/` answers the
/// host's name, `/health` answers 200.
pub async fn http_instance(host: &Host, port: u16) {
    let name = host.name.clone();
    let listener = host.listen(port).await;
    host.spawn(async move {
        let app = axum::Router::new()
            .route("/", axum::routing::get(move || async move { name }))
            .route("/health", axum::routing::get(|| async { "ok" }));
        axum::serve(listener, app).await.ok();
    });
}

/// A gRPC instance on `host` at `port`: the standard health service,
/// serving.
pub async fn grpc_instance(host: &Host, port: u16) {
    let listener = host.listen(port).await;
    host.spawn(crate::upstream::serve_grpc_health(listener, ""));
}

/// A TCP echo instance on `host` at `port`.
pub async fn echo_instance(host: &Host, port: u16) {
    let listener = host.listen(port).await;
    host.spawn(crate::upstream::serve_echo(listener));
}
