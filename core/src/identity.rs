//! Service identities in the mesh: the SPIFFE ID a service's certificate
//! carries (`spiffe://<trust domain>/dc/<dc>/svc/<service>`), and the TLS
//! server name a consumer's proxy dials a host's inbound listener with,
//! which names the instance it wants (`p<port>.<service>.mesh.invalid`:
//! `.invalid` never resolves, so the name cannot reach anything else).

/// What every server name ends with.
const SERVER_NAME_SUFFIX: &str = ".mesh.invalid";

/// A service's identity, as its certificate's URI SAN names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceIdentity {
    pub trust_domain: String,
    pub datacenter: String,
    pub service: String,
}

impl ServiceIdentity {
    /// `spiffe://<trust domain>/dc/<dc>/svc/<service>`.
    pub fn uri(&self) -> String {
        format!(
            "spiffe://{}/dc/{}/svc/{}",
            self.trust_domain, self.datacenter, self.service
        )
    }

    /// The identity `uri` names, if it is a service's.
    pub fn parse(uri: &str) -> Option<ServiceIdentity> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (trust_domain, path) = rest.split_once('/')?;
        let mut parts = path.split('/');
        let (Some("dc"), Some(datacenter), Some("svc"), Some(service), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        (valid_trust_domain(trust_domain)
            && !datacenter.is_empty()
            && crate::model::valid_name(service)
            && !service.is_empty())
        .then(|| ServiceIdentity {
            trust_domain: trust_domain.to_string(),
            datacenter: datacenter.to_string(),
            service: service.to_string(),
        })
    }
}

/// A trust domain is a DNS name in lowercase (SPIFFE's rule).
pub fn valid_trust_domain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// The server name that asks a host's inbound listener for the instance
/// of `service` on `port`: `p<port>.<service>.mesh.invalid`, in
/// lowercase (DNS names are compared without case).
pub fn server_name(service: &str, port: u16) -> String {
    format!(
        "p{port}.{}{SERVER_NAME_SUFFIX}",
        service.to_ascii_lowercase()
    )
}

/// The service (in lowercase) and port a server name asks for.
pub fn parse_server_name(name: &str) -> Option<(String, u16)> {
    let rest = name
        .to_ascii_lowercase()
        .strip_suffix(SERVER_NAME_SUFFIX)?
        .strip_prefix('p')?
        .to_string();
    let (port, service) = rest.split_once('.')?;
    let port: u16 = port.parse().ok()?;
    (port != 0 && !service.is_empty() && crate::model::valid_name(service))
        .then(|| (service.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_and_foreign_uris_are_refused() {
        let id = ServiceIdentity {
            trust_domain: "signpost.mesh".into(),
            datacenter: "dc1".into(),
            service: "web".into(),
        };
        assert_eq!(id.uri(), "spiffe://signpost.mesh/dc/dc1/svc/web");
        assert_eq!(ServiceIdentity::parse(&id.uri()), Some(id));
        for bad in [
            "spiffe://signpost.mesh/dc/dc1/svc/",
            "spiffe://signpost.mesh/dc/dc1/svc/web/extra",
            "spiffe://signpost.mesh/ns/default/dc/dc1/svc/web",
            "spiffe://Signpost/dc/dc1/svc/web",
            "https://signpost.mesh/dc/dc1/svc/web",
            "spiffe://signpost.mesh/dc/dc1/svc/we b",
        ] {
            assert_eq!(ServiceIdentity::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn server_names_name_one_instance() {
        let name = server_name("Web.v2", 8080);
        assert_eq!(name, "p8080.web.v2.mesh.invalid");
        assert_eq!(parse_server_name(&name), Some(("web.v2".into(), 8080)));
        assert_eq!(
            parse_server_name("P8080.WEB.MESH.INVALID"),
            Some(("web".into(), 8080))
        );
        for bad in [
            "p0.web.mesh.invalid",
            "p70000.web.mesh.invalid",
            "8080.web.mesh.invalid",
            "p8080.mesh.invalid",
            "p8080.web.example.com",
        ] {
            assert_eq!(parse_server_name(bad), None, "{bad}");
        }
    }
}
