//! The control API's bearer token: 32 random bytes from `/dev/urandom`, hex-encoded, kept in
//! `<state_dir>/api.token`.
//!
//! Invariants:
//! - The file is created with mode 0600 and is never readable by other users: the agent runs
//!   as root, so only root (and the CLI run as root) can talk to the API. An existing file
//!   with wider permissions is narrowed to 0600 at start.
//! - The file appears atomically and complete: the token is written to a fresh temporary file
//!   (`O_EXCL`), synced, then hard-linked to its name. A link never replaces an existing file,
//!   so two agents racing on the same state directory end up with the same token.
//! - A token is never logged or printed.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Random bytes in a token (64 hex digits).
pub const TOKEN_BYTES: usize = 32;
/// Permissions of the token file.
const TOKEN_MODE: u32 = 0o600;

/// A fresh token: [`TOKEN_BYTES`] bytes from `/dev/urandom`, lower-case hex.
pub fn generate() -> io::Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let token = bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    debug_assert_eq!(token.len(), 2 * TOKEN_BYTES);
    Ok(token)
}

/// Reads the token from `path`, trimming whitespace; an empty file is an error.
pub fn read(path: &Path) -> io::Result<String> {
    let text = fs::read_to_string(path)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("token file {} is empty", path.display()),
        ));
    }
    Ok(token.to_string())
}

/// The agent's token: read from `path` if it exists (narrowing its permissions to 0600),
/// else generated and written there. An existing empty file is replaced with a new token.
pub fn load_or_create(path: &Path) -> io::Result<String> {
    match fs::metadata(path) {
        Ok(meta) => {
            if meta.permissions().mode() & 0o077 != 0 {
                log::warn!(
                    "{} was readable by other users: setting mode 0600",
                    path.display()
                );
                fs::set_permissions(path, fs::Permissions::from_mode(TOKEN_MODE))?;
            }
            match read(path) {
                Ok(token) => return Ok(token),
                Err(err) if err.kind() == io::ErrorKind::InvalidData => {
                    log::warn!("{err}: writing a new token");
                    fs::remove_file(path)?;
                }
                Err(err) => return Err(err),
            }
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let token = generate()?;
    match publish(path, &token) {
        Ok(()) => {
            log::info!("created API token {}", path.display());
            Ok(token)
        }
        // Another agent published its token first: use that one.
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => read(path),
        Err(err) => Err(err),
    }
}

/// Writes `token` to `path`, which must not exist (`AlreadyExists` then, `path` untouched).
fn publish(path: &Path, token: &str) -> io::Result<()> {
    crate::durable::write_new(path, format!("{token}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_reuse() {
        // Goal: the first start creates a 64-hex-digit token; later starts get the same one.
        // Method: load_or_create twice in a fresh directory, then read as the CLI does.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api.token");
        let first = load_or_create(&path).expect("create");
        assert_eq!(first.len(), 2 * TOKEN_BYTES);
        assert!(first
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(load_or_create(&path).expect("reuse"), first);
        assert_eq!(read(&path).expect("read"), first);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("api.token")],
            "no temporary left"
        );
    }

    #[test]
    fn file_is_private() {
        // Goal: the token file is mode 0600, and a too-open one is narrowed.
        // Method: check the mode after creation; chmod 0644 and load again.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api.token");
        let token = load_or_create(&path).expect("create");
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(load_or_create(&path).expect("reload"), token);
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn read_trims_and_rejects_empty() {
        // Goal: hand-written token files work; empty ones fail clearly, and the agent
        // replaces them. Method: write files by hand, read, load_or_create.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api.token");
        fs::write(&path, "  abc123 \n").expect("write");
        assert_eq!(read(&path).expect("read"), "abc123");
        fs::write(&path, " \n").expect("write");
        let err = read(&path).expect_err("empty");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("is empty"), "{err}");
        let token = load_or_create(&path).expect("replace empty");
        assert_eq!(token.len(), 2 * TOKEN_BYTES);
        let missing = read(&dir.path().join("nope")).expect_err("missing");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn tokens_differ() {
        // Goal: tokens are random. Method: two generated tokens differ.
        assert_ne!(generate().expect("first"), generate().expect("second"));
    }
}
