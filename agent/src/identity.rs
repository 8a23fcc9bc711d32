//! The agent's client certificate for its connections to the control
//! plane (mutual TLS): asked for on the token-authenticated connection
//! (`Certify`, with a fresh key and a certificate request for this node),
//! kept in `data_dir/tls/agent.pem` (certificate and key, 0600), presented
//! on every later connection while valid, and renewed at two thirds of
//! its life on the open connection, which stays up.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use signpost_proto::CertifyRequest;

/// Where the certificate and its key are kept.
pub(crate) fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("tls").join("agent.pem")
}

/// A certificate with its key, and when it is valid.
pub(crate) struct Held {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    /// Its issuer's common name (the mesh root that signed it).
    pub(crate) issuer: String,
}

impl Held {
    /// When to ask for the next one: two thirds into its life.
    pub(crate) fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life * 2 / 3
    }

    pub(crate) fn valid_now(&self) -> bool {
        let now = SystemTime::now();
        self.not_before <= now && now < self.not_after
    }
}

/// The certificate in `file`, if there is a readable one.
pub(crate) fn load(file: &Path) -> Option<Held> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "cannot read the client certificate: connecting with the token only");
            return None;
        }
    };
    let parsed = parse(&text);
    if parsed.is_none() {
        tracing::warn!(file = %file.display(), "unreadable client certificate: connecting with the token only, and asking for a new one");
    }
    parsed
}

pub(crate) fn parse(text: &str) -> Option<Held> {
    let split = text.find("-----BEGIN PRIVATE KEY-----")?;
    let (cert_pem, key_pem) = text.split_at(split);
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    Some(Held {
        cert_pem: cert_pem.to_string(),
        key_pem: key_pem.to_string(),
        not_before: at(cert.validity().not_before.timestamp()),
        not_after: at(cert.validity().not_after.timestamp()),
        issuer: cert
            .issuer()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_string(),
    })
}

/// Asks the control plane on `client` for a certificate for `node` (or,
/// with `service`, for that service's mesh identity on `node`), for a key
/// made here, and keeps both in `file` (0600); returns it.
pub(crate) async fn renew(
    client: &mut crate::sync::Client,
    node: &str,
    service: Option<&str>,
    file: &Path,
) -> Result<Held, tonic::Status> {
    let (csr_pem, key_pem) =
        request(service.unwrap_or(node)).map_err(|e| tonic::Status::internal(format!("{e:#}")))?;
    let reply = client
        .certify(CertifyRequest {
            node: node.to_string(),
            csr_pem,
            service: service.unwrap_or_default().to_string(),
        })
        .await?
        .into_inner();
    let text = format!("{}{key_pem}", reply.cert_pem);
    let held = parse(&text).ok_or_else(|| {
        tonic::Status::internal("the control plane sent an unreadable certificate")
    })?;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            tonic::Status::internal(format!("cannot create {}: {e}", dir.display()))
        })?;
    }
    signpost_daemon::fs::write_atomic(file, text.as_bytes())
        .map_err(|e| tonic::Status::internal(format!("cannot write {}: {e}", file.display())))?;
    Ok(held)
}

/// A new key and a certificate request for `node` (PEM both).
fn request(node: &str) -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate().context("cannot make a key")?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, node);
    let csr = params
        .serialize_request(&key)
        .context("cannot make a certificate request")?;
    Ok((
        csr.pem().context("cannot encode the request")?,
        key.serialize_pem(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_carries_the_node_and_renewal_is_two_thirds_in() {
        let (csr, key) = request("host-a").unwrap();
        assert!(csr.contains("BEGIN CERTIFICATE REQUEST"));
        assert!(key.contains("BEGIN PRIVATE KEY"));
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        let cn = parsed
            .params
            .distinguished_name
            .get(&rcgen::DnType::CommonName)
            .unwrap();
        assert_eq!(cn, &rcgen::DnValue::Utf8String("host-a".to_string()));
        let start = UNIX_EPOCH + Duration::from_secs(1_000);
        let held = Held {
            cert_pem: String::new(),
            key_pem: String::new(),
            not_before: start,
            not_after: start + Duration::from_secs(300),
            issuer: String::new(),
        };
        assert_eq!(held.renew_at(), start + Duration::from_secs(200));
        assert!(!held.valid_now());
    }
}
