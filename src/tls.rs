//! HTTPS: the server's rustls configuration from PEM files (like the
//! CloudStack agent's certificate): a certificate chain, and a private key
//! in PKCS#8, PKCS#1 (RSA) or SEC1 (EC) form. TLS 1.2 and 1.3 only.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

mod stream;
pub(crate) use stream::{Fill, ReadAhead};

/// A PEM file larger than this is refused.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_end(&mut buf))
        .map_err(|e| format!("cannot read TLS {what} file {}: {e}", path.display()))?;
    if buf.len() as u64 > MAX_PEM_BYTES {
        return Err(format!(
            "TLS {what} file {} is larger than {MAX_PEM_BYTES} bytes",
            path.display()
        ));
    }
    Ok(buf)
}

/// Loads the certificate chain and key and checks that they belong together.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<ServerConfig, String> {
    let cert_pem = read_pem(cert_file, "certificate")?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid PEM in {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate found in {}", cert_file.display()));
    }
    let key_pem = read_pem(key_file, "key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => format!(
            "no private key (PKCS#8, RSA or EC) found in {}",
            key_file.display()
        ),
        e => format!("invalid PEM in {}: {e}", key_file.display()),
    })?;
    // ring, its suites in its own order (AES-256-GCM, AES-128-GCM, then
    // ChaCha20-Poly1305), and the client's order honoured: curl and
    // Python's ssl (imageio's client) both ask for AES-256-GCM first, which
    // costs ring a third of ChaCha20 on a CPU with AES instructions, and
    // aws-lc-rs measured no cheaper here (bench/RESULTS.md, issue 24).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "TLS key {} does not match certificate {}",
                key_file.display(),
                cert_file.display()
            ),
            e => format!(
                "unusable TLS certificate {} or key {}: {e}",
                cert_file.display(),
                key_file.display()
            ),
        })
}
