//! The persistence cookie the balancer inserts (HAProxy `cookie NAME insert`, nginx `sticky
//! cookie`), sealed so that it neither shows the backend nor lets a client choose one, and the
//! `Cookie` / `Set-Cookie` header handling around it.
//!
//! # Format, version 1
//!
//! ```text
//! value     = base64url without padding (RFC 4648 section 5) of
//!             version (u8, 1) | key id (u8) | nonce (12 bytes) | AES-256-GCM ciphertext + tag (16 bytes)
//! plaintext = issued (u64, unix seconds, big endian) | last seen (u64, unix seconds, big endian)
//!             | service name length (u8) | service name | backend name length (u8) | backend name
//! AAD       = the first two bytes (version, key id)
//! ```
//!
//! The nonce is drawn from the operating system's CSPRNG for every seal. With random 96-bit
//! nonces NIST SP 800-38D allows 2^32 seals under one key; a cookie is sealed once per new
//! session and then only when its last-seen time is stale (see [`refresh_due`]), so a key
//! rotated yearly stays far below that.
//!
//! Times are wall-clock seconds, the same on every node within [`CLOCK_SKEW`]. A cookie is
//! checked in this order, and the first failure is its [`Rejected`] reason: size, base64,
//! version -> key id -> authentication -> layout -> service -> times.

use super::keys::Keyring;
use crate::config::CookieConfig;
use aes_gcm::{
    Aes256Gcm,
    aead::{Aead, Generate, Nonce, Payload},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{
    HeaderMap, HeaderValue,
    header::{COOKIE, Entry, SET_COOKIE},
};
use std::{fmt, time::Duration};

/// The format version this code seals and opens.
pub const VERSION: u8 = 1;
/// The longest service or backend name a cookie carries (its length is one byte).
pub const MAX_NAME_LEN: usize = 255;
/// How far the clocks of the nodes may differ. A cookie last seen up to this far in the future
/// is accepted (another node's clock runs ahead); `max_idle` and `max_life` expire a cookie only
/// once they are exceeded by more than this.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);

const HEADER_LEN: usize = 2;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Two times and two length bytes: names may be empty as far as the format goes.
const MIN_PLAINTEXT_LEN: usize = 8 + 8 + 1 + 1;
const MIN_SEALED_LEN: usize = HEADER_LEN + NONCE_LEN + MIN_PLAINTEXT_LEN + TAG_LEN;
const MAX_SEALED_LEN: usize = MIN_SEALED_LEN + 2 * MAX_NAME_LEN;
/// Longer values are refused before decoding anything (a client controls what it sends).
const MAX_VALUE_LEN: usize = (MAX_SEALED_LEN * 4).div_ceil(3);

/// What a cookie says: the backend of a service, and since when (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub service: String,
    pub backend: String,
    /// When the cookie was first issued; `max_life` counts from here.
    pub issued: u64,
    /// When the cookie was last (re-)issued; `max_idle` counts from here.
    pub last_seen: u64,
}

/// Why a cookie counts as absent. The request is then placed by the policy and gets a new
/// cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejected {
    /// Not a version 1 cookie of this balancer: too long or short, not base64url, another
    /// version, or (authentic but) inconsistent: names that do not fill the plaintext, a last
    /// seen time before its issue time or more than [`CLOCK_SKEW`] ahead of this node's clock.
    /// The latter can only come from a node whose clock is off; its times are not trusted.
    Malformed,
    /// Sealed with a key id this node's key file does not list (removed after rotation, or
    /// the nodes have different key files).
    UnknownKey,
    /// The AES-GCM tag does not verify: altered, or sealed with another secret under the same
    /// id.
    Tampered,
    /// Authentic, but for another service (a cookie name shared by two services on one site).
    OtherService,
    /// Last seen more than `max_idle` (+ [`CLOCK_SKEW`]) ago.
    IdleExpired,
    /// Issued more than `max_life` (+ [`CLOCK_SKEW`]) ago.
    LifeExpired,
}

impl Rejected {
    pub const ALL: [Rejected; 6] = [
        Rejected::Malformed,
        Rejected::UnknownKey,
        Rejected::Tampered,
        Rejected::OtherService,
        Rejected::IdleExpired,
        Rejected::LifeExpired,
    ];

    /// The reason as a metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed",
            Rejected::UnknownKey => "unknown_key",
            Rejected::Tampered => "tampered",
            Rejected::OtherService => "other_service",
            Rejected::IdleExpired => "idle_expired",
            Rejected::LifeExpired => "life_expired",
        }
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// A session whose service or backend name is longer than [`MAX_NAME_LEN`] bytes: it cannot
/// be sealed, and the request goes without a cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameTooLong;

impl fmt::Display for NameTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a service or backend name longer than {MAX_NAME_LEN} bytes does not fit in a cookie"
        )
    }
}

impl std::error::Error for NameTooLong {}

/// The age limits `open` enforces (HAProxy `maxidle`, `maxlife`); `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_idle: Option<Duration>,
    pub max_life: Option<Duration>,
}

impl From<&CookieConfig> for Limits {
    fn from(cfg: &CookieConfig) -> Limits {
        Limits {
            max_idle: cfg.max_idle,
            max_life: cfg.max_life,
        }
    }
}

/// Seals `session` with the ring's first key and a fresh random nonce, as a cookie value
/// (base64url, so it needs no quoting). Two seals of one session differ.
///
/// # Panics
/// If the operating system's random number generator fails (`getrandom(2)` does not, once the
/// kernel's pool is initialised at boot).
pub fn seal(keys: &Keyring, session: &Session) -> Result<String, NameTooLong> {
    let (service, backend) = (session.service.as_bytes(), session.backend.as_bytes());
    if service.len() > MAX_NAME_LEN || backend.len() > MAX_NAME_LEN {
        return Err(NameTooLong);
    }
    let mut plaintext = Vec::with_capacity(MIN_PLAINTEXT_LEN + service.len() + backend.len());
    plaintext.extend_from_slice(&session.issued.to_be_bytes());
    plaintext.extend_from_slice(&session.last_seen.to_be_bytes());
    for name in [service, backend] {
        plaintext.push(name.len() as u8);
        plaintext.extend_from_slice(name);
    }
    let (id, cipher) = keys.primary();
    let header = [VERSION, id];
    let nonce = Nonce::<Aes256Gcm>::generate();
    let sealed = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: &plaintext,
                aad: &header,
            },
        )
        .expect("AES-GCM seals messages of up to 64 GiB");
    let mut raw = Vec::with_capacity(HEADER_LEN + NONCE_LEN + sealed.len());
    raw.extend_from_slice(&header);
    raw.extend_from_slice(&nonce);
    raw.extend_from_slice(&sealed);
    Ok(URL_SAFE_NO_PAD.encode(raw))
}

/// Opens a cookie value for `service` at `now` (unix seconds): the session it seals, or why it
/// counts as absent (checks in the order of the module doc).
pub fn open(
    keys: &Keyring,
    value: &str,
    service: &str,
    now: u64,
    limits: Limits,
) -> Result<Session, Rejected> {
    if value.len() > MAX_VALUE_LEN {
        return Err(Rejected::Malformed);
    }
    let raw = URL_SAFE_NO_PAD
        .decode(value)
        .map_err(|_| Rejected::Malformed)?;
    if raw.len() < MIN_SEALED_LEN || raw[0] != VERSION {
        return Err(Rejected::Malformed);
    }
    let cipher = keys.get(raw[1]).ok_or(Rejected::UnknownKey)?;
    let (header, rest) = raw.split_at(HEADER_LEN);
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    let nonce = Nonce::<Aes256Gcm>::try_from(nonce).expect("split at the nonce length");
    let plaintext = cipher
        .decrypt(
            &nonce,
            Payload {
                msg: sealed,
                aad: header,
            },
        )
        .map_err(|_| Rejected::Tampered)?;
    let session = decode(&plaintext).ok_or(Rejected::Malformed)?;
    if session.service != service {
        return Err(Rejected::OtherService);
    }
    let skew = CLOCK_SKEW.as_secs();
    if session.last_seen < session.issued || session.last_seen > now.saturating_add(skew) {
        return Err(Rejected::Malformed);
    }
    let exceeded = |since: u64, limit: Option<Duration>| {
        limit.is_some_and(|l| now.saturating_sub(since) > l.as_secs().saturating_add(skew))
    };
    // Both limits exceeded: the absolute one is the reason.
    if exceeded(session.issued, limits.max_life) {
        return Err(Rejected::LifeExpired);
    }
    if exceeded(session.last_seen, limits.max_idle) {
        return Err(Rejected::IdleExpired);
    }
    Ok(session)
}

/// The plaintext layout -> a session; `None` where the lengths do not fill it exactly or a name
/// is not UTF-8.
fn decode(plaintext: &[u8]) -> Option<Session> {
    let (issued, rest) = plaintext.split_first_chunk::<8>()?;
    let (last_seen, mut rest) = rest.split_first_chunk::<8>()?;
    let mut names = [String::new(), String::new()];
    for name in &mut names {
        let (&len, after) = rest.split_first()?;
        let (bytes, after) = after.split_at_checked(len as usize)?;
        *name = String::from_utf8(bytes.to_vec()).ok()?;
        rest = after;
    }
    let [service, backend] = names;
    rest.is_empty().then_some(Session {
        service,
        backend,
        issued: u64::from_be_bytes(*issued),
        last_seen: u64::from_be_bytes(*last_seen),
    })
}

/// Whether the cookie of `session` should be re-issued now (with `last_seen = now`): when its
/// last-seen time is older than a quarter of `max_idle`, or, for a persistent cookie, a quarter
/// of `max_age`, whichever quarter is shorter; never when neither is set.
///
/// A quarter keeps `Set-Cookie` off most responses, while a client active at least every three
/// quarters of `max_idle` is never idle-expired (its sealed last-seen time lags by at most a
/// quarter), and a browser active within three quarters of `max_age` never drops the cookie.
/// The cost: a client idle for a little over three quarters of `max_idle` may already count as
/// idle. Also re-issue a cookie not sealed with the primary key (see [`sealed_with_primary`]),
/// so that active clients move to a new key before the old one is removed.
pub fn refresh_due(session: &Session, now: u64, cfg: &CookieConfig) -> bool {
    [cfg.max_idle, cfg.max_age]
        .into_iter()
        .flatten()
        .map(|limit| limit.as_secs() / 4)
        .min()
        .is_some_and(|quarter| now.saturating_sub(session.last_seen) > quarter)
}

/// Whether `value` was sealed with the ring's primary key, read from its (authenticated, once
/// [`open`] accepted it) clear header without opening it. `false` for a value too short to say.
pub fn sealed_with_primary(keys: &Keyring, value: &str) -> bool {
    // 4 base64 characters hold the first 3 bytes: version, key id and one nonce byte.
    let mut head = [0u8; 3];
    value.get(..4).is_some_and(|prefix| {
        URL_SAFE_NO_PAD.decode_slice(prefix, &mut head).is_ok() && head[1] == keys.primary_id()
    })
}

/// The `name=value` pairs of a `Cookie` header (RFC 6265 section 4.2.1, `; ` separated),
/// trimmed of spaces and tabs; a part without `=` is skipped. Quoted values are left quoted.
fn pairs(header: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    header.split(|&b| b == b';').filter_map(|part| {
        let eq = part.iter().position(|&b| b == b'=')?;
        Some((trim(&part[..eq]), trim(&part[eq + 1..])))
    })
}

fn trim(bytes: &[u8]) -> &[u8] {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !ows(b)).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !ows(b)).map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// The values of cookie `name` in every `Cookie` header of a request, in order. HTTP/2 clients
/// send one header per cookie, and a client may hold several cookies of one name (other paths
/// or domains): the caller tries each. Names compare exactly (`XSLBID` is not `SLBID`); values
/// that are not UTF-8 are skipped.
pub fn request_values<'a>(
    headers: &'a HeaderMap,
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers.get_all(COOKIE).iter().flat_map(move |header| {
        pairs(header.as_bytes())
            .filter(move |(n, _)| *n == name.as_bytes())
            .filter_map(|(_, value)| std::str::from_utf8(value).ok())
    })
}

/// Removes every `name=...` pair from the request's `Cookie` headers, and a header left
/// without a pair (HAProxy `indirect`: the backend never sees the balancer's cookie). Headers
/// without the cookie stay as they were, byte for byte.
pub fn strip(headers: &mut HeaderMap, name: &str) {
    let has = |header: &HeaderValue| pairs(header.as_bytes()).any(|(n, _)| n == name.as_bytes());
    if !headers.get_all(COOKIE).iter().any(has) {
        return;
    }
    let Entry::Occupied(entry) = headers.entry(COOKIE) else {
        return;
    };
    let (_, old) = entry.remove_entry_mult();
    let old: Vec<HeaderValue> = old.collect();
    for header in old {
        if !has(&header) {
            headers.append(COOKIE, header);
            continue;
        }
        let kept: Vec<&[u8]> = header
            .as_bytes()
            .split(|&b| b == b';')
            .map(trim)
            .filter(|part| {
                !part.is_empty() && pairs(part).next().is_none_or(|(n, _)| n != name.as_bytes())
            })
            .collect();
        if kept.is_empty() {
            continue;
        }
        // Only bytes of a valid value and "; ": valid again.
        let mut value = HeaderValue::from_bytes(&kept.join(&b"; "[..]))
            .expect("parts of a header value are a header value");
        value.set_sensitive(header.is_sensitive());
        headers.append(COOKIE, value);
    }
}

/// The `Set-Cookie` header that gives a client the sealed `value`, with the attributes `cfg`
/// sets: `Path`, `Domain`, `Max-Age` (seconds; without it a session cookie), `Secure`,
/// `HttpOnly`, `SameSite`.
///
/// # Panics
/// If `cfg` holds characters a header cannot (control characters): the config's validation
/// refuses them.
pub fn set_cookie(cfg: &CookieConfig, value: &str) -> HeaderValue {
    let mut text = format!("{}={value}; Path={}", cfg.name, cfg.path);
    if let Some(domain) = &cfg.domain {
        text.push_str(&format!("; Domain={domain}"));
    }
    if let Some(max_age) = cfg.max_age {
        text.push_str(&format!("; Max-Age={}", max_age.as_secs()));
    }
    if cfg.secure {
        text.push_str("; Secure");
    }
    if cfg.httponly {
        text.push_str("; HttpOnly");
    }
    if let Some(samesite) = cfg.samesite {
        text.push_str(&format!("; SameSite={}", samesite.name()));
    }
    HeaderValue::from_str(&text).expect("a validated cookie config makes a valid header")
}

/// The value a response's `Set-Cookie` headers give cookie `name` (to learn an application's
/// session cookie): the last that sets it, skipping those that delete it (RFC 6265 section
/// 5.2: an empty value, `Max-Age` of 0 or less, or without `Max-Age` an `Expires` date before
/// the year 2000: frameworks delete with the Unix epoch). Quoted values are returned quoted.
pub fn response_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut found = None;
    for header in headers.get_all(SET_COOKIE) {
        let mut parts = header.as_bytes().split(|&b| b == b';');
        let Some((n, value)) = parts.next().and_then(|first| pairs(first).next()) else {
            continue;
        };
        if n != name.as_bytes() || value.is_empty() || value == b"\"\"" || deletes(parts) {
            continue;
        }
        if let Ok(value) = std::str::from_utf8(value) {
            found = Some(value.to_owned());
        }
    }
    found
}

/// Whether a `Set-Cookie`'s attributes expire the cookie at once.
fn deletes<'a>(attributes: impl Iterator<Item = &'a [u8]>) -> bool {
    let (mut max_age, mut expired) = (None, false);
    for attribute in attributes {
        let attribute = trim(attribute);
        let (key, value) = match attribute.iter().position(|&b| b == b'=') {
            Some(eq) => (trim(&attribute[..eq]), trim(&attribute[eq + 1..])),
            None => (attribute, &b""[..]),
        };
        if key.eq_ignore_ascii_case(b"max-age") {
            // RFC 6265 5.2.2: an optional '-' and digits, else the attribute is ignored.
            let (negative, digits) = match value.split_first() {
                Some((b'-', rest)) => (true, rest),
                _ => (false, value),
            };
            if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) {
                max_age = Some(negative || digits.iter().all(|&d| d == b'0'));
            }
        } else if key.eq_ignore_ascii_case(b"expires") {
            expired = expires_year(value).is_some_and(|year| year < 2000);
        }
    }
    // Max-Age wins over Expires (RFC 6265 5.3 step 3).
    max_age.unwrap_or(expired)
}

/// The year of a cookie date, as RFC 6265 section 5.1.1 finds it: among the date's tokens, the
/// first of 1-2 leading digits is the day of month, the next of 2-4 leading digits the year;
/// the time (`hh:mm:ss`) and the month are skipped. Two-digit years 70-99 are 19xx, 00-69
/// 20xx.
fn expires_year(date: &[u8]) -> Option<u32> {
    let delimiter =
        |b: &u8| matches!(*b, 0x09 | 0x20..=0x2f | 0x3b..=0x40 | 0x5b..=0x60 | 0x7b..=0x7e);
    let mut day_found = false;
    for token in date.split(delimiter).filter(|t| !t.is_empty()) {
        if token.contains(&b':') {
            continue;
        }
        let digits = token.iter().take_while(|b| b.is_ascii_digit()).count();
        if !day_found && (1..=2).contains(&digits) {
            day_found = true;
        } else if (2..=4).contains(&digits) {
            let year: u32 = std::str::from_utf8(&token[..digits]).ok()?.parse().ok()?;
            return Some(match year {
                70..=99 => year + 1900,
                0..=69 => year + 2000,
                _ => year,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::keys::tests::{SECRET_A, SECRET_B, ring};

    const NOW: u64 = 1_750_000_000;
    const SKEW: u64 = CLOCK_SKEW.as_secs();

    fn session() -> Session {
        Session {
            service: "shop-web".into(),
            backend: "web-1".into(),
            issued: NOW - 600,
            last_seen: NOW - 60,
        }
    }

    fn cookie_config() -> CookieConfig {
        serde_yaml::from_str("{}").unwrap()
    }

    fn limits(idle: Option<u64>, life: Option<u64>) -> Limits {
        Limits {
            max_idle: idle.map(Duration::from_secs),
            max_life: life.map(Duration::from_secs),
        }
    }

    fn open_at(keys: &Keyring, value: &str, now: u64, limits: Limits) -> Result<Session, Rejected> {
        open(keys, value, "shop-web", now, limits)
    }

    /// Decoded raw bytes of a value, changed by `edit`, encoded again.
    fn edited(value: &str, edit: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut raw = URL_SAFE_NO_PAD.decode(value).unwrap();
        edit(&mut raw);
        URL_SAFE_NO_PAD.encode(raw)
    }

    #[test]
    fn a_sealed_session_opens_as_it_was() {
        let keys = ring(&[(1, SECRET_A)]);
        let value = seal(&keys, &session()).unwrap();
        assert_eq!(
            open_at(&keys, &value, NOW, Limits::default()),
            Ok(session())
        );
        // Layout: header, nonce, plaintext (8 + 8 + 1 + 8 + 1 + 5), tag.
        let raw = URL_SAFE_NO_PAD.decode(&value).unwrap();
        assert_eq!(raw.len(), 2 + 12 + (8 + 8 + 1 + 8 + 1 + 5) + 16);
        assert_eq!(raw[..2], [VERSION, 1]);
        // Names of the longest length, and empty ones, fit.
        for (service, backend) in [
            ("s".repeat(255), "b".repeat(255)),
            (String::new(), String::new()),
        ] {
            let long = Session {
                service,
                backend,
                ..session()
            };
            let value = seal(&keys, &long).unwrap();
            assert!(value.len() <= MAX_VALUE_LEN);
            assert_eq!(
                open(&keys, &value, &long.service, NOW, Limits::default()),
                Ok(long)
            );
        }
    }

    #[test]
    fn a_name_too_long_is_not_sealed() {
        let keys = ring(&[(1, SECRET_A)]);
        let long = Session {
            backend: "b".repeat(256),
            ..session()
        };
        assert_eq!(seal(&keys, &long), Err(NameTooLong));
        let long = Session {
            service: "é".repeat(128),
            ..session()
        };
        assert_eq!(seal(&keys, &long), Err(NameTooLong));
    }

    #[test]
    fn every_seal_has_its_own_nonce() {
        let keys = ring(&[(1, SECRET_A)]);
        let (a, b) = (
            seal(&keys, &session()).unwrap(),
            seal(&keys, &session()).unwrap(),
        );
        assert_ne!(a, b);
        let (a, b) = (
            URL_SAFE_NO_PAD.decode(a).unwrap(),
            URL_SAFE_NO_PAD.decode(b).unwrap(),
        );
        assert_ne!(a[2..14], b[2..14]);
    }

    #[test]
    fn the_value_shows_no_name_or_address() {
        let keys = ring(&[(1, SECRET_A)]);
        let clear = Session {
            service: "shop-web".into(),
            backend: "198.18.0.11:8080".into(),
            ..session()
        };
        for _ in 0..16 {
            let value = seal(&keys, &clear).unwrap();
            let raw = URL_SAFE_NO_PAD.decode(&value).unwrap();
            for needle in ["198.18.0.11", "shop-web", "8080"] {
                assert!(!value.contains(needle), "{value}");
                // Nor in the decoded bytes (so in no base64 alignment either).
                assert!(!raw.windows(needle.len()).any(|w| w == needle.as_bytes()));
            }
        }
    }

    #[test]
    fn an_altered_byte_is_tampered() {
        let keys = ring(&[(1, SECRET_A)]);
        let value = seal(&keys, &session()).unwrap();
        let len = URL_SAFE_NO_PAD.decode(&value).unwrap().len();
        // Every byte after the header: nonce, ciphertext, tag.
        for i in 2..len {
            let bad = edited(&value, |raw| raw[i] ^= 0x01);
            assert_eq!(
                open_at(&keys, &bad, NOW, Limits::default()),
                Err(Rejected::Tampered),
                "{i}"
            );
        }
        // Cut short, yet longer than the shortest cookie: the tag is lost.
        let cut = edited(&value, |raw| raw.truncate(len - 1));
        assert_eq!(
            open_at(&keys, &cut, NOW, Limits::default()),
            Err(Rejected::Tampered)
        );
        // The same secret under another id: the id is authenticated data.
        let renamed = ring(&[(2, SECRET_A)]);
        let bad = edited(&value, |raw| raw[1] = 2);
        assert_eq!(
            open_at(&renamed, &bad, NOW, Limits::default()),
            Err(Rejected::Tampered)
        );
        // Another secret under the same id.
        let other = ring(&[(1, SECRET_B)]);
        assert_eq!(
            open_at(&other, &value, NOW, Limits::default()),
            Err(Rejected::Tampered)
        );
    }

    #[test]
    fn a_key_id_not_in_the_ring_is_unknown() {
        let keys = ring(&[(1, SECRET_A)]);
        let value = seal(&keys, &session()).unwrap();
        let bad = edited(&value, |raw| raw[1] = 9);
        assert_eq!(
            open_at(&keys, &bad, NOW, Limits::default()),
            Err(Rejected::UnknownKey)
        );
    }

    #[test]
    fn what_is_not_a_version_1_cookie_is_malformed() {
        let keys = ring(&[(1, SECRET_A)]);
        let value = seal(&keys, &session()).unwrap();
        let malformed = [
            String::new(),
            "not base64!".into(),
            format!("{value}="),
            // Truncated, by one character and down to the header.
            value[..value.len() - 1].to_string(),
            value[..20].to_string(),
            edited(&value, |raw| raw.truncate(MIN_SEALED_LEN - 1)),
            edited(&value, |raw| raw[0] = 2),
            edited(&value, |raw| raw[0] = 0),
            "A".repeat(MAX_VALUE_LEN + 4),
        ];
        for bad in malformed {
            assert_eq!(
                open_at(&keys, &bad, NOW, Limits::default()),
                Err(Rejected::Malformed),
                "{bad}"
            );
        }
    }

    /// A value sealed by hand with an arbitrary plaintext, as a buggy or future node could.
    fn seal_raw(keys: &Keyring, plaintext: &[u8]) -> String {
        let (id, cipher) = keys.primary();
        let nonce = Nonce::<Aes256Gcm>::generate();
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &[VERSION, id],
                },
            )
            .unwrap();
        URL_SAFE_NO_PAD.encode([&[VERSION, id][..], nonce.as_slice(), &sealed].concat())
    }

    #[test]
    fn authentic_but_inconsistent_plaintext_is_malformed() {
        let keys = ring(&[(1, SECRET_A)]);
        let times = [(NOW - 10).to_be_bytes(), NOW.to_be_bytes()].concat();
        let good = [&times[..], b"\x08shop-web\x05web-1"].concat();
        assert!(open_at(&keys, &seal_raw(&keys, &good), NOW, Limits::default()).is_ok());
        for plaintext in [
            [&times[..], b"\x08shop-web\x06web-1"].concat(),
            [&times[..], b"\x08shop-web\x05web-1x"].concat(),
            [&times[..], b"\x09shop-web"].concat(),
            [&times[..], b"\x08shop-web\x02\xff\xfe"].concat(),
        ] {
            let value = seal_raw(&keys, &plaintext);
            assert_eq!(
                open_at(&keys, &value, NOW, Limits::default()),
                Err(Rejected::Malformed)
            );
        }
    }

    #[test]
    fn a_cookie_of_another_service_is_refused() {
        let keys = ring(&[(1, SECRET_A)]);
        let value = seal(&keys, &session()).unwrap();
        assert_eq!(
            open(&keys, &value, "shop-api", NOW, Limits::default()),
            Err(Rejected::OtherService)
        );
        assert_eq!(
            open(&keys, &value, "shop-web2", NOW, Limits::default()),
            Err(Rejected::OtherService)
        );
    }

    #[test]
    fn idle_expiry_allows_the_skew() {
        let keys = ring(&[(1, SECRET_A)]);
        let at = |last_seen: u64| {
            let s = Session {
                issued: last_seen - 100,
                last_seen,
                ..session()
            };
            seal(&keys, &s).unwrap()
        };
        let idle = limits(Some(300), None);
        let edge = at(NOW - 300 - SKEW);
        assert!(open_at(&keys, &edge, NOW, idle).is_ok());
        assert_eq!(
            open_at(&keys, &edge, NOW + 1, idle),
            Err(Rejected::IdleExpired)
        );
        let old = at(NOW - 10_000);
        assert_eq!(open_at(&keys, &old, NOW, idle), Err(Rejected::IdleExpired));
        // Without the limit the same cookie is fine.
        assert!(open_at(&keys, &old, NOW, limits(None, Some(100_000))).is_ok());
    }

    #[test]
    fn life_expiry_allows_the_skew() {
        let keys = ring(&[(1, SECRET_A)]);
        let s = Session {
            issued: NOW - 3600 - SKEW,
            last_seen: NOW,
            ..session()
        };
        let value = seal(&keys, &s).unwrap();
        let life = limits(Some(60), Some(3600));
        assert!(open_at(&keys, &value, NOW, life).is_ok());
        assert_eq!(
            open_at(&keys, &value, NOW + 1, life),
            Err(Rejected::LifeExpired)
        );
        // Both exceeded: life is the reason.
        assert_eq!(
            open_at(&keys, &value, NOW + 100_000, life),
            Err(Rejected::LifeExpired)
        );
        assert!(open_at(&keys, &value, NOW + 100_000, Limits::default()).is_ok());
    }

    #[test]
    fn times_from_the_future_are_allowed_up_to_the_skew() {
        let keys = ring(&[(1, SECRET_A)]);
        let ahead = |secs: u64| {
            let s = Session {
                issued: NOW + secs,
                last_seen: NOW + secs,
                ..session()
            };
            seal(&keys, &s).unwrap()
        };
        let idle = limits(Some(60), Some(60));
        assert!(open_at(&keys, &ahead(SKEW), NOW, idle).is_ok());
        assert_eq!(
            open_at(&keys, &ahead(SKEW + 1), NOW, idle),
            Err(Rejected::Malformed)
        );
        // Last seen before issued.
        let s = Session {
            issued: NOW,
            last_seen: NOW - 1,
            ..session()
        };
        let value = seal(&keys, &s).unwrap();
        assert_eq!(open_at(&keys, &value, NOW, idle), Err(Rejected::Malformed));
    }

    #[test]
    fn keys_rotate() {
        let old = ring(&[(1, SECRET_A)]);
        let rotated = ring(&[(2, SECRET_B), (1, SECRET_A)]);
        let retired = ring(&[(2, SECRET_B)]);
        let by_old = seal(&old, &session()).unwrap();
        assert_eq!(
            open_at(&rotated, &by_old, NOW, Limits::default()),
            Ok(session())
        );
        assert_eq!(
            open_at(&retired, &by_old, NOW, Limits::default()),
            Err(Rejected::UnknownKey)
        );
        assert!(!sealed_with_primary(&rotated, &by_old));
        assert!(sealed_with_primary(&old, &by_old));
        // New seals use the first key: the retired ring opens them, the old one does not.
        let by_new = seal(&rotated, &session()).unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(&by_new).unwrap()[1], 2);
        assert!(sealed_with_primary(&rotated, &by_new));
        assert_eq!(
            open_at(&retired, &by_new, NOW, Limits::default()),
            Ok(session())
        );
        assert_eq!(
            open_at(&old, &by_new, NOW, Limits::default()),
            Err(Rejected::UnknownKey)
        );
        assert!(!sealed_with_primary(&rotated, "ab"));
    }

    #[test]
    fn every_reason_has_its_label() {
        let labels: Vec<&str> = Rejected::ALL.iter().map(|r| r.reason()).collect();
        assert_eq!(
            labels,
            [
                "malformed",
                "unknown_key",
                "tampered",
                "other_service",
                "idle_expired",
                "life_expired"
            ]
        );
        assert_eq!(Rejected::Tampered.to_string(), "tampered");
    }

    #[test]
    fn refresh_only_when_last_seen_is_stale() {
        let mut cfg = cookie_config();
        let seen = |ago: u64| Session {
            last_seen: NOW - ago,
            ..session()
        };
        // Neither max_idle nor max_age: never.
        assert!(!refresh_due(&seen(1_000_000), NOW, &cfg));
        cfg.max_idle = Some(Duration::from_secs(400));
        assert!(!refresh_due(&seen(100), NOW, &cfg));
        assert!(refresh_due(&seen(101), NOW, &cfg));
        // max_age's quarter is shorter: it wins.
        cfg.max_age = Some(Duration::from_secs(200));
        assert!(!refresh_due(&seen(50), NOW, &cfg));
        assert!(refresh_due(&seen(51), NOW, &cfg));
        cfg.max_idle = None;
        assert!(refresh_due(&seen(51), NOW, &cfg));
        // A last-seen time ahead of this node's clock is fresh.
        let ahead = Session {
            last_seen: NOW + 20,
            ..session()
        };
        assert!(!refresh_due(&ahead, NOW, &cfg));
    }

    fn request(cookies: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("shop.example"));
        for c in cookies {
            headers.append(COOKIE, HeaderValue::from_str(c).unwrap());
        }
        headers
    }

    fn values<'a>(headers: &'a HeaderMap, name: &'a str) -> Vec<&'a str> {
        request_values(headers, name).collect()
    }

    #[test]
    fn request_values_are_found_in_every_cookie_header() {
        let h = request(&[
            "a=1; SLBID=one;XSLBID=x; SLBIDX=y",
            "SLBID=two",
            "b=2;  SLBID = three ",
        ]);
        assert_eq!(values(&h, "SLBID"), ["one", "two", "three"]);
        assert_eq!(values(&h, "XSLBID"), ["x"]);
        assert_eq!(values(&h, "slbid"), Vec::<&str>::new());
        let h = request(&["SLBID=\"quoted\"; flag; =novalue; SLBID=; c=a=b"]);
        assert_eq!(values(&h, "SLBID"), ["\"quoted\"", ""]);
        assert_eq!(values(&h, "c"), ["a=b"]);
        assert_eq!(values(&request(&[]), "SLBID"), Vec::<&str>::new());
        let mut h = request(&[]);
        h.append(
            COOKIE,
            HeaderValue::from_bytes(b"n=\xff; SLBID=ok").unwrap(),
        );
        assert_eq!(values(&h, "n"), Vec::<&str>::new());
        assert_eq!(values(&h, "SLBID"), ["ok"]);
    }

    fn cookie_headers(headers: &HeaderMap) -> Vec<&str> {
        headers
            .get_all(COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn strip_removes_only_the_named_cookie() {
        let mut h = request(&[
            "a=1; SLBID=one;XSLBID=x",
            "SLBID=two",
            "  SLBID=three ;  b=2 ",
            "untouched=1;;  spacing",
        ]);
        strip(&mut h, "SLBID");
        assert_eq!(
            cookie_headers(&h),
            ["a=1; XSLBID=x", "b=2", "untouched=1;;  spacing"]
        );
        assert_eq!(h.get("host").unwrap(), "shop.example");
        // Nothing to strip: left alone.
        let mut h = request(&["a=1 ;b=2"]);
        strip(&mut h, "SLBID");
        assert_eq!(cookie_headers(&h), ["a=1 ;b=2"]);
        // Only the cookie: no Cookie header is left.
        let mut h = request(&["SLBID=one", "SLBID=two"]);
        strip(&mut h, "SLBID");
        assert!(h.get(COOKIE).is_none());
        // Sensitivity survives.
        let mut h = request(&[]);
        let mut v = HeaderValue::from_static("SLBID=1; secret=2");
        v.set_sensitive(true);
        h.append(COOKIE, v);
        strip(&mut h, "SLBID");
        assert!(h.get(COOKIE).unwrap().is_sensitive());
    }

    #[test]
    fn set_cookie_carries_the_configured_attributes() {
        let cfg = cookie_config();
        assert_eq!(set_cookie(&cfg, "v4lue"), "SLBID=v4lue; Path=/; HttpOnly");
        let cfg: CookieConfig = serde_yaml::from_str(
            "{name: SRV, max_age: 1h, domain: shop.example, path: /app, secure: true, httponly: false, samesite: None}",
        )
        .unwrap();
        assert_eq!(
            set_cookie(&cfg, "v"),
            "SRV=v; Path=/app; Domain=shop.example; Max-Age=3600; Secure; SameSite=None"
        );
    }

    fn response(set_cookies: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for c in set_cookies {
            headers.append(SET_COOKIE, HeaderValue::from_str(c).unwrap());
        }
        headers
    }

    #[test]
    fn response_cookie_is_the_last_that_sets_it() {
        let r = response(&[
            "JSESSIONID=abc; Path=/; HttpOnly",
            "other=1",
            "XJSESSIONID=nope",
            " JSESSIONID = \"def\" ; Secure",
        ]);
        assert_eq!(
            response_cookie(&r, "JSESSIONID").as_deref(),
            Some("\"def\"")
        );
        assert_eq!(response_cookie(&r, "other").as_deref(), Some("1"));
        assert_eq!(response_cookie(&r, "missing"), None);
        assert_eq!(response_cookie(&response(&[]), "JSESSIONID"), None);
    }

    #[test]
    fn response_cookie_skips_deletions() {
        for deleting in [
            "sid=; Path=/",
            "sid=\"\"",
            "sid=deleted; Max-Age=0",
            "sid=deleted; max-age=-1; Path=/",
            "sid=deleted; Max-Age=000",
            "sid=deleted; expires=Thu, 01 Jan 1970 00:00:00 GMT",
            "sid=deleted; Expires=Thu, 01-Jan-1970 00:00:10 GMT; Path=/",
            "sid=deleted; Expires=Thursday, 01-Jan-70 00:00:01 GMT",
            // Max-Age wins over a future Expires.
            "sid=x; Expires=Wed, 21 Oct 2099 07:28:00 GMT; Max-Age=0",
        ] {
            let r = response(&["sid=live", deleting]);
            assert_eq!(
                response_cookie(&r, "sid").as_deref(),
                Some("live"),
                "{deleting}"
            );
            assert_eq!(
                response_cookie(&response(&[deleting]), "sid"),
                None,
                "{deleting}"
            );
        }
        for setting in [
            "sid=new; Max-Age=3600",
            "sid=new; Expires=Wed, 21 Oct 2099 07:28:00 GMT",
            "sid=new; Expires=Wed, 21-Oct-99 07:28:00 GMT; Max-Age=60",
            "sid=new; Max-Age=soon",
            "sid=new; Expires=never",
        ] {
            let r = response(&["sid=old", setting]);
            assert_eq!(
                response_cookie(&r, "sid").as_deref(),
                Some("new"),
                "{setting}"
            );
        }
    }

    #[test]
    fn cookie_dates_give_their_year() {
        assert_eq!(expires_year(b"Thu, 01 Jan 1970 00:00:00 GMT"), Some(1970));
        assert_eq!(expires_year(b"Wed, 21-Oct-15 07:28:00 GMT"), Some(2015));
        assert_eq!(expires_year(b"Sun Nov  6 08:49:37 1994"), Some(1994));
        assert_eq!(expires_year(b"garbage"), None);
    }
}
