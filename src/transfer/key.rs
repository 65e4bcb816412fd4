//! The cluster key: 32 secret bytes shared by every agent of a cluster, used as the key of a
//! keyed BLAKE3 hash in the stream's mutual challenge and to derive each connection's record
//! keys ([`super::seal`], with each connection's ephemeral X25519 secret); it never travels. It also carries whether this agent's streams run
//! unprotected after the handshake (`stream_insecure`, for measurement only): the mode goes
//! wherever the key goes, and both sides must agree on it.
//!
//! Invariants:
//! - The key file holds 64 hex characters (and an optional newline), and is readable by its
//!   owner only: a file with any group or other permission bit is refused, naming the path.
//! - [`ClusterKey::create`] never replaces an existing key: it writes a temporary file with
//!   mode 0600, then links it into place (fails if the name exists), so a reader sees either
//!   no key or a whole one.
//! - `Debug` never prints the key.

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::frame::Role;
use super::TransferError;

/// Domain separation of the proofs (a MAC for another purpose never verifies here).
const PROOF_CONTEXT: &[u8] = b"ferry block stream v2 proof";
/// Context of [`ClusterKey::seed_key`].
const SEED_KEY_CONTEXT: &str = "ferry seed v1 2026-12 seed key";
/// BLAKE3 `derive_key` contexts of the record keys, one per sending direction.
const SOURCE_RECORD_CONTEXT: &str =
    "ferry block stream v2 2026-12 record key source to destination";
const TARGET_RECORD_CONTEXT: &str =
    "ferry block stream v2 2026-12 record key destination to source";

/// What both Hellos of one connection said: the proofs and the record keys cover all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transcript {
    /// The source's fresh nonce.
    pub source_nonce: [u8; 32],
    /// The destination's fresh nonce.
    pub target_nonce: [u8; 32],
    /// The source's ephemeral X25519 public key.
    pub source_public: [u8; 32],
    /// The destination's ephemeral X25519 public key.
    pub target_public: [u8; 32],
}

/// The shared secret of a cluster, and how this agent's streams protect their frames.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey {
    bytes: [u8; 32],
    /// Frames after the handshake travel unsealed (plaintext, no record MAC).
    insecure_stream: bool,
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

impl ClusterKey {
    /// A key from raw bytes (tests, and keys taken from elsewhere).
    pub fn from_bytes(bytes: [u8; 32]) -> ClusterKey {
        ClusterKey {
            bytes,
            insecure_stream: false,
        }
    }

    /// The same key with streams sealed (`false`, the default) or in plaintext after the
    /// handshake (`true`: measurement only; both peers must say the same).
    pub fn with_insecure_stream(mut self, insecure: bool) -> ClusterKey {
        self.insecure_stream = insecure;
        self
    }

    /// Whether streams made with this key run unsealed after the handshake.
    pub fn insecure_stream(&self) -> bool {
        self.insecure_stream
    }

    /// Reads the key file at `path`, refusing one that group or others may read.
    pub fn load(path: &Path) -> Result<ClusterKey, TransferError> {
        let key_error = |source| TransferError::KeyRead {
            path: path.to_owned(),
            source,
        };
        let mut file = fs::File::open(path).map_err(key_error)?;
        let mode = file.metadata().map_err(key_error)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(TransferError::KeyPermissions {
                path: path.to_owned(),
                mode: mode & 0o777,
            });
        }
        let mut text = String::new();
        // Bounded: a key file is 65 bytes; anything much longer is not a key.
        Read::by_ref(&mut file)
            .take(256)
            .read_to_string(&mut text)
            .map_err(key_error)?;
        Self::parse_hex(text.strip_suffix('\n').unwrap_or(&text)).ok_or_else(|| {
            TransferError::KeyFormat {
                path: path.to_owned(),
            }
        })
    }

    /// Returns the key at `path`, creating a fresh random one (mode 0600) if there is none.
    pub fn create(path: &Path) -> Result<ClusterKey, TransferError> {
        if path.exists() {
            return Self::load(path);
        }
        let key =
            ClusterKey::from_bytes(random_bytes().map_err(|source| TransferError::KeyCreate {
                path: path.to_owned(),
                source,
            })?);
        match key.write_new(path) {
            Ok(()) => Ok(key),
            // Another process created it meanwhile: theirs wins, everyone uses the same key.
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Self::load(path),
            Err(source) => Err(TransferError::KeyCreate {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn write_new(&self, path: &Path) -> io::Result<()> {
        crate::durable::write_new(path, format!("{}\n", self.to_hex()).as_bytes())
    }

    fn parse_hex(text: &str) -> Option<ClusterKey> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut key = [0u8; 32];
        for (out, pair) in key.iter_mut().zip(bytes.chunks_exact(2)) {
            let digits = std::str::from_utf8(pair).ok()?;
            *out = u8::from_str_radix(digits, 16).ok()?;
        }
        Some(ClusterKey::from_bytes(key))
    }

    fn to_hex(&self) -> String {
        self.bytes
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    /// The proof `prover` sends: keyed BLAKE3 over the context, the prover's role, the
    /// stream mode and both Hellos. Each side's proof covers the other's fresh nonce (no
    /// replay), its own role (a proof cannot be reflected back to its author), the mode (a
    /// relay cannot talk both sides into plaintext) and both ephemeral public keys (a relay
    /// cannot put its own in).
    pub fn prove(&self, prover: Role, transcript: &Transcript) -> [u8; 32] {
        let mut message = Vec::with_capacity(PROOF_CONTEXT.len() + 130);
        message.extend_from_slice(PROOF_CONTEXT);
        message.push(prover.to_wire());
        message.push(u8::from(self.insecure_stream));
        message.extend_from_slice(&transcript.source_nonce);
        message.extend_from_slice(&transcript.target_nonce);
        message.extend_from_slice(&transcript.source_public);
        message.extend_from_slice(&transcript.target_public);
        *blake3::keyed_hash(&self.bytes, &message).as_bytes()
    }

    /// The key of seed `seed_id` on portable media (`docs/seed-format.md`): derived from the
    /// cluster key and the seed id, so every seed has its own and only holders of the
    /// cluster key can compute it.
    pub fn seed_key(&self, seed_id: &[u8; 16]) -> [u8; 32] {
        let mut material = [0u8; 48];
        material[..32].copy_from_slice(&self.bytes);
        material[32..].copy_from_slice(seed_id);
        blake3::derive_key(SEED_KEY_CONTEXT, &material)
    }

    /// The record key `sender` seals with on the connection of `transcript`
    /// ([`super::seal`]): derived from the key, both Hellos and the ephemeral X25519 secret
    /// `shared` the two sides agreed on, one context per direction.
    pub(crate) fn record_key(
        &self,
        sender: Role,
        transcript: &Transcript,
        shared: &[u8; 32],
    ) -> [u8; 32] {
        let context = match sender {
            Role::Source => SOURCE_RECORD_CONTEXT,
            Role::Destination => TARGET_RECORD_CONTEXT,
        };
        let mut material = [0u8; 192];
        let parts = [
            &self.bytes,
            shared,
            &transcript.source_nonce,
            &transcript.target_nonce,
            &transcript.source_public,
            &transcript.target_public,
        ];
        for (out, part) in material.chunks_exact_mut(32).zip(parts) {
            out.copy_from_slice(part);
        }
        blake3::derive_key(context, &material)
    }

    /// Whether `mac` is the proof `prover` should have sent; constant time
    /// (`blake3::Hash`'s equality).
    pub fn verify(&self, prover: Role, transcript: &Transcript, mac: &[u8; 32]) -> bool {
        blake3::Hash::from(self.prove(prover, transcript)) == blake3::Hash::from(*mac)
    }
}

/// 32 bytes from the kernel's CSPRNG.
pub fn random_bytes() -> io::Result<[u8; 32]> {
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: create writes a 0600 key that load reads back; a second create keeps it; Debug
    // hides it. Method: create twice in a temp dir, compare, check the mode and Debug text.
    #[test]
    fn create_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let key = ClusterKey::create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ClusterKey::load(&path).unwrap(), key);
        assert_eq!(ClusterKey::create(&path).unwrap(), key);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65);
        assert!(!format!("{key:?}").contains(&text[..8]));
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp file left"
        );
    }

    // Goal: a key readable by others, or malformed, is refused with the path named.
    // Method: chmod 0644, then a short key.
    #[test]
    fn refuses_open_or_malformed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        ClusterKey::create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = ClusterKey::load(&path).unwrap_err();
        assert!(matches!(
            err,
            TransferError::KeyPermissions { mode: 0o644, .. }
        ));
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "abcd\n").unwrap();
        assert!(matches!(
            ClusterKey::load(&path),
            Err(TransferError::KeyFormat { .. })
        ));
    }

    // Goal: a proof verifies only for the same key, role, mode, nonces and public keys.
    // Method: vary each.
    #[test]
    fn proofs_bind_key_role_mode_and_hellos() {
        let key = ClusterKey::from_bytes([1; 32]);
        let other = ClusterKey::from_bytes([2; 32]);
        let hellos = Transcript {
            source_nonce: [3; 32],
            target_nonce: [4; 32],
            source_public: [5; 32],
            target_public: [6; 32],
        };
        let mac = key.prove(Role::Source, &hellos);
        assert!(key.verify(Role::Source, &hellos, &mac));
        assert!(!other.verify(Role::Source, &hellos, &mac));
        assert!(!key.verify(Role::Destination, &hellos, &mac));
        let insecure = key.clone().with_insecure_stream(true);
        assert!(!insecure.verify(Role::Source, &hellos, &mac));
        let variants = [
            Transcript {
                source_nonce: [4; 32],
                ..hellos
            },
            Transcript {
                target_nonce: [3; 32],
                ..hellos
            },
            Transcript {
                source_public: [7; 32],
                ..hellos
            },
            Transcript {
                target_public: [7; 32],
                ..hellos
            },
        ];
        for changed in variants {
            assert!(!key.verify(Role::Source, &changed, &mac), "{changed:?}");
        }
    }
}
