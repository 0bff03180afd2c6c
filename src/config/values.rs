//! Value types in the policy file that TOML has no native form for: durations and sizes.

use serde::{Deserialize, Deserializer, de};

/// Durations are humantime strings ("250ms", "30s", "10m"), or a number of seconds (`1.5`
/// too), at most [`MAX`](duration::MAX).
pub mod duration {
    use super::*;
    use std::time::Duration;

    /// The longest duration any setting takes: ten years. Longer ones mean "never" to whoever
    /// writes them, but the clocks and timers they reach have limits of their own (a cache's
    /// lifetime of over 1,000 years, an instant past the end of time), which would stop the
    /// gateway at start or on a request rather than at the check.
    pub const MAX: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Fraction(f64),
            Text(String),
        }
        let d = match Raw::deserialize(d).map_err(|_| {
            de::Error::custom(
                "expected a duration such as \"30s\" or \"250ms\", or a number of seconds",
            )
        })? {
            Raw::Secs(s) => Duration::from_secs(s),
            Raw::Fraction(s) => Duration::try_from_secs_f64(s).map_err(|_| {
                de::Error::custom(format!(
                    "a duration of {s} seconds: it must be a number of seconds of 0 or more"
                ))
            })?,
            Raw::Text(t) => humantime::parse_duration(t.trim()).map_err(|e| {
                de::Error::custom(format!(
                    "invalid duration {t:?} ({e}); use e.g. \"30s\" or \"250ms\""
                ))
            })?,
        };
        if d > MAX {
            return Err(de::Error::custom(
                "a duration may be at most 10 years (\"3650days\")",
            ));
        }
        Ok(d)
    }
}

/// A size in bytes: a number, or a string such as "50MiB" or "512KB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)
            .map_err(|_| de::Error::custom("expected a size such as \"50MiB\" or a byte count"))?
        {
            Raw::Bytes(b) => Ok(ByteSize(b)),
            Raw::Text(t) => t
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|b| ByteSize(b.as_u64()))
                .map_err(|e| de::Error::custom(format!("invalid size {t:?}: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let s: ByteSize = toml::Value::String("50MiB".into()).try_into().unwrap();
        assert_eq!(s.0, 50 * 1024 * 1024);
        let s: ByteSize = toml::Value::Integer(10).try_into().unwrap();
        assert_eq!(s.0, 10);
    }
}
