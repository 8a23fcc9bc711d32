//! This hop's headers: the ones that belong to one connection and are
//! never forwarded (RFC 9110 §7.6.1), a switch of protocols carried
//! across, the attempt number every request to an instance carries, and
//! the balancing key a hash balancer reads from a request.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use signpost_core::policy::{HashKey, Policy};

use crate::balance::{hash_ip, hash_key};

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// The attempt header's value; the usual ones without an allocation.
pub(super) fn attempt_value(attempt: u32) -> HeaderValue {
    const VALUES: [&str; 4] = ["1", "2", "3", "4"];
    match VALUES.get(attempt.wrapping_sub(1) as usize) {
        Some(value) => HeaderValue::from_static(value),
        None => HeaderValue::from(attempt),
    }
}

/// Where `name` is in [`HOP_BY_HOP`]: a match on the name's text, which
/// looks at its length first, where comparing `HeaderName`s one by one
/// compares bytes for every custom one.
fn hop_by_hop(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "transfer-encoding" => Some(3),
        "upgrade" => Some(4),
        "proxy-authorization" => Some(5),
        _ => None,
    }
}

/// Removes the headers that belong to one connection. Returns the
/// `Upgrade` header's value when `Connection` names it: the protocols the
/// message asks to switch to (or, on a 101, switches to).
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    // One pass over the names says which are here (most messages carry
    // one or none): only those are looked up and removed.
    let mut present = [false; HOP_BY_HOP.len()];
    let mut te = false;
    for name in headers.keys() {
        match hop_by_hop(name) {
            Some(i) => present[i] = true,
            None => te |= name == header::TE,
        }
    }
    // Headers named in Connection (HOP_BY_HOP[0]) are hop-by-hop too (its
    // usual `close` and `keep-alive` need no lookup). One lookup removes
    // it and yields its values.
    let mut named: Vec<HeaderName> = Vec::new();
    let mut upgrade_named = false;
    if present[0]
        && let header::Entry::Occupied(connection) = headers.entry(header::CONNECTION)
    {
        for value in connection.remove_entry_mult().1 {
            let bytes = value.as_bytes();
            if bytes.eq_ignore_ascii_case(b"keep-alive") || bytes.eq_ignore_ascii_case(b"close") {
                continue;
            }
            let Ok(value) = value.to_str() else { continue };
            named.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|n| {
                        if n.eq_ignore_ascii_case("upgrade") {
                            upgrade_named = true;
                            return false;
                        }
                        !n.eq_ignore_ascii_case("close") && !n.eq_ignore_ascii_case("keep-alive")
                    })
                    .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok()),
            );
        }
    }
    let mut upgrade = None;
    for (name, _) in HOP_BY_HOP
        .iter()
        .zip(present)
        .skip(1)
        .filter(|(_, here)| *here)
    {
        let removed = headers.remove(name);
        if *name == header::UPGRADE {
            upgrade = removed;
        }
    }
    for name in &named {
        headers.remove(name);
    }
    // TE survives only as "trailers" (gRPC needs it).
    if te
        && headers
            .get(header::TE)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
    upgrade.filter(|_| upgrade_named)
}

/// This hop's own headers for a switch to `protocols` (the ones the last
/// hop sent were stripped with the other hop-by-hop headers).
pub(super) fn set_upgrade(headers: &mut HeaderMap, protocols: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocols);
}

/// Does an `Upgrade` value name h2c? That switch is not passed on: the
/// connection would carry HTTP/2 past the proxy's per-request routing,
/// and the proxy speaks h2c to clients itself (as Envoy strips it).
pub(super) fn names_h2c(protocols: &HeaderValue) -> bool {
    protocols
        .as_bytes()
        .split(|b| *b == b',')
        .any(|p| p.trim_ascii().eq_ignore_ascii_case(b"h2c"))
}

/// What a [`Balancer::Hash`] service hashes for this request; the client's
/// IP when the header or cookie is missing.
pub(super) fn balance_key(policy: &Policy, headers: &HeaderMap, client: SocketAddr) -> u64 {
    let found = match &policy.hash_key {
        HashKey::ClientIp => None,
        HashKey::Header(name) => headers.get(name.as_str()).map(|v| hash_key(v.as_bytes())),
        HashKey::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| hash_key(v.as_bytes())),
    };
    found.unwrap_or_else(|| hash_ip(client.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_scoped_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
        let mut grpc = HeaderMap::new();
        grpc.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut grpc);
        assert!(grpc.contains_key(header::TE));
    }

    #[test]
    fn hop_by_hop_names_are_found_by_text() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop(name), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop(&header::TE), None);
        assert_eq!(hop_by_hop(&header::HOST), None);
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("x-a"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-b"),
        );
        for name in [
            "x-a",
            "x-b",
            "keep-alive",
            "upgrade",
            "proxy-authorization",
            "x-kept",
        ] {
            h.insert(name, HeaderValue::from_static("1"));
        }
        // An Upgrade header that Connection does not name asks for nothing.
        assert_eq!(strip_hop_by_hop(&mut h), None);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn a_switch_of_protocols_is_found_and_h2c_told_apart() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("sec-websocket-key", HeaderValue::from_static("k"));
        assert_eq!(
            strip_hop_by_hop(&mut h),
            Some(HeaderValue::from_static("websocket"))
        );
        assert_eq!(h.keys().collect::<Vec<_>>(), ["sec-websocket-key"]);
        assert!(names_h2c(&HeaderValue::from_static("foo, H2C")));
        assert!(!names_h2c(&HeaderValue::from_static("websocket")));
    }

    #[test]
    fn attempt_numbers_are_written_in_decimal() {
        for n in [1, 2, 4, 5, 12] {
            assert_eq!(attempt_value(n), n.to_string().as_str());
        }
    }

    #[test]
    fn the_hash_key_is_the_named_header_or_cookie_else_the_client_ip() {
        let client: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("alice"));
        h.append(header::COOKIE, HeaderValue::from_static("a=1; session=s42"));
        let policy = |key| Policy {
            hash_key: key,
            ..Policy::default()
        };
        let header = policy(HashKey::Header("x-user".into()));
        assert_eq!(balance_key(&header, &h, client), hash_key(b"alice"));
        let cookie = policy(HashKey::Cookie("session".into()));
        assert_eq!(balance_key(&cookie, &h, client), hash_key(b"s42"));
        let ip = hash_ip(client.ip());
        assert_eq!(balance_key(&policy(HashKey::ClientIp), &h, client), ip);
        let missing = policy(HashKey::Cookie("other".into()));
        assert_eq!(balance_key(&missing, &h, client), ip);
        let missing = policy(HashKey::Header("x-none".into()));
        assert_eq!(balance_key(&missing, &h, client), ip);
    }
}
