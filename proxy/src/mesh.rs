//! The service mesh in the data plane. A meshed instance is never dialled
//! directly: the proxy dials its host's inbound listener over mutual TLS
//! (TLS 1.3, session resumption on), presenting the certificate of the
//! local service that is calling, and names the instance in the server
//! name (`p<port>.<service>.mesh.invalid`). The listener checks the
//! caller's certificate against the mesh's roots, decides with the
//! intentions, and hands the connection (L4) or each request (L7) to the
//! local instance. L7 goes over HTTP/2 between hosts (one multiplexed
//! connection per instance, calling service and worker thread), L4 over
//! one TLS connection per client connection; ALPN tells them apart.
//!
//! The agent gives the proxy a [`MeshView`] ([`crate::Proxy::set_mesh`]):
//! the certificates of the local services, the roots, the intentions,
//! and how to tell which local service a client connection comes from.

pub(crate) mod inbound;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use signpost_core::identity::{ServiceIdentity, parse_server_name};
use signpost_core::intention::Intentions;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::Liveness;

/// ALPN of an L4 connection between hosts.
pub const ALPN_TCP: &[u8] = b"signpost-tcp/1";
/// ALPN of HTTP between hosts.
pub const ALPN_H2: &[u8] = b"h2";

/// TLS sessions each side keeps for resumption.
const SESSION_CACHE: usize = 4096;

/// How to reach a meshed instance: its host's inbound listener, and the
/// server name that asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshHop {
    pub inbound: SocketAddr,
    pub server_name: ServerName<'static>,
}

impl MeshHop {
    /// The hop to the instance of `service` on `port` behind `inbound`;
    /// `None` when the name cannot be a TLS server name.
    pub fn new(inbound: SocketAddr, service: &str, port: u16) -> Option<MeshHop> {
        let name = signpost_core::identity::server_name(service, port);
        ServerName::try_from(name).ok().map(|server_name| MeshHop {
            inbound,
            server_name,
        })
    }
}

/// A local service calling meshed services: its TLS client settings, with
/// its certificate.
pub struct Caller {
    pub name: Arc<str>,
    tcp: Arc<ClientConfig>,
    h2: Arc<ClientConfig>,
}

/// What the proxy needs of the mesh, as the agent last gave it.
pub struct MeshView {
    pub trust_domain: String,
    /// The local services with a certificate, by name.
    pub callers: HashMap<Arc<str>, Arc<Caller>>,
    /// Local addresses that belong to one local service each (services
    /// registered with an address of their own, such as 127.0.0.2).
    pub sources: HashMap<IpAddr, Arc<str>>,
    /// The service calling from any other address.
    pub default_source: Option<Arc<str>>,
    /// The inbound listener's settings (`None`: no certificate yet).
    pub server: Option<Arc<ServerConfig>>,
    pub intentions: Arc<Intentions>,
}

impl Default for MeshView {
    fn default() -> Self {
        MeshView {
            trust_domain: String::new(),
            callers: HashMap::new(),
            sources: HashMap::new(),
            default_source: None,
            server: None,
            intentions: Arc::new(Intentions::new(
                Vec::new(),
                signpost_core::intention::Action::Deny,
                false,
            )),
        }
    }
}

impl MeshView {
    /// The local service a connection from `client` calls as.
    pub(crate) fn caller(&self, client: IpAddr) -> Result<Arc<Caller>, String> {
        let name = self
            .sources
            .get(&client)
            .or(self.default_source.as_ref())
            .ok_or_else(|| {
                format!(
                    "cannot tell which local service calls from {client}: register the caller with an address of its own, or set mesh.default_source"
                )
            })?;
        self.callers
            .get(name)
            .cloned()
            .ok_or_else(|| format!("the local service {name:?} has no mesh certificate yet"))
    }
}

/// A certificate chain and key, from PEM.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, String> {
    use rustls::pki_types::pem::PemObject as _;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate".to_string());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("key: {e}"))?;
    let key =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| format!("key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(chain, key)))
}

/// The roots in `pems`.
pub fn roots<'a>(pems: impl IntoIterator<Item = &'a str>) -> Result<Arc<RootCertStore>, String> {
    use rustls::pki_types::pem::PemObject as _;
    let mut store = RootCertStore::empty();
    for pem in pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("root: {e}"))?;
            store.add(cert).map_err(|e| format!("root: {e}"))?;
        }
    }
    if store.is_empty() {
        return Err("no root".to_string());
    }
    Ok(Arc::new(store))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies a chain against the roots (as for a client certificate: the
/// mesh's certificates are for both sides).
fn chain_verifier(roots: Arc<RootCertStore>) -> Result<Arc<dyn ClientCertVerifier>, String> {
    WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| format!("roots: {e}"))
}

impl Caller {
    /// `name` calling with `key`, verifying servers against `roots` and
    /// their identity in `trust_domain`.
    pub fn new(
        name: &str,
        key: Arc<CertifiedKey>,
        roots: Arc<RootCertStore>,
        trust_domain: &str,
    ) -> Result<Caller, String> {
        let verifier = Arc::new(PeerVerifier {
            chain: chain_verifier(roots)?,
            trust_domain: trust_domain.to_string(),
            provider: provider(),
        });
        let config = |alpn: &[u8]| -> Result<Arc<ClientConfig>, String> {
            let mut config = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_client_cert_resolver(Arc::new(OneKey(key.clone())));
            config.alpn_protocols = vec![alpn.to_vec()];
            config.resumption = rustls::client::Resumption::in_memory_sessions(SESSION_CACHE);
            Ok(Arc::new(config))
        };
        Ok(Caller {
            name: Arc::from(name),
            tcp: config(ALPN_TCP)?,
            h2: config(ALPN_H2)?,
        })
    }
}

/// The inbound listener's settings: each local service's certificate,
/// chosen by the server name the caller asks for, and callers' verified
/// against `roots`.
pub fn server_config(
    keys: HashMap<String, Arc<CertifiedKey>>,
    roots: Arc<RootCertStore>,
) -> Result<Arc<ServerConfig>, String> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(chain_verifier(roots)?)
        .with_cert_resolver(Arc::new(ByServerName(keys)));
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_TCP.to_vec()];
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    Ok(Arc::new(config))
}

/// The client certificate, whatever the server asks.
#[derive(Debug)]
struct OneKey(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for OneKey {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The certificate of the service the server name asks for.
#[derive(Debug)]
struct ByServerName(HashMap<String, Arc<CertifiedKey>>);

impl ResolvesServerCert for ByServerName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let (service, _) = parse_server_name(hello.server_name()?)?;
        self.0.get(&service).cloned()
    }
}

/// Verifies the inbound listener a proxy dials: a chain to the mesh's
/// roots, for the service the server name asked for, in this trust
/// domain.
#[derive(Debug)]
struct PeerVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let wanted = match server_name {
            ServerName::DnsName(name) => parse_server_name(name.as_ref()).map(|(s, _)| s),
            _ => None,
        };
        let presented = identity_of(end_entity.as_ref());
        match (wanted, presented) {
            (Some(wanted), Some(id))
                if id.trust_domain == self.trust_domain
                    && id.service.eq_ignore_ascii_case(&wanted) =>
            {
                Ok(ServerCertVerified::assertion())
            }
            _ => Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The service identity a certificate's URI SAN names.
pub fn identity_of(der: &[u8]) -> Option<ServiceIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => ServiceIdentity::parse(uri),
        _ => None,
    })
}

/// Why a handshake failed, as a metric label: `expired`, `unknown_ca`,
/// `wrong_identity`, `no_certificate`, `timeout`, or `other`.
pub(crate) fn classify(error: &io::Error) -> &'static str {
    if error.kind() == io::ErrorKind::TimedOut {
        return "timeout";
    }
    let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return "other";
    };
    use rustls::AlertDescription as Alert;
    match tls {
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::UnknownIssuer
            | CertificateError::BadSignature
            | CertificateError::InvalidPurpose => "unknown_ca",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "wrong_identity"
            }
            _ => "other",
        },
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::AlertReceived(alert) => match alert {
            Alert::CertificateExpired => "expired",
            Alert::UnknownCA | Alert::BadCertificate => "unknown_ca",
            Alert::CertificateRequired => "no_certificate",
            _ => "other",
        },
        _ => "other",
    }
}

/// A connection to an instance: straight, or through its host's inbound
/// listener.
pub(crate) enum Upstream {
    Plain(TcpStream),
    Mesh(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Dials `hop` as `caller` (L4 when `l4`, else HTTP/2) within `timeout`,
/// handshake included; a failed handshake is counted by why.
pub(crate) async fn dial(
    hop: &MeshHop,
    caller: &Caller,
    l4: bool,
    timeout: Duration,
    liveness: Liveness,
    metrics: &crate::ProxyMetrics,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let config = if l4 { &caller.tcp } else { &caller.h2 };
    let connect = async {
        let tcp = crate::connect(hop.inbound, timeout, liveness).await?;
        TlsConnector::from(config.clone())
            .connect(hop.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                metrics.mesh_handshake_failed("outbound", classify(&e));
                format!("mesh handshake with {}: {e}", hop.inbound)
            })
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(stream)) => {
            let resumed =
                stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            metrics.mesh_handshake("outbound", resumed);
            Ok(stream)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => {
            metrics.mesh_handshake_failed("outbound", "timeout");
            Err(format!(
                "mesh handshake with {} timed out after {timeout:?}",
                hop.inbound
            ))
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Mesh(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Mesh(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
            Upstream::Mesh(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Mesh(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Handshakes between a [`Caller`] and an inbound [`server_config`], in
/// memory, with certificates from rcgen CAs: who is let in, and why the
/// others are not, as the metrics name it.
#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType,
    };

    const TRUST_DOMAIN: &str = "signpost.mesh";

    fn ca() -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    /// A certificate for `service` signed by `ca`, valid `days` from
    /// `from_days` ago.
    fn leaf(
        ca: &CertifiedIssuer<'static, KeyPair>,
        service: &str,
        (from_days, days): (u32, u32),
    ) -> Arc<CertifiedKey> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let uri = format!("spiffe://{TRUST_DOMAIN}/dc/dc1/svc/{service}");
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
        let day = Duration::from_secs(86_400);
        params.not_before = now - day * from_days;
        params.not_after = now - day * from_days + day * days;
        let cert = params.signed_by(&key, ca).unwrap();
        certified_key(&cert.pem(), &key.serialize_pem()).unwrap()
    }

    fn roots_of(ca: &CertifiedIssuer<'static, KeyPair>) -> Arc<RootCertStore> {
        roots([ca.pem().as_str()]).unwrap()
    }

    /// Dials `server` as `caller` for `service`'s instance on 8080: the
    /// client's result and the server's.
    async fn handshake(
        caller: &Caller,
        server: Arc<ServerConfig>,
        service: &str,
    ) -> (
        Result<(), &'static str>,
        Result<Option<ServiceIdentity>, &'static str>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let hop = MeshHop::new("127.0.0.1:8443".parse().unwrap(), service, 8080).unwrap();
        let connector = TlsConnector::from(caller.h2.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let (client, server) = tokio::join!(
            async {
                let mut tls = connector
                    .connect(hop.server_name.clone(), client_io)
                    .await
                    .map_err(|e| classify(&e))?;
                // TLS 1.3: the server's verdict on the client's
                // certificate arrives after the client's handshake.
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                tls.write_all(b"x").await.map_err(|e| classify(&e))?;
                let mut byte = [0u8; 1];
                tls.read_exact(&mut byte).await.map_err(|e| classify(&e))?;
                Ok(())
            },
            async {
                let mut tls = acceptor.accept(server_io).await.map_err(|e| classify(&e))?;
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| identity_of(c.as_ref()));
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut byte = [0u8; 1];
                tls.read_exact(&mut byte).await.map_err(|e| classify(&e))?;
                tls.write_all(b"y").await.map_err(|e| classify(&e))?;
                tls.flush().await.map_err(|e| classify(&e))?;
                Ok(peer)
            }
        );
        (client, server)
    }

    #[tokio::test]
    async fn callers_are_verified_both_ways_and_failures_are_named() {
        let ours = ca();
        let web = leaf(&ours, "web", (1, 3));
        let server = server_config(
            [("web".to_string(), web)].into_iter().collect(),
            roots_of(&ours),
        )
        .unwrap();
        let api = Caller::new(
            "api",
            leaf(&ours, "api", (1, 3)),
            roots_of(&ours),
            TRUST_DOMAIN,
        )
        .unwrap();

        // The caller is let in, and the server knows who it is.
        let (client, server_side) = handshake(&api, server.clone(), "web").await;
        assert_eq!(client, Ok(()));
        let peer = server_side.unwrap().unwrap();
        assert_eq!(peer.service, "api");
        assert_eq!(peer.trust_domain, TRUST_DOMAIN);

        // A caller from another CA: refused by the server.
        let other = ca();
        let stranger = Caller::new(
            "api",
            leaf(&other, "api", (1, 3)),
            roots_of(&ours),
            TRUST_DOMAIN,
        )
        .unwrap();
        let (_, server_side) = handshake(&stranger, server.clone(), "web").await;
        assert_eq!(server_side, Err("unknown_ca"));

        // An expired caller certificate: refused, and said so.
        let expired = Caller::new(
            "api",
            leaf(&ours, "api", (5, 2)),
            roots_of(&ours),
            TRUST_DOMAIN,
        )
        .unwrap();
        let (_, server_side) = handshake(&expired, server.clone(), "web").await;
        assert_eq!(server_side, Err("expired"));

        // A server that answers for another service than the one asked
        // for: the caller refuses it.
        let impostor = server_config(
            [("db".to_string(), leaf(&ours, "web", (1, 3)))]
                .into_iter()
                .collect(),
            roots_of(&ours),
        )
        .unwrap();
        let (client, _) = handshake(&api, impostor, "db").await;
        assert_eq!(client, Err("wrong_identity"));

        // A service this host has no certificate for: no handshake.
        let (client, server_side) = handshake(&api, server, "payments").await;
        assert!(client.is_err() && server_side.is_err());
    }
}
