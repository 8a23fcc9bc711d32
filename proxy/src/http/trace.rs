//! Request identity across hops: the W3C trace context's `traceparent`
//! (https://www.w3.org/TR/trace-context/) and `x-request-id`, so that a
//! request can be followed through every proxy and application that logs
//! them. A valid `traceparent` is forwarded as it came (the proxy
//! records no span of its own, so it is not a new parent); a missing or
//! malformed one is replaced by a new trace (its `tracestate` dropped,
//! as the specification asks), not sampled: sampling is the
//! applications' tracers' call. `x-request-id` is kept when it is
//! reasonable text, else made; the answer carries it back too. Both go
//! to the access log.

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub(super) static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub(super) static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest `x-request-id` kept as it came.
const MAX_REQUEST_ID: usize = 200;

/// A request's identity, as sent to the instance.
pub(super) struct Ids {
    /// The trace's id (32 hex digits).
    pub(super) trace_id: HeaderValue,
    pub(super) request_id: HeaderValue,
}

/// Makes sure the request carries a valid `traceparent` and an
/// `x-request-id`; returns them.
pub(super) fn ensure(headers: &mut HeaderMap) -> Ids {
    let trace_id = match headers.get(&TRACEPARENT).and_then(trace_id_of) {
        Some(id) => id,
        None => {
            let (id, parent) = (rand::random::<u128>(), rand::random::<u64>());
            // Never all zeros, which the specification forbids.
            let (id, parent) = (id.max(1), parent.max(1));
            let value = format!("00-{id:032x}-{parent:016x}-00");
            headers.remove(&TRACESTATE);
            headers.insert(TRACEPARENT.clone(), header_value(&value));
            header_value(&value[3..35])
        }
    };
    let request_id = match headers.get(&REQUEST_ID).filter(reasonable) {
        Some(id) => id.clone(),
        None => {
            let id = new_request_id();
            headers.insert(REQUEST_ID.clone(), id.clone());
            id
        }
    };
    Ids {
        trace_id,
        request_id,
    }
}

/// A header value from text this module made (hex digits and dashes).
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// The trace id of a valid `traceparent` (version 00's format; a later
/// version's first four fields, as the specification says to read it).
fn trace_id_of(value: &HeaderValue) -> Option<HeaderValue> {
    let bytes = value.as_bytes();
    let hex = |s: &[u8]| s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let zero = |s: &[u8]| s.iter().all(|b| *b == b'0');
    if bytes.len() < 55 || (bytes.len() > 55 && bytes[55] != b'-') {
        return None;
    }
    let (version, trace, parent, flags) =
        (&bytes[0..2], &bytes[3..35], &bytes[36..52], &bytes[53..55]);
    let dashes = bytes[2] == b'-' && bytes[35] == b'-' && bytes[52] == b'-';
    let valid = dashes
        && hex(version)
        && version != b"ff"
        && (version != b"00" || bytes.len() == 55)
        && hex(trace)
        && !zero(trace)
        && hex(parent)
        && !zero(parent)
        && hex(flags);
    valid.then(|| HeaderValue::from_bytes(trace).ok()).flatten()
}

/// Printable ASCII, not empty, not too long: worth keeping as it came.
fn reasonable(value: &&HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_REQUEST_ID
        && bytes.iter().all(|b| (0x21..0x7f).contains(b))
}

/// A random UUID (version 4), as request ids usually are.
fn new_request_id() -> HeaderValue {
    header_value(&signpost_core::uuid::new_v4())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIVEN: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_and_request_id_go_on_as_they_came() {
        let mut headers = HeaderMap::new();
        headers.insert(&TRACEPARENT, HeaderValue::from_static(GIVEN));
        headers.insert(&TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        headers.insert(&REQUEST_ID, HeaderValue::from_static("req-42"));
        let ids = ensure(&mut headers);
        assert_eq!(ids.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ids.request_id, "req-42");
        assert_eq!(headers[&TRACEPARENT], GIVEN);
        assert_eq!(headers[&TRACESTATE], "congo=t61rcWkgMzE");
    }

    #[test]
    fn a_missing_or_broken_traceparent_is_replaced_by_a_new_trace() {
        for broken in [
            None,
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            Some("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),
            Some("garbage"),
        ] {
            let mut headers = HeaderMap::new();
            if let Some(value) = broken {
                headers.insert(&TRACEPARENT, HeaderValue::from_static(value));
                headers.insert(&TRACESTATE, HeaderValue::from_static("congo=x"));
            }
            let ids = ensure(&mut headers);
            let made = headers[&TRACEPARENT].to_str().unwrap().to_string();
            assert_ne!(Some(made.as_str()), broken);
            assert!(
                trace_id_of(&headers[&TRACEPARENT]).is_some(),
                "{made} is valid"
            );
            assert_eq!(made[3..35], *ids.trace_id.to_str().unwrap());
            assert!(made.ends_with("-00"), "not sampled: {made}");
            assert!(
                headers.get(&TRACESTATE).is_none(),
                "its tracestate goes with it"
            );
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let mut headers = HeaderMap::new();
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        headers.insert(&TRACEPARENT, HeaderValue::from_static(later));
        let ids = ensure(&mut headers);
        assert_eq!(ids.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(headers[&TRACEPARENT], later);
    }

    #[test]
    fn request_ids_are_made_when_missing_or_unreasonable() {
        let long = "x".repeat(MAX_REQUEST_ID + 1);
        for given in [None, Some(""), Some("has space"), Some(long.as_str())] {
            let mut headers = HeaderMap::new();
            if let Some(value) = given {
                headers.insert(&REQUEST_ID, HeaderValue::from_str(value).unwrap());
            }
            let ids = ensure(&mut headers);
            let id = ids.request_id.to_str().unwrap();
            assert_eq!(id.len(), 36, "{id}");
            assert_eq!(&id[14..15], "4", "a version 4 UUID: {id}");
            assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
            assert_eq!(headers[&REQUEST_ID], ids.request_id);
        }
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
    }
}
