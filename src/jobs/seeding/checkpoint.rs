//! The exporting agent's record of a seed export in progress, so that a stopped export
//! continues where it stopped (`ferry seed export --resume SEED`): which disks, which volumes
//! are sealed, the extents already on the volume being written, and the chunk sequences
//! reserved on it.
//!
//! Invariants:
//! - Extents are recorded only after the volume was fdatasynced with their chunks on it: a
//!   recorded extent is on the medium.
//! - A sequence is used only below a reservation already durable here; a resumed export
//!   starts above the highest reservation, so no (key, nonce) pair is ever used twice, even
//!   for a chunk written but not recorded before the stop.
//! - The file is hostile input when read back (the state directory may be damaged): lines are
//!   bounded, parsed, checked, and a torn last line is dropped; nothing panics.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SeedRunError;
use crate::seed::manifest::{Extent, ExtentKind};

/// Longest line read back.
const MAX_LINE_BYTES: u64 = 1 << 20;
/// Longest checkpoint file read back.
const MAX_FILE_BYTES: u64 = 4 << 30;
/// Sequences reserved at a time.
pub const RESERVE_SEQUENCES: u64 = 4096;

/// One disk of the seed, as the export started it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartDisk {
    /// Index in the seed.
    pub index: u32,
    /// Export name.
    pub export: String,
    /// Its size when the export began.
    pub size_bytes: u64,
    /// The seed's job.
    pub job_id: u64,
    /// Seed tracker name and generation.
    pub tracker: (String, u64),
    /// When its tracker was created (Unix ms).
    pub start_unix_ms: u64,
}

/// An extent as the checkpoint stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentLine {
    /// Start on the disk.
    pub offset_bytes: u64,
    /// Length.
    pub len_bytes: u32,
    /// A chunk: its volume offset, sequence and digest; none for zeros.
    pub data: Option<(u64, u64, [u8; 32])>,
}

/// One line of the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Line {
    /// The export began (the first line).
    Start {
        /// The seed (hex).
        seed_id: String,
        /// Whether a separate seed key was used.
        separate_key: bool,
        /// The disks.
        disks: Vec<StartDisk>,
    },
    /// Sequences below `until` may be used on `volume`.
    Reserve {
        /// The volume.
        volume: u32,
        /// First sequence not reserved.
        until: u64,
    },
    /// Extents of `disk` on `volume`, after the ones recorded before (the first of a part
    /// starts where the disk's part on this volume starts).
    Extents {
        /// The volume.
        volume: u32,
        /// The disk.
        disk: u32,
        /// They follow each other.
        extents: Vec<ExtentLine>,
    },
    /// `disk`'s part on `volume` is complete.
    PartEnd {
        /// The volume.
        volume: u32,
        /// The disk.
        disk: u32,
        /// When its last extent was read (Unix ms).
        end_unix_ms: u64,
    },
    /// `volume` is sealed.
    Sealed {
        /// The volume.
        volume: u32,
    },
}

/// The append side.
#[derive(Debug)]
pub struct Checkpoint {
    file: File,
    path: PathBuf,
}

impl Checkpoint {
    /// Creates the checkpoint of a new export at `path` (never over a file, no links).
    pub fn create(path: &Path) -> Result<Checkpoint, SeedRunError> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
            .map_err(SeedRunError::io("create", path))?;
        Ok(Checkpoint {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Opens an existing checkpoint to go on appending (a resume).
    pub fn reopen(path: &Path) -> Result<Checkpoint, SeedRunError> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
            .map_err(SeedRunError::io("open", path))?;
        Ok(Checkpoint {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends `line` durably.
    pub fn append(&mut self, line: &Line) -> Result<(), SeedRunError> {
        let mut text = serde_json::to_string(line).expect("a line serializes");
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(SeedRunError::io("append to", &self.path))
    }
}

/// Where a stopped export stands, from its checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    /// The seed (hex) and whether it used a separate key.
    pub seed_id: String,
    /// Whether a separate seed key was used.
    pub separate_key: bool,
    /// The disks.
    pub disks: Vec<StartDisk>,
    /// Volumes sealed (0..sealed).
    pub sealed: u32,
    /// Highest reservation of the volume being written.
    pub reserved_until: u64,
    /// Parts on the volume being written: disk, extents (in order), end time once complete.
    pub parts: Vec<(u32, Vec<Extent>, Option<u64>)>,
    /// The disk and offset the copy continues at (`disks.len()` when every disk is done).
    pub position: (u32, u64),
}

/// Folds a checkpoint's lines into where the export stands; refuses what does not fit.
pub fn fold(lines: &[Line]) -> Result<Resume, SeedRunError> {
    let bad = |what: &str| SeedRunError::Refused(format!("damaged checkpoint: {what}"));
    let Some(Line::Start {
        seed_id,
        separate_key,
        disks,
    }) = lines.first()
    else {
        return Err(bad("no start line"));
    };
    let mut resume = Resume {
        seed_id: seed_id.clone(),
        separate_key: *separate_key,
        disks: disks.clone(),
        ..Resume::default()
    };
    for line in &lines[1..] {
        match line {
            Line::Start { .. } => return Err(bad("a second start line")),
            Line::Reserve { volume, until } if *volume == resume.sealed => {
                resume.reserved_until = resume.reserved_until.max(*until);
            }
            Line::Extents {
                volume,
                disk,
                extents,
            } if *volume == resume.sealed => {
                let part = match resume.parts.last_mut() {
                    Some(part) if part.0 == *disk && part.2.is_none() => part,
                    _ => {
                        resume.parts.push((*disk, Vec::new(), None));
                        resume.parts.last_mut().expect("pushed")
                    }
                };
                part.1.extend(extents.iter().map(extent_of));
                let end = part.1.last().map_or(0, Extent::end_bytes);
                resume.position = (*disk, end);
            }
            Line::PartEnd {
                volume,
                disk,
                end_unix_ms,
            } if *volume == resume.sealed => {
                match resume.parts.last_mut() {
                    Some(part) if part.0 == *disk && part.2.is_none() => {
                        part.2 = Some(*end_unix_ms)
                    }
                    _ => resume.parts.push((*disk, Vec::new(), Some(*end_unix_ms))),
                }
                let size = disks
                    .iter()
                    .find(|d| d.index == *disk)
                    .map_or(0, |d| d.size_bytes);
                if resume.position.0 == *disk && resume.position.1 >= size {
                    resume.position = (disk + 1, 0);
                }
            }
            Line::Sealed { volume } if *volume == resume.sealed => {
                resume.sealed += 1;
                resume.reserved_until = 0;
                resume.parts.clear();
            }
            _ => return Err(bad("a line about another volume")),
        }
    }
    Ok(resume)
}

/// An extent for the checkpoint.
pub fn extent_line(extent: &Extent) -> ExtentLine {
    ExtentLine {
        offset_bytes: extent.offset_bytes,
        len_bytes: extent.len_bytes,
        data: match extent.kind {
            ExtentKind::Zero => None,
            ExtentKind::Data {
                volume_offset_bytes,
                sequence,
                digest,
            } => Some((volume_offset_bytes, sequence, digest)),
        },
    }
}

/// An extent read back (its place is checked when the part is rebuilt).
pub fn extent_of(line: &ExtentLine) -> Extent {
    let kind = match &line.data {
        None => ExtentKind::Zero,
        Some((volume_offset_bytes, sequence, digest)) => ExtentKind::Data {
            volume_offset_bytes: *volume_offset_bytes,
            sequence: *sequence,
            digest: *digest,
        },
    };
    Extent {
        offset_bytes: line.offset_bytes,
        len_bytes: line.len_bytes,
        kind,
    }
}

/// Every whole line of the checkpoint at `path`; a torn last line is dropped.
pub fn read_lines(path: &Path) -> Result<Vec<Line>, SeedRunError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(SeedRunError::io("open", path))?;
    let mut reader = BufReader::new(file.take(MAX_FILE_BYTES));
    let mut lines = Vec::new();
    loop {
        let mut buf = Vec::new();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES)
            .read_until(b'\n', &mut buf)
            .map_err(SeedRunError::io("read", path))?;
        if read == 0 {
            return Ok(lines);
        }
        if buf.last() != Some(&b'\n') {
            // Torn (or overlong): nothing after it was recorded.
            return Ok(lines);
        }
        let line = serde_json::from_slice::<Line>(&buf).map_err(|err| {
            SeedRunError::Refused(format!("{}: damaged checkpoint: {err}", path.display()))
        })?;
        lines.push(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_a_torn_tail_is_dropped() {
        // Goal: what is appended reads back; a half-written last line is ignored, damage in
        // the middle is refused. Method: append three lines, cut the file mid-line, garble it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let mut checkpoint = Checkpoint::create(&path).unwrap();
        let extent = Extent {
            offset_bytes: 4096,
            len_bytes: 1 << 20,
            kind: ExtentKind::Data {
                volume_offset_bytes: 8192,
                sequence: 3,
                digest: [0xa5; 32],
            },
        };
        let lines = [
            Line::Reserve {
                volume: 0,
                until: 4096,
            },
            Line::Extents {
                volume: 0,
                disk: 0,
                extents: vec![extent_line(&extent)],
            },
            Line::Sealed { volume: 0 },
        ];
        for line in &lines {
            checkpoint.append(line).unwrap();
        }
        assert!(Checkpoint::create(&path).is_err(), "never over a file");
        let read = read_lines(&path).unwrap();
        assert_eq!(read, lines);
        let Line::Extents { extents, .. } = &read[1] else {
            panic!("extents");
        };
        assert_eq!(extent_of(&extents[0]), extent);
        let len = std::fs::metadata(&path).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 3).unwrap();
        assert_eq!(read_lines(&path).unwrap(), lines[..2]);
        std::fs::write(&path, b"{\"sealed\":{\"volume\":\"x\"}}\n").unwrap();
        assert!(read_lines(&path).is_err());
    }
}
