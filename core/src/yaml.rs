//! YAML parsing that reports `file:line:col: what is wrong`.

use serde::de::DeserializeOwned;

/// A YAML document that could not be turned into the expected type, or
/// that broke a rule after parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct YamlError {
    /// The file name as given by the caller.
    pub file: String,
    /// 1-based; 0 when the position is unknown.
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl YamlError {
    pub fn new(file: &str, line: u64, column: u64, message: impl Into<String>) -> Self {
        YamlError {
            file: file.to_string(),
            line,
            column,
            message: message.into(),
        }
    }

    fn render(&self) -> String {
        if self.line == 0 {
            format!("{}: {}", self.file, self.message)
        } else {
            format!(
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

/// Parses `text` (named `file` in errors) into `T`.
pub fn from_str<T: DeserializeOwned>(file: &str, text: &str) -> Result<T, YamlError> {
    serde_saphyr::from_str::<T>(text).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let options = serde_saphyr::render_options! {
            snippets: serde_saphyr::SnippetMode::Off,
        };
        let rendered = e.render_with_options(options);
        YamlError::new(file, line, column, strip_location(&rendered))
    })
}

/// serde-saphyr appends "at line L column C"; we lead with it instead.
fn strip_location(message: &str) -> String {
    let first = message.lines().next().unwrap_or(message).trim();
    match first.rfind(" at line ") {
        Some(i) => first[..i].trim_end_matches(',').to_string(),
        None => first.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        name: String,
        port: u16,
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let err = from_str::<Doc>("a.yaml", "name: x\nport: 80800\n").unwrap_err();
        assert_eq!((err.line, err.column), (2, 7));
        let text = err.to_string();
        assert!(text.starts_with("a.yaml:2:7: "), "{text}");
        assert!(!text.contains("at line"), "{text}");
    }

    #[test]
    fn unknown_keys_are_refused_at_their_position() {
        let err = from_str::<Doc>("b.yaml", "name: x\nport: 1\nprot: 2\n").unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        assert!(err.message.contains("prot"), "{err}");
    }
}
