//! `signpost dev`: a control plane and an agent in one process, with a demo
//! service, in a temporary directory (TLS included), so that a newcomer
//! sees Signpost work with one command.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use axum::routing::get;
use signpost_core::config::{AgentConfig, ControlPlaneClientConfig};
use signpost_core::control_plane_config::{ControlPlaneConfig, GrpcConfig, HttpConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The port HTTP services' VIPs listen on in `signpost dev`.
const DEV_HTTP_PORT: u16 = 8080;

/// Starts two demo instances, writes their service file and runs an agent
/// with its API on `http_addr` until `shutdown`.
pub async fn run(
    http_addr: &str,
    dns_addr: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listen: SocketAddr = http_addr
        .parse()
        .with_context(|| format!("--http-addr {http_addr:?} must be an ip:port address"))?;
    let dns: SocketAddr = dns_addr
        .parse()
        .with_context(|| format!("--dns-addr {dns_addr:?} must be an ip:port address"))?;
    let dir = tempfile::Builder::new()
        .prefix("signpost-dev-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let services_dir = dir.path().join("services.d");
    std::fs::create_dir_all(&services_dir)?;

    let instances = demo_instances(&shutdown).await?;
    let demo_file = write_demo_file(&services_dir, &instances)?;

    // The control plane, with its own CA, on loopback ports of its own.
    let cp_dir = dir.path().join("control-plane");
    let tls = signpost_control_plane::tls::init(&cp_dir.join("tls"), &["127.0.0.1".to_string()])?;
    let token = format!("dev-{:032x}", rand::random::<u128>());
    let cp_config = ControlPlaneConfig {
        data_dir: cp_dir,
        grpc: GrpcConfig {
            listen: "127.0.0.1:0".parse()?,
            cert_file: Some(tls.cert.clone()),
            key_file: Some(tls.key.clone()),
            ..GrpcConfig::default()
        },
        http: HttpConfig {
            listen: "127.0.0.1:0".parse()?,
            ..HttpConfig::default()
        },
        agent_tokens: vec![token.clone()],
        ..ControlPlaneConfig::default()
    };
    let (cp_ready, cp_listening) = tokio::sync::oneshot::channel();
    let control_plane = tokio::spawn(signpost_control_plane::run(
        cp_config,
        Some(cp_ready),
        shutdown.clone(),
    ));
    let Ok(cp) = cp_listening.await else {
        return control_plane.await?;
    };

    let mut config = AgentConfig {
        node_name: Some("dev".to_string()),
        control_plane: Some(ControlPlaneClientConfig {
            addresses: vec![cp.grpc.to_string()],
            ca_file: tls.ca.clone(),
            token,
            server_name: None,
            http: Some(cp.http.to_string()),
            first_lookup_wait: Duration::from_millis(250),
            subscription_idle: Duration::from_secs(600),
        }),
        data_dir: dir.path().join("data"),
        services_dir: services_dir.clone(),
        ..AgentConfig::default()
    };
    config.api.listen = listen;
    config.dns.listen = dns;
    // Beside an agent already on this host (which has 127.0.0.1:8301).
    config.liveness_port = 0;
    config.mesh.inbound_port = 0;
    // Port 80 needs privileges a newcomer's shell may not have.
    config.proxy.http_port = DEV_HTTP_PORT;
    signpost_daemon::logging::init(&config.log);

    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let agent = tokio::spawn(crate::run(config, None, Some(ready_tx), shutdown.clone()));
    let Ok(api) = ready_rx.await else {
        // The agent failed before listening; its error says why.
        return agent.await?;
    };
    // Give the first checks a moment so the hints show them passing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    print_hints(&Hints {
        api,
        listen,
        dns,
        cp,
        services_dir: &services_dir,
        instances: &instances,
        file: &demo_file,
        dir: dir.path(),
    });
    let result = agent.await?;
    let cp_result = control_plane.await?;
    drop(dir);
    result.and(cp_result)
}

/// Two demo HTTP instances on loopback (`/` and `/health`), until
/// `shutdown`.
async fn demo_instances(shutdown: &CancellationToken) -> anyhow::Result<[SocketAddr; 2]> {
    let mut instances = [SocketAddr::from(([127, 0, 0, 1], 0)); 2];
    for (n, slot) in (1..).zip(instances.iter_mut()) {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        *slot = listener.local_addr()?;
        let body = format!("hello from demo-{n}\n");
        let app = axum::Router::new()
            .route("/", get(move || async move { body }))
            .route("/health", get(|| async { "ok\n" }));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "demo instance failed");
            }
        });
    }
    Ok(instances)
}

/// `services.d/demo.yaml`: the demo instances with HTTP and TCP checks.
fn write_demo_file(
    services_dir: &Path,
    instances: &[SocketAddr],
) -> anyhow::Result<std::path::PathBuf> {
    let mut yaml = String::from(
        "# Edit me: changes apply within a second, mistakes are reported\n# and the last good version keeps serving.\nservices:\n",
    );
    for (i, addr) in instances.iter().enumerate() {
        yaml.push_str(&format!(
            "  - name: demo\n    id: demo-{n}\n    address: {ip}\n    port: {port}\n    tags: [v1]\n    protocol: http\n    checks:\n      - http: http://{addr}/health\n        interval: 2s\n        timeout: 1s\n      - tcp: {addr}\n        interval: 5s\n",
            n = i + 1,
            ip = addr.ip(),
            port = addr.port(),
        ));
    }
    let file = services_dir.join("demo.yaml");
    std::fs::write(&file, yaml)?;
    Ok(file)
}

/// What `signpost dev` tells a newcomer to try.
struct Hints<'a> {
    api: SocketAddr,
    listen: SocketAddr,
    dns: SocketAddr,
    cp: signpost_control_plane::Listening,
    services_dir: &'a Path,
    instances: &'a [SocketAddr],
    file: &'a Path,
    dir: &'a Path,
}

fn print_hints(h: &Hints<'_>) {
    let (api, listen, dns, cp) = (h.api, h.listen, h.dns, h.cp);
    let base = format!("http://{api}");
    let flag = if listen.port() == 8500 && listen.ip().is_loopback() {
        String::new()
    } else {
        format!(" --http-addr {api}")
    };
    println!(
        r#"
Signpost dev is running: a control plane and an agent.
  local API      {base}
  local DNS      {dns} (UDP and TCP), domain "internal"
  control plane  https://{cp_http} (try /v1/nodes; CA {ca}), agents' gRPC on {cp_grpc} (TLS)
  web console    https://{cp_http}/ui/ (its certificate is signed by the CA above; log in with the token in {bootstrap})
  service files  {services_dir}
  demo service   demo-1 at {i1}, demo-2 at {i2} (HTTP and TCP checks)

Try:
  signpost services{flag}                          # or: cargo run -q -p signpost-agent -- services{flag}
  signpost checks{flag}
  curl -s '{base}/v1/health/service/demo?passing'
  dig @{dns_ip} -p {dns_port} demo.service.internal          # the service's stable VIP
  dig @{dns_ip} -p {dns_port} _demo._tcp.service.internal SRV   # VIP and port
  curl -s http://$(dig +short @{dns_ip} -p {dns_port} demo.service.internal):{http_port}/   # through the proxy, to a healthy instance
  dig @{dns_ip} -p {dns_port} dev.node.internal
  signpost maint demo-1 --enable --reason 'trying Signpost'{flag}
  curl -s '{base}/v1/health/service/demo?passing'   # demo-1 is gone
  curl -s -X PUT -d '{{"Name":"web","Port":9000,"Check":{{"TTL":"30s"}}}}' {base}/v1/agent/service/register
  curl -s -X PUT '{base}/v1/agent/check/pass/service:web?note=alive'
  $EDITOR {file}             # add, change or break it
  curl -s {base}/metrics
  curl -s --cacert {ca} https://{cp_http}/v1/health/service/demo   # the fleet, as the control plane sees it
  signpost acl token list --control-plane {cp_http} --ca-file {ca} --token-file {bootstrap}   # ACL tokens

Ctrl-C stops it and removes {dir}."#,
        services_dir = h.services_dir.display(),
        i1 = h.instances[0],
        i2 = h.instances[1],
        file = h.file.display(),
        dir = h.dir.display(),
        cp_http = cp.http,
        ca = h
            .dir
            .join("control-plane")
            .join("tls")
            .join("ca.pem")
            .display(),
        bootstrap = h
            .dir
            .join("control-plane")
            .join("bootstrap-token")
            .display(),
        cp_grpc = cp.grpc,
        dns_ip = dns.ip(),
        dns_port = dns.port(),
        http_port = DEV_HTTP_PORT,
    );
}
