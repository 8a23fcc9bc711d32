//! What the two daemons, the agent (`signpost`) and
//! `signpost-control-plane`, share at their edges, so that each is written
//! once and behaves the same in both:
//! - [`logging`]: `tracing` to stderr as `log.format` and `log.level` say;
//! - [`signals`]: SIGTERM or Ctrl-C starts a graceful shutdown, a second
//!   one exits at once;
//! - [`http_server`]: the HTTP/1.1 server loop both HTTP APIs run on, with
//!   its timeouts and per-client limits;
//! - [`token`]: the token an HTTP request presents;
//! - [`read_filter`]: what a read may see under a token's rules, and the
//!   header that says something was left out;
//! - [`routes`]: a router that remembers its routes, so tests can check
//!   that every write endpoint refuses a request without a token;
//! - [`kv_answer`]: `/v1/kv` read answers in Consul's shapes, and the
//!   text errors and 501 for routes not served;
//! - [`fs`]: atomic file replacement, for every file a daemon keeps.
//!
//! The data-plane libraries (`dns`, `proxy`) do not depend on it: they
//! never read files or handle signals; the binaries do.

pub mod fs;
pub mod http_server;
pub mod kv_answer;
pub mod logging;
pub mod read_filter;
pub mod routes;
pub mod signals;
pub mod token;
