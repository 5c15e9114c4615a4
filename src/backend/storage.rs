//! A transfer's storage: how to reach it (its backend config) and what
//! outlives one request: the NBD connection pool and the count of what was
//! written since the last flush. The backend's own write, zero and flush
//! paths keep that count; nothing above the backend does.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{file, nbd_export, BackendError, KnownCaps, Opened, Result, Writer};
use crate::config::BackendConfig;
use crate::stats::TransferStats;

/// What was written and not flushed yet, as counts rather than a flag:
/// requests run concurrently, and a flush that ends while another request's
/// write is still in flight must not count as covering it. A flush covers
/// only the writes completed before it started.
#[derive(Debug, Default)]
pub(crate) struct Unflushed {
    /// Writes (or zeroes) completed, counted per request once none of its
    /// writes is in flight.
    completed: AtomicU64,
    /// The most `completed` a successful flush covers. Behind `completed`,
    /// retiring the transfer (e.g. at shutdown) must still flush.
    flushed_upto: AtomicU64,
}

impl Unflushed {
    /// Counts a request's writes as completed: call once none of them is in
    /// flight any more.
    pub(crate) fn wrote(&self) {
        self.completed.fetch_add(1, Ordering::AcqRel);
    }

    /// What a flush starting now covers: pass it to [`Unflushed::flushed`]
    /// once the flush succeeded.
    pub(crate) fn flush_starts(&self) -> u64 {
        self.completed.load(Ordering::Acquire)
    }

    /// A flush that started when [`Unflushed::flush_starts`] said `covers`
    /// succeeded.
    pub(crate) fn flushed(&self, covers: u64) {
        self.flushed_upto.fetch_max(covers, Ordering::AcqRel);
    }

    /// Whether a completed write is not covered by a flush yet.
    pub(crate) fn any(&self) -> bool {
        self.completed.load(Ordering::Acquire) > self.flushed_upto.load(Ordering::Acquire)
    }
}

/// One transfer's storage (see the module documentation). Handles keep it
/// alive while they are open.
pub(crate) struct Storage {
    /// The transfer's id, for log lines.
    id: String,
    backend: BackendConfig,
    pool: nbd_export::Pool,
    unflushed: Arc<Unflushed>,
    /// The transfer's counters, for the NBD timeouts its requests meet.
    stats: Arc<TransferStats>,
}

impl Storage {
    pub(crate) fn new(
        id: &str,
        backend: BackendConfig,
        pool: nbd_export::Pool,
        stats: Arc<TransferStats>,
    ) -> Arc<Storage> {
        Arc::new(Storage {
            id: id.to_string(),
            backend,
            pool,
            unflushed: Arc::default(),
            stats,
        })
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// What the backend can do as far as its config tells.
    pub(crate) fn known_caps(&self) -> KnownCaps {
        KnownCaps::of(&self.backend)
    }

    pub(crate) fn pool(&self) -> &nbd_export::Pool {
        &self.pool
    }

    pub(crate) fn stats(&self) -> &TransferStats {
        &self.stats
    }

    pub(crate) fn unflushed(&self) -> &Arc<Unflushed> {
        &self.unflushed
    }

    /// Whether a completed write is not covered by a flush yet.
    pub(crate) fn is_unflushed(&self) -> bool {
        self.unflushed.any()
    }

    /// Waits (without blocking a thread) for a request's turn to open the
    /// storage: only a not-multi-conn NBD export makes requests take turns
    /// (see [`nbd_export::Pool::turn`]). Pass it to [`Storage::open_in_turn`].
    pub(crate) async fn turn(&self) -> nbd_export::Turn {
        match self.backend {
            BackendConfig::Nbd { .. } => self.pool.turn().await,
            BackendConfig::File { .. } => None,
        }
    }

    /// Opens the storage without waiting for a turn: for the blocking paths
    /// that run once no request is in flight. Blocking; call it inside the
    /// runtime that drives the connection.
    fn open(self: &Arc<Self>) -> Result<Opened> {
        let turn = match self.backend {
            BackendConfig::Nbd { .. } => self.pool.try_turn(),
            BackendConfig::File { .. } => None,
        };
        self.open_in_turn(turn)
    }

    /// Opens the storage (an NBD connection, from the pool when one is idle,
    /// or the file) in the request's `turn`. Blocking: call it on the
    /// blocking pool of the async worker that then drives the connection
    /// (see [`nbd_export::ExportConn::open`]).
    pub(crate) fn open_in_turn(self: &Arc<Self>, turn: nbd_export::Turn) -> Result<Opened> {
        self.open_as(turn, Opened::Nbd, |path, unflushed| {
            file::FileHandle::open(path, unflushed).map(Opened::File)
        })
    }

    /// Opens the storage for a write request in the request's `turn`, the
    /// way this backend takes writes: positioned writes into the export
    /// for NBD, a whole new file (the old one need not exist) for a file.
    /// Blocking.
    pub(crate) fn open_writer(self: &Arc<Self>, turn: nbd_export::Turn) -> Result<Writer> {
        self.open_as(turn, Writer::At, |path, unflushed| {
            file::FileUpload::create(path, unflushed).map(Writer::Replace)
        })
    }

    /// An NBD connection made into `T` by `nbd`, or the file's path (and
    /// the counts its writes and flushes keep) by `file`.
    fn open_as<T>(
        self: &Arc<Self>,
        turn: nbd_export::Turn,
        nbd: fn(nbd_export::ExportConn) -> T,
        file: fn(&Path, Arc<Unflushed>) -> Result<T>,
    ) -> Result<T> {
        match &self.backend {
            BackendConfig::Nbd {
                socket,
                export,
                export_bitmap,
            } => nbd_export::ExportConn::open(
                self.clone(),
                socket,
                export.as_deref(),
                export_bitmap.as_deref(),
                turn,
            )
            .map(nbd),
            BackendConfig::File { path } => file(path, self.unflushed.clone()),
        }
    }

    /// Flushes if anything was written since the last flush (when the
    /// transfer is retired, e.g. at shutdown): true when it did. Blocking:
    /// the flush runs on a runtime of its own on the calling thread (not
    /// an async worker's).
    pub(crate) fn flush_if_written(self: &Arc<Self>) -> Result<bool> {
        if !self.is_unflushed() {
            return Ok(false);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BackendError::Io(format!("no runtime to flush on: {e}")))?;
        rt.block_on(async { self.open()?.flush().await })?;
        Ok(true)
    }

    /// Closes the pooled NBD connections, and every connection still lent
    /// out as soon as it comes back. Blocking (NBD disconnects).
    pub(crate) fn close(&self) {
        self.pool.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_covers_only_writes_completed_before_it_started() {
        let u = Unflushed::default();
        assert!(!u.any());
        u.wrote();
        assert!(u.any());
        // A flush starts; another request's write completes meanwhile.
        let covers = u.flush_starts();
        u.wrote();
        u.flushed(covers);
        assert!(u.any(), "the later write is not covered");
        // A flush that started after it covers it; an older flush ending
        // last does not undo that.
        let old = covers;
        let covers = u.flush_starts();
        u.flushed(covers);
        u.flushed(old);
        assert!(!u.any());
    }
}
