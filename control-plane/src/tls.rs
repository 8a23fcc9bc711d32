//! The control plane's TLS: `init-tls` creates a private CA and a server
//! certificate signed by it; agents verify the server against the CA.
//! The CA also signs agents' client certificates ([`Issuer`]): short-lived,
//! one node each (its name is the certificate's common name).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// The files `init-tls` writes into its directory.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    pub fn in_dir(dir: &Path) -> Self {
        TlsFiles {
            ca: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
        }
    }
}

/// Creates a CA and a server certificate valid for `names` (DNS names or
/// IP addresses). With a CA already in `dir` (`ca.pem` and `ca-key.pem`
/// copied from the first replica), creates only this replica's server
/// certificate, signed by it. Refuses to overwrite existing files.
pub fn init(dir: &Path, names: &[String]) -> anyhow::Result<TlsFiles> {
    // The HTTP API listens on loopback by default, where the CLI reaches it.
    let mut names = names.to_vec();
    for local in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|n| n == local) {
            names.push(local.to_string());
        }
    }
    let names = names.as_slice();
    let files = TlsFiles::in_dir(dir);
    let existing_ca = files.ca.exists() && files.ca_key.exists();
    let to_write: &[&PathBuf] = if existing_ca {
        &[&files.cert, &files.key]
    } else {
        &[&files.ca, &files.ca_key, &files.cert, &files.key]
    };
    for path in to_write {
        if path.exists() {
            bail!(
                "{} already exists: remove it to create new TLS files",
                path.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if existing_ca {
        let issuer = Issuer::load(&files.ca, &files.ca_key, std::time::Duration::ZERO)?;
        let key = KeyPair::generate()?;
        let cert = server_params(names)?.signed_by(&key, &issuer.issuer)?;
        write(&files.cert, cert.pem().as_bytes(), 0o644)?;
        write(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
        return Ok(files);
    }

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Signpost control plane CA");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let key = KeyPair::generate()?;
    let cert = server_params(names)?.signed_by(&key, &ca)?;

    write(&files.ca, ca.pem().as_bytes(), 0o644)?;
    write(&files.ca_key, ca_key_pem.as_bytes(), 0o600)?;
    write(&files.cert, cert.pem().as_bytes(), 0o644)?;
    write(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    Ok(files)
}

/// A server certificate for `names`.
fn server_params(names: &[String]) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "signpost-control-plane");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok(params)
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Signs agents' client certificates with the control plane's CA.
pub struct Issuer {
    issuer: rcgen::Issuer<'static, KeyPair>,
    ttl: std::time::Duration,
}

impl Issuer {
    /// The CA in `ca` (PEM certificate) with its key in `ca_key`.
    pub fn load(ca: &Path, ca_key: &Path, ttl: std::time::Duration) -> anyhow::Result<Issuer> {
        let ca_pem = std::fs::read_to_string(ca)
            .with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
        let key_pem = std::fs::read_to_string(ca_key)
            .with_context(|| format!("cannot read the CA key {}", ca_key.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{}: not a private key", ca_key.display()))?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, key)
            .with_context(|| format!("{}: not a CA certificate", ca.display()))?;
        Ok(Issuer { issuer, ttl })
    }

    /// A client certificate for `node` with the public key of `csr_pem`
    /// (the request's other contents are not used); the PEM and its
    /// expiry (Unix seconds).
    pub fn certify(&self, node: &str, csr_pem: &str) -> Result<(String, u64), String> {
        if csr_pem.len() > 16 * 1024 {
            return Err("the certificate request is larger than 16 KiB".to_string());
        }
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("not a valid certificate request: {e}"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = rcgen::date_time_ymd(1970, 1, 1)
            + std::time::Duration::from_millis(signpost_core::command::now_millis());
        // A little slack for clocks that differ, small beside its life
        // (agents renew two thirds into it, counted from here).
        params.not_before = now - (self.ttl / 10).min(std::time::Duration::from_secs(60));
        params.not_after = now + self.ttl;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let request = rcgen::CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = request
            .signed_by(&self.issuer)
            .map_err(|e| format!("cannot sign: {e}"))?;
        let not_after = signpost_core::command::now_millis() / 1000 + self.ttl.as_secs();
        Ok((cert.pem(), not_after))
    }
}

/// The node a client certificate was issued to (its common name).
pub fn node_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// The HTTP API's TLS: the certificate chain and key in `(cert, key)`
/// (PEM), HTTP/1.1.
pub fn http_server_config(
    (cert, key): &(PathBuf, PathBuf),
) -> anyhow::Result<std::sync::Arc<rustls::ServerConfig>> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| {
            format!(
                "cannot read the HTTP API's certificate {} (create one with `signpost-control-plane init-tls`, or set http.plaintext on loopback)",
                cert.display()
            )
        })?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read the HTTP API's key {}", key.display()))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the HTTP API's certificate does not match its key")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(std::sync::Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent renews two thirds into a certificate's validity: even a
    /// short one must put that point ahead of now, or agents would renew
    /// in a loop.
    #[test]
    fn issued_certificates_name_the_node_and_are_renewed_ahead_of_now() {
        let dir = tempfile::tempdir().unwrap();
        let files = init(dir.path(), &[]).unwrap();
        for ttl in [5, 9, 72 * 3600] {
            let issuer = Issuer::load(
                &files.ca,
                &files.ca_key,
                std::time::Duration::from_secs(ttl),
            )
            .unwrap();
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, "host-a");
            let csr = params.serialize_request(&key).unwrap().pem().unwrap();
            let (pem, _) = issuer.certify("host-a", &csr).unwrap();
            let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
            let cert = pem.parse_x509().unwrap();
            assert_eq!(node_of(&pem.contents).as_deref(), Some("host-a"));
            let (from, to) = (
                cert.validity().not_before.timestamp(),
                cert.validity().not_after.timestamp(),
            );
            let renew_at = from + (to - from) * 2 / 3;
            let now = i64::try_from(signpost_core::command::now_millis() / 1000).unwrap();
            assert!(
                renew_at > now,
                "ttl {ttl}s: renews at {renew_at}, now {now}"
            );
        }
        assert!(
            Issuer::load(&files.ca, &files.ca_key, std::time::Duration::from_secs(60))
                .unwrap()
                .certify("host-a", "not a request")
                .is_err()
        );
    }
}
