//! Human-friendly sizes (`"512MiB"`) and durations (`"30s"`) for config values.
//!
//! SREs write sizes and timeouts by hand; raw byte counts and millisecond integers invite
//! off-by-1000 mistakes, so both types parse a number with a unit and print back in the largest
//! unit that represents the value exactly (`parse(display(x)) == x`).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a size value must look like; quoted in error messages.
pub const SIZE_FORM: &str =
    "an integer number of bytes or a string like \"512MiB\" (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)";

/// What a duration value must look like; quoted in error messages.
pub const DURATION_FORM: &str = "a string like \"500ms\", \"30s\", \"2m\" or \"1h\"";

const KIB: u64 = 1024;

/// Binary units first: display prefers them, and they are what memory sizes are counted in.
const SIZE_UNITS: [(&str, u64); 9] = [
    ("TiB", KIB * KIB * KIB * KIB),
    ("GiB", KIB * KIB * KIB),
    ("MiB", KIB * KIB),
    ("KiB", KIB),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

/// A number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` mebibytes.
    pub const fn mib(n: u64) -> ByteSize {
        ByteSize(n * KIB * KIB)
    }

    /// `n` gibibytes.
    pub const fn gib(n: u64) -> ByteSize {
        ByteSize(n * KIB * KIB * KIB)
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// Parses `"512MiB"`, `"512 MiB"`, `"4GB"` or `"1000"` (units are case-insensitive).
    pub fn parse(text: &str) -> Option<ByteSize> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let number: u64 = digits.parse().ok()?;
        let unit = unit.trim();
        if unit.is_empty() {
            return Some(ByteSize(number));
        }
        let (_, scale) = SIZE_UNITS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(unit))?;
        number.checked_mul(*scale).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let binary = SIZE_UNITS.iter().take(4);
        match binary
            .into_iter()
            .find(|(_, s)| self.0 != 0 && self.0.is_multiple_of(*s))
        {
            Some((name, scale)) => write!(f, "{}{name}", self.0 / scale),
            None => write!(f, "{}B", self.0),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        let parsed = match Raw::deserialize(deserializer)? {
            Raw::Int(n) => Some(ByteSize(n)),
            Raw::Text(t) => ByteSize::parse(&t),
        };
        parsed.ok_or_else(|| serde::de::Error::custom(format!("expected {SIZE_FORM}")))
    }
}

const DURATION_UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

/// A duration with millisecond resolution, written as `"30s"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// `n` seconds.
    pub const fn secs(n: u64) -> HumanDuration {
        HumanDuration(Duration::from_secs(n))
    }

    /// The wrapped duration.
    pub const fn get(self) -> Duration {
        self.0
    }

    /// Parses `"500ms"`, `"30s"`, `"2m"`, `"1h"`; a bare number is rejected because its unit
    /// would be a guess.
    pub fn parse(text: &str) -> Option<HumanDuration> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit())?;
        let (digits, unit) = text.split_at(split);
        let number: u64 = digits.parse().ok()?;
        let (_, millis) = DURATION_UNITS
            .iter()
            .find(|(name, _)| *name == unit.trim())?;
        number
            .checked_mul(*millis)
            .map(|ms| HumanDuration(Duration::from_millis(ms)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        let (name, scale) = DURATION_UNITS
            .iter()
            .find(|(_, s)| ms.is_multiple_of(u128::from(*s)))
            .unwrap_or(&("ms", 1));
        write!(f, "{}{name}", ms / u128::from(*scale))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        HumanDuration::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("expected {DURATION_FORM}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(ByteSize::parse("512MiB"), Some(ByteSize(512 << 20)));
        assert_eq!(ByteSize::parse("512 mib"), Some(ByteSize(512 << 20)));
        assert_eq!(ByteSize::parse("4GB"), Some(ByteSize(4_000_000_000)));
        assert_eq!(ByteSize::parse("1000"), Some(ByteSize(1000)));
        assert_eq!(ByteSize::parse("7B"), Some(ByteSize(7)));
        for bad in ["", "MiB", "1.5GiB", "-1", "12 parsecs", "99999999999999TiB"] {
            assert_eq!(ByteSize::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn sizes_display_in_the_largest_exact_binary_unit() {
        assert_eq!(ByteSize::mib(256).to_string(), "256MiB");
        assert_eq!(ByteSize(1536).to_string(), "1536B");
        assert_eq!(ByteSize(2048).to_string(), "2KiB");
        assert_eq!(ByteSize(1_000_000).to_string(), "1000000B");
        assert_eq!(ByteSize(0).to_string(), "0B");
    }

    #[test]
    fn durations_parse_and_display() {
        assert_eq!(
            HumanDuration::parse("500ms"),
            Some(HumanDuration(Duration::from_millis(500)))
        );
        assert_eq!(HumanDuration::parse("2m"), Some(HumanDuration::secs(120)));
        assert_eq!(HumanDuration::secs(90).to_string(), "90s");
        assert_eq!(HumanDuration::secs(7200).to_string(), "2h");
        assert_eq!(
            HumanDuration(Duration::from_millis(1500)).to_string(),
            "1500ms"
        );
        for bad in ["", "30", "s", "1.5s", "10 days", "-3s"] {
            assert_eq!(HumanDuration::parse(bad), None, "{bad}");
        }
    }
}
