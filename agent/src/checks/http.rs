//! HTTP(S) checks: 2xx passes, 429 warns, anything else is critical.
//!
//! Connections are kept alive between probes by default, as Envoy's
//! health checker does: a new TCP connection per probe costs the host more
//! than the rest of the check together. `checks.http_keep_alive: false`
//! opens one per probe (`Connection: close`), as Consul does. The output is
//! `HTTP <method> <url>: <status> Output: <body>` with the body capped, and
//! TLS is verified against the system roots unless `tls_skip_verify`.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use signpost_core::model::{CheckKind, Health};

use super::{Outcome, truncate_output};

/// The shared HTTP clients, one per TLS/redirect combination, so that a
/// thousand checks do not hold a thousand connection pools.
#[derive(Clone, Default)]
pub(crate) struct HttpClients {
    keep_alive: bool,
    clients: Arc<[OnceLock<Result<reqwest::Client, String>>; 4]>,
}

impl HttpClients {
    pub(crate) fn new(keep_alive: bool) -> Self {
        HttpClients {
            keep_alive,
            clients: Default::default(),
        }
    }

    fn get(&self, skip_verify: bool, follow_redirects: bool) -> Result<reqwest::Client, String> {
        let slot = usize::from(skip_verify) * 2 + usize::from(follow_redirects);
        self.clients[slot]
            .get_or_init(|| build_client(self.keep_alive, skip_verify, follow_redirects, None))
            .clone()
    }
}

/// Idle kept-alive connections are closed after this (below the usual
/// server keep-alive timeouts, so a probe rarely finds one closed).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// `resolve` pins a host name to an address: how a check's
/// `tls_server_name` becomes the SNI while the connection goes to the
/// URL's address.
fn build_client(
    keep_alive: bool,
    skip_verify: bool,
    follow_redirects: bool,
    resolve: Option<(&str, SocketAddr)>,
) -> Result<reqwest::Client, String> {
    crate::tls::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .user_agent("Signpost Health Check")
        .pool_idle_timeout(IDLE_TIMEOUT)
        .redirect(if follow_redirects {
            reqwest::redirect::Policy::limited(10)
        } else {
            reqwest::redirect::Policy::none()
        })
        .tls_danger_accept_invalid_certs(skip_verify)
        .no_proxy();
    if !keep_alive {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::CONNECTION,
            reqwest::header::HeaderValue::from_static("close"),
        );
        builder = builder.pool_max_idle_per_host(0).default_headers(headers);
    }
    if let Some((name, addr)) = resolve {
        builder = builder.resolve(name, addr);
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP check client: {e}"))
}

/// Rewrites an `https://<ip>...` URL to use `server_name` as its host (so
/// it is sent as SNI) and returns the client that connects to the IP.
fn with_server_name(
    keep_alive: bool,
    url: &str,
    server_name: &str,
    skip_verify: bool,
    follow_redirects: bool,
) -> Result<(String, reqwest::Client, String), String> {
    let mut parsed = reqwest::Url::parse(url).map_err(|e| format!("invalid url {url:?}: {e}"))?;
    let original_host = parsed.host_str().unwrap_or_default().to_string();
    let ip: std::net::IpAddr = original_host
        .trim_matches(['[', ']'])
        .parse()
        .map_err(|_| {
            format!("tls_server_name needs an IP address in the check URL, not {original_host:?}")
        })?;
    let port = parsed.port_or_known_default().unwrap_or(443);
    parsed
        .set_host(Some(server_name))
        .map_err(|e| format!("invalid tls_server_name {server_name:?}: {e}"))?;
    let client = build_client(
        keep_alive,
        skip_verify,
        follow_redirects,
        Some((server_name, SocketAddr::new(ip, port))),
    )?;
    let host_header = match parsed.port() {
        Some(p) => format!("{original_host}:{p}"),
        None => original_host,
    };
    Ok((parsed.to_string(), client, host_header))
}

pub(crate) struct HttpProbe {
    /// The client and the URL requested (rewritten to carry
    /// `tls_server_name` as SNI, parsed once rather than on every probe),
    /// or why the check cannot run.
    target: Result<(reqwest::Client, reqwest::Url), String>,
    method: reqwest::Method,
    /// The URL as configured, for the output.
    shown_url: String,
    headers: reqwest::header::HeaderMap,
    body: String,
    timeout: Duration,
    max_output: usize,
}

impl HttpProbe {
    pub(crate) fn new(
        kind: &CheckKind,
        timeout: Duration,
        max_output: usize,
        clients: &HttpClients,
    ) -> Option<Self> {
        let CheckKind::Http {
            url,
            method,
            headers,
            body,
            tls_skip_verify,
            tls_server_name,
            disable_redirects,
        } = kind
        else {
            return None;
        };
        let mut map = reqwest::header::HeaderMap::new();
        map.insert(
            reqwest::header::ACCEPT,
            reqwest::header::HeaderValue::from_static("text/plain, text/*, */*"),
        );
        let shown_url = url.clone();
        let mut url = url.clone();
        let mut client = match tls_server_name {
            Some(name) if url.starts_with("https://") => {
                match with_server_name(
                    clients.keep_alive,
                    &url,
                    name,
                    *tls_skip_verify,
                    !disable_redirects,
                ) {
                    Ok((rewritten, client, host)) => {
                        url = rewritten;
                        if let Ok(v) = reqwest::header::HeaderValue::from_str(&host) {
                            map.insert(reqwest::header::HOST, v);
                        }
                        Ok(client)
                    }
                    Err(e) => Err(e),
                }
            }
            _ => clients.get(*tls_skip_verify, !disable_redirects),
        };
        for (name, values) in headers {
            for value in values {
                match (
                    reqwest::header::HeaderName::from_bytes(name.as_bytes()),
                    reqwest::header::HeaderValue::from_str(value),
                ) {
                    (Ok(n), Ok(v)) => {
                        map.append(n, v);
                    }
                    _ => client = Err(format!("invalid header {name}: {value:?}")),
                }
            }
        }
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let target = client.and_then(|c| {
            reqwest::Url::parse(&url)
                .map(|u| (c, u))
                .map_err(|e| format!("invalid url {url:?}: {e}"))
        });
        Some(HttpProbe {
            target,
            method,
            shown_url,
            headers: map,
            body: body.clone(),
            timeout,
            max_output,
        })
    }

    pub(crate) async fn run(&self) -> Outcome {
        let (client, url) = match &self.target {
            Ok(t) => t,
            Err(e) => return Outcome::new(Health::Critical, e.clone()),
        };
        let mut request = client
            .request(self.method.clone(), url.clone())
            .headers(self.headers.clone())
            .timeout(self.timeout);
        if !self.body.is_empty() {
            request = request.body(self.body.clone());
        }
        let prefix = format!("HTTP {} {}", self.method, self.shown_url);
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                // The error names the URL already (the rewritten one when
                // tls_server_name is set): leave it out.
                let e = e.without_url();
                return Outcome::new(
                    Health::Critical,
                    format!("{prefix}: {}", signpost_core::error_chain(&e)),
                );
            }
        };
        let status = response.status();
        let mut body = Vec::new();
        while body.len() < self.max_output {
            match tokio::time::timeout(self.timeout, response.chunk()).await {
                Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        let body = truncate_output(String::from_utf8_lossy(&body).into_owned(), self.max_output);
        let health = if status.is_success() {
            Health::Passing
        } else if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            Health::Warning
        } else {
            Health::Critical
        };
        let output = format!(
            "{prefix}: {} {} Output: {body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        Outcome::new(health, truncate_output(output, self.max_output))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use axum::routing::any;
    use std::collections::BTreeMap;

    async fn server() -> String {
        let app =
            axum::Router::new()
                .route("/ok", any(|| async { "all good" }))
                .route(
                    "/busy",
                    any(|| async { (StatusCode::TOO_MANY_REQUESTS, "slow down") }),
                )
                .route(
                    "/down",
                    any(|| async { (StatusCode::SERVICE_UNAVAILABLE, "down") }),
                )
                .route(
                    "/echo",
                    any(
                        |method: axum::http::Method,
                         headers: axum::http::HeaderMap,
                         body: String| async move {
                            let h = headers
                                .get("x-probe")
                                .map(|v| v.to_str().unwrap_or("").to_string())
                                .unwrap_or_default();
                            format!("{method} {h} {body}")
                        },
                    ),
                );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    fn probe(
        url: String,
        method: &str,
        headers: BTreeMap<String, Vec<String>>,
        body: &str,
    ) -> HttpProbe {
        let kind = CheckKind::Http {
            url,
            method: method.into(),
            headers,
            body: body.into(),
            tls_skip_verify: false,
            tls_server_name: None,
            disable_redirects: false,
        };
        HttpProbe::new(&kind, Duration::from_secs(2), 4096, &HttpClients::new(true)).unwrap()
    }

    #[tokio::test]
    async fn status_classes() {
        let base = server().await;
        let ok = probe(format!("{base}/ok"), "GET", BTreeMap::new(), "")
            .run()
            .await;
        assert_eq!(ok.status, Health::Passing);
        assert_eq!(
            ok.output,
            format!("HTTP GET {base}/ok: 200 OK Output: all good")
        );
        let busy = probe(format!("{base}/busy"), "GET", BTreeMap::new(), "")
            .run()
            .await;
        assert_eq!(busy.status, Health::Warning);
        let down = probe(format!("{base}/down"), "GET", BTreeMap::new(), "")
            .run()
            .await;
        assert_eq!(down.status, Health::Critical);
        assert!(
            down.output.contains("503 Service Unavailable"),
            "{}",
            down.output
        );
    }

    #[tokio::test]
    async fn method_headers_and_body_are_sent() {
        let base = server().await;
        let headers = BTreeMap::from([("X-Probe".to_string(), vec!["yes".to_string()])]);
        let out = probe(format!("{base}/echo"), "POST", headers, "ping")
            .run()
            .await;
        assert_eq!(out.status, Health::Passing);
        assert!(
            out.output.ends_with("Output: POST yes ping"),
            "{}",
            out.output
        );
    }

    #[tokio::test]
    async fn refused_connection_is_critical() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let out = probe(format!("http://{addr}/"), "GET", BTreeMap::new(), "")
            .run()
            .await;
        assert_eq!(out.status, Health::Critical);
        assert!(
            out.output
                .starts_with(&format!("HTTP GET http://{addr}/: ")),
            "{}",
            out.output
        );
    }
}
