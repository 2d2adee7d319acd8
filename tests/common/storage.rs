//! The fault-injecting storage of the tests: a real data directory whose files run a
//! test's hook before every write and fsync, and the directory before every change to it,
//! to fail them (a full disk, an I/O error), hold the writer inside one or panic there.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use sluice::broker::{DirStorage, FileSyncer, Storage, StorageFile};

/// What happens before each write and fsync of a file of a [`HookedStorage`], and before
/// each change to its directory; an error is returned in place of the call's.
pub trait FileHook: fmt::Debug + Send + Sync + 'static {
    /// Before `write_all`.
    fn before_write(&self) -> io::Result<()> {
        Ok(())
    }
    /// Before `sync`.
    fn before_sync(&self) -> io::Result<()> {
        Ok(())
    }
    /// Before creating, cutting, renaming or removing a file, and syncing the directory.
    fn before_change(&self) -> io::Result<()> {
        Ok(())
    }
}

/// [`DirStorage`] with `hook` run before every write and fsync of its files and every
/// change to the directory.
#[derive(Debug)]
pub struct HookedStorage<H> {
    pub inner: DirStorage,
    pub hook: Arc<H>,
}

impl<H: FileHook> HookedStorage<H> {
    /// The storage of the data directory `dir`, with `hook`.
    pub fn open(dir: &Path, hook: Arc<H>) -> Arc<Self> {
        Arc::new(Self {
            inner: DirStorage::open(dir).unwrap(),
            hook,
        })
    }
}

struct HookedFile<H> {
    inner: Box<dyn StorageFile>,
    hook: Arc<H>,
}

impl<H: FileHook> StorageFile for HookedFile<H> {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.hook.before_write()?;
        self.inner.write_all(data)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.hook.before_sync()?;
        self.inner.sync()
    }

    fn syncer(&self) -> io::Result<Option<Box<dyn FileSyncer>>> {
        Ok(self.inner.syncer()?.map(|inner| {
            Box::new(HookedSyncer {
                inner,
                hook: self.hook.clone(),
            }) as Box<dyn FileSyncer>
        }))
    }
}

/// A [`HookedFile`]'s sync handle (the WAL's sync threads use these): the same hook runs
/// before each of its syncs.
struct HookedSyncer<H> {
    inner: Box<dyn FileSyncer>,
    hook: Arc<H>,
}

impl<H: FileHook> FileSyncer for HookedSyncer<H> {
    fn sync(&mut self) -> io::Result<()> {
        self.hook.before_sync()?;
        self.inner.sync()
    }
}

impl<H: FileHook> Storage for HookedStorage<H> {
    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }
    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        self.inner.read(name)
    }
    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        self.hook.before_change()?;
        Ok(Box::new(HookedFile {
            inner: self.inner.create(name)?,
            hook: self.hook.clone(),
        }))
    }
    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        self.hook.before_change()?;
        self.inner.truncate(name, len)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.hook.before_change()?;
        self.inner.rename(from, to)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.hook.before_change()?;
        self.inner.remove(name)
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.hook.before_change()?;
        self.inner.sync_dir()
    }
    fn describe(&self, name: &str) -> String {
        self.inner.describe(name)
    }
    fn release(&self) {
        self.inner.release()
    }
}
