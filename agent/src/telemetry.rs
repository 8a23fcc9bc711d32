//! Logging: `tracing` with plain or JSON output, chosen by `log.format`.

use signpost_core::config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// hickory logs every DNS request at `info`; that is debug detail for us.
/// A filter that names hickory itself wins.
const QUIET: &[&str] = &[
    "hickory_server=warn",
    "hickory_net=warn",
    "hickory_proto=warn",
    "hickory_resolver=warn",
];

/// Installs the global subscriber. `RUST_LOG` overrides `log.level`.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let named = filter.to_string();
    let filter = QUIET
        .iter()
        .filter(|d| !named.contains(d.split('=').next().unwrap_or_default()))
        .filter_map(|d| d.parse().ok())
        .fold(filter, EnvFilter::add_directive);
    // Colours only for a person at a terminal, not in the journal or a file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Err(e) = result {
        eprintln!("logging already initialised: {e}");
    }
}
