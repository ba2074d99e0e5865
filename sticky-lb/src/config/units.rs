//! Values the config writes in units of their own: durations (`1h30m`, `500ms`, bare seconds)
//! and MAC addresses (`aa:bb:cc:dd:ee:ff`), with the deserializers the model's fields use.
//! Errors say what is wrong with the value; the field and the line are added by the parser.

use serde::{Deserializer, de};
use std::{fmt, time::Duration};

/// What a duration error suggests instead.
const DURATION_EXAMPLES: &str = "use e.g. 1h30m, 30m, 2s, 500ms";

/// Parses a duration: a number and a unit (`500ms`, `2s`, `10m`, `1h`, `1d`), several of them
/// (`1h30m`, `1m 30s`), a decimal (`1.5s`), or a bare number of seconds (`7`, as the config
/// accepted before units were required). `m` is minutes. The error quotes the text and says
/// what is wrong.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map(Duration::from_secs).map_err(|_| {
            format!("'{text}' is not a duration: too many seconds ({DURATION_EXAMPLES})")
        });
    }
    humantime::parse_duration(text).map_err(|e| {
        let reason = match e {
            // The library's own text lists every unit spelling it knows: too long for one line.
            humantime::DurationError::UnknownUnit { unit, .. } if !unit.is_empty() => {
                format!("unknown unit '{unit}'")
            }
            e => e.to_string(),
        };
        format!("'{text}' is not a duration: {reason} ({DURATION_EXAMPLES})")
    })
}

/// A duration field: a string as [`parse_duration`] reads it, or a YAML integer of seconds.
pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct Visitor;
    impl de::Visitor<'_> for Visitor {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as 1h30m, 30m, 2s or 500ms")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }
    }
    d.deserialize_any(Visitor)
}

/// An optional duration field (a health check override): present means set.
pub(super) fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// Parses a unicast MAC address written `aa:bb:cc:dd:ee:ff` (two hex digits per byte). A
/// multicast or all-zero address is refused: a backend cannot be one.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.split(':').collect();
    let bad = || format!("'{text}' is not a MAC address (aa:bb:cc:dd:ee:ff)");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err(format!("'{text}' is not a unicast MAC address"));
    }
    Ok(mac)
}

/// Writes a MAC address as [`parse_mac`] reads it (lower-case hex).
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A backend's optional `mac`. The error is raised while the parser is still on the value, so
/// that it names the `mac` field and its line rather than the backend's.
pub(super) fn mac<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 6]>, D::Error> {
    struct Visitor;
    impl de::Visitor<'_> for Visitor {
        type Value = Option<[u8; 6]>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a MAC address such as 02:00:00:00:00:12")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            parse_mac(v).map(Some).map_err(E::custom)
        }
    }
    d.deserialize_str(Visitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration(" 30 m ").unwrap(), Duration::from_secs(1800));
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn compound_durations() {
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    }

    #[test]
    fn duration_errors_quote_the_text_and_say_why() {
        let e = parse_duration("2 fortnights").unwrap_err();
        assert_eq!(
            e,
            "'2 fortnights' is not a duration: unknown unit 'fortnights' (use e.g. 1h30m, 30m, 2s, 500ms)"
        );
        let e = parse_duration("99999999999999999999").unwrap_err();
        assert!(e.contains("too many seconds"), "{e}");
    }

    #[test]
    fn macs() {
        let mac = [2, 0, 0, 0, 0, 0x12];
        assert_eq!(parse_mac(&format_mac(&mac)).unwrap(), mac);
        assert_eq!(parse_mac("02:AB:cd:00:00:01").unwrap()[1..3], [0xab, 0xcd]);
        assert!(parse_mac("02:00:00:00:00").is_err());
        assert!(parse_mac("02:00:00:00:00:0g").is_err());
        assert!(
            parse_mac("01:00:5e:00:00:01")
                .unwrap_err()
                .contains("unicast")
        );
        assert!(
            parse_mac("00:00:00:00:00:00")
                .unwrap_err()
                .contains("unicast")
        );
    }
}
