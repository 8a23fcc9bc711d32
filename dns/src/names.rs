//! What a name under the DNS domain asks for. Labels are read from the
//! right up to a keyword (`service`, `node`, `addr`, `virtual`, ...), after
//! an optional datacenter, as Consul does.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A name under the domain, parsed (labels are lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Parsed<'a> {
    /// The domain itself.
    Apex,
    /// `ns.<domain>`: this server.
    Ns,
    /// `[<tag>.]<service>.service`, or RFC 2782 `_<service>._<tag|tcp>`.
    Service {
        service: &'a str,
        tag: Option<String>,
    },
    /// `<service>.virtual`: the VIP whatever the answer mode.
    Virtual { service: &'a str },
    /// `<node>.node`.
    Node(String),
    /// `<hexip>.addr`.
    Addr(IpAddr),
    /// Nothing we serve (NXDOMAIN).
    Unknown,
}

const KEYWORDS: &[&str] = &[
    "service", "virtual", "node", "addr", "connect", "ingress", "query",
];

/// Parses the labels in front of the domain. Returns what is asked and
/// the datacenter label, if one was given.
pub(crate) fn parse<'a>(labels: &[&'a str]) -> (Parsed<'a>, Option<&'a str>) {
    let n = labels.len();
    match labels {
        [] => return (Parsed::Apex, None),
        ["ns"] => return (Parsed::Ns, None),
        _ => {}
    }
    let is_keyword = |l: &str| KEYWORDS.contains(&l);
    let (k, dc) = if is_keyword(labels[n - 1]) {
        (n - 1, None)
    } else if n >= 3 && labels[n - 1] == "dc" && is_keyword(labels[n - 3]) {
        (n - 3, Some(labels[n - 2]))
    } else if n >= 2 && is_keyword(labels[n - 2]) {
        (n - 2, Some(labels[n - 1]))
    } else if let [service, tag] = labels {
        // RFC 2782 without the `service` label.
        return (rfc2782(service, tag), None);
    } else {
        return (Parsed::Unknown, None);
    };
    let rest = &labels[..k];
    let parsed = match (labels[k], rest) {
        ("service", [service, tag]) if service.starts_with('_') && tag.starts_with('_') => {
            rfc2782(service, tag)
        }
        ("service", [service]) => Parsed::Service { service, tag: None },
        ("service", [tags @ .., service]) if !tags.is_empty() => Parsed::Service {
            service,
            tag: Some(tags.join(".")),
        },
        ("virtual", [service]) => Parsed::Virtual { service },
        ("node", node) if !node.is_empty() => Parsed::Node(node.join(".")),
        ("addr", [hex]) => hex_ip(hex).map_or(Parsed::Unknown, Parsed::Addr),
        _ => Parsed::Unknown,
    };
    (parsed, dc)
}

fn rfc2782<'a>(service: &'a str, tag: &'a str) -> Parsed<'a> {
    match (service.strip_prefix('_'), tag.strip_prefix('_')) {
        (Some(service), Some(tag)) if !service.is_empty() && !tag.is_empty() => Parsed::Service {
            service,
            tag: (tag != "tcp").then(|| tag.to_string()),
        },
        _ => Parsed::Unknown,
    }
}

/// `c000020a` → 192.0.2.10; 32 hex digits → an IPv6 address.
pub(crate) fn hex_ip(hex: &str) -> Option<IpAddr> {
    match hex.len() {
        8 => u32::from_str_radix(hex, 16)
            .ok()
            .map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        32 => u128::from_str_radix(hex, 16)
            .ok()
            .map(|v| IpAddr::V6(Ipv6Addr::from(v))),
        _ => None,
    }
    .filter(|_| hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `<hexip>` label of an address (the inverse of [`hex_ip`]).
pub(crate) fn ip_hex(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{:08x}", u32::from(v4)),
        IpAddr::V6(v6) => format!("{:032x}", u128::from(v6)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> (Parsed<'_>, Option<&str>) {
        let labels: Vec<&str> = if name.is_empty() {
            Vec::new()
        } else {
            name.split('.').collect()
        };
        parse(&labels)
    }

    #[test]
    fn every_query_form() {
        assert_eq!(p("").0, Parsed::Apex);
        assert_eq!(p("ns").0, Parsed::Ns);
        assert_eq!(
            p("web.service"),
            (
                Parsed::Service {
                    service: "web",
                    tag: None
                },
                None
            )
        );
        assert_eq!(
            p("v2.web.service.dc1"),
            (
                Parsed::Service {
                    service: "web",
                    tag: Some("v2".into())
                },
                Some("dc1")
            )
        );
        assert_eq!(
            p("a.b.web.service"),
            (
                Parsed::Service {
                    service: "web",
                    tag: Some("a.b".into())
                },
                None
            )
        );
        assert_eq!(
            p("_web._tcp.service"),
            (
                Parsed::Service {
                    service: "web",
                    tag: None
                },
                None
            )
        );
        assert_eq!(
            p("_web._v2.service.dc1.dc"),
            (
                Parsed::Service {
                    service: "web",
                    tag: Some("v2".into())
                },
                Some("dc1")
            )
        );
        assert_eq!(
            p("_web._tcp").0,
            Parsed::Service {
                service: "web",
                tag: None
            }
        );
        assert_eq!(p("web.virtual").0, Parsed::Virtual { service: "web" });
        assert_eq!(p("host-1.node").0, Parsed::Node("host-1".into()));
        assert_eq!(
            p("my.host.node.dc2"),
            (Parsed::Node("my.host".into()), Some("dc2"))
        );
        assert_eq!(
            p("c000020a.addr").0,
            Parsed::Addr("192.0.2.10".parse().unwrap())
        );
        assert_eq!(
            p("20010db8000000000000000000000001.addr").0,
            Parsed::Addr("2001:db8::1".parse().unwrap())
        );
        for unknown in [
            "service",
            "web",
            "a.b.c",
            "zzzzzzzz.addr",
            "c00002.addr",
            "web.query",
            "web.connect",
            "_._tcp",
        ] {
            assert_eq!(p(unknown).0, Parsed::Unknown, "{unknown}");
        }
    }

    #[test]
    fn hex_round_trips() {
        for ip in ["127.0.0.1", "10.1.2.3", "::1", "2001:db8::ff"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(hex_ip(&ip_hex(ip)), Some(ip));
        }
        assert_eq!(hex_ip("+0000001"), None);
    }
}
