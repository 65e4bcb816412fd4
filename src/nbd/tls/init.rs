//! `ferry tls init`: a fresh CA, and a server and a client identity it signed, written in the
//! layout [`super::TlsCreds::load`], QEMU (`tls-creds-x509`) and libnbd (`tls-certificates=`)
//! read, so one directory serves a listener, ferry's forwarder and real clients.
//!
//! Invariants: no existing file is overwritten (each is created with `O_EXCL`); keys are
//! created 0600 and the directory 0700 when this creates it. The CA key is kept as
//! `ca-key.pem` (to sign more identities later; move it offline where that matters).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use thiserror::Error;

use super::{CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};

/// The CA's private key.
pub const CA_KEY: &str = "ca-key.pem";
/// Years the generated certificates are valid for.
const VALID_YEARS: i32 = 10;

/// Why credentials could not be created.
#[derive(Debug, Error)]
pub enum InitError {
    /// rcgen refused a parameter (a host name that is not a DNS name or an address, ...).
    #[error("cannot create the certificates")]
    Generate(#[source] rcgen::Error),
    /// A file could not be created (it may exist already: nothing is overwritten).
    #[error("cannot create {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Creates `dir` (if missing) and the CA, server and client credentials in it. The server
/// certificate names `hosts` (DNS names or IP addresses clients connect with).
pub fn generate(dir: &Path, hosts: &[String]) -> Result<(), InitError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| InitError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    let year = current_year();
    // From the start of last year (other hosts' clocks may lag) to VALID_YEARS ahead.
    let not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    let not_after = rcgen::date_time_ymd(year + VALID_YEARS, 1, 1);
    let ca_key = KeyPair::generate().map_err(InitError::Generate)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = name("ferry CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (ca.not_before, ca.not_after) = (not_before, not_after);
    let ca_cert = ca.self_signed(&ca_key).map_err(InitError::Generate)?;
    let issuer = Issuer::new(ca, &ca_key);

    let leaf = |common_name: &str, sans: &[String], purpose| {
        let mut params = CertificateParams::new(sans.to_vec()).map_err(InitError::Generate)?;
        params.distinguished_name = name(common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![purpose];
        (params.not_before, params.not_after) = (not_before, not_after);
        let key = KeyPair::generate().map_err(InitError::Generate)?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(InitError::Generate)?;
        Ok::<_, InitError>((cert.pem(), key.serialize_pem()))
    };
    let server_name = hosts.first().map(String::as_str).unwrap_or("ferry server");
    let (server_cert, server_key) = leaf(server_name, hosts, ExtendedKeyUsagePurpose::ServerAuth)?;
    let (client_cert, client_key) = leaf("ferry client", &[], ExtendedKeyUsagePurpose::ClientAuth)?;

    write_new(&dir.join(CA_KEY), &ca_key.serialize_pem(), 0o600)?;
    write_new(&dir.join(CA_CERT), &ca_cert.pem(), 0o644)?;
    write_new(&dir.join(SERVER_KEY), &server_key, 0o600)?;
    write_new(&dir.join(SERVER_CERT), &server_cert, 0o644)?;
    write_new(&dir.join(CLIENT_KEY), &client_key, 0o600)?;
    write_new(&dir.join(CLIENT_CERT), &client_cert, 0o644)?;
    Ok(())
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// The current year (UTC), give or take a day around new year.
fn current_year() -> i32 {
    const SECONDS_PER_YEAR: u64 = 31_556_952; // 365.2425 days
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_secs())
        .unwrap_or(0);
    1970 + i32::try_from(now / SECONDS_PER_YEAR).unwrap_or(0)
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), InitError> {
    let write_err = |source| InitError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(write_err)?;
    file.write_all(text.as_bytes()).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}
