//! The address this host is known by in the fleet (`advertise_addr`):
//! given, taken from a named interface, or detected the way Consul does.
//!
//! Other hosts send this host's traffic to it (services that give no
//! address of their own) and probe its liveness listener there, so a
//! wrong default breaks a fleet quietly: loopback is only ever chosen
//! when the control plane is on this host's loopback too (a one-host
//! setup, `signpost dev`), and a host with several candidate addresses
//! refuses to guess.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use nix::net::if_::InterfaceFlags;
use signpost_core::config::{Advertise, AgentConfig};

/// One address of a network interface that is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InterfaceAddr {
    pub(crate) interface: String,
    pub(crate) ip: IpAddr,
    pub(crate) loopback: bool,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AdvertiseError {
    #[error("cannot list the network interfaces: {0}")]
    Interfaces(#[source] nix::Error),
    #[error("advertise_addr: interface {0:?} does not exist or is down")]
    NoInterface(String),
    #[error("advertise_addr: interface {name:?} has no usable address{}", list(.found))]
    InterfaceWithoutAddress { name: String, found: Vec<String> },
    #[error(
        "advertise_addr: interface {name:?} has several {kind} addresses ({}); set advertise_addr to the one other hosts reach",
        .candidates.join(", ")
    )]
    InterfaceAmbiguous {
        name: String,
        kind: &'static str,
        candidates: Vec<String>,
    },
    #[error(
        "advertise_addr is not set and this host has several {kind} addresses: {}; set advertise_addr to the one other hosts reach (an address or interface:NAME)",
        .candidates.join(", ")
    )]
    Ambiguous {
        kind: &'static str,
        candidates: Vec<String>,
    },
    #[error(
        "advertise_addr is not set and this host has no address other hosts could reach (only loopback or link-local); set advertise_addr"
    )]
    NoCandidate,
}

fn list(found: &[String]) -> String {
    if found.is_empty() {
        String::new()
    } else {
        format!(" (only {})", found.join(", "))
    }
}

/// The address to advertise for `config`, reading the host's interfaces
/// only when it is not given.
pub(crate) fn resolve(config: &AgentConfig) -> Result<IpAddr, AdvertiseError> {
    match &config.advertise_addr {
        Some(Advertise::Ip(ip)) => Ok(*ip),
        Some(Advertise::Interface(name)) => of_interface(name, &interfaces()?),
        None if config
            .control_plane
            .as_ref()
            .is_none_or(|cp| cp.on_loopback()) =>
        {
            // The fleet is this host: nothing else needs to reach it.
            Ok(IpAddr::V4(Ipv4Addr::LOCALHOST))
        }
        None => detect(&interfaces()?),
    }
}

/// Every address of every interface that is up.
fn interfaces() -> Result<Vec<InterfaceAddr>, AdvertiseError> {
    let all = nix::ifaddrs::getifaddrs().map_err(AdvertiseError::Interfaces)?;
    Ok(all
        .filter(|i| i.flags.contains(InterfaceFlags::IFF_UP))
        .filter_map(|i| {
            let address = i.address?;
            let ip = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                (Some(v4), _) => IpAddr::V4(v4.ip()),
                (None, Some(v6)) => IpAddr::V6(v6.ip()),
                (None, None) => return None,
            };
            Some(InterfaceAddr {
                interface: i.interface_name,
                loopback: i.flags.contains(InterfaceFlags::IFF_LOOPBACK) || ip.is_loopback(),
                ip,
            })
        })
        .collect())
}

/// The address of interface `name`: its one IPv4 address, else its one
/// IPv6 address that is not link-local.
pub(crate) fn of_interface(name: &str, all: &[InterfaceAddr]) -> Result<IpAddr, AdvertiseError> {
    let mine: Vec<&InterfaceAddr> = all.iter().filter(|a| a.interface == name).collect();
    if mine.is_empty() {
        return Err(AdvertiseError::NoInterface(name.to_string()));
    }
    let v4: Vec<IpAddr> = mine
        .iter()
        .map(|a| a.ip)
        .filter(|ip| ip.is_ipv4() && !link_local(*ip))
        .collect();
    let v6: Vec<IpAddr> = mine
        .iter()
        .map(|a| a.ip)
        .filter(|ip| ip.is_ipv6() && !link_local(*ip))
        .collect();
    for (kind, found) in [("IPv4", v4), ("IPv6", v6)] {
        match found.as_slice() {
            [] => continue,
            [one] => return Ok(*one),
            several => {
                return Err(AdvertiseError::InterfaceAmbiguous {
                    name: name.to_string(),
                    kind,
                    candidates: several.iter().map(ToString::to_string).collect(),
                });
            }
        }
    }
    Err(AdvertiseError::InterfaceWithoutAddress {
        name: name.to_string(),
        found: mine.iter().map(|a| a.ip.to_string()).collect(),
    })
}

/// Consul's rule: the host's one private IPv4 address, else its one public
/// IPv4 address, else its one IPv6 address; loopback and link-local
/// addresses never count, and several of the first kind found is an error
/// that lists them.
pub(crate) fn detect(all: &[InterfaceAddr]) -> Result<IpAddr, AdvertiseError> {
    let usable: Vec<&InterfaceAddr> = all
        .iter()
        .filter(|a| !a.loopback && !a.ip.is_loopback() && !link_local(a.ip))
        .collect();
    let of_kind = |keep: &dyn Fn(IpAddr) -> bool| -> Vec<&InterfaceAddr> {
        let mut found: Vec<&InterfaceAddr> =
            usable.iter().copied().filter(|a| keep(a.ip)).collect();
        // One address on two interfaces (a bond and its slave) is one candidate.
        found.sort_by_key(|a| a.ip);
        found.dedup_by_key(|a| a.ip);
        found
    };
    let kinds: [(&'static str, Vec<&InterfaceAddr>); 3] = [
        (
            "private IPv4",
            of_kind(&|ip| matches!(ip, IpAddr::V4(v4) if private_v4(v4))),
        ),
        (
            "public IPv4",
            of_kind(&|ip| matches!(ip, IpAddr::V4(v4) if !private_v4(v4))),
        ),
        ("IPv6", of_kind(&|ip| ip.is_ipv6())),
    ];
    for (kind, found) in kinds {
        match found.as_slice() {
            [] => continue,
            [one] => return Ok(one.ip),
            several => {
                let candidates = several
                    .iter()
                    .map(|a| {
                        let mut s = a.ip.to_string();
                        let _ = write!(s, " ({})", a.interface);
                        s
                    })
                    .collect();
                return Err(AdvertiseError::Ambiguous { kind, candidates });
            }
        }
    }
    Err(AdvertiseError::NoCandidate)
}

/// RFC 1918 and RFC 6598 (carrier-grade NAT) addresses, as Consul counts
/// private ones.
fn private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_private() || (a == 100 && (64..128).contains(&b))
}

fn link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80 || v6 == Ipv6Addr::UNSPECIFIED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(interface: &str, ip: &str) -> InterfaceAddr {
        let ip: IpAddr = ip.parse().unwrap();
        InterfaceAddr {
            interface: interface.to_string(),
            loopback: ip.is_loopback(),
            ip,
        }
    }

    #[test]
    fn one_private_ipv4_address_wins_over_public_and_ipv6() {
        let all = [
            addr("lo", "127.0.0.1"),
            addr("lo", "::1"),
            addr("eth0", "203.0.113.5"),
            addr("eth1", "10.1.2.3"),
            addr("eth1", "fe80::1"),
            addr("eth1", "2001:db8::5"),
        ];
        assert_eq!(detect(&all).unwrap(), "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn without_a_private_address_one_public_then_one_ipv6_is_taken() {
        let all = [addr("lo", "127.0.0.1"), addr("eth0", "198.18.0.3")];
        assert_eq!(
            detect(&all).unwrap(),
            "198.18.0.3".parse::<IpAddr>().unwrap()
        );
        let all = [
            addr("lo", "127.0.0.1"),
            addr("eth0", "fe80::2"),
            addr("eth0", "2001:db8::7"),
            addr("eth0", "169.254.1.1"),
        ];
        assert_eq!(
            detect(&all).unwrap(),
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        // 100.64.0.0/10 counts as private, as in Consul.
        let all = [addr("eth0", "100.100.1.1"), addr("eth1", "203.0.113.9")];
        assert_eq!(
            detect(&all).unwrap(),
            "100.100.1.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn several_candidates_are_refused_and_listed() {
        let all = [
            addr("eth0", "10.0.0.5"),
            addr("docker0", "172.17.0.1"),
            addr("eth1", "203.0.113.9"),
        ];
        let e = detect(&all).unwrap_err().to_string();
        assert!(e.contains("several private IPv4 addresses"), "{e}");
        assert!(e.contains("10.0.0.5 (eth0)"), "{e}");
        assert!(e.contains("172.17.0.1 (docker0)"), "{e}");
        assert!(!e.contains("203.0.113.9"), "{e}");
        // The same address on two interfaces is one candidate.
        let all = [addr("bond0", "10.0.0.5"), addr("eth0", "10.0.0.5")];
        assert_eq!(detect(&all).unwrap(), "10.0.0.5".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn loopback_and_link_local_alone_are_no_candidates() {
        let all = [
            addr("lo", "127.0.0.1"),
            addr("lo", "::1"),
            addr("eth0", "fe80::1"),
        ];
        let e = detect(&all).unwrap_err().to_string();
        assert!(e.contains("set advertise_addr"), "{e}");
    }

    #[test]
    fn a_named_interface_gives_its_address() {
        let all = [
            addr("eth0", "198.18.0.3"),
            addr("eth0", "fe80::3"),
            addr("eth1", "10.0.0.1"),
            addr("v6only", "2001:db8::1"),
            addr("v6only", "fe80::9"),
            addr("two", "10.0.0.2"),
            addr("two", "10.0.0.3"),
            addr("ll", "fe80::4"),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(of_interface("eth0", &all).unwrap(), ip("198.18.0.3"));
        assert_eq!(of_interface("v6only", &all).unwrap(), ip("2001:db8::1"));
        let e = of_interface("two", &all).unwrap_err().to_string();
        assert!(e.contains("10.0.0.2, 10.0.0.3"), "{e}");
        let e = of_interface("ll", &all).unwrap_err().to_string();
        assert!(e.contains("no usable address (only fe80::4)"), "{e}");
        let e = of_interface("eth9", &all).unwrap_err().to_string();
        assert!(e.contains("\"eth9\" does not exist or is down"), "{e}");
    }

    #[test]
    fn loopback_only_when_the_fleet_is_this_host() {
        let with_cp = |cp: &str| {
            AgentConfig::from_yaml(
                "a.yaml",
                &format!(
                    "control_plane:\n  addresses: [\"{cp}\"]\n  ca_file: ca.pem\n  token: t\n"
                ),
            )
            .unwrap()
        };
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(resolve(&AgentConfig::default()).unwrap(), localhost);
        assert_eq!(resolve(&with_cp("127.0.0.1:8300")).unwrap(), localhost);
        // Given: used as is, loopback included.
        let mut given = with_cp("198.18.0.1:8300");
        given.advertise_addr = Some(Advertise::Ip("127.0.0.9".parse().unwrap()));
        assert_eq!(
            resolve(&given).unwrap(),
            "127.0.0.9".parse::<IpAddr>().unwrap()
        );
        // A remote control plane: never loopback, whatever this host has.
        let remote = resolve(&with_cp("198.18.0.1:8300"));
        assert!(remote.as_ref().is_err() || remote.as_ref().is_ok_and(|ip| !ip.is_loopback()));
    }
}
