//! The file backend: the raw bytes of a local file. GET reads ranges of it,
//! a full PUT replaces it (written beside it, renamed over it when the whole
//! body arrived), flush is fsync. An upload counts as a write in the
//! transfer's [`Unflushed`] once renamed, and a flush (of a handle, or of
//! an upload asked to flush) clears what it covers.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{BackendError, Result, Unflushed};

fn unavailable(path: &Path, e: std::io::Error) -> BackendError {
    log::error!("file open failed path={} err={e}", path.display());
    BackendError::Unavailable(format!("cannot open file: {}", e.kind()))
}

/// An open image file; its clones share it (to read and flush from a
/// blocking thread).
#[derive(Clone)]
pub(crate) struct FileHandle {
    file: Arc<File>,
    size: u64,
    unflushed: Arc<Unflushed>,
    /// The uploads a flush of this handle covers: those renamed over the
    /// file before it was opened (a later one is another file).
    covers: u64,
}

impl FileHandle {
    /// Opens the file at `path`, whose writes and flushes `unflushed` counts.
    pub(crate) fn open(path: &Path, unflushed: Arc<Unflushed>) -> Result<FileHandle> {
        let covers = unflushed.flush_starts();
        let file = File::open(path).map_err(|e| unavailable(path, e))?;
        let md = file.metadata().map_err(|e| unavailable(path, e))?;
        if !md.is_file() {
            return Err(BackendError::Unavailable("not a regular file".into()));
        }
        Ok(FileHandle {
            file: Arc::new(file),
            size: md.len(),
            unflushed,
            covers,
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.size => {}
            _ => return Err(BackendError::OutOfRange { size: self.size }),
        }
        self.file.read_exact_at(buf, offset).map_err(|e| {
            BackendError::Io(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "file shrank while being read".to_string()
            } else {
                e.to_string()
            })
        })
    }

    /// fsync: covers the uploads completed before the file was opened.
    /// Blocking.
    pub(crate) fn flush(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| BackendError::Io(e.to_string()))?;
        self.unflushed.flushed(self.covers);
        Ok(())
    }
}

/// A full upload that replaces a file: the body goes to a temporary file in
/// the same directory, which is renamed over the target only once complete.
/// Dropped without [`FileUpload::commit`], the temporary file is removed and
/// the target is unchanged.
pub(crate) struct FileUpload {
    file: Option<File>,
    tmp: PathBuf,
    target: PathBuf,
    written: u64,
    unflushed: Arc<Unflushed>,
}

impl FileUpload {
    /// Starts replacing `target`, whose writes and flushes `unflushed`
    /// counts.
    pub(crate) fn create(target: &Path, unflushed: Arc<Unflushed>) -> Result<FileUpload> {
        let dir = target
            .parent()
            .ok_or_else(|| BackendError::Unavailable("file has no parent directory".into()))?;
        let name = target
            .file_name()
            .ok_or_else(|| BackendError::Unavailable("file has no name".into()))?;
        let mode = std::fs::metadata(target)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644);
        let tmp = dir.join(format!(
            ".{}.upload-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            unique()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| unavailable(&tmp, e))?;
        Ok(FileUpload {
            file: Some(file),
            tmp,
            target: target.to_path_buf(),
            written: 0,
            unflushed,
        })
    }

    pub(crate) fn write(&mut self, buf: &[u8]) -> Result<()> {
        let f = self.file.as_mut().expect("open until commit");
        f.write_all(buf)
            .map_err(|e| BackendError::Io(e.to_string()))?;
        self.written += buf.len() as u64;
        Ok(())
    }

    /// Optionally fsyncs, then renames the new file over the target (and
    /// fsyncs the directory). Counts as a completed write, and with `flush`
    /// as flushed: full uploads of one image run one at a time (see
    /// `crate::http::limits`), so no other upload completes in between.
    pub(crate) fn commit(mut self, flush: bool) -> Result<u64> {
        let f = self.file.take().expect("open until commit");
        if flush {
            f.sync_all().map_err(|e| BackendError::Io(e.to_string()))?;
        }
        drop(f);
        std::fs::rename(&self.tmp, &self.target).map_err(|e| BackendError::Io(e.to_string()))?;
        self.unflushed.wrote();
        if flush {
            let covers = self.unflushed.flush_starts();
            if let Some(dir) = self.target.parent() {
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            self.unflushed.flushed(covers);
        }
        Ok(self.written)
    }
}

impl Drop for FileUpload {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
