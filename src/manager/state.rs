//! The manager's durable role state (`<state-dir>/manager-role`): the witness choice both
//! managers recorded, a proposal in doubt, and the highest epoch known.
//!
//! Invariants: written with [`crate::durable::write_atomic`] before anything that depends
//! on it is sent; read back checked (a BLAKE3 line over the JSON line). A missing file is a
//! manager that never ran; a corrupt or unreadable one stops the start, never reads as
//! empty: forgetting a recorded move or a known epoch could let this manager act on an old
//! generation.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::lease::role::RoleDurable;

/// The file's name in the state directory.
pub const FILE_NAME: &str = "manager-role";
/// Largest file read back.
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// Why the role state cannot be read or written.
#[derive(Debug, Error)]
pub enum StateError {
    /// Reading failed.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The content is not what this manager wrote.
    #[error("{} is corrupt ({what}); remove it only if the pair is being set up anew", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: &'static str,
    },
    /// Writing failed.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::durable::DurableError,
    },
}

/// The role state file.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The file in `state_dir` (created 0700 if missing).
    pub fn new(state_dir: &Path) -> Result<Self, StateError> {
        let path = state_dir.join(FILE_NAME);
        std::fs::create_dir_all(state_dir).map_err(|source| StateError::Read {
            path: state_dir.to_path_buf(),
            source,
        })?;
        Ok(Self { path })
    }

    /// The state last saved, or the empty one if none was.
    pub fn load(&self) -> Result<RoleDurable, StateError> {
        let bytes = match read_bounded(&self.path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(RoleDurable::default())
            }
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        decode(&bytes).map_err(|what| StateError::Corrupt {
            path: self.path.clone(),
            what,
        })
    }

    /// Saves `durable` durably.
    pub fn save(&self, durable: &RoleDurable) -> Result<(), StateError> {
        crate::durable::write_atomic(&self.path, encode(durable).as_bytes()).map_err(|source| {
            StateError::Write {
                path: self.path.clone(),
                source,
            }
        })
    }
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn encode(durable: &RoleDurable) -> String {
    // Our own type always serializes.
    let json = serde_json::to_string(durable).expect("role state serializes");
    let digest = blake3::hash(json.as_bytes()).to_hex();
    format!("{json}\n{digest}\n")
}

fn decode(bytes: &[u8]) -> Result<RoleDurable, &'static str> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err("too large");
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8")?;
    let mut lines = text.split('\n');
    let (Some(json), Some(digest), Some(""), None) =
        (lines.next(), lines.next(), lines.next(), lines.next())
    else {
        return Err("not two lines");
    };
    if blake3::hash(json.as_bytes()).to_hex().as_str() != digest {
        return Err("checksum mismatch");
    }
    serde_json::from_str(json).map_err(|_| "not the role state")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::role::WitnessChoice;

    #[test]
    fn saved_state_reads_back_and_damage_is_refused() {
        // Goal: round trip; a missing file is empty; every flipped byte and every truncation
        // is refused. Method: a temp dir.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = StateFile::new(dir.path()).expect("dir");
        assert_eq!(file.load().expect("missing"), RoleDurable::default());
        let durable = RoleDurable {
            choice: Some(WitnessChoice {
                generation: 3,
                host: "h2".into(),
                proposer_epoch: 7,
            }),
            pending: None,
            known_epoch: 9,
        };
        file.save(&durable).expect("save");
        assert_eq!(file.load().expect("load"), durable);
        let bytes = encode(&durable).into_bytes();
        for index in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[index] ^= 0x01;
            assert!(decode(&damaged).is_err(), "flip at {index}");
            assert!(decode(&bytes[..index]).is_err(), "cut at {index}");
        }
    }
}
