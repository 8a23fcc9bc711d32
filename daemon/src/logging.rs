//! Logging for both binaries: `tracing` with plain or JSON output, chosen
//! by `log.format`, and `RUST_LOG` over `log.level`.
//!
//! Logged values can come from anyone (a request path, a token's
//! description, a service name), so the plain format writes every control
//! character of a field escaped (`\n`, `\u{1b}`): a value can never start
//! a line of its own or drive the terminal. JSON escapes them by itself.
//! Colours only for a person at a terminal, not in the journal or a file.
//!
//! The filter can be replaced while the daemon runs ([`set_level`]), when
//! a reload of its configuration changes `log.level`.

use std::fmt::{self, Write as _};
use std::sync::OnceLock;

use signpost_core::config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::reload;

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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(quieted(filter))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Text => {
            let builder = builder
                .fmt_fields(
                    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
                        let mut escaped = Escaped(writer);
                        if field.name() == "message" {
                            write!(escaped, "{value:?}")
                        } else {
                            write!(escaped, "{field}={value:?}")
                        }
                    })
                    .delimited(" "),
                )
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().map(|()| keep_reload_handle(handle))
        }
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().map(|()| keep_reload_handle(handle))
        }
    };
    if let Err(e) = result {
        eprintln!("logging already initialised: {e}");
    }
}

/// `filter` with hickory quietened, unless it names hickory itself.
fn quieted(filter: EnvFilter) -> EnvFilter {
    let named = filter.to_string();
    QUIET
        .iter()
        .filter(|d| !named.contains(d.split('=').next().unwrap_or_default()))
        .filter_map(|d| d.parse().ok())
        .fold(filter, EnvFilter::add_directive)
}

/// Why the log level could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LevelError {
    #[error(
        "log.level {level:?} is not a filter such as `info` or `signpost_agent=debug,info`: {reason}"
    )]
    Invalid { level: String, reason: String },
    #[error("the log level cannot change: logging was not set up by `init`")]
    NotInstalled,
    #[error("the log level cannot change: {0}")]
    Reload(String),
}

/// A filter for `log.level`, checked, to [`set_level`] later.
#[derive(Debug)]
pub struct Level(EnvFilter);

impl std::str::FromStr for Level {
    type Err = LevelError;

    fn from_str(level: &str) -> Result<Self, LevelError> {
        EnvFilter::try_new(level)
            .map(|filter| Level(quieted(filter)))
            .map_err(|e| LevelError::Invalid {
                level: level.to_string(),
                reason: e.to_string(),
            })
    }
}

/// Replaces the filter [`init`] installed with `level`, `RUST_LOG`
/// included: the configuration was changed on purpose since.
pub fn set_level(level: Level) -> Result<(), LevelError> {
    let set = RELOAD.get().ok_or(LevelError::NotInstalled)?;
    set(level.0).map_err(|e| LevelError::Reload(e.to_string()))
}

/// Replaces the installed subscriber's filter (its type depends on the
/// output format, hence a function).
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), reload::Error> + Send + Sync>;

static RELOAD: OnceLock<SetFilter> = OnceLock::new();

fn keep_reload_handle<S: 'static>(handle: reload::Handle<EnvFilter, S>) {
    // Only one subscriber is ever installed, so this is the only handle.
    let _ = RELOAD.set(Box::new(move |filter| handle.reload(filter)));
}

/// Writes through to `0` with control characters escaped.
struct Escaped<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Escaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(char::is_control) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        let mut out = String::new();
        let mut writer = Writer::new(&mut out);
        write!(Escaped(&mut writer), "a\nb\r\u{1b}[31mc\u{85}é").unwrap();
        assert_eq!(out, "a\\nb\\r\\u{1b}[31mc\\u{85}é");
    }
}
