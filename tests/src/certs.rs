//! Self-signed certificates for the TLS tests: one per call, for an IP address (the VIP, as
//! an IP subject alternative name: clients connect to `https://198.18.0.100/`), with a serial
//! number and common name the test chooses, so it can tell which certificate a server sent.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use base64::Engine;
use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData, SerialNumber};

/// A certificate and its private key (ECDSA P-256), PEM.
pub struct TestCertificate {
    pub cert_pem: String,
    pub key_pem: String,
    /// The common name, `sticky-lb test N` for serial N.
    pub common_name: String,
    pub serial: u64,
    /// SHA-256 of the SubjectPublicKeyInfo, base64 (standard alphabet, padded): the pin a
    /// browser is told to trust (Chromium's `--ignore-certificate-errors-spki-list`).
    pub spki_sha256: String,
}

impl TestCertificate {
    /// A new key pair and a certificate for `ip` signed by it, serial `serial`.
    pub fn new(ip: IpAddr, serial: u64) -> TestCertificate {
        let key = KeyPair::generate().expect("generating a key pair");
        let mut params =
            CertificateParams::new(vec![ip.to_string()]).expect("an IP is a subject alt name");
        let common_name = format!("sticky-lb test {serial}");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name.clone());
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params.self_signed(&key).expect("self-signing");
        let spki = ring::digest::digest(&ring::digest::SHA256, &key.subject_public_key_info());
        TestCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            common_name,
            serial,
            spki_sha256: base64::engine::general_purpose::STANDARD.encode(spki.as_ref()),
        }
    }

    /// Writes the certificate to `dir/NAME.crt` and the key to `dir/NAME.key` (replacing
    /// them, as a renewal does); the two paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert_pem).expect("writing the certificate");
        std::fs::write(&key, &self.key_pem).expect("writing the key");
        (cert, key)
    }
}
