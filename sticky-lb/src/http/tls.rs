//! TLS termination for `mode: http` services: the PEM files of `http.tls` -> a rustls server
//! config on the ring crypto provider, offering HTTP/2 then HTTP/1.1 by ALPN (RFC 7301).
//!
//! The files are read whenever a config is built, at start and on every reload, so a renewed
//! certificate takes effect with a reload; connections already open keep the one they began
//! with.

use crate::config::TlsConfig;
use anyhow::{Context, anyhow, bail};
use rustls::{
    InconsistentKeys, ServerConfig,
    pki_types::{
        CertificateDer, PrivateKeyDer,
        pem::{self, PemObject},
    },
};
use std::{path::Path, sync::Arc};

/// The application protocols offered, in order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Reads the certificate chain and private key of `tls` and builds a server config: TLS 1.3
/// and 1.2 with rustls' safe defaults, no client certificates, ALPN [`ALPN`].
///
/// Errors name the file and what is wrong with it: unreadable, not PEM, no certificate, no
/// (usable) private key, a key that does not match the leaf certificate.
pub fn server_config(tls: &TlsConfig) -> anyhow::Result<Arc<ServerConfig>> {
    let chain = certificates(&tls.certificate)?;
    let key = private_key(&tls.key)?;
    // The provider is given here rather than installed process-wide: nothing else in the
    // process needs to agree on one.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("the ring provider offers no TLS version")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => anyhow!(
                "{}: the key does not match the certificate (the first one) in {}",
                tls.key.display(),
                tls.certificate.display()
            ),
            rustls::Error::InvalidCertificate(e) => anyhow!(
                "{}: the first certificate cannot be used: {e}",
                tls.certificate.display()
            ),
            e => anyhow!("{}: unusable private key: {e}", tls.key.display()),
        })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the TLS {what} {}", path.display()))
}

/// Every `CERTIFICATE` block of a PEM file, in order (the leaf first). Other blocks (a key in
/// the same file) are skipped.
fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let text = read(path, "certificate")?;
    let chain = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{}: not valid PEM: {}", path.display(), pem_error(e)))?;
    if chain.is_empty() {
        bail!(
            "{}: no certificate found (expected PEM blocks -----BEGIN CERTIFICATE-----, the leaf first)",
            path.display()
        );
    }
    Ok(chain)
}

/// The first private key of a PEM file: PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) or
/// SEC1 (`EC PRIVATE KEY`).
fn private_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let text = read(path, "key")?;
    match PrivateKeyDer::from_pem_slice(&text) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) => {
            let encrypted = text.windows(9).any(|w| w == b"ENCRYPTED");
            bail!(
                "{}: no private key found (expected a PEM block -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY){}",
                path.display(),
                if encrypted {
                    "; an encrypted key must be decrypted first (openssl pkey -in KEY -out KEY.plain)"
                } else {
                    ""
                }
            )
        }
        Err(e) => bail!("{}: not valid PEM: {}", path.display(), pem_error(e)),
    }
}

/// A PEM parse error in words (the parser's own shows markers as byte lists).
fn pem_error(e: pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "the {} block is never closed (no -----END {0}-----)",
            String::from_utf8_lossy(&end_marker)
        ),
        pem::Error::IllegalSectionStart { .. } => "a -----BEGIN line inside another block".into(),
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
    use std::{
        path::PathBuf,
        sync::atomic::{AtomicUsize, Ordering},
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    /// A directory of its own per test, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("slb-tls-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A self-signed certificate for `localhost` and its key, PEM.
    fn self_signed() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn files(dir: &TempDir, cert: &str, key: &str) -> TlsConfig {
        TlsConfig {
            certificate: dir.write("cert.pem", cert),
            key: dir.write("key.pem", key),
        }
    }

    fn error(tls: &TlsConfig) -> String {
        format!("{:#}", server_config(tls).unwrap_err())
    }

    #[test]
    fn a_certificate_and_its_key_load_with_alpn() {
        let dir = TempDir::new();
        let (cert, key) = self_signed();
        let config = server_config(&files(&dir, &cert, &key)).unwrap();
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        // One file holding both, in either order, does too.
        let both = dir.write("both.pem", &format!("{key}{cert}"));
        let tls = TlsConfig {
            certificate: both.clone(),
            key: both,
        };
        server_config(&tls).unwrap();
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = TempDir::new();
        let (cert, key) = self_signed();
        let mut tls = files(&dir, &cert, &key);
        tls.key = dir.0.join("absent-key.pem");
        let e = error(&tls);
        assert!(e.starts_with("cannot read the TLS key "), "{e}");
        assert!(e.contains(&tls.key.display().to_string()), "{e}");
        assert!(e.contains("No such file"), "{e}");
        tls.certificate = dir.0.join("absent-cert.pem");
        let e = error(&tls);
        assert!(e.contains(&tls.certificate.display().to_string()), "{e}");
    }

    #[test]
    fn files_without_what_they_should_hold_are_named() {
        let dir = TempDir::new();
        let (cert, key) = self_signed();
        let garbage = "this is not PEM\n";

        let tls = files(&dir, garbage, &key);
        let e = error(&tls);
        let shown = tls.certificate.display().to_string();
        assert_eq!(
            e,
            format!(
                "{shown}: no certificate found (expected PEM blocks -----BEGIN CERTIFICATE-----, the leaf first)"
            )
        );
        // A key where the certificate should be.
        let e = error(&files(&dir, &key, &key));
        assert!(e.contains("no certificate found"), "{e}");

        let tls = files(&dir, &cert, garbage);
        let e = error(&tls);
        assert!(
            e.starts_with(&format!("{}: no private key found", tls.key.display())),
            "{e}"
        );
        // A certificate where the key should be.
        let e = error(&files(&dir, &cert, &cert));
        assert!(e.contains("no private key found"), "{e}");
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let e = error(&files(&dir, &cert, encrypted));
        assert!(e.contains("must be decrypted first"), "{e}");

        // A PEM block whose body is not base64, and one that is never closed.
        let bad = "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n";
        let e = error(&files(&dir, bad, &key));
        assert!(e.starts_with(&format!("{shown}: not valid PEM: ")), "{e}");
        let open = "-----BEGIN CERTIFICATE-----\nAAAA\n";
        assert_eq!(
            error(&files(&dir, open, &key)),
            format!(
                "{shown}: not valid PEM: the CERTIFICATE block is never closed (no -----END CERTIFICATE-----)"
            )
        );

        // Base64 that is not a certificate, and not a key.
        let not_der = "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
        let e = error(&files(&dir, not_der, &key));
        assert!(
            e.starts_with(&format!("{shown}: the first certificate cannot be used")),
            "{e}"
        );
        let not_der = "-----BEGIN PRIVATE KEY-----\naGVsbG8=\n-----END PRIVATE KEY-----\n";
        let tls = files(&dir, &cert, not_der);
        let e = error(&tls);
        assert!(
            e.starts_with(&format!("{}: unusable private key", tls.key.display())),
            "{e}"
        );
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = TempDir::new();
        let (cert, _) = self_signed();
        let (_, other_key) = self_signed();
        let tls = files(&dir, &cert, &other_key);
        assert_eq!(
            error(&tls),
            format!(
                "{}: the key does not match the certificate (the first one) in {}",
                tls.key.display(),
                tls.certificate.display()
            )
        );
    }

    /// A TLS handshake against the config over an in-memory pipe; the protocol ALPN chose.
    async fn handshake(config: Arc<ServerConfig>, cert: &str, offer: &[&[u8]]) -> Option<Vec<u8>> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(cert.as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = offer.iter().map(|p| p.to_vec()).collect();
        let (near, far) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut stream = TlsAcceptor::from(config).accept(far).await.unwrap();
            let mut ping = [0u8; 4];
            stream.read_exact(&mut ping).await.unwrap();
            stream.write_all(b"pong").await.unwrap();
            stream.flush().await.unwrap();
            ping
        });
        let name = ServerName::try_from("localhost").unwrap();
        let mut stream = TlsConnector::from(Arc::new(client))
            .connect(name, near)
            .await
            .unwrap();
        stream.write_all(b"ping").await.unwrap();
        stream.flush().await.unwrap();
        let mut pong = [0u8; 4];
        stream.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
        assert_eq!(&server.await.unwrap(), b"ping");
        stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
    }

    #[tokio::test]
    async fn clients_get_h2_or_http1_by_alpn() {
        let dir = TempDir::new();
        let (cert, key) = self_signed();
        let config = server_config(&files(&dir, &cert, &key)).unwrap();
        let both: &[&[u8]] = &[b"http/1.1", b"h2"];
        // The server's preference wins.
        assert_eq!(
            handshake(config.clone(), &cert, both).await,
            Some(b"h2".to_vec())
        );
        let http1: &[&[u8]] = &[b"http/1.1"];
        assert_eq!(
            handshake(config.clone(), &cert, http1).await,
            Some(b"http/1.1".to_vec())
        );
        assert_eq!(handshake(config, &cert, &[]).await, None);
    }
}
