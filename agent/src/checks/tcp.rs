//! TCP checks: a successful connect passes.

use std::time::Duration;

use signpost_core::model::Health;
use tokio::net::TcpStream;

use super::Outcome;

pub(crate) struct TcpProbe {
    address: String,
    timeout: Duration,
}

impl TcpProbe {
    pub(crate) fn new(address: &str, timeout: Duration) -> Self {
        TcpProbe {
            address: address.to_string(),
            timeout,
        }
    }

    pub(crate) async fn run(&self) -> Outcome {
        match tokio::time::timeout(self.timeout, TcpStream::connect(&self.address)).await {
            Ok(Ok(_stream)) => Outcome::new(
                Health::Passing,
                format!("TCP connect {}: Success", self.address),
            ),
            Ok(Err(e)) => Outcome::new(Health::Critical, format!("dial tcp {}: {e}", self.address)),
            Err(_) => Outcome::new(
                Health::Critical,
                format!(
                    "dial tcp {}: i/o timeout after {:?}",
                    self.address, self.timeout
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_on_listener_and_fails_when_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let probe = TcpProbe::new(&addr, Duration::from_secs(2));
        let ok = probe.run().await;
        assert_eq!(ok.status, Health::Passing);
        assert_eq!(ok.output, format!("TCP connect {addr}: Success"));
        drop(listener);
        let down = probe.run().await;
        assert_eq!(down.status, Health::Critical);
        assert!(down.output.contains("refused"), "{}", down.output);
    }
}
