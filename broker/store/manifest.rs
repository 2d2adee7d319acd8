//! The MANIFEST: which files make up the log, so recovery can tell a complete data
//! directory from one that lost a file.
//!
//! It names the current snapshot and the newest segment created; the segments in between
//! are numbered consecutively, so the manifest and the numbering together name every file
//! the log needs. It is a small text file, replaced atomically (temporary file, fsync,
//! rename, directory fsync) through [`Storage`], and ends with a CRC32C of the lines
//! before it, so a damaged manifest is never mistaken for a valid one.
//!
//! Claims only ever follow the files: a segment is created (and its directory entry
//! synced) before the manifest names it, and a snapshot is renamed into place before the
//! manifest names it, so a crash between the two leaves a directory whose files are a
//! superset of what the manifest claims, which recovery accepts.

use std::io;
use std::sync::Arc;

use super::Storage;
use super::error::{FileOp, ManifestDefect, StoreError};
use super::wal::{segment_name, snapshot_name};

/// The manifest's file name.
pub(crate) const MANIFEST: &str = "MANIFEST";
pub(super) const HEADER: &str = "sluice-manifest 1";

/// What the manifest claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Manifest {
    /// Base of the current snapshot (it holds the state before this segment).
    pub snapshot: Option<u64>,
    /// The newest segment created; every segment from the snapshot's base (or 1) up to
    /// it is part of the log.
    pub newest: Option<u64>,
}

impl Manifest {
    fn encode(&self) -> String {
        let mut text = format!("{HEADER}\n");
        if let Some(base) = self.snapshot {
            text.push_str(&format!("snapshot {}\n", snapshot_name(base)));
        }
        if let Some(newest) = self.newest {
            text.push_str(&format!("newest {}\n", segment_name(newest)));
        }
        let crc = crc32c::crc32c(text.as_bytes());
        text.push_str(&format!("crc32c {crc:08x}\n"));
        text
    }

    fn decode(data: &[u8]) -> Result<Self, ManifestDefect> {
        let text = std::str::from_utf8(data).map_err(|_| ManifestDefect::NotUtf8)?;
        let body_end = text
            .trim_end_matches('\n')
            .rfind('\n')
            .map(|i| i + 1)
            .ok_or(ManifestDefect::NoChecksumLine)?;
        let (body, last) = text.split_at(body_end);
        let stored = last
            .trim_end()
            .strip_prefix("crc32c ")
            .and_then(|c| u32::from_str_radix(c, 16).ok())
            .ok_or(ManifestDefect::BadChecksumLine)?;
        let computed = crc32c::crc32c(body.as_bytes());
        if stored != computed {
            return Err(ManifestDefect::ChecksumMismatch { stored, computed });
        }
        let mut lines = body.lines();
        if lines.next() != Some(HEADER) {
            return Err(ManifestDefect::BadHeader);
        }
        let mut manifest = Self::default();
        for line in lines {
            let bad = || ManifestDefect::UnrecognisedLine(line.to_owned());
            match line.split_once(' ') {
                Some(("snapshot", name)) => {
                    manifest.snapshot = Some(super::wal::parse_snapshot(name).ok_or_else(bad)?)
                }
                Some(("newest", name)) => {
                    manifest.newest = Some(super::wal::parse_segment(name).ok_or_else(bad)?)
                }
                _ => return Err(bad()),
            }
        }
        Ok(manifest)
    }
}

/// Reads the manifest; `Ok(None)` if there is none (a directory written by a version
/// without manifests, or a new one).
pub(crate) fn read(storage: &dyn Storage) -> Result<Option<Manifest>, StoreError> {
    match storage.read(MANIFEST) {
        Ok(data) => {
            Manifest::decode(&data)
                .map(Some)
                .map_err(|defect| StoreError::ManifestDamaged {
                    file: storage.describe(MANIFEST),
                    defect,
                })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(failed(storage, FileOp::Read, e)),
    }
}

fn failed(storage: &dyn Storage, op: FileOp, e: io::Error) -> StoreError {
    StoreError::Manifest {
        op,
        file: storage.describe(MANIFEST),
        source: Arc::new(e),
    }
}

/// Replaces the manifest atomically and durably.
pub(crate) fn write(storage: &dyn Storage, manifest: &Manifest) -> Result<(), StoreError> {
    let tmp = format!("{MANIFEST}.tmp");
    let written = storage.create(&tmp).and_then(|mut file| {
        file.write_all(manifest.encode().as_bytes())?;
        file.sync()
    });
    if let Err(e) = written {
        let _ = storage.remove(&tmp);
        return Err(failed(storage, FileOp::Write, e));
    }
    storage
        .rename(&tmp, MANIFEST)
        .map_err(|e| failed(storage, FileOp::Rename, e))?;
    storage
        .sync_dir()
        .map_err(|e| failed(storage, FileOp::FsyncDir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_round_trips_and_damage_is_detected() {
        for manifest in [
            Manifest::default(),
            Manifest {
                snapshot: Some(7),
                newest: None,
            },
            Manifest {
                snapshot: Some(7),
                newest: Some(12),
            },
        ] {
            let text = manifest.encode();
            assert_eq!(Manifest::decode(text.as_bytes()), Ok(manifest), "{text}");
        }
        let text = Manifest {
            snapshot: Some(7),
            newest: Some(12),
        }
        .encode();
        let flipped = text.replace("00012.wal", "00013.wal");
        let err = Manifest::decode(flipped.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
        let cut = &text[..text.len() - 4];
        assert!(Manifest::decode(cut.as_bytes()).is_err());
    }
}
