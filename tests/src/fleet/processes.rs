//! The fleet's Signpost processes: a control plane and agents started
//! from the packaged configuration on hosts of their own, and what a test
//! asks of them (their HTTP APIs, logs, restarts).

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;

use serde_json::Value;
use tokio::task::JoinHandle;

use super::{Fleet, Host, client};
use crate::{PATIENCE, Response, control_plane_bin, poll, signpost_bin};

/// The token agents join with.
const TOKEN: &str = "fleet-agent-token-0123456789";

/// The packaged configurations, as installed in `/etc/signpost/`.
const AGENT_YAML: &str = include_str!("../../../packaging/etc/agent.yaml");
const CONTROL_PLANE_YAML: &str = include_str!("../../../packaging/etc/control-plane.yaml");

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

/// The packaged control-plane configuration with its state under
/// `data` and the fleet's agent token.
fn control_plane_yaml(data: &std::path::Path) -> String {
    let yaml = edit(
        CONTROL_PLANE_YAML,
        "data_dir:",
        &format!("data_dir: {}", data.display()),
    );
    edit(&yaml, "agent_tokens:", &format!("agent_tokens: [{TOKEN}]"))
}

/// `yaml` with `settings` added: a top-level section it has already
/// (`proxy:`) gets the settings' lines under it, others are appended.
fn merge(yaml: &str, settings: &str) -> String {
    let mut lines: Vec<String> = yaml.lines().map(str::to_string).collect();
    let mut section: Option<usize> = None;
    for line in settings.lines() {
        if !line.starts_with(' ') {
            section = lines.iter().position(|l| l == line);
            if section.is_none() {
                lines.push(line.to_string());
            }
            continue;
        }
        match &mut section {
            Some(at) => {
                *at += 1;
                lines.insert(*at, line.to_string());
            }
            None => lines.push(line.to_string()),
        }
    }
    lines.join("\n") + "\n"
}

/// `init-tls` with `config`: a CA and a server certificate for `names`.
fn init_tls(config: &std::path::Path, names: &[String]) {
    let mut command = Command::new(control_plane_bin());
    command.arg("--config").arg(config).arg("init-tls");
    for name in names {
        command.args(["--name", name]);
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "init-tls: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Fleet {
    /// A control plane on a host of its own, from the packaged
    /// configuration with `changes` made (each replaces the line that
    /// starts with its first part).
    pub async fn control_plane(&self, changes: &[(&str, &str)]) -> ControlPlane {
        let host = self.host("cp");
        let data = host.dir.join("data");
        let mut yaml = control_plane_yaml(&data);
        for (from, to) in changes {
            yaml = edit(&yaml, from, to);
        }
        let config = host.dir.join("control-plane.yaml");
        std::fs::write(&config, yaml).unwrap();
        init_tls(&config, &[host.ip.to_string()]);
        let cp = ControlPlane {
            ca: data.join("tls").join("ca.pem"),
            grpc: SocketAddr::from((host.ip, 8300)),
            host,
            config,
        };
        cp.start().await;
        cp
    }

    /// `n` control-plane replicas on hosts of their own (`cp1`...), each
    /// with a member of one etcd cluster beside it, from the packaged
    /// configuration with `store: etcd`; each has a server certificate of
    /// its own, signed by the first one's CA (copied, as an operator does).
    #[cfg(feature = "etcd")]
    pub async fn control_plane_replicas(&self, n: usize) -> Vec<ControlPlane> {
        let hosts: Vec<Arc<super::Host>> = (1..=n).map(|i| self.host(&format!("cp{i}"))).collect();
        let cluster: Vec<String> = hosts
            .iter()
            .map(|h| format!("{}=http://{}:2380", h.name, h.ip))
            .collect();
        let cluster = cluster.join(",");
        for host in &hosts {
            let (client, peer) = (
                format!("http://{}:2379", host.ip),
                format!("http://{}:2380", host.ip),
            );
            let data = host.dir.join("etcd");
            host.start_process(
                "etcd",
                std::path::Path::new("etcd"),
                &[
                    "--name",
                    &host.name,
                    "--data-dir",
                    data.to_str().unwrap(),
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                    "--initial-cluster",
                    &cluster,
                    "--initial-cluster-state",
                    "new",
                ],
            );
        }
        for host in &hosts {
            host.wait_answering(&format!("http://{}:2379/health", host.ip), "etcd")
                .await;
        }
        let endpoints: Vec<String> = hosts
            .iter()
            .map(|h| format!("\"http://{}:2379\"", h.ip))
            .collect();
        let store = format!(
            "store: etcd\netcd:\n  endpoints: [{}]\n",
            endpoints.join(", ")
        );
        let first_tls = hosts[0].dir.join("data").join("tls");
        let mut replicas = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let mut yaml = control_plane_yaml(&host.dir.join("data"));
            yaml.push_str(&store);
            let config = host.dir.join("control-plane.yaml");
            std::fs::write(&config, yaml).unwrap();
            let tls = host.dir.join("data").join("tls");
            if i > 0 {
                // The operator copies the first replica's CA; init-tls
                // then signs this replica's server certificate with it.
                std::fs::create_dir_all(&tls).unwrap();
                for file in ["ca.pem", "ca-key.pem"] {
                    std::fs::copy(first_tls.join(file), tls.join(file)).unwrap();
                }
            }
            init_tls(&config, &[host.ip.to_string()]);
            let cp = ControlPlane {
                ca: tls.join("ca.pem"),
                grpc: SocketAddr::from((host.ip, 8300)),
                host: host.clone(),
                config,
            };
            cp.start().await;
            replicas.push(cp);
        }
        replicas
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
            "node_name: {name}\ncontrol_plane:\n  addresses: [\"{via}\"]\n  ca_file: {}\n  token: {TOKEN}\n",
            cp.ca.display()
        ));
        let yaml = merge(&yaml, settings);
        let config = host.dir.join("agent.yaml");
        std::fs::write(&config, yaml).unwrap();
        Agent {
            name: name.to_string(),
            host,
            config,
        }
    }
}

/// `GET`/`PUT` on a host's loopback (run on that host).
async fn call(host: &Host, method: reqwest::Method, url: String, body: Option<Value>) -> Response {
    call_with(host, client(), method, url, body).await
}

/// [`call`] with `client`.
async fn call_with(
    host: &Host,
    client: reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
) -> Response {
    host.run(async move {
        let mut request = client.request(method, url);
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
            .wait_answering_with(
                self.http(),
                "https://127.0.0.1:8700/v1/nodes",
                "control-plane",
            )
            .await;
    }

    /// A client of its HTTP API (HTTPS on the host's loopback, as
    /// packaged), trusting its CA.
    fn http(&self) -> reqwest::Client {
        crate::api_client()
            .timeout(std::time::Duration::from_secs(15))
            .tls_certs_only([
                reqwest::Certificate::from_pem(&std::fs::read(&self.ca).unwrap()).unwrap(),
            ])
            .build()
            .unwrap()
    }

    pub fn kill(&self) {
        self.host.kill_process("control-plane");
    }

    pub fn log(&self) -> String {
        self.host.log("control-plane")
    }

    pub async fn get(&self, path: &str) -> Response {
        call_with(
            &self.host,
            self.http(),
            reqwest::Method::GET,
            format!("https://127.0.0.1:8700{path}"),
            None,
        )
        .await
    }

    /// `method` on `path` of its HTTP API, with a JSON `body`, as the
    /// operator who installed it (the bootstrap token).
    pub async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Response {
        let token = std::fs::read_to_string(self.host.dir.join("data").join("bootstrap-token"))
            .unwrap()
            .trim()
            .to_string();
        let (client, url) = (self.http(), format!("https://127.0.0.1:8700{path}"));
        self.host
            .run(async move {
                let mut request = client.request(method, url).header("X-Consul-Token", token);
                if let Some(body) = body {
                    request = request.body(body.to_string());
                }
                Response::from(request.send().await.unwrap()).await
            })
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

    /// Waits until `node` has `status` (the control plane's restore grace
    /// period, 30 s, may come first).
    pub async fn wait_status(&self, node: &str, status: &str) {
        let what = format!("{node} to be {status}");
        let context = || format!("control plane log:\n{}", self.log());
        poll(&what, 2 * PATIENCE, context, || async {
            (self.status(node).await.as_deref() == Some(status)).then_some(())
        })
        .await
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
    pub async fn eventually<T, F, Fut>(&self, what: &str, f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let context = || format!("agent {} log:\n{}", self.name, self.log());
        poll(what, PATIENCE, context, f).await
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
