//! The agent starts, answers, and stops cleanly on SIGTERM.

use signpost_tests::Agent;

#[tokio::test]
async fn starts_answers_and_stops_on_sigterm() {
    let mut agent = Agent::start("").await;
    let me = agent.get("/v1/agent/self").await.json();
    assert_eq!(me["Config"]["NodeName"], "test-node");
    assert_eq!(agent.stop().await, Some(0));
}

/// The README's first command: `signpost dev` runs a control plane, an
/// agent and a demo service whose checks pass, and says where to look.
#[tokio::test]
async fn dev_runs_control_plane_agent_and_demo() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let addr = signpost_tests::free_addr();
    let dns = std::net::SocketAddr::new(addr.ip(), 8600);
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(signpost_tests::signpost_bin())
        .args(["dev", "--http-addr", &addr.to_string()])
        .args(["--dns-addr", &dns.to_string()])
        .stdout(out.reopen().unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + signpost_tests::PATIENCE;
    let passing = loop {
        let url = format!("http://{addr}/v1/health/service/demo?passing");
        if let Ok(r) = client.get(url).send().await
            && let Ok(body) = r.json::<serde_json::Value>().await
            && body.as_array().is_some_and(|a| a.len() == 2)
        {
            break body;
        }
        assert!(Instant::now() < deadline, "demo never passed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(passing[0]["Service"]["Service"], "demo");
    let printed = std::fs::read_to_string(out.path()).unwrap();
    assert!(printed.contains("Try:"), "{printed}");
    let line = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("control plane  https://"))
        .unwrap();
    let cp = line.split_whitespace().next().unwrap().to_string();
    // Its API is HTTPS, with the CA the hint names.
    let ca = line
        .split("CA ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap();
    let nodes: serde_json::Value = signpost_tests::control_plane_client(std::path::Path::new(ca))
        .get(format!("https://{cp}/v1/nodes"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(nodes[0]["Node"], "dev");
    assert_eq!(nodes[0]["Status"], "alive");

    // The hint: the demo's name, then its VIP on port 8080, through the
    // proxy to an instance.
    let m = signpost_tests::dns::query(
        dns,
        "demo.service.internal",
        hickory_proto::rr::RecordType::A,
        signpost_tests::dns::Transport::Udp,
    )
    .await;
    let vip = m
        .answers
        .iter()
        .find_map(|r| match &r.data {
            hickory_proto::rr::RData::A(a) => Some(a.0),
            _ => None,
        })
        .unwrap();
    assert!(printed.contains(":8080/"), "{printed}");
    let hello = loop {
        if let Ok(r) = client.get(format!("http://{vip}:8080/")).send().await
            && r.status() == 200
        {
            break r.text().await.unwrap();
        }
        assert!(Instant::now() < deadline, "nothing answers on {vip}:8080");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(hello.starts_with("hello from demo-"), "{hello}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
}
