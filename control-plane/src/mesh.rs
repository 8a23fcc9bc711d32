//! The service mesh's CA and intentions, kept as records of the KV store
//! (`m/ca`, `m/intention/<destination>/<source>`), so every replica
//! shares them, on etcd as on files, and a write is a compare-and-swap
//! like any other: one record per source and destination, so two
//! replicas creating the same pair at once cannot make two.
//!
//! The CA is created by the first replica that starts without one. It
//! signs each service's certificate (`spiffe://<trust domain>/dc/<dc>/svc/<name>`,
//! for a key that never leaves its agent). A rotation adds a new root and
//! cross-signs it with the old one: certificates signed by the new root
//! travel with that cross-signed copy, so agents that trust only the old
//! root still verify them, and both roots are trusted until every
//! certificate of the old one has expired (one leaf lifetime), when the
//! old root is dropped.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};
use signpost_core::command::now_millis;
use signpost_core::control_plane_config::MeshCaConfig;
use signpost_core::identity::ServiceIdentity;
use signpost_core::intention::{Action, Intention};

use crate::kv::{Kv, KvError};

/// The CA's record.
pub const CA_RECORD: &str = "ca";
/// Where intentions are kept, by destination and source
/// ([`intention_record`]).
pub const INTENTION_PREFIX: &str = "intention/";

/// How long a root is valid.
const ROOT_LIFE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How often the CA is checked (created if missing, old roots dropped).
const CHECK_EVERY: Duration = Duration::from_secs(30);
/// Largest certificate request taken.
const MAX_CSR: usize = 16 * 1024;

/// The CA as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaRecord {
    pub trust_domain: String,
    /// The root that signs new certificates.
    pub active: String,
    /// Every root trusted, oldest first.
    pub roots: Vec<Root>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Root {
    pub id: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// This root signed by the one before it (certificates it signs
    /// carry this, so agents that trust only the old root verify them).
    #[serde(default)]
    pub cross_signed_pem: Option<String>,
    pub created_ms: u64,
}

/// Why the mesh CA could not do something.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Store(#[from] KvError),
    #[error("the mesh CA does not exist yet: the control plane creates it at start")]
    NoCa,
    #[error("the mesh CA record is unreadable: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot sign: {0}")]
    Sign(String),
    #[error("another write changed the mesh CA at the same time: try again")]
    Conflict,
}

impl CaRecord {
    /// A new CA with one root.
    pub fn new(trust_domain: &str) -> Result<CaRecord, MeshError> {
        let root = new_root(None)?;
        Ok(CaRecord {
            trust_domain: trust_domain.to_string(),
            active: root.id.clone(),
            roots: vec![root],
        })
    }

    pub fn active_root(&self) -> Result<&Root, MeshError> {
        self.roots
            .iter()
            .find(|r| r.id == self.active)
            .ok_or_else(|| MeshError::Corrupt(format!("no root {}", self.active)))
    }

    /// Adds a new root, cross-signed by the active one, and makes it the
    /// active one.
    pub fn rotate(&mut self) -> Result<&Root, MeshError> {
        let old = self.active_root()?.clone();
        let root = new_root(Some(&old))?;
        self.active = root.id.clone();
        self.roots.push(root);
        self.active_root()
    }

    /// Drops the roots other than the active one once every certificate
    /// they signed has expired (`leaf_ttl` after the active one took
    /// over, with a margin for clocks); whether any was.
    pub fn prune(&mut self, leaf_ttl: Duration, now_ms: u64) -> bool {
        let Ok(active) = self.active_root() else {
            return false;
        };
        let until = active.created_ms
            + u64::try_from((leaf_ttl + Duration::from_secs(600)).as_millis()).unwrap_or(u64::MAX);
        if now_ms < until || self.roots.len() == 1 {
            return false;
        }
        let active = self.active.clone();
        self.roots.retain(|r| r.id == active);
        true
    }

    /// A certificate for `service` in `datacenter` with the public key of
    /// `csr_pem` (nothing else of the request is used), valid for `ttl`:
    /// the chain's PEM (with the cross-signed root during a rotation),
    /// its expiry (Unix seconds) and the root that signed it.
    pub fn sign_leaf(
        &self,
        datacenter: &str,
        service: &str,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<(String, u64, String), MeshError> {
        if csr_pem.len() > MAX_CSR {
            return Err(MeshError::Invalid(
                "the certificate request is larger than 16 KiB".into(),
            ));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| MeshError::Invalid(format!("not a valid certificate request: {e}")))?;
        let root = self.active_root()?;
        let key =
            KeyPair::from_pem(&root.key_pem).map_err(|e| MeshError::Corrupt(e.to_string()))?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&root.cert_pem, key)
            .map_err(|e| MeshError::Corrupt(e.to_string()))?;
        let uri = ServiceIdentity {
            trust_domain: self.trust_domain.clone(),
            datacenter: datacenter.to_string(),
            service: service.to_string(),
        }
        .uri();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, service);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            uri.clone()
                .try_into()
                .map_err(|e| MeshError::Invalid(format!("{uri}: {e}")))?,
        )];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_millis(now_millis());
        params.not_before = now - (ttl / 10).min(Duration::from_secs(60));
        params.not_after = now + ttl;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let cert = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&issuer)
        .map_err(|e| MeshError::Sign(e.to_string()))?;
        let mut chain = cert.pem();
        if let Some(cross) = &root.cross_signed_pem {
            chain.push_str(cross);
        }
        let not_after = now_millis() / 1000 + ttl.as_secs();
        Ok((chain, not_after, root.id.clone()))
    }

    /// The roots as agents get them (no keys).
    pub fn to_wire(&self) -> Vec<signpost_proto::MeshRoot> {
        self.roots
            .iter()
            .map(|r| signpost_proto::MeshRoot {
                id: r.id.clone(),
                cert_pem: r.cert_pem.clone(),
            })
            .collect()
    }
}

/// A root CA: its own key, signed by itself, and by `previous` if given.
fn new_root(previous: Option<&Root>) -> Result<Root, MeshError> {
    let id: String = rand::random::<[u8; 8]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let params = || {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, root_name(&id));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_millis(now_millis());
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + ROOT_LIFE;
        params
    };
    let sign = |e: rcgen::Error| MeshError::Sign(e.to_string());
    let key = KeyPair::generate().map_err(sign)?;
    let key_pem = key.serialize_pem();
    let cross_signed_pem = match previous {
        Some(old) => {
            let old_key =
                KeyPair::from_pem(&old.key_pem).map_err(|e| MeshError::Corrupt(e.to_string()))?;
            let old_issuer = rcgen::Issuer::from_ca_cert_pem(&old.cert_pem, old_key)
                .map_err(|e| MeshError::Corrupt(e.to_string()))?;
            Some(params().signed_by(&key, &old_issuer).map_err(sign)?.pem())
        }
        None => None,
    };
    let cert = params().self_signed(&key).map_err(sign)?;
    Ok(Root {
        id,
        cert_pem: cert.pem(),
        key_pem,
        cross_signed_pem,
        created_ms: now_millis(),
    })
}

/// The CA as the store has it now, with its modify index.
pub fn load(kv: &Kv) -> Result<Option<(CaRecord, u64)>, MeshError> {
    Ok(load_indexed(kv)?.map(|(ca, _, modify)| (ca, modify)))
}

/// The CA as the store has it now, with its create and modify index.
pub fn load_indexed(kv: &Kv) -> Result<Option<(CaRecord, u64, u64)>, MeshError> {
    let Some((_, create, modify, bytes)) = kv
        .mirror()
        .mesh(CA_RECORD)
        .into_iter()
        .find(|(name, ..)| name == CA_RECORD)
    else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(|ca| Some((ca, create, modify)))
        .map_err(|e| MeshError::Corrupt(e.to_string()))
}

// === impl CaRecord (Consul's shape) ===

impl CaRecord {
    /// The roots as `GET /v1/connect/ca/roots` answers them (no keys);
    /// `create`/`modify` are the record's indexes.
    pub fn to_consul(&self, create: u64, modify: u64) -> signpost_core::consul::CaRootList {
        signpost_core::consul::CaRootList {
            active_root_id: self.active.clone(),
            trust_domain: self.trust_domain.clone(),
            roots: self
                .roots
                .iter()
                .map(|r| signpost_core::consul::CaRoot {
                    id: r.id.clone(),
                    name: root_name(&r.id),
                    root_cert: r.cert_pem.clone(),
                    intermediate_certs: r.cross_signed_pem.iter().cloned().collect(),
                    active: r.id == self.active,
                    create_index: create,
                    modify_index: modify,
                })
                .collect(),
        }
    }
}

/// A root's name: its certificate's common name.
pub fn root_name(id: &str) -> String {
    format!("Signpost mesh CA {id}")
}

/// Writes `ca` if the record's index is still `expected`.
async fn store(kv: &Kv, ca: &CaRecord, expected: Option<u64>) -> Result<(), MeshError> {
    let bytes = serde_json::to_vec(ca).map_err(|e| MeshError::Corrupt(e.to_string()))?;
    match kv.put_mesh(CA_RECORD, Some(bytes), Some(expected)).await? {
        (true, _) => Ok(()),
        (false, _) => Err(MeshError::Conflict),
    }
}

/// Rotates the CA: a new root, cross-signed; agents renew their
/// certificates as soon as they hear of it. The new root's ID.
pub async fn rotate(kv: &Kv) -> Result<String, MeshError> {
    let (mut ca, modify) = load(kv)?.ok_or(MeshError::NoCa)?;
    let id = ca.rotate()?.id.clone();
    store(kv, &ca, Some(modify)).await?;
    tracing::info!(root = %id, "mesh CA rotated: the new root signs from now on, both are trusted");
    Ok(id)
}

/// Creates the CA if there is none, and drops expired old roots, now
/// and every [`CHECK_EVERY`] until `stop`. Never fails: a store that
/// cannot be written is tried again.
pub async fn keep_ca(
    kv: std::sync::Arc<Kv>,
    config: MeshCaConfig,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        if let Err(error) = check_ca(&kv, &config).await {
            tracing::warn!(%error, "mesh CA: cannot create or tidy it; trying again");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}

async fn check_ca(kv: &Kv, config: &MeshCaConfig) -> Result<(), MeshError> {
    match load(kv)? {
        None => {
            let ca = CaRecord::new(&config.trust_domain)?;
            match store(kv, &ca, None).await {
                Ok(()) => {
                    tracing::info!(trust_domain = %ca.trust_domain, root = %ca.active, "mesh CA created");
                    Ok(())
                }
                // Another replica created it first.
                Err(MeshError::Conflict) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Some((mut ca, modify)) => {
            if ca.trust_domain != config.trust_domain {
                tracing::warn!(stored = %ca.trust_domain, configured = %config.trust_domain,
                    "mesh.trust_domain differs from the mesh CA's: the CA's is kept");
            }
            if ca.prune(config.leaf_ttl, now_millis()) {
                store(kv, &ca, Some(modify)).await?;
                tracing::info!(root = %ca.active, "mesh CA: roots older than the last leaf they signed dropped");
            }
            Ok(())
        }
    }
}

/// The record of the intention from `source` to `destination`
/// (`intention/<destination>/<source>`; service names hold no `/`).
pub fn intention_record(source: &str, destination: &str) -> String {
    format!("{INTENTION_PREFIX}{destination}/{source}")
}

/// An intention as the store has it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredIntention {
    /// Its record's name.
    pub record: String,
    pub intention: Intention,
    pub create_index: u64,
    pub modify_index: u64,
}

/// Every intention in the store, with its record (undecodable ones are
/// logged and left out).
pub fn stored_intentions(kv: &Kv) -> Vec<StoredIntention> {
    kv.mirror()
        .mesh(INTENTION_PREFIX)
        .into_iter()
        .filter_map(decode_intention)
        .collect()
}

/// The intention in `record` ([`intention_record`]), if there is one.
pub fn stored_intention(kv: &Kv, record: &str) -> Option<StoredIntention> {
    kv.mirror()
        .mesh(record)
        .into_iter()
        .find(|(name, ..)| name == record)
        .and_then(decode_intention)
}

fn decode_intention(
    (record, create_index, modify_index, bytes): (String, u64, u64, Vec<u8>),
) -> Option<StoredIntention> {
    match serde_json::from_slice::<Intention>(&bytes) {
        Ok(intention) => Some(StoredIntention {
            record,
            intention,
            create_index,
            modify_index,
        }),
        Err(error) => {
            tracing::error!(%record, %error, "undecodable intention skipped");
            None
        }
    }
}

/// Every intention in the store, with its create and modify index.
pub fn intentions(kv: &Kv) -> Vec<(Intention, u64, u64)> {
    stored_intentions(kv)
        .into_iter()
        .map(|s| (s.intention, s.create_index, s.modify_index))
        .collect()
}

/// What agents are sent: roots, intentions and the fleet's defaults;
/// `None` before the CA exists.
pub fn state(kv: &Kv, config: &MeshCaConfig) -> Option<signpost_proto::MeshState> {
    let ca = match load(kv) {
        Ok(Some((ca, _))) => ca,
        Ok(None) => return None,
        Err(error) => {
            tracing::error!(%error, "mesh CA unreadable: agents keep the roots they have");
            return None;
        }
    };
    Some(signpost_proto::MeshState {
        trust_domain: ca.trust_domain.clone(),
        roots: ca.to_wire(),
        active_root: ca.active.clone(),
        intentions: intentions(kv)
            .into_iter()
            .filter_map(|(i, _, _)| serde_json::to_string(&i).ok())
            .collect(),
        default_action: match config.default_intention {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
        .to_string(),
        shadow: config.shadow,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, UnixTime};
    use rustls_pki_types::pem::PemObject as _;

    fn csr() -> String {
        let key = KeyPair::generate().unwrap();
        CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    }

    fn verifier(roots: &[&Root]) -> std::sync::Arc<dyn rustls::server::danger::ClientCertVerifier> {
        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            store
                .add(CertificateDer::from_pem_slice(r.cert_pem.as_bytes()).unwrap())
                .unwrap();
        }
        rustls::server::WebPkiClientVerifier::builder_with_provider(
            store.into(),
            rustls::crypto::ring::default_provider().into(),
        )
        .build()
        .unwrap()
    }

    fn verifies(
        verifier: &dyn rustls::server::danger::ClientCertVerifier,
        chain_pem: &str,
    ) -> bool {
        let chain: Vec<CertificateDer> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .is_ok()
    }

    /// During a rotation a certificate of the new root is verified by
    /// agents that trust only the old root (through the cross-signed
    /// copy) and by those that trust both; one of the old root by both.
    #[test]
    fn a_rotated_ca_is_trusted_by_old_and_new_agents_alike() {
        let mut ca = CaRecord::new("signpost.mesh").unwrap();
        let ttl = Duration::from_secs(3600);
        let (old_leaf, _, old_root) = ca.sign_leaf("dc1", "web", &csr(), ttl).unwrap();
        let old = ca.active_root().unwrap().clone();
        let new = ca.rotate().unwrap().clone();
        assert_ne!(old.id, new.id);
        let (new_leaf, _, new_root) = ca.sign_leaf("dc1", "web", &csr(), ttl).unwrap();
        assert_eq!((old_root, new_root), (old.id.clone(), new.id.clone()));
        let only_old = verifier(&[&old]);
        let both = verifier(&[&old, &new]);
        let only_new = verifier(&[&new]);
        assert!(verifies(only_old.as_ref(), &new_leaf));
        assert!(verifies(both.as_ref(), &new_leaf));
        assert!(verifies(both.as_ref(), &old_leaf));
        assert!(verifies(only_new.as_ref(), &new_leaf));
        assert!(!verifies(only_new.as_ref(), &old_leaf));
        // An unrelated CA's certificates are not.
        let other = CaRecord::new("signpost.mesh").unwrap();
        let (foreign, _, _) = other.sign_leaf("dc1", "web", &csr(), ttl).unwrap();
        assert!(!verifies(both.as_ref(), &foreign));

        // The old root goes once its last certificate has expired.
        assert!(!ca.prune(ttl, now_millis()));
        assert!(ca.prune(ttl, now_millis() + 2 * 3600 * 1000));
        assert_eq!(ca.roots.len(), 1);
        assert_eq!(ca.active, new.id);
    }

    #[test]
    fn roots_are_shown_in_consuls_shape_without_keys() {
        let mut ca = CaRecord::new("signpost.mesh").unwrap();
        let old = ca.active.clone();
        let new = ca.rotate().unwrap().id.clone();
        let list = ca.to_consul(3, 7);
        assert_eq!(list.active_root_id, new);
        assert_eq!(list.trust_domain, "signpost.mesh");
        let shown: Vec<(&str, bool, usize)> = list
            .roots
            .iter()
            .map(|r| (r.id.as_str(), r.active, r.intermediate_certs.len()))
            .collect();
        assert_eq!(shown, [(old.as_str(), false, 0), (new.as_str(), true, 1)]);
        assert_eq!(
            (list.roots[1].create_index, list.roots[1].modify_index),
            (3, 7)
        );
        assert_eq!(list.roots[1].name, format!("Signpost mesh CA {new}"));
        let text = serde_json::to_string(&list).unwrap();
        assert!(text.contains("\"ActiveRootID\""), "{text}");
        assert!(!text.contains("PRIVATE KEY"), "no key is ever shown");
        assert_eq!(intention_record("web", "db"), "intention/db/web");
    }

    #[test]
    fn leaves_carry_the_service_identity_and_bad_requests_are_refused() {
        let ca = CaRecord::new("signpost.mesh").unwrap();
        let (pem, not_after, _) = ca
            .sign_leaf("dc1", "web", &csr(), Duration::from_secs(72 * 3600))
            .unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let uris: Vec<String> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(uris, ["spiffe://signpost.mesh/dc/dc1/svc/web"]);
        assert!(not_after > now_millis() / 1000 + 71 * 3600);
        assert!(matches!(
            ca.sign_leaf("dc1", "web", "garbage", Duration::from_secs(60)),
            Err(MeshError::Invalid(_))
        ));
    }
}
