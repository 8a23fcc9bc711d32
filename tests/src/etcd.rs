//! A real etcd cluster on loopback for the control plane's `store: etcd`
//! tests: `etcd` (Debian's etcd-server) members on their own 127.x
//! addresses, each with its own data directory, killed and started again
//! by the tests.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_addr;

pub struct EtcdCluster {
    dir: tempfile::TempDir,
    /// Client and peer addresses of each member.
    members: Vec<(SocketAddr, SocketAddr)>,
    children: Vec<Option<Child>>,
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster answers.
    pub async fn start(size: usize) -> EtcdCluster {
        rustls::crypto::ring::default_provider()
            .install_default()
            .ok();
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<(SocketAddr, SocketAddr)> =
            (0..size).map(|_| (free_addr(), free_addr())).collect();
        let mut cluster = EtcdCluster {
            dir,
            members,
            children: (0..size).map(|_| None).collect(),
        };
        for n in 0..size {
            cluster.spawn(n);
        }
        cluster.wait_healthy().await;
        cluster
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .enumerate()
            .map(|(n, (_, peer))| format!("m{n}=http://{peer}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, n: usize) {
        let (client, peer) = self.members[n];
        let log = std::fs::File::create(self.dir.path().join(format!("m{n}.log"))).unwrap();
        let child = Command::new("etcd")
            .args(["--name", &format!("m{n}")])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("m{n}")))
            .args(["--listen-client-urls", &format!("http://{client}")])
            .args(["--advertise-client-urls", &format!("http://{client}")])
            .args(["--listen-peer-urls", &format!("http://{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
            .args(["--initial-cluster", &self.initial_cluster()])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "signpost-test"])
            // Fast elections on loopback.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start etcd (install etcd-server)");
        self.children[n] = Some(child);
    }

    /// Every member's client URL, as `etcd.endpoints` wants them.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|(client, _)| format!("http://{client}"))
            .collect()
    }

    /// The control plane's `store: etcd` configuration for this cluster.
    pub fn config(&self, prefix: &str) -> String {
        let endpoints: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        format!(
            "store: etcd\netcd:\n  endpoints: [{}]\n  prefix: {prefix}\n  timeout: 2s\n",
            endpoints.join(", ")
        )
    }

    /// SIGKILL one member.
    pub fn kill(&mut self, n: usize) {
        if let Some(mut child) = self.children[n].take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// Starts a killed member again on its data.
    pub async fn restart(&mut self, n: usize) {
        self.spawn(n);
        self.wait_healthy().await;
    }

    /// Waits until a member says the cluster has a leader.
    async fn wait_healthy(&self) {
        let client = crate::api_client().build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for (addr, _) in &self.members {
                if let Ok(r) = client.get(format!("http://{addr}/health")).send().await
                    && let Ok(body) = r.json::<serde_json::Value>().await
                    && body["health"] == "true"
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "etcd did not become healthy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for n in 0..self.children.len() {
            self.kill(n);
        }
    }
}
