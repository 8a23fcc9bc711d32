//! Go-style durations: the format Consul and its clients use everywhere.
//!
//! Accepts a sequence of decimal numbers with units (`ns`, `us`, `µs`, `ms`,
//! `s`, `m`, `h`), e.g. "10s", "1m30s", "250ms", "1.5h". Formats back the way
//! Go's `time.Duration.String()` does, so values round-trip through the API.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// The longest duration: Go's (a signed 64-bit count of nanoseconds,
/// 2562047h47m16.854775807s), so that Consul clients and Signpost agree on
/// what parses, and no deadline computed from a duration can overflow.
pub const MAX: Duration = Duration::from_nanos(i64::MAX as u64);

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error(
        "invalid duration {0:?}: expected a number with a unit such as \"10s\", \"1m30s\" or \"250ms\""
    )]
    Invalid(String),
    #[error("invalid duration {0:?}: negative durations are not allowed")]
    Negative(String),
    #[error("invalid duration {0:?}: too large (at most 2562047h47m16.854775807s)")]
    Overflow(String),
}

/// Parses a Go duration string ("10s", "1m30s", "250ms", "0").
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    if s.starts_with('-') {
        return Err(DurationError::Negative(input.to_string()));
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let invalid = || DurationError::Invalid(input.to_string());
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        if num_len == 0 {
            return Err(invalid());
        }
        let (num, after) = rest.split_at(num_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            _ => return Err(invalid()),
        };
        let (int_part, frac_part) = match num.split_once('.') {
            Some((i, f)) => (i, f),
            None => (num, ""),
        };
        if (int_part.is_empty() && frac_part.is_empty()) || frac_part.contains('.') {
            return Err(invalid());
        }
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part
                .parse()
                .map_err(|_| DurationError::Overflow(input.to_string()))?
        };
        let mut nanos = int
            .checked_mul(unit_nanos)
            .ok_or_else(|| DurationError::Overflow(input.to_string()))?;
        // Fractions: keep at most 18 digits, enough below a nanosecond.
        let mut scale = unit_nanos;
        for digit in frac_part.bytes().take(18) {
            scale /= 10;
            nanos += u128::from(digit - b'0') * scale;
            if scale == 0 {
                break;
            }
        }
        total = total
            .checked_add(nanos)
            .ok_or_else(|| DurationError::Overflow(input.to_string()))?;
        rest = next;
    }
    if total > MAX.as_nanos() {
        return Err(DurationError::Overflow(input.to_string()));
    }
    // Below MAX, so both parts fit.
    let secs = (total / 1_000_000_000) as u64;
    let nanos = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

/// A duration given as a number of nanoseconds (as Go's `time.Duration`
/// marshals), at most [`MAX`].
pub fn from_nanos(nanos: u64) -> Result<Duration, DurationError> {
    let d = Duration::from_nanos(nanos);
    if d > MAX {
        return Err(DurationError::Overflow(nanos.to_string()));
    }
    Ok(d)
}

/// Formats like Go's `time.Duration.String()`: "1m30s", "250ms", "0s".
pub fn format(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}µs", trim_fraction(nanos, 1_000));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", trim_fraction(nanos, 1_000_000));
    }
    let mut out = String::new();
    let total_secs = d.as_secs();
    let hours = total_secs / 3600;
    let minutes = (total_secs % 3600) / 60;
    if hours > 0 {
        let _ = write!(out, "{hours}h");
    }
    if hours > 0 || minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    let secs_nanos = u128::from(total_secs % 60) * 1_000_000_000 + u128::from(d.subsec_nanos());
    let _ = write!(out, "{}s", trim_fraction(secs_nanos, 1_000_000_000));
    out
}

fn trim_fraction(value: u128, unit: u128) -> String {
    let whole = value / unit;
    let frac = value % unit;
    if frac == 0 {
        return whole.to_string();
    }
    let width = unit.ilog10() as usize;
    let digits = format!("{frac:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// Serde adapter for `Duration` fields written as Go duration strings.
pub mod serde_go {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Serde adapter for `Option<Duration>` fields written as Go duration strings.
pub mod serde_go_opt {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| parse(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("2h45m"), Ok(Duration::from_secs(2 * 3600 + 45 * 60)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse(".5m"), Ok(Duration::from_secs(30)));
    }

    #[test]
    fn refuses_bad_durations() {
        for bad in ["", "10", "s", "10x", "1..5s", "-1s", "1 s", "10sm"] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn durations_beyond_gos_are_refused() {
        assert_eq!(parse("2562047h47m16.854775807s"), Ok(MAX));
        assert_eq!(format(MAX), "2562047h47m16.854775807s");
        for big in [
            "2562047h47m16.854775808s",
            "3000000000000000h",
            "99999999999999999999999999999h",
        ] {
            let e = parse(big).unwrap_err();
            assert!(matches!(e, DurationError::Overflow(_)), "{big}: {e}");
            assert!(e.to_string().contains("at most 2562047h"), "{e}");
        }
        assert_eq!(from_nanos(i64::MAX as u64), Ok(MAX));
        assert!(from_nanos(i64::MAX as u64 + 1).is_err());
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format(Duration::from_secs(90)), "1m30s");
        assert_eq!(format(Duration::from_millis(250)), "250ms");
        assert_eq!(format(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(format(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format(Duration::ZERO), "0s");
        for s in ["10s", "1m30s", "250ms", "2h45m0s", "1.5s"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }
}
