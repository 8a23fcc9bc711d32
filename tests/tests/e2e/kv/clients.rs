//! Real Consul clients against agents: py-consul (PyPI) and node-consul
//! (npm), installed by `.ci/run` under `~/.cache/signpost/clients`
//! (`SIGNPOST_CLIENTS` elsewhere). Their scripts are in `tests/clients/`.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use signpost_tests::Agent;

use super::fleet;

/// Where `.ci/run` installs the clients (a Python venv, node modules).
pub(crate) fn clients() -> PathBuf {
    std::env::var_os("SIGNPOST_CLIENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/signpost/clients")
        })
}

pub(crate) fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(name)
}

/// A command running a client script against `agent`.
fn client(name: &str, agent: &Agent) -> Command {
    let dir = clients();
    let mut command = if name.ends_with(".py") {
        let python = dir.join("venv/bin/python");
        assert!(
            python.exists(),
            "py-consul is not installed in {} (see .ci/run)",
            dir.display()
        );
        Command::new(python)
    } else {
        let modules = dir.join("node_modules");
        assert!(
            modules.join("consul").exists(),
            "node-consul is not installed in {} (see .ci/run)",
            dir.display()
        );
        let mut c = Command::new("node");
        c.env("NODE_PATH", modules);
        c
    };
    command
        .arg(script(name))
        .arg(agent.addr.ip().to_string())
        .arg(agent.addr.port().to_string());
    command
}

fn run_ok(mut command: Command) {
    let out = command.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
}

#[tokio::test]
#[ignore = "needs py-consul (PyPI)"]
async fn py_consul_uses_kv_transactions_and_sessions() {
    let (_cp, agents) = fleet(1).await;
    let command = client("py_consul_kv.py", &agents[0]);
    tokio::task::spawn_blocking(move || run_ok(command))
        .await
        .unwrap();
}

#[tokio::test]
#[ignore = "needs node-consul (npm) and node"]
async fn node_consul_uses_kv_transactions_and_sessions() {
    let (_cp, agents) = fleet(1).await;
    let command = client("node_consul.js", &agents[0]);
    tokio::task::spawn_blocking(move || run_ok(command))
        .await
        .unwrap();
}

/// A contender of the election, with what it printed so far.
struct Contender {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Contender {
    fn start(script_name: &str, agent: &Agent, name: &str) -> Contender {
        let mut command = client(script_name, agent);
        command.arg(name).arg("election/leader");
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (out, kept) = (child.stdout.take().unwrap(), lines.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        Contender {
            name: name.to_string(),
            child,
            lines,
        }
    }

    fn led(&self) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("leader "))
            .count()
    }
}

impl Drop for Contender {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

#[tokio::test]
#[ignore = "needs py-consul (PyPI), node-consul (npm) and node"]
async fn leader_election_recipe_elects_one_and_fails_over() {
    let (_cp, agents) = fleet(3).await;
    let mut contenders = vec![
        Contender::start("leader_py.py", &agents[0], "py-0"),
        Contender::start("leader_py.py", &agents[1], "py-1"),
        Contender::start("leader_js.js", &agents[2], "js-2"),
    ];
    let leaders = |cs: &[Contender]| {
        cs.iter()
            .filter(|c| c.led() > 0)
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    };
    let first = agents[0]
        .eventually("a leader is elected", || {
            let found = leaders(&contenders);
            async move { (!found.is_empty()).then_some(found) }
        })
        .await;
    assert_eq!(first.len(), 1, "one leader: {first:?}");
    let entry = agents[1]
        .get("/v1/kv/election/leader?consistent")
        .await
        .json();
    assert_eq!(
        entry[0]["Value"].as_str().map(|v| v.to_string()),
        Some(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            &first[0]
        ))
    );
    // Nobody else takes it while the leader lives (its session renewed).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(leaders(&contenders), first, "still one leader");

    // Kill the leader's process: its session's TTL runs out (2 x 10 s),
    // its lock is released, and after the lock delay one other contender
    // takes over; never two at once.
    let at = contenders.iter().position(|c| c.name == first[0]).unwrap();
    let dead = contenders.remove(at);
    drop(dead);
    // Twice the TTL and the lock delay: longer than the usual patience.
    let second = signpost_tests::poll(
        "another contender takes over",
        Duration::from_secs(90),
        || agents[0].log(),
        || {
            let found = leaders(&contenders);
            async move { (!found.is_empty()).then_some(found) }
        },
    )
    .await;
    assert_eq!(second.len(), 1, "one new leader: {second:?}");
    assert_ne!(second[0], first[0]);
    let entry = agents[2]
        .get("/v1/kv/election/leader?consistent")
        .await
        .json();
    assert_eq!(
        entry[0]["Value"].as_str().map(|v| v.to_string()),
        Some(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            &second[0]
        ))
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(leaders(&contenders), second, "still one leader");
}
