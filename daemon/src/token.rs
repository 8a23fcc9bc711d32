//! The token an HTTP request presents, as Consul's clients send it.

use axum::http::HeaderMap;

/// The token of an `Authorization` header's value: the `Bearer` scheme,
/// in any case (schemes are case-insensitive, RFC 9110).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The token an HTTP request presents: `X-Consul-Token`, else
/// `Authorization: Bearer`.
pub fn presented(headers: &HeaderMap) -> Option<&str> {
    if let Some(token) = headers.get("x-consul-token").and_then(|v| v.to_str().ok()) {
        return Some(token.trim());
    }
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn the_consul_header_wins_over_a_bearer_token() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("  bearer   abc  "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        let mut headers = HeaderMap::new();
        assert_eq!(presented(&headers), None);
        headers.insert("authorization", HeaderValue::from_static("Bearer b"));
        assert_eq!(presented(&headers), Some("b"));
        headers.insert("x-consul-token", HeaderValue::from_static(" c "));
        assert_eq!(presented(&headers), Some("c"));
    }
}
