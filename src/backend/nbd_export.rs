//! The NBD backend: a pooled [`Connection`] per request.
//!
//! Connections are reused across requests of the same transfer only when the
//! server advertises multi-conn (qemu-nbd does with `--shared` other than 1):
//! a server that takes one client at a time must see each connection closed
//! after its request, as `image_server.py` did, or a second client would wait forever.
//!
//! Requests of one transfer run concurrently, each on a connection of its
//! own. What that means depends on the export:
//!
//! - **Multi-conn** (the server says its connections share one cache): as
//!   many connections as requests, pooled. A flush on any of them covers
//!   every write the server completed on any connection before it received
//!   the flush (`NBD_FLAG_CAN_MULTI_CONN`'s promise), so a flush covers the
//!   writes of this transfer that completed before the flush request
//!   started, whichever pooled connection carried them. A connection coming
//!   back while another request of the transfer is still connecting is
//!   closed rather than pooled: a server with a client limit (qemu-nbd
//!   `--shared=N`) would otherwise keep that connect waiting behind an idle
//!   connection of our own.
//! - **Not multi-conn** (e.g. qemu-nbd's default `--shared=1`): the NBD
//!   spec asks clients not to use several connections at once, and qemu-nbd
//!   does not even accept a second one until the first is closed. The
//!   transfer's requests then take turns ([`Pool::turn`], asynchronous: no
//!   thread waits, no connect timeout runs out behind a long request), each
//!   closing its connection before the next connects. There is one
//!   connection at a time, so a flush follows every completed write of the
//!   export and covers it (qemu flushes the whole image for any client).
//!   A turn is given back when its request ends, fails or its client goes
//!   away (it lives in the [`ExportConn`]); no request waits for a turn while
//!   holding one, so turns cannot deadlock.
//!
//! Until the first connection tells, a transfer is treated as not
//! multi-conn; a request that then learns it is gives its turn back at once.

use std::future::poll_fn;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{BackendError, Caps, Result, Storage};
use crate::extents::{self, DirtyExtent, Extent};
use crate::nbd::{self, ConnectOptions, Connection, Pipeline};
use crate::zeroes::ZEROES;

/// What a command of an [`ExportConn`] gave back when it retired: ops reads
/// it through the backend, not from `nbd` below it.
pub(crate) use crate::nbd::Retired;

/// Idle connections kept per transfer.
/// The most block status pairs a checksum holds for its zero extents:
/// 1 MiB of pairs and 1.5 MiB of extents (plus one reply of the server:
/// qemu-nbd sends at most 131,072 pairs, 2 MiB), so that a checksum stays
/// within a data request's few MiB.
pub(crate) const CHECKSUM_MAX_EXTENTS: usize = 1 << 16;

const MAX_IDLE: usize = 4;
/// Bound on connect + handshake.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Size of each NBD request when a buffer is read or written with several
/// requests in flight. qemu-nbd allocates a bounce buffer per read request;
/// from 512 KiB on, its allocator hands them back to the kernel and faults
/// them in again (some 300 000 page faults in qemu-nbd per 2 GiB read by
/// four clients at once, against 6 000 at 256 KiB, which is also nbdcopy's
/// default request size).
pub const PIPELINE_REQUEST: usize = 256 * 1024;
/// Size of each NBD write request of an upload: at 512 KiB qemu-nbd spent
/// about a fifth less CPU on an upload than at 256 KiB (half the requests;
/// an upload has one writer, so the page faults above do not show).
pub const WRITE_REQUEST: usize = 512 * 1024;

/// `--nbd-timeout`'s default: seconds an NBD command may go without a reply
/// (see [`Pool::new`]).
pub const DEFAULT_COMMAND_TIMEOUT_SECS: u64 = 120;

/// A request's turn to hold the one connection of a transfer whose export
/// is not multi-conn (`None`: no turn needed or held). Given back when dropped.
pub(crate) type Turn = Option<OwnedSemaphorePermit>;

/// Idle connections of one transfer, and the turns of a transfer whose
/// export takes one connection at a time (see the module documentation).
pub(crate) struct Pool {
    inner: Mutex<PoolInner>,
    /// One permit: the turn to hold a connection to a not-multi-conn export.
    turns: Arc<Semaphore>,
    /// What the last connection said: the export is multi-conn, so requests
    /// need no turn.
    multi_conn: AtomicBool,
    /// How long a command of a new connection may go without a reply.
    command_timeout: Option<Duration>,
}

struct PoolInner {
    idle: Vec<Connection>,
    /// Set when the transfer goes away: returned connections are closed.
    closed: bool,
    /// Requests of this transfer connecting right now.
    connecting: usize,
}

impl Pool {
    /// A transfer's pool, empty. Its new connections fail a command (and are
    /// discarded) when the server does not reply within `command_timeout`
    /// (`--nbd-timeout`; `None`: no limit).
    pub(crate) fn new(command_timeout: Option<Duration>) -> Pool {
        Pool {
            inner: Mutex::new(PoolInner {
                idle: Vec::new(),
                closed: false,
                connecting: 0,
            }),
            turns: Arc::new(Semaphore::new(1)),
            multi_conn: AtomicBool::new(false),
            command_timeout,
        }
    }

    /// Waits for this request's turn to connect: at once on a multi-conn
    /// export, else once no other request of the transfer holds a
    /// connection (first come, first served).
    pub(crate) async fn turn(&self) -> Turn {
        if self.multi_conn.load(Ordering::Acquire) {
            return None;
        }
        self.turns.clone().acquire_owned().await.ok()
    }

    /// The turn if it is free now (for the blocking paths that run once no
    /// request is in flight: a turn still held is about to come back, and
    /// the connect then simply waits for the server to accept it).
    pub(crate) fn try_turn(&self) -> Turn {
        if self.multi_conn.load(Ordering::Acquire) {
            return None;
        }
        self.turns.clone().try_acquire_owned().ok()
    }

    fn take(&self) -> Option<Connection> {
        loop {
            let conn = self.inner.lock().idle.pop()?;
            if conn.probe_alive() {
                return Some(conn);
            }
            log::info!("dropping a pooled NBD connection the server closed");
        }
    }

    fn put(&self, conn: Connection) {
        let mut inner = self.inner.lock();
        if !inner.closed && inner.connecting == 0 && inner.idle.len() < MAX_IDLE {
            inner.idle.push(conn);
            return;
        }
        drop(inner);
        drop(conn);
    }

    /// Closes the idle connections and, from now on, every connection that
    /// is returned.
    pub(crate) fn close(&self) {
        let drained: Vec<Connection> = {
            let mut inner = self.inner.lock();
            inner.closed = true;
            std::mem::take(&mut inner.idle)
        };
        drop(drained);
    }
}

/// One request that [`zero_requests`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroRequest {
    /// NBD WRITE_ZEROES of `len` bytes at `offset`.
    Zero { offset: u64, len: u64 },
    /// A write of these zeroes at `offset`.
    Write(&'static [u8], u64),
}

/// The requests that make `len` bytes at `offset` read as zeroes: one
/// WRITE_ZEROES when the server can zero, else writes of [`ZEROES`] (the
/// one fallback; the blocking and the queued paths only issue them).
fn zero_requests(can_zero: bool, offset: u64, len: u64) -> impl Iterator<Item = ZeroRequest> {
    let zero = can_zero.then_some(ZeroRequest::Zero { offset, len });
    let step = ZEROES.len() as u64;
    let end = offset.saturating_add(if can_zero { 0 } else { len });
    let writes = (offset..end).step_by(ZEROES.len()).map(move |off| {
        let n = (end - off).min(step) as usize;
        ZeroRequest::Write(&ZEROES[..n], off)
    });
    zero.into_iter().chain(writes)
}

fn io_err(e: nbd::Error) -> BackendError {
    if e.is_timeout() {
        BackendError::Timeout(e.to_string())
    } else {
        BackendError::Io(e.to_string())
    }
}

/// Counts a connect in progress on its pool while alive.
struct Connecting<'a>(&'a Pool);

impl<'a> Connecting<'a> {
    fn start(pool: &'a Pool) -> Connecting<'a> {
        pool.inner.lock().connecting += 1;
        Connecting(pool)
    }
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        self.0.inner.lock().connecting -= 1;
    }
}

/// What a request holds with its connection besides the connection: the
/// storage it counts its writes and flushes in, and its turn.
struct Loan {
    storage: Arc<Storage>,
    /// A timeout was logged already (one line per request).
    timeout_logged: bool,
    /// Wrote or zeroed since the last flush of this request: the storage's
    /// [`super::Unflushed`] counts the writes as completed when the
    /// request's connection goes back or flushes.
    wrote: bool,
    /// What the flush started by this request covers (see
    /// [`super::Unflushed::flush_starts`]).
    flush_covers: u64,
    /// The turn of a not-multi-conn export, given back after the connection
    /// is closed or pooled ([`ExportConn`]'s pipeline drops before its
    /// loan). Only held, never read.
    _turn: Turn,
}

impl Loan {
    /// Counts this request's writes as completed: call once none is in
    /// flight.
    fn writes_done(&mut self) {
        if std::mem::take(&mut self.wrote) {
            self.storage.unflushed().wrote();
        }
    }

    /// What a flush starting now covers (this request's writes included).
    fn start_flush(&mut self) -> u64 {
        self.writes_done();
        self.flush_covers = self.storage.unflushed().flush_starts();
        self.flush_covers
    }

    /// The flush started by [`Loan::start_flush`] succeeded.
    fn flushed(&self) {
        self.storage.unflushed().flushed(self.flush_covers);
    }

    /// Maps an NBD error for the request (a fatal one has left the
    /// connection dead: it is closed, not pooled). The first timeout logs
    /// the one line that names the transfer and counts in its
    /// `nbd_timeouts`.
    fn error(&mut self, e: nbd::Error) -> BackendError {
        if e.is_timeout() && !self.timeout_logged {
            self.timeout_logged = true;
            self.storage.stats().add_nbd_timeout();
            log::error!(
                "NBD timeout image_id={} err={e}: request failed, connection discarded",
                self.storage.id()
            );
        }
        io_err(e)
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        // The request is over: every write of it has completed or failed
        // (an error discards the connection with what is in flight).
        self.writes_done();
    }
}

/// Where a request's connection goes when its pipeline is dropped idle:
/// back to the pool when it can serve another request; else it is closed.
fn home(storage: Arc<Storage>) -> nbd::Home {
    Box::new(move |conn: Connection| {
        if !conn.is_dead() && conn.can_multi_conn().unwrap_or(false) {
            storage.pool().put(conn);
        }
    })
}

/// NBD commands a request keeps in flight when it makes a range read as
/// zeroes with writes of zeroes (1 MiB each).
const ZERO_WRITES: usize = 8;

/// One NBD connection lent to one request. Every command of the request
/// (read, write, zero, flush, block status) is queued on the connection's
/// [`nbd::Pipeline`] and retired on the async worker that opened it, with
/// the pipeline's one deadline and one rule for a dead connection. Dropped,
/// the connection goes back to the pool if no command is in flight and it
/// can serve another request (else it is closed), then the request's turn.
pub(crate) struct ExportConn {
    // Fields drop in declaration order: the pipeline (its connection
    // pooled or closed) before the loan (the turn). Boxed: it is large,
    // and the request moves its connection around.
    pipe: Box<Pipeline>,
    loan: Loan,
    bitmap_context: Option<String>,
}

impl ExportConn {
    /// Opens a connection: a pooled one, or a new one. `turn` is the
    /// request's turn (see [`Pool::turn`]); kept while the connection turns
    /// out not to be multi-conn. Blocking (connect); the pipeline is
    /// registered with the calling thread's tokio runtime (from a blocking
    /// task: the runtime that spawned it), whose tasks must drive it.
    pub(crate) fn open(
        storage: Arc<Storage>,
        socket: &Path,
        export: Option<&str>,
        export_bitmap: Option<&str>,
        turn: Turn,
    ) -> Result<ExportConn> {
        let bitmap_context =
            export_bitmap.map(|b| format!("{}{b}", nbd::CONTEXT_DIRTY_BITMAP_PREFIX));
        let pool = storage.pool();
        // Counted as connecting before the second look into the pool: a
        // connection returned in between is found there, one returned
        // after is closed rather than pooled (see `Pool::put`).
        let pooled = pool.take();
        let connecting = pooled.is_none().then(|| Connecting::start(pool));
        let conn = match pooled.or_else(|| pool.take()) {
            Some(c) => c,
            None => {
                // qemu:allocation-depth tells holes (unallocated in every
                // layer); a server without it simply does not agree to it.
                let mut contexts =
                    vec![nbd::CONTEXT_BASE_ALLOCATION, nbd::CONTEXT_ALLOCATION_DEPTH];
                if let Some(b) = &bitmap_context {
                    contexts.push(b);
                }
                Connection::connect_unix(&ConnectOptions {
                    socket,
                    export,
                    meta_contexts: &contexts,
                    timeout: CONNECT_TIMEOUT,
                    command_timeout: pool.command_timeout,
                })
                .map_err(|e| {
                    log::error!(
                        "NBD connect failed image_id={} socket={} err={e}",
                        storage.id(),
                        socket.display()
                    );
                    BackendError::Unavailable(e.to_string())
                })?
            }
        };
        drop(connecting);
        let multi_conn = conn.can_multi_conn().unwrap_or(false);
        pool.multi_conn.store(multi_conn, Ordering::Release);
        // On a multi-conn export the turn goes back at once, so that
        // requests that queued for it before that was known go ahead.
        let turn = if multi_conn { None } else { turn };
        let mut pipe = Box::new(Pipeline::new(conn).map_err(io_err)?);
        pipe.set_home(Some(home(storage.clone())));
        Ok(ExportConn {
            pipe,
            loan: Loan {
                storage,
                timeout_logged: false,
                wrote: false,
                flush_covers: 0,
                _turn: turn,
            },
            bitmap_context,
        })
    }

    fn conn(&self) -> &Connection {
        self.pipe.connection()
    }

    /// Runs `f` on the pipeline, mapping its error for the request.
    fn with<T>(&mut self, f: impl FnOnce(&mut Pipeline) -> nbd::Result<T>) -> Result<T> {
        let r = f(&mut self.pipe);
        r.map_err(|e| self.loan.error(e))
    }

    pub(crate) fn size(&self) -> u64 {
        self.conn().size()
    }

    pub(crate) fn caps(&self) -> Result<Caps> {
        let c = self.conn();
        Ok(Caps {
            read_only: c.is_read_only().map_err(io_err)?,
            can_zero: c.can_zero().map_err(io_err)?,
            can_flush: c.can_flush().map_err(io_err)?,
            ..Caps::NBD_MOST
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BackendError::OutOfRange { size }),
        }
    }

    /// Commands started and not yet retired by `poll_oldest`.
    pub(crate) fn queued(&self) -> usize {
        self.pipe.queued()
    }

    /// Starts reading `len` bytes at `offset` into the start of `buf`,
    /// without blocking, as requests of `PIPELINE_REQUEST` bytes.
    pub(crate) fn start_read(&mut self, buf: Vec<u8>, len: usize, offset: u64) -> Result<()> {
        self.check(offset, len as u64)?;
        self.with(|p| p.queue_read(buf, len, offset, PIPELINE_REQUEST))
    }

    /// Starts writing `data` at `offset`, without blocking. Commands in
    /// flight together may complete in any order: callers keep them to
    /// disjoint ranges.
    pub(crate) fn start_write(&mut self, data: Bytes, offset: u64) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        self.loan.wrote = true;
        self.with(|p| p.queue_write(data, offset, WRITE_REQUEST))
    }

    /// Starts one of the requests that make a range read as zeroes.
    fn start_zero_request(&mut self, r: ZeroRequest) -> Result<()> {
        match r {
            ZeroRequest::Zero { offset, len } => self.with(|p| p.queue_zero(offset, len)),
            ZeroRequest::Write(zeroes, at) => {
                self.with(|p| p.queue_write(Bytes::from_static(zeroes), at, WRITE_REQUEST))
            }
        }
    }

    /// Starts making `len` bytes at `offset` read as zeroes: WRITE_ZEROES
    /// when the server can, else writes of zeroes.
    pub(crate) fn start_zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.loan.wrote = true;
        let can_zero = self.conn().can_zero().unwrap_or(false);
        zero_requests(can_zero, offset, len).try_for_each(|r| self.start_zero_request(r))
    }

    /// Starts a flush; start it only once the writes it must cover have
    /// retired. Once it retired, call [`ExportConn::flushed`].
    pub(crate) fn start_flush(&mut self) -> Result<()> {
        self.loan.start_flush();
        self.with(|p| p.queue_flush())
    }

    /// Retires the oldest started request once complete (see
    /// [`nbd::Pipeline::poll_oldest`]): the last request of a read gives
    /// back its buffer, a write or zero the bytes it covered.
    pub(crate) fn poll_oldest(&mut self, cx: &mut Context<'_>) -> Poll<Result<nbd::Retired>> {
        match self.pipe.poll_oldest(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => Poll::Ready(r.map_err(|e| self.loan.error(e))),
        }
    }

    /// Marks the storage flushed up to what the flush started by
    /// [`ExportConn::start_flush`] covers (it retired).
    pub(crate) fn flushed(&self) {
        self.loan.flushed();
    }

    /// The connection is closed when the request ends, not pooled: an
    /// error left it in an unknown state.
    pub(crate) fn discard(&mut self) {
        self.pipe.set_home(None);
    }

    /// Waits until no command is in flight, handing each that retires to
    /// `retired`; returns the first error. A fatal error (the connection
    /// died or timed out) ends the wait: nothing more can retire then. A
    /// request that stops early calls it before it gives back what it
    /// holds, so that nothing it started outlives it.
    pub(crate) async fn settle(&mut self, retired: impl FnMut(nbd::Retired)) -> Result<()> {
        let mut first = Ok(());
        let loan = &mut self.loan;
        self.pipe
            .settle(retired, |e| {
                let e = loan.error(e);
                if first.is_ok() {
                    first = Err(e);
                }
            })
            .await;
        first
    }

    /// Retires commands until at most `most` are in flight; on an error,
    /// waits for all of them (see [`ExportConn::settle`]) and returns it.
    async fn retire_to(&mut self, most: usize) -> Result<()> {
        while self.queued() > most {
            if let Err(e) = poll_fn(|cx| self.poll_oldest(cx)).await {
                let _ = self.settle(|_| ()).await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Starts `r`; on an error, waits for what is in flight and returns it.
    async fn start_or_settle(&mut self, r: Result<()>) -> Result<()> {
        if r.is_err() {
            let _ = self.settle(|_| ()).await;
        }
        r
    }

    /// Reads `len` bytes at `offset` into the start of `buf`, which comes
    /// back filled.
    pub(crate) async fn read_at(
        &mut self,
        buf: Vec<u8>,
        len: usize,
        offset: u64,
    ) -> Result<Vec<u8>> {
        let started = self.start_read(buf, len, offset);
        self.start_or_settle(started).await?;
        loop {
            match poll_fn(|cx| self.poll_oldest(cx)).await {
                Ok(nbd::Retired::Read(buf, _)) => return Ok(buf),
                // An earlier part of the read.
                Ok(nbd::Retired::Done(_)) => {}
                Err(e) => {
                    let _ = self.settle(|_| ()).await;
                    return Err(e);
                }
            }
        }
    }

    /// Makes `len` bytes at `offset` read as zeroes: WRITE_ZEROES when the
    /// server can, else writes of zeroes, [`ZERO_WRITES`] at a time.
    pub(crate) async fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.loan.wrote = true;
        let can_zero = self.conn().can_zero().unwrap_or(false);
        for r in zero_requests(can_zero, offset, len) {
            let started = self.start_zero_request(r);
            self.start_or_settle(started).await?;
            self.retire_to(ZERO_WRITES - 1).await?;
        }
        self.retire_to(0).await
    }

    /// Flushes: covers the writes of this request and every write of the
    /// transfer that completed before (see the module documentation).
    pub(crate) async fn flush(&mut self) -> Result<()> {
        self.retire_to(0).await?;
        let started = self.start_flush();
        self.start_or_settle(started).await?;
        self.retire_to(0).await?;
        self.flushed();
        Ok(())
    }

    /// Block status of the whole image for `contexts`, at most `max` pairs.
    async fn block_status(
        &mut self,
        contexts: &[&str],
        max: usize,
    ) -> nbd::Result<Vec<Vec<(u64, u32)>>> {
        let size = self.size();
        self.pipe.block_status(0, size, contexts, max).await
    }

    fn allocation_available(&self) -> bool {
        self.conn()
            .can_meta_context(nbd::CONTEXT_BASE_ALLOCATION)
            .unwrap_or(false)
    }

    pub(crate) async fn allocation_extents(&mut self) -> Result<Vec<Extent>> {
        let size = self.size();
        if size == 0 {
            return Ok(Vec::new());
        }
        if !self.allocation_available() {
            return Ok(extents::whole(size, false));
        }
        let depth = self
            .conn()
            .can_meta_context(nbd::CONTEXT_ALLOCATION_DEPTH)
            .unwrap_or(false);
        if depth {
            let contexts = [nbd::CONTEXT_BASE_ALLOCATION, nbd::CONTEXT_ALLOCATION_DEPTH];
            let lists = self.block_status(&contexts, nbd::MAX_EXTENTS).await;
            let lists = lists.map_err(|e| self.loan.error(e))?;
            return Ok(extents::from_allocation(&lists[0], Some(&lists[1]), size));
        }
        let lists = self
            .block_status(&[nbd::CONTEXT_BASE_ALLOCATION], nbd::MAX_EXTENTS)
            .await;
        let lists = lists.map_err(|e| self.loan.error(e))?;
        Ok(extents::from_allocation(&lists[0], None, size))
    }

    /// Extents whose `zero` flag means the range reads as zeroes (see
    /// [`extents::reads_as_zero`]); one data extent without `base:allocation`,
    /// or when the image has more than [`CHECKSUM_MAX_EXTENTS`] (a checksum
    /// then reads every block: slower, the same result, bounded memory).
    pub(crate) async fn reads_as_zero_extents(&mut self) -> Result<Vec<Extent>> {
        let size = self.size();
        if size == 0 {
            return Ok(Vec::new());
        }
        if !self.allocation_available() {
            return Ok(extents::whole(size, false));
        }
        let lists = match self
            .block_status(&[nbd::CONTEXT_BASE_ALLOCATION], CHECKSUM_MAX_EXTENTS)
            .await
        {
            // Too fragmented to hold its extents: every block is read.
            Err(e) if e.errno() == libc::E2BIG => {
                log::info!(
                    "image_id={}: {e}; checksum reads every block",
                    self.loan.storage.id()
                );
                return Ok(extents::whole(size, false));
            }
            r => r.map_err(|e| self.loan.error(e))?,
        };
        Ok(extents::reads_as_zero(&lists[0], size))
    }

    pub(crate) async fn dirty_extents(&mut self) -> Result<Option<Vec<DirtyExtent>>> {
        let Some(ctx) = self.bitmap_context.clone() else {
            return Ok(None);
        };
        if !self.conn().can_meta_context(&ctx).unwrap_or(false) {
            log::warn!(
                "dirty bitmap context {ctx:?} not negotiated image_id={}",
                self.loan.storage.id()
            );
            return Ok(None);
        }
        let size = self.size();
        if size == 0 {
            return Ok(Some(Vec::new()));
        }
        if !self.allocation_available() {
            let lists = self.block_status(&[ctx.as_str()], nbd::MAX_EXTENTS).await;
            let mut lists = lists.map_err(|e| self.loan.error(e))?;
            return Ok(Some(extents::merge_dirty(
                &extents::whole(size, false),
                &lists.remove(0),
                size,
            )));
        }
        let contexts = [nbd::CONTEXT_BASE_ALLOCATION, ctx.as_str()];
        let lists = self.block_status(&contexts, nbd::MAX_EXTENTS).await;
        let lists = lists.map_err(|e| self.loan.error(e))?;
        let alloc = extents::from_allocation(&lists[0], None, size);
        Ok(Some(extents::merge_dirty(&alloc, &lists[1], size)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_requests_zero_or_write_zeroes_in_pieces() {
        let step = ZEROES.len();
        let write = |off: u64, n: usize| ZeroRequest::Write(&ZEROES[..n], off);
        assert_eq!(zero_requests(false, 5, 0).count(), 0);
        assert_eq!(
            zero_requests(false, 7, 10).collect::<Vec<_>>(),
            vec![write(7, 10)]
        );
        assert_eq!(
            zero_requests(false, 100, 2 * step as u64 + 3).collect::<Vec<_>>(),
            vec![
                write(100, step),
                write(100 + step as u64, step),
                write(100 + 2 * step as u64, 3)
            ]
        );
        assert_eq!(
            zero_requests(true, 100, 5 << 30).collect::<Vec<_>>(),
            vec![ZeroRequest::Zero {
                offset: 100,
                len: 5 << 30
            }]
        );
    }
}
