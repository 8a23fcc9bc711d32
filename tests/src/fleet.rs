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
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::PATIENCE;

mod instances;
mod processes;

pub use self::instances::{
    delay_relay, echo_instance, grpc_instance, http_instance, loopback_echo_instance,
    loopback_http_instance,
};
pub use self::processes::{Agent, ControlPlane};

/// The fleet's subnet; host `n` (1: the control plane) is `.n`.
const SUBNET: [u8; 3] = [198, 18, 0];

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
        self.wait_answering_with(client(), url, what).await;
    }

    /// [`Host::wait_answering`] with `client`.
    async fn wait_answering_with(&self, client: reqwest::Client, url: &str, what: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.exited(what) {
                panic!(
                    "{what} on {} exited with {status}:\n{}",
                    self.name,
                    self.log(what)
                );
            }
            let (url, client) = (url.to_string(), client.clone());
            let answered = self
                .run(async move {
                    client
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

/// An HTTP client for a host's loopback (used on that host).
fn client() -> reqwest::Client {
    crate::api_client()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}
