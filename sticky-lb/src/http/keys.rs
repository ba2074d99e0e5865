//! The keys that seal persistence cookies: the YAML file the top-level `cookie_keys` names.
//!
//! ```yaml
//! # The first key seals new cookies; every key listed opens them (rotation: add a new key
//! # first, keep the old one until cookies sealed with it have expired, then remove it).
//! keys:
//!   - id: 2
//!     secret: 64 hex digits (32 bytes, e.g. from `openssl rand -hex 32`)
//!   - id: 1
//!     secret: ...
//! ```
//!
//! Every node of a cluster reads the same file, so a cookie sealed by one node opens on every
//! other, and after a restart. The key id travels in clear in each cookie (1 to 255; 0 is left
//! unused so that a zeroed header never names a key), the secret never leaves the process: no
//! error, log line or `Debug` output shows it.

use crate::config::{
    ConfigError,
    location::{
        PathPart::{self, Index as I, Key as K},
        locate, render_path,
    },
};
use aes_gcm::{Aes256Gcm, KeyInit};
use serde::{Deserialize, Deserializer, de};
use std::{fmt, path::Path, sync::Arc};

/// Length of a secret: AES-256 keys are 32 bytes, written as 64 hex digits.
pub const SECRET_LEN: usize = 32;

/// The cookie keys, ready to seal and open. Cloning is cheap (one `Arc`): the proxy hands a
/// clone to every connection and swaps in a new ring on reload.
#[derive(Clone)]
pub struct Keyring {
    /// In file order: the first seals, all open. Never empty.
    keys: Arc<[SealingKey]>,
}

struct SealingKey {
    id: u8,
    /// The AES-256-GCM key schedule; the hex text and raw bytes are not kept.
    cipher: Aes256Gcm,
}

impl Keyring {
    /// Reads and checks a key file. Errors name the file, the field (`keys[1].secret`) and,
    /// where it can be found, the line; never a secret.
    pub fn load(path: &Path) -> Result<Keyring, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            field: String::new(),
            line: None,
            message: format!("cannot read the cookie key file {}: {e}", path.display()),
        })?;
        Keyring::parse(&text).map_err(|e| ConfigError {
            field: match e.field.is_empty() {
                true => path.display().to_string(),
                false => format!("{}: {}", path.display(), e.field),
            },
            ..e
        })
    }

    /// Parses and checks key file text (see [`Keyring::load`]): at least one key, ids 1 to 255
    /// and unique, secrets of exactly 64 hex digits, no secret listed twice.
    pub fn parse(text: &str) -> Result<Keyring, ConfigError> {
        let file: KeyFile = serde_yaml::from_str(text).map_err(ConfigError::from_yaml)?;
        let err = |path: &[PathPart], message: String| ConfigError {
            field: render_path(path),
            line: locate(text, path),
            message,
        };
        if file.keys.is_empty() {
            return Err(err(
                &[K("keys")],
                "needs at least one key (the first one seals new cookies)".into(),
            ));
        }
        let mut keys = Vec::with_capacity(file.keys.len());
        let mut secrets: Vec<[u8; SECRET_LEN]> = Vec::with_capacity(file.keys.len());
        for (i, entry) in file.keys.iter().enumerate() {
            let id = u8::try_from(entry.id)
                .ok()
                .filter(|&id| id != 0)
                .ok_or_else(|| err(&[K("keys"), I(i), K("id")], "must be 1 to 255".into()))?;
            if let Some(j) = keys.iter().position(|k: &SealingKey| k.id == id) {
                return Err(err(
                    &[K("keys"), I(i), K("id")],
                    format!("duplicate key id {id} (also keys[{j}])"),
                ));
            }
            let at = [K("keys"), I(i), K("secret")];
            let secret = decode_secret(&entry.secret.0).map_err(|message| err(&at, message))?;
            if let Some(j) = secrets.iter().position(|s| *s == secret) {
                return Err(err(
                    &at,
                    format!("the same secret as keys[{j}]: a new key needs a new secret"),
                ));
            }
            keys.push(SealingKey {
                id,
                cipher: Aes256Gcm::new(&secret.into()),
            });
            secrets.push(secret);
        }
        Ok(Keyring { keys: keys.into() })
    }

    /// The id of the key that seals new cookies (the first in the file).
    pub fn primary_id(&self) -> u8 {
        self.keys[0].id
    }

    /// Every key id, in file order (for logs: which keys a node accepts).
    pub fn ids(&self) -> Vec<u8> {
        self.keys.iter().map(|k| k.id).collect()
    }

    /// The key that seals: its id and cipher.
    pub(crate) fn primary(&self) -> (u8, &Aes256Gcm) {
        (self.keys[0].id, &self.keys[0].cipher)
    }

    /// The cipher of key `id`, if the ring has it.
    pub(crate) fn get(&self, id: u8) -> Option<&Aes256Gcm> {
        self.keys.iter().find(|k| k.id == id).map(|k| &k.cipher)
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring").field("ids", &self.ids()).finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    /// Wider than `u8` so that 0 and 256 get our message rather than serde's.
    id: i64,
    secret: Secret,
}

/// A secret as written. Deserialized by hand so that no parse error can quote it: any YAML
/// scalar is taken as text (a secret of only digits is a number to YAML), and what is not a
/// scalar is refused by its kind only.
struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 hex digits")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret(v.to_owned()))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// 64 hex digits -> 32 bytes. The message says what is wrong without quoting any of it.
fn decode_secret(text: &str) -> Result<[u8; SECRET_LEN], String> {
    const HOW: &str = "must be 64 hex digits (32 bytes, e.g. from `openssl rand -hex 32`)";
    let text = text.trim();
    if text.len() != 2 * SECRET_LEN {
        return Err(format!(
            "{HOW}; this one has {} characters",
            text.chars().count()
        ));
    }
    let digit = |b: u8| (b as char).to_digit(16);
    let mut out = [0u8; SECRET_LEN];
    for (byte, pair) in out.iter_mut().zip(text.as_bytes().chunks(2)) {
        let (Some(hi), Some(lo)) = (digit(pair[0]), digit(pair[1])) else {
            return Err(format!(
                "{HOW}; this one has a character that is not a hex digit"
            ));
        };
        *byte = ((hi << 4) | lo) as u8;
    }
    // One digit 64 times is a placeholder someone forgot to replace, not a secret.
    if text
        .bytes()
        .all(|b| b.eq_ignore_ascii_case(&text.as_bytes()[0]))
    {
        return Err(
            "is one digit repeated: a placeholder, not a secret (take 32 random bytes, e.g. from `openssl rand -hex 32`)".into(),
        );
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SECRET_A: &str =
        "8c1f0e5d2a7b4c9e3f6a1d8b5e2c7f4a9d6b3e0c5f8a2d7b4e1c6f9a3d8b5e20";
    pub(crate) const SECRET_B: &str =
        "17e4b9c2d5a8f3e6b1c4d7a0f5e8b3c6d9a2f7e0b5c8d3a6f1e4b7c0d5a8f3e6";

    /// A ring of keys `(id, secret)`, the first sealing.
    pub(crate) fn ring(keys: &[(u8, &str)]) -> Keyring {
        let mut text = String::from("keys:\n");
        for (id, secret) in keys {
            text.push_str(&format!("  - id: {id}\n    secret: {secret}\n"));
        }
        Keyring::parse(&text).unwrap()
    }

    fn error(text: &str) -> String {
        Keyring::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn the_first_key_seals_and_all_are_listed() {
        let text = format!(
            "# rotation: new key first\nkeys:\n  - id: 2\n    secret: {SECRET_B}\n  - id: 1\n    secret: \"{SECRET_A}\"\n"
        );
        let ring = Keyring::parse(&text).unwrap();
        assert_eq!(ring.primary_id(), 2);
        assert_eq!(ring.primary().0, 2);
        assert_eq!(ring.ids(), vec![2, 1]);
        assert!(ring.get(1).is_some() && ring.get(2).is_some());
        assert!(ring.get(3).is_none());
        // Clones share the keys.
        assert_eq!(ring.clone().ids(), vec![2, 1]);
    }

    #[test]
    fn a_secret_of_only_digits_is_text_not_a_number() {
        let digits = "1234567890".repeat(7)[..64].to_string();
        let ring = Keyring::parse(&format!("keys:\n  - id: 9\n    secret: {digits}\n")).unwrap();
        assert_eq!(ring.ids(), vec![9]);
        // Upper-case hex is hex too.
        let upper = SECRET_A.to_uppercase();
        Keyring::parse(&format!("keys:\n  - id: 9\n    secret: {upper}\n")).unwrap();
    }

    #[test]
    fn bad_secrets_are_named_with_their_line_and_never_shown() {
        let short = &SECRET_B[..40];
        let text =
            format!("keys:\n  - id: 2\n    secret: {SECRET_A}\n  - id: 1\n    secret: {short}\n");
        let e = error(&text);
        assert!(
            e.starts_with("keys[1].secret (line 5): must be 64 hex digits"),
            "{e}"
        );
        assert!(e.contains("40 characters"), "{e}");
        assert!(!e.contains(short), "{e}");

        let not_hex = format!("{}zz", &SECRET_B[..62]);
        let e = error(&format!("keys:\n  - id: 1\n    secret: {not_hex}\n"));
        assert!(e.starts_with("keys[0].secret (line 3): "), "{e}");
        assert!(e.contains("not a hex digit"), "{e}");
        assert!(!e.contains(&not_hex[..20]), "{e}");

        let e = error(&format!(
            "keys:\n  - id: 1\n    secret: {}\n",
            "0".repeat(64)
        ));
        assert!(e.contains("placeholder"), "{e}");

        let e = error("keys:\n  - id: 1\n    secret: [a, b]\n");
        assert!(e.contains("expected 64 hex digits"), "{e}");

        let text = format!(
            "keys:\n  - id: 2\n    secret: {SECRET_A}\n  - id: 1\n    secret: {SECRET_A}\n"
        );
        let e = error(&text);
        assert!(
            e.starts_with("keys[1].secret (line 5): the same secret as keys[0]"),
            "{e}"
        );
        assert!(!e.contains(SECRET_A), "{e}");
    }

    #[test]
    fn bad_ids_are_named_with_their_line() {
        for id in ["0", "256", "-1"] {
            let e = error(&format!("keys:\n  - id: {id}\n    secret: {SECRET_A}\n"));
            assert_eq!(e, "keys[0].id (line 2): must be 1 to 255");
        }
        let text = format!(
            "keys:\n  - id: 7\n    secret: {SECRET_A}\n  - id: 7\n    secret: {SECRET_B}\n"
        );
        assert_eq!(
            error(&text),
            "keys[1].id (line 4): duplicate key id 7 (also keys[0])"
        );
    }

    #[test]
    fn structure_errors_name_the_field() {
        assert_eq!(
            error("keys: []\n"),
            "keys (line 1): needs at least one key (the first one seals new cookies)"
        );
        let e = error(&format!("keys:\n  - id: 1\n    secrt: {SECRET_A}\n"));
        assert!(e.contains("unknown field `secrt`"), "{e}");
        assert!(!e.contains(SECRET_A), "{e}");
        let e = error("keys:\n  - id: 1\n");
        assert!(e.contains("missing field `secret`"), "{e}");
        let e = error("key: []\n");
        assert!(e.contains("unknown field `key`"), "{e}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("slb-keys-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cookie-keys.yaml");
        std::fs::write(&path, "keys:\n  - id: 1\n    secret: abc\n").unwrap();
        let e = Keyring::load(&path).unwrap_err().to_string();
        let shown = path.display().to_string();
        assert!(
            e.starts_with(&format!("{shown}: keys[0].secret (line 3): ")),
            "{e}"
        );
        std::fs::write(&path, format!("keys:\n  - id: 4\n    secret: {SECRET_B}\n")).unwrap();
        assert_eq!(Keyring::load(&path).unwrap().primary_id(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
        let e = Keyring::load(&path).unwrap_err().to_string();
        assert!(e.starts_with("cannot read the cookie key file "), "{e}");
        assert!(e.contains(&shown), "{e}");
    }

    #[test]
    fn debug_shows_ids_only() {
        let ring = ring(&[(3, SECRET_A), (1, SECRET_B)]);
        let shown = format!("{ring:?} {ring:#?}");
        assert!(
            shown.contains("ids: [3, 1]") || shown.contains("ids: [\n"),
            "{shown}"
        );
        for secret in [SECRET_A, SECRET_B] {
            assert!(!shown.contains(&secret[..8]), "{shown}");
        }
    }
}
