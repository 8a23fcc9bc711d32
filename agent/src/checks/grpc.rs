//! gRPC checks: the standard `grpc.health.v1.Health/Check`; SERVING passes,
//! anything else (or an error) is critical.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use signpost_core::model::Health;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::Outcome;

pub(crate) struct GrpcProbe {
    target: String,
    service: String,
    channel: Result<Channel, String>,
    timeout: Duration,
}

impl GrpcProbe {
    pub(crate) fn new(target: &str, use_tls: bool, skip_verify: bool, timeout: Duration) -> Self {
        let (host_port, service) = match target.split_once('/') {
            Some((hp, svc)) => (hp, svc.to_string()),
            None => (target, String::new()),
        };
        let channel = channel(host_port, use_tls, skip_verify, timeout);
        GrpcProbe {
            target: target.to_string(),
            service,
            channel,
            timeout,
        }
    }

    pub(crate) async fn run(&self) -> Outcome {
        let channel = match &self.channel {
            Ok(c) => c.clone(),
            Err(e) => {
                return Outcome::new(Health::Critical, format!("gRPC check {}: {e}", self.target));
            }
        };
        let request = HealthCheckRequest {
            service: self.service.clone(),
        };
        let mut client = HealthClient::new(channel);
        let call = client.check(request);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => match response.get_ref().status() {
                ServingStatus::Serving => Outcome::new(
                    Health::Passing,
                    format!("gRPC check {}: success", self.target),
                ),
                other => Outcome::new(
                    Health::Critical,
                    format!(
                        "gRPC check {}: failed with status {}",
                        self.target,
                        other.as_str_name()
                    ),
                ),
            },
            Ok(Err(status)) => Outcome::new(
                Health::Critical,
                format!(
                    "gRPC check {}: rpc error: code = {:?} desc = {}",
                    self.target,
                    status.code(),
                    status.message()
                ),
            ),
            Err(_) => Outcome::new(
                Health::Critical,
                format!(
                    "gRPC check {}: timed out after {:?}",
                    self.target, self.timeout
                ),
            ),
        }
    }
}

/// A lazily connecting channel, reused between probes (it reconnects by
/// itself after the service restarts).
fn channel(
    host_port: &str,
    use_tls: bool,
    skip_verify: bool,
    timeout: Duration,
) -> Result<Channel, String> {
    let scheme = if use_tls { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{host_port}"))
        .map_err(|e| format!("invalid target {host_port:?}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if !use_tls {
        return Ok(endpoint.connect_lazy());
    }
    let config = crate::tls::client_config(skip_verify, vec![b"h2".to_vec()])?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let connect = tower::service_fn(move |uri: Uri| {
        let connector = connector.clone();
        async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let name = rustls::pki_types::ServerName::try_from(host)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connect))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::server::health_reporter;

    #[tokio::test]
    async fn serving_passes_and_not_serving_fails() {
        let (reporter, service) = health_reporter();
        reporter
            .set_service_status("payments", tonic_health::ServingStatus::Serving)
            .await;
        reporter
            .set_service_status("ledger", tonic_health::ServingStatus::NotServing)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let t = Duration::from_secs(2);
        let ok = GrpcProbe::new(&format!("{addr}/payments"), false, false, t)
            .run()
            .await;
        assert_eq!(
            ok,
            Outcome::new(
                Health::Passing,
                format!("gRPC check {addr}/payments: success")
            )
        );
        let bad = GrpcProbe::new(&format!("{addr}/ledger"), false, false, t)
            .run()
            .await;
        assert_eq!(bad.status, Health::Critical);
        assert!(bad.output.contains("NOT_SERVING"), "{}", bad.output);
        let unknown = GrpcProbe::new(&format!("{addr}/nope"), false, false, t)
            .run()
            .await;
        assert_eq!(unknown.status, Health::Critical);
        assert!(unknown.output.contains("NotFound"), "{}", unknown.output);
    }

    #[tokio::test]
    async fn unreachable_is_critical() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let out = GrpcProbe::new(&addr.to_string(), false, false, Duration::from_secs(1))
            .run()
            .await;
        assert_eq!(out.status, Health::Critical);
    }
}
