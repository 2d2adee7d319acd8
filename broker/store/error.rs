//! What can go wrong in the write-ahead log, typed: the file, the operation and the
//! `io::Error` stay apart until a message is printed, so callers can match on them and
//! logs and statuses still read as one sentence.

use std::fmt;
use std::io;
use std::sync::Arc;

use super::manifest::HEADER;

/// A file operation of the store, as it reads in `"cannot <op> <file>"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOp {
    /// Creating a file.
    Create,
    /// Opening a file.
    Open,
    /// Writing (and syncing) a whole file.
    Write,
    /// Fsyncing a file.
    Fsync,
    /// Fsyncing the directory holding a file.
    FsyncDir,
    /// Renaming a temporary file into place.
    Rename,
    /// Listing the data directory.
    List,
    /// Reading a file.
    Read,
    /// Deleting a file.
    Remove,
    /// Cutting a file short.
    Truncate,
}

impl fmt::Display for FileOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileOp::Create => "create",
            FileOp::Open => "open",
            FileOp::Write => "write",
            FileOp::Fsync => "fsync",
            FileOp::FsyncDir => "fsync the directory of",
            FileOp::Rename => "rename",
            FileOp::List => "list",
            FileOp::Read => "read",
            FileOp::Remove => "delete",
            FileOp::Truncate => "truncate",
        })
    }
}

/// Why the manifest's content is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestDefect {
    /// The bytes are not text.
    #[error("not UTF-8 text")]
    NotUtf8,
    /// A single line: no room for the checksum.
    #[error("no checksum line")]
    NoChecksumLine,
    /// The last line is not a checksum.
    #[error("the last line is not \"crc32c <hex>\"")]
    BadChecksumLine,
    /// The checksum does not match the body.
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    ChecksumMismatch {
        /// The checksum in the file.
        stored: u32,
        /// The checksum of the body as read.
        computed: u32,
    },
    /// The first line is not the format's header.
    #[error("the first line is not {:?}", HEADER)]
    BadHeader,
    /// A line this version does not know.
    #[error("unrecognised line {0:?}")]
    UnrecognisedLine(String),
}

/// Why the write-ahead log (or its manifest) could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("cannot {op} {file}: {source}")]
    Io {
        /// What was being done.
        op: FileOp,
        /// The file's path.
        file: String,
        /// The operating system's error (shared: a failure is handed to every waiter).
        source: Arc<io::Error>,
    },
    /// Appending records to a segment failed.
    #[error("write of {bytes} bytes to {file} failed: {source}")]
    Append {
        /// How many bytes were being written.
        bytes: usize,
        /// The segment's path.
        file: String,
        /// The operating system's error.
        source: Arc<io::Error>,
    },
    /// A file operation on the manifest (the list of files making up the log) failed.
    #[error("cannot {op} the manifest {file}: {source}")]
    Manifest {
        /// What was being done.
        op: FileOp,
        /// The manifest's path.
        file: String,
        /// The operating system's error.
        source: Arc<io::Error>,
    },
    /// The manifest exists but its content is refused.
    #[error("{file} is damaged: {defect}")]
    ManifestDamaged {
        /// The manifest's path.
        file: String,
        /// What is wrong with it.
        defect: ManifestDefect,
    },
    /// Writing a snapshot (compaction) failed.
    #[error("compaction: {0}")]
    Compaction(Box<StoreError>),
    /// The writer thread is gone.
    #[error("the write-ahead log writer stopped")]
    WriterStopped,
    /// The log was closed by shutdown.
    #[error("the write-ahead log is closed (the broker is stopping)")]
    Closed,
    /// Compaction was started outside a Tokio runtime.
    #[error("compaction needs a Tokio runtime")]
    NoRuntime,
    /// Recovery or the startup snapshot could not write: the broker starts read-only.
    #[error(
        "the data directory cannot be written at startup, so the broker serves reads only: {0}"
    )]
    UnwritableAtStartup(Box<StoreError>),
    /// The log failed and refuses every later change.
    #[error("write-ahead log failed, the broker no longer accepts changes (fail-stop): {0}")]
    FailStopped(Box<StoreError>),
}

impl StoreError {
    /// A failed file operation on `file` (a path, as `Storage::describe` gives it).
    pub(crate) fn io(op: FileOp, file: String, source: io::Error) -> Self {
        StoreError::Io {
            op,
            file,
            source: Arc::new(source),
        }
    }

    /// The operating system's error at the root of this one, if any.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            StoreError::Io { source, .. }
            | StoreError::Append { source, .. }
            | StoreError::Manifest { source, .. } => Some(source),
            StoreError::Compaction(inner)
            | StoreError::UnwritableAtStartup(inner)
            | StoreError::FailStopped(inner) => inner.io_error(),
            StoreError::ManifestDamaged { .. }
            | StoreError::WriterStopped
            | StoreError::Closed
            | StoreError::NoRuntime => None,
        }
    }
}

/// Two store errors are equal when they say the same thing: `io::Error` has no equality,
/// and [`crate::broker::domain::error::BrokerError`] (which wraps this) is compared in tests.
impl PartialEq for StoreError {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for StoreError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_error_keeps_the_file_the_operation_and_the_os_error() {
        let full = io::Error::from_raw_os_error(28);
        let e = StoreError::FailStopped(Box::new(StoreError::io(
            FileOp::Fsync,
            "/data/00000000000000000001.wal".into(),
            full,
        )));
        assert_eq!(e.io_error().and_then(io::Error::raw_os_error), Some(28));
        let text = e.to_string();
        assert!(
            text.starts_with("write-ahead log failed, the broker no longer accepts changes (fail-stop): cannot fsync /data/00000000000000000001.wal: "),
            "{text}"
        );
        assert!(text.contains("os error 28"), "{text}");
    }
}
