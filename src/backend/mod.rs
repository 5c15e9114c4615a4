//! Backends: where a transfer's bytes live. A [`Transfer`] is one configured
//! disk; [`Transfer::open`] gives a [`Handle`] that the operations read,
//! write, zero and flush through, whatever the storage kind.
//!
//! Everything here blocks: call it from a blocking thread, never from an
//! async worker.

pub mod file;
pub mod nbd;

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::config::{BackendConfig, TransferConfig};
use crate::extents::Extent;
use crate::stats::TransferStats;

/// What went wrong in a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// The storage could not be reached (NBD connect/handshake failed,
    /// file missing): nothing was done.
    Unavailable(String),
    /// An I/O error while working on the storage.
    Io(String),
    /// The storage did not answer within the NBD command timeout
    /// (`--nbd-timeout`); its connection was discarded.
    Timeout(String),
    /// The request lies (partly) beyond the end of the image.
    OutOfRange { size: u64 },
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Unavailable(m) => write!(f, "backend unavailable: {m}"),
            BackendError::Io(m) => write!(f, "backend I/O error: {m}"),
            BackendError::Timeout(m) => write!(f, "backend timed out: {m}"),
            BackendError::OutOfRange { size } => write!(f, "beyond the end of the image ({size})"),
        }
    }
}

impl std::error::Error for BackendError {}

pub type Result<T> = std::result::Result<T, BackendError>;

/// What a backend can do: OPTIONS advertises it, and requests for what it
/// cannot do are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Writes are refused.
    pub read_only: bool,
    /// Ranges can be made to read as zeroes without sending them.
    pub can_zero: bool,
    pub can_flush: bool,
    /// Allocation (and dirty) extents can be listed.
    pub extents: bool,
    /// Writes at an offset (`Content-Range` PUT, PATCH); without them a
    /// write replaces the whole image (see [`Writer`]).
    pub ranged_writes: bool,
}

impl Caps {
    /// The file backend: reads, whole-file uploads, fsync.
    pub const FILE: Caps = Caps {
        read_only: false,
        can_zero: false,
        can_flush: true,
        extents: false,
        ranged_writes: false,
    };

    /// The most an NBD export offers; its own flags may take away writes,
    /// zero and flush (see [`Handle::caps`]).
    pub const NBD_MOST: Caps = Caps {
        read_only: false,
        can_zero: true,
        can_flush: true,
        extents: true,
        ranged_writes: true,
    };
}

/// What a backend can do as far as its config tells, without opening it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownCaps {
    /// All of it (the file backend).
    All(Caps),
    /// At most this; the open backend tells the rest (an NBD export).
    AtMost(Caps),
}

impl KnownCaps {
    pub fn of(backend: &BackendConfig) -> KnownCaps {
        match backend {
            BackendConfig::File { .. } => KnownCaps::All(Caps::FILE),
            BackendConfig::Nbd { .. } => KnownCaps::AtMost(Caps::NBD_MOST),
        }
    }

    /// The most the backend can do: what it lacks here, it lacks whatever
    /// its image.
    pub fn at_most(self) -> Caps {
        match self {
            KnownCaps::All(c) | KnownCaps::AtMost(c) => c,
        }
    }
}

/// One configured transfer: its config plus runtime state (the NBD
/// connection pool, the requests in flight). A changed config file or a new
/// registration makes a new `Transfer`, so a stale connection is never reused.
///
/// Requests use a transfer through a [`Lease`]. Once the transfer is closed
/// (unregistered, or idle for longer than its `idle_timeout`) it grants no
/// more leases, so the id is unknown to new requests.
pub struct Transfer {
    id: String,
    config: TransferConfig,
    pool: nbd::Pool,
    activity: Mutex<Activity>,
    /// Woken whenever the last lease is returned.
    drained: Notify,
    /// Writes (or zeroes) completed, counted per request once none of its
    /// writes is in flight (see [`Transfer::mark_written`]).
    writes_completed: AtomicU64,
    /// The most `writes_completed` a successful flush covers: a flush covers
    /// the writes completed before it started. Behind `writes_completed`,
    /// a shutdown (or retiring the transfer) must still flush. Counts rather
    /// than a flag because requests run concurrently: a flush that ends
    /// while another request's write is still in flight must not count as
    /// covering it.
    flushed_upto: AtomicU64,
    /// Bytes moved and requests ended, for the control socket's `status`.
    stats: Arc<TransferStats>,
}

/// What closing and the idle timeout look at.
struct Activity {
    in_flight: usize,
    closed: bool,
    /// When the last request started or ended (or the transfer was made).
    last_active: Instant,
}

impl Transfer {
    pub fn new(id: String, config: TransferConfig) -> Transfer {
        Transfer {
            id,
            config,
            pool: nbd::Pool::new(),
            activity: Mutex::new(Activity {
                in_flight: 0,
                closed: false,
                last_active: Instant::now(),
            }),
            drained: Notify::new(),
            writes_completed: AtomicU64::new(0),
            flushed_upto: AtomicU64::new(0),
            stats: Arc::new(TransferStats::new()),
        }
    }

    /// This transfer's counters.
    pub fn stats(&self) -> &Arc<TransferStats> {
        &self.stats
    }

    /// Whether a completed write is not covered by a flush yet.
    pub fn is_unflushed(&self) -> bool {
        self.writes_completed.load(Ordering::Acquire) > self.flushed_upto.load(Ordering::Acquire)
    }

    /// Counts a request's writes as completed: call once none of them is in
    /// flight any more.
    pub(crate) fn mark_written(&self) {
        self.writes_completed.fetch_add(1, Ordering::AcqRel);
    }

    /// What a flush starting now covers: pass it to
    /// [`Transfer::mark_flushed`] once the flush succeeded.
    pub(crate) fn writes_completed(&self) -> u64 {
        self.writes_completed.load(Ordering::Acquire)
    }

    /// A flush that started when [`Transfer::writes_completed`] was `covers`
    /// succeeded.
    pub(crate) fn mark_flushed(&self, covers: u64) {
        self.flushed_upto.fetch_max(covers, Ordering::AcqRel);
    }

    /// Flushes the transfer if anything was written since the last flush
    /// (used at shutdown). Blocking.
    pub fn flush_if_written(self: &Arc<Self>) -> Result<bool> {
        if !self.is_unflushed() {
            return Ok(false);
        }
        let covers = self.writes_completed();
        let mut h = self.open()?;
        h.flush()?;
        self.mark_flushed(covers);
        Ok(true)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn config(&self) -> &TransferConfig {
        &self.config
    }

    pub fn is_file(&self) -> bool {
        self.config.is_file()
    }

    /// Starts a request on this transfer; `None` once it is closed.
    pub fn lease(self: &Arc<Self>) -> Option<Lease> {
        let mut a = self.activity.lock();
        if a.closed {
            return None;
        }
        a.in_flight += 1;
        a.last_active = Instant::now();
        Some(Lease {
            transfer: self.clone(),
            served: false,
        })
    }

    /// Counts as activity (restarts the idle timeout) without being a
    /// request; false once the transfer is closed.
    pub fn touch(&self) -> bool {
        let mut a = self.activity.lock();
        if a.closed {
            return false;
        }
        a.last_active = Instant::now();
        true
    }

    /// Requests holding a lease right now.
    pub fn in_flight(&self) -> usize {
        self.activity.lock().in_flight
    }

    pub fn is_closed(&self) -> bool {
        self.activity.lock().closed
    }

    /// Refuses new leases from now on. Requests in flight go on; see
    /// [`Transfer::drained`] and [`Transfer::close_connections`].
    pub fn mark_closed(&self) {
        self.activity.lock().closed = true;
    }

    /// Closes the transfer if no request is in flight and none has started
    /// or ended for `idle_timeout` before `now`. True when this call closed it.
    pub fn close_if_idle(&self, now: Instant) -> bool {
        let mut a = self.activity.lock();
        if a.closed || a.in_flight > 0 {
            return false;
        }
        if now.saturating_duration_since(a.last_active) < self.config.idle_timeout {
            return false;
        }
        a.closed = true;
        true
    }

    /// How long the transfer has been without a request (zero while one is
    /// in flight).
    pub fn idle_for(&self, now: Instant) -> Duration {
        let a = self.activity.lock();
        if a.in_flight > 0 {
            Duration::ZERO
        } else {
            now.saturating_duration_since(a.last_active)
        }
    }

    /// Waits until no request holds a lease.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a lease returned in between
            // still wakes us.
            notified.as_mut().enable();
            if self.activity.lock().in_flight == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Closes the pooled NBD connections, and every connection still lent
    /// out as soon as it comes back. Blocking (NBD disconnects).
    pub fn close_connections(&self) {
        self.pool.close();
    }

    /// The end of a transfer (unregistered, replaced, idle, or the server
    /// stopping): what was written since the last flush is flushed, then
    /// its connections are closed. Call it once no request is in flight, or
    /// requests still running may write after the flush. `when` completes
    /// the log lines ("at shutdown"). Blocking.
    pub fn retire(self: &Arc<Self>, when: &str) {
        match self.flush_if_written() {
            Ok(true) => log::info!("flushed image_id={} {when}", self.id),
            Ok(false) => {}
            Err(e) => log::error!("flush {when} failed image_id={} err={e}", self.id),
        }
        self.close_connections();
    }

    /// Waits (without blocking a thread) for a request's turn to open the
    /// storage: only a not-multi-conn NBD export makes requests take turns
    /// (see [`nbd::Pool::turn`]). Pass it to [`Transfer::open_in_turn`].
    pub async fn turn(&self) -> nbd::Turn {
        if self.is_file() {
            return None;
        }
        self.pool.turn().await
    }

    /// Opens the storage without waiting for a turn: for the blocking paths
    /// that run once no request is in flight. Blocking.
    pub fn open(self: &Arc<Self>) -> Result<Handle> {
        let turn = if self.is_file() {
            None
        } else {
            self.pool.try_turn()
        };
        self.open_in_turn(turn)
    }

    /// Opens the storage (an NBD connection, from the pool when one is idle,
    /// or the file) in the request's `turn`. Blocking.
    pub fn open_in_turn(self: &Arc<Self>, turn: nbd::Turn) -> Result<Handle> {
        self.open_as(turn, Handle::Nbd, |path| {
            file::FileHandle::open(path).map(Handle::File)
        })
    }

    /// Opens the storage for a write request in the request's `turn`, the
    /// way this backend takes writes: positioned writes into the export
    /// for NBD, a whole new file (the old one need not exist) for a file.
    /// Blocking.
    pub fn open_writer(self: &Arc<Self>, turn: nbd::Turn) -> Result<Writer> {
        self.open_as(turn, Writer::At, |path| {
            file::FileUpload::create(path).map(Writer::Replace)
        })
    }

    /// An NBD connection made into `T` by `nbd`, or the file's path by `file`.
    fn open_as<T>(
        self: &Arc<Self>,
        turn: nbd::Turn,
        nbd: fn(nbd::NbdHandle) -> T,
        file: fn(&std::path::Path) -> Result<T>,
    ) -> Result<T> {
        match &self.config.backend {
            BackendConfig::Nbd {
                socket,
                export,
                export_bitmap,
            } => nbd::NbdHandle::open(
                self.clone(),
                socket,
                export.as_deref(),
                export_bitmap.as_deref(),
                turn,
            )
            .map(nbd),
            BackendConfig::File { path } => file(path),
        }
    }

    pub(crate) fn pool(&self) -> &nbd::Pool {
        &self.pool
    }
}

/// One request's use of a transfer: while any lease is alive the transfer
/// counts as busy (never idle, and unregistering waits for it). Dropping it
/// ends the request's use, whatever way the request ended, and counts the
/// request as served if [`Lease::served`] was called, else as failed.
pub struct Lease {
    transfer: Arc<Transfer>,
    served: bool,
}

impl Lease {
    pub fn transfer(&self) -> &Arc<Transfer> {
        &self.transfer
    }

    /// Marks the request as served (completed successfully).
    pub fn served(&mut self) {
        self.served = true;
    }
}

impl Deref for Lease {
    type Target = Transfer;
    fn deref(&self) -> &Transfer {
        &self.transfer
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Counted before the request leaves the in-flight count, so that
        // served + failed + in flight never misses a finished request.
        self.transfer.stats.add_request(self.served);
        let mut a = self.transfer.activity.lock();
        a.in_flight -= 1;
        a.last_active = Instant::now();
        let last = a.in_flight == 0;
        drop(a);
        if last {
            self.transfer.drained.notify_waiters();
        }
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lease({})", self.transfer.id)
    }
}

/// A backend opened for a write request (see [`Transfer::open_writer`]).
pub enum Writer {
    /// Writes at offsets into the image (NBD).
    At(nbd::NbdHandle),
    /// A new image written from its start, replacing the old one only once
    /// complete (the file backend).
    Replace(file::FileUpload),
}

impl Writer {
    /// What the backend can do (read-only, zero, ...).
    pub fn caps(&self) -> Result<Caps> {
        match self {
            Writer::At(h) => h.caps(),
            Writer::Replace(_) => Ok(Caps::FILE),
        }
    }

    /// The size that writes must fit in; `None` for a replacing writer,
    /// whose new image is as long as what is written.
    pub fn size(&self) -> Option<u64> {
        match self {
            Writer::At(h) => Some(h.size()),
            Writer::Replace(_) => None,
        }
    }
}

/// An open backend, used by one request at a time.
pub enum Handle {
    Nbd(nbd::NbdHandle),
    File(file::FileHandle),
}

impl Handle {
    /// Image size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Handle::Nbd(h) => h.size(),
            Handle::File(h) => h.size(),
        }
    }

    pub fn caps(&self) -> Result<Caps> {
        match self {
            Handle::Nbd(h) => h.caps(),
            Handle::File(_) => Ok(Caps::FILE),
        }
    }

    /// Fills `buf` from `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self {
            Handle::Nbd(h) => h.read_at(buf, offset),
            Handle::File(h) => h.read_at(buf, offset),
        }
    }

    /// Writes `buf` at `offset` (never past the end of the image).
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Handle::Nbd(h) => h.write_at(buf, offset),
            Handle::File(_) => Err(BackendError::Io(
                "ranged writes are not supported by the file backend".into(),
            )),
        }
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        match self {
            Handle::Nbd(h) => h.zero(offset, len),
            Handle::File(_) => Err(BackendError::Io(
                "zero is not supported by the file backend".into(),
            )),
        }
    }

    pub fn flush(&mut self) -> Result<()> {
        match self {
            Handle::Nbd(h) => h.flush(),
            Handle::File(h) => h.flush(),
        }
    }

    /// Allocation extents covering the whole image (`zero` = hole or zero).
    pub fn allocation_extents(&mut self) -> Result<Vec<Extent>> {
        match self {
            Handle::Nbd(h) => h.allocation_extents(),
            Handle::File(h) => Ok(crate::extents::whole(h.size(), false)),
        }
    }

    /// Extents whose `zero` flag guarantees the range reads as zeroes (no
    /// such knowledge for files: one data extent).
    pub fn reads_as_zero_extents(&mut self) -> Result<Vec<Extent>> {
        match self {
            Handle::Nbd(h) => h.reads_as_zero_extents(),
            Handle::File(h) => Ok(crate::extents::whole(h.size(), false)),
        }
    }

    /// Allocation extents merged with the configured dirty bitmap, or `None`
    /// when no bitmap is configured or the server did not offer it.
    pub fn dirty_extents(&mut self) -> Result<Option<Vec<crate::extents::DirtyExtent>>> {
        match self {
            Handle::Nbd(h) => h.dirty_extents(),
            Handle::File(_) => Ok(None),
        }
    }

    /// Marks the handle as not reusable (an error left it in an unknown state).
    pub fn discard(&mut self) {
        if let Handle::Nbd(h) = self {
            h.discard();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_covers_only_writes_completed_before_it_started() {
        let cfg = TransferConfig::parse(br#"{"socket": "/s"}"#).unwrap();
        let t = Transfer::new("t".into(), cfg);
        assert!(!t.is_unflushed());
        t.mark_written();
        assert!(t.is_unflushed());
        // A flush starts; another request's write completes meanwhile.
        let covers = t.writes_completed();
        t.mark_written();
        t.mark_flushed(covers);
        assert!(t.is_unflushed(), "the later write is not covered");
        // A flush that started after it covers it; an older flush ending
        // last does not undo that.
        let old = covers;
        let covers = t.writes_completed();
        t.mark_flushed(covers);
        t.mark_flushed(old);
        assert!(!t.is_unflushed());
    }
}
