//! The one NBD engine: commands of every kind queued on a connection and
//! retired oldest first from a tokio reactor, with one deadline and one
//! rule for a dead connection.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::future::{poll_fn, Future};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use libnbd_sys as sys;
use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::{Instant, Sleep};

use super::block_status::BlockStatus;
use super::connection::Connection;
use super::error::{Error, Result};
use super::MAX_ZERO;

/// Where a [`Pipeline`] sends its connection when it is dropped with no
/// command in flight (see [`Pipeline::set_home`]).
pub type Home = Box<dyn FnOnce(Connection) + Send>;

/// A command [`Pipeline::poll_oldest`] retired successfully.
#[derive(Debug)]
pub enum Retired {
    /// The last command of a read: its buffer, and how many bytes at its
    /// start were read.
    Read(Vec<u8>, usize),
    /// Any other command, with the bytes it wrote or zeroed (0 for a flush
    /// or an earlier part of a read).
    Done(u64),
}

/// What a queued command owns while libnbd may use it.
enum Owned {
    /// The buffer a read fills (its first `len` bytes).
    Read(Vec<u8>, usize),
    /// The bytes a write sends.
    Write(Bytes),
    /// Nothing: an earlier part of a read (the buffer is with the last
    /// part), or a flush.
    Nothing,
    /// Nothing, for a zero of this many bytes.
    Zero(u64),
}

/// A command in flight and what it owns.
struct Queued {
    cookie: u64,
    owned: Owned,
}

/// A [`Connection`] driven from a tokio reactor, with commands queued
/// ([`Pipeline::queue_read`], [`Pipeline::queue_write`],
/// [`Pipeline::queue_zero`], [`Pipeline::queue_flush`]) and retired oldest
/// first by [`Pipeline::poll_oldest`], which never blocks.
///
/// Every command of the server's requests goes through a pipeline: reads,
/// writes, zeroes, flushes and block status ([`Pipeline::block_status`]).
/// The pipeline owns the connection and gives it up only when no command is
/// in flight: to its [`Home`] when dropped (a pool), or
/// ([`Pipeline::into_connection`]) to the caller. Each queued command owns
/// the buffer libnbd reads into or writes from (a block status command: a
/// reference to its state, held by libnbd itself), kept until libnbd
/// retired the command or the handle is closed, so no caller can free a
/// buffer libnbd still uses.
///
/// Every reply must come within the connection's command timeout
/// ([`Connection::command_timeout`]) of the caller waiting for it, counted
/// from the last retired command or from when the caller started waiting in
/// [`Pipeline::poll_oldest`], whichever is later: time the caller spends
/// elsewhere with commands in flight (a GET reader waiting for its HTTP
/// client) does not count against the server. The first fatal error (a
/// timeout; or the server gone, reported as libnbd failed the oldest
/// command: ENOTCONN) poisons the connection and is returned by every later
/// call.
pub struct Pipeline {
    // `Drop` closes the connection (nbd_close: libnbd is done with every
    // buffer) or sends it home; the fields drop after that: the
    // registration (and the duplicate fd it owns), then the queue that owns
    // the buffers.
    /// Taken only by `Drop` (or `into_connection`, which is a drop).
    conn: ManuallyDrop<Connection>,
    /// The reactor's registration of our own duplicate of libnbd's socket.
    /// libnbd closes its fd itself when the connection dies; this one stays
    /// open, and the same, until the registration is dropped, so the
    /// reactor never watches a number the kernel may have reused.
    reactor: AsyncFd<OwnedFd>,
    /// Where the connection goes when the pipeline is dropped idle; `None`:
    /// it is closed.
    home: Option<Home>,
    /// Commands in flight, oldest first.
    queue: VecDeque<Queued>,
    /// The first fatal error.
    failed: Option<Error>,
    /// When the last command retired, or the caller started waiting: the
    /// next reply is due within the command timeout of it.
    progress: Instant,
    /// The last `poll_oldest` returned `Pending`: the caller is waiting.
    waiting: bool,
    /// Armed the first time `poll_oldest` waits; re-armed from `progress`
    /// only when it fires, so there is no timer work per command.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Pipeline {
    /// Takes `conn` and registers (a duplicate of) its socket with the tokio
    /// reactor of the calling thread, which polls it from then on. Must be
    /// called inside a tokio runtime (else an error). On error the
    /// connection is closed.
    pub fn new(conn: Connection) -> Result<Pipeline> {
        conn.check_alive()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::new(
                libc::EINVAL,
                "no tokio runtime to poll NBD from",
            ));
        }
        // SAFETY: valid handle; only reads state.
        let fd = unsafe { sys::nbd_aio_get_fd(conn.h()) };
        if fd < 0 {
            return Err(conn.last_error());
        }
        // SAFETY: `fd` is libnbd's open socket of this live handle (checked
        // above), and it stays open while it is borrowed here: we own `conn`,
        // so no libnbd call on it can run and close it meanwhile.
        let libnbds = unsafe { BorrowedFd::borrow_raw(fd) };
        // F_DUPFD_CLOEXEC: a new descriptor for the same socket, ours alone.
        let own = libnbds.try_clone_to_owned().map_err(Error::os)?;
        // SAFETY: `own` is a descriptor that only this AsyncFd owns: it stays
        // open, and refers to the same socket, until the AsyncFd is dropped
        // (OwnedFd closes it only on drop, after tokio deregistered it), and
        // its as_raw_fd never changes. libnbd closing its own fd does not
        // close this one.
        let reactor = unsafe {
            AsyncFd::register_with_interest(own, Interest::READABLE | Interest::WRITABLE)
        }
        .map_err(|e| Error::os(e.into_parts().1))?;
        Ok(Pipeline {
            conn: ManuallyDrop::new(conn),
            reactor,
            home: None,
            queue: VecDeque::new(),
            failed: None,
            progress: Instant::now(),
            waiting: false,
            deadline: None,
        })
    }

    /// The connection, for what does not drive it (size, flags).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Commands queued and not yet retired by [`Pipeline::poll_oldest`].
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Where the connection goes when the pipeline is dropped with no
    /// command in flight (`None`: it is closed, the default). A connection
    /// whose pipeline failed fatally goes there dead: `home` decides.
    pub fn set_home(&mut self, home: Option<Home>) {
        self.home = home;
    }

    /// Ends the registration and gives the connection back, once no
    /// command is in flight; else the pipeline is returned unchanged. A
    /// connection whose pipeline failed fatally comes back dead.
    pub fn into_connection(mut self) -> std::result::Result<Connection, Box<Pipeline>> {
        if !self.queue.is_empty() {
            return Err(Box::new(self));
        }
        let slot = Arc::new(Mutex::new(None));
        let home = slot.clone();
        self.home = Some(Box::new(move |c| *home.lock() = Some(c)));
        drop(self);
        // Filled by `Drop` (the queue was empty), so never `None`.
        let conn = slot.lock().take();
        match conn {
            Some(conn) => Ok(conn),
            None => unreachable!("an idle pipeline sends its connection home"),
        }
    }

    /// The sticky fatal error, if any.
    fn usable(&self) -> Result<()> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Passes `e` on; a fatal one poisons the connection and is kept for
    /// every later call.
    fn note(&mut self, e: Error) -> Error {
        if e.is_fatal() && self.failed.is_none() {
            self.conn.poison();
            self.failed = Some(e.clone());
        }
        e
    }

    /// Queues a read of `len` bytes at `offset` into the start of `buf`, as
    /// commands of at most `piece` bytes (and of what the server accepts);
    /// the filled buffer comes back from [`Pipeline::poll_oldest`] when the
    /// last of them retires. `len` must not exceed `buf.len()`; for `len ==
    /// 0` nothing is queued. On error nothing more is queued; commands
    /// already queued keep the buffer.
    pub fn queue_read(
        &mut self,
        mut buf: Vec<u8>,
        len: usize,
        offset: u64,
        piece: usize,
    ) -> Result<()> {
        self.usable()?;
        if len > buf.len() {
            return Err(Error::new(
                libc::EINVAL,
                format!("read of {len} bytes into a buffer of {}", buf.len()),
            ));
        }
        let before = self.queue.len();
        let base = buf.as_mut_ptr();
        let step = self.conn.request_step(piece);
        let queue = &mut self.queue;
        let r = self.conn.start_chunks(
            offset,
            len as u64,
            step,
            |h, pos, n, off| {
                // SAFETY: valid handle; pos + n <= len <= buf.len(), so the n
                // bytes at base + pos lie inside `buf`'s initialised heap
                // block. The Vec is moved into the queue below without
                // touching that block, into the entry of the last command
                // that points into it (the queue retires in order), and
                // stays there until libnbd retired them all or the handle is
                // closed: libnbd never writes into freed memory.
                unsafe {
                    sys::nbd_aio_pread(
                        h,
                        base.add(pos as usize) as *mut c_void,
                        n as usize,
                        off,
                        sys::nbd_completion_callback::default(),
                        0,
                    )
                }
            },
            |cookie, _, _| {
                queue.push_back(Queued {
                    cookie,
                    owned: Owned::Nothing,
                })
            },
        );
        if self.queue.len() > before {
            if let Some(last) = self.queue.back_mut() {
                last.owned = Owned::Read(buf, len);
            }
        }
        r.map_err(|e| self.note(e))
    }

    /// Queues a write of `data` at `offset` as commands of at most `piece`
    /// bytes (and of what the server accepts). The bytes are kept until the
    /// commands retire.
    pub fn queue_write(&mut self, data: Bytes, offset: u64, piece: usize) -> Result<()> {
        self.usable()?;
        let base = data.as_ptr();
        let step = self.conn.request_step(piece);
        let queue = &mut self.queue;
        let r = self.conn.start_chunks(
            offset,
            data.len() as u64,
            step,
            |h, pos, n, off| {
                // SAFETY: valid handle; pos + n <= data.len(), so the n bytes
                // at base + pos lie inside `data`. `started` (below) keeps a
                // slice of exactly those bytes in the queue, which holds it
                // alive and unchanged (Bytes is immutable) until libnbd
                // retired the command or the handle is closed. libnbd only
                // reads them.
                unsafe {
                    sys::nbd_aio_pwrite(
                        h,
                        base.add(pos as usize) as *const c_void,
                        n as usize,
                        off,
                        sys::nbd_completion_callback::default(),
                        0,
                    )
                }
            },
            |cookie, pos, n| {
                queue.push_back(Queued {
                    cookie,
                    owned: Owned::Write(data.slice(pos as usize..(pos + n) as usize)),
                })
            },
        );
        r.map_err(|e| self.note(e))
    }

    /// Queues NBD WRITE_ZEROES of `len` bytes at `offset`, split into
    /// commands the protocol can carry. The server must be able to zero
    /// ([`Connection::can_zero`]).
    pub fn queue_zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.usable()?;
        let queue = &mut self.queue;
        let r = self.conn.start_chunks(
            offset,
            len,
            MAX_ZERO,
            |h, _, n, off| {
                // SAFETY: valid handle; plain integers, no buffer.
                unsafe { sys::nbd_aio_zero(h, n, off, sys::nbd_completion_callback::default(), 0) }
            },
            |cookie, _, n| {
                queue.push_back(Queued {
                    cookie,
                    owned: Owned::Zero(n),
                })
            },
        );
        r.map_err(|e| self.note(e))
    }

    /// Queues NBD FLUSH: once it retires, every write that retired before
    /// it was queued is durable.
    pub fn queue_flush(&mut self) -> Result<()> {
        self.usable()?;
        if let Err(e) = self.conn.check_alive() {
            return Err(self.note(e));
        }
        // SAFETY: valid handle; no buffer.
        let cookie = unsafe {
            sys::nbd_aio_flush(self.conn.h(), sys::nbd_completion_callback::default(), 0)
        };
        if cookie < 0 {
            let e = self.conn.last_error();
            return Err(self.note(e));
        }
        self.queue.push_back(Queued {
            cookie: cookie as u64,
            owned: Owned::Nothing,
        });
        Ok(())
    }

    /// Queues one NBD BLOCK_STATUS command of `count` bytes at `from` for
    /// `query`, which records the reply (see [`Pipeline::block_status`]).
    fn queue_block_status(&mut self, query: &BlockStatus, from: u64, count: u64) -> Result<()> {
        self.usable()?;
        if let Err(e) = self.conn.check_alive() {
            return Err(self.note(e));
        }
        match query.start(&self.conn, from, count) {
            Ok(cookie) => {
                self.queue.push_back(Queued {
                    cookie,
                    owned: Owned::Nothing,
                });
                Ok(())
            }
            Err(e) => Err(self.note(e)),
        }
    }

    /// Block status of `offset..offset+len` for each of `contexts` (which
    /// must have been negotiated): one list per context, in the order given,
    /// of `(length, flags)` pairs as the server reports them, back to back
    /// from `offset`, covering the range exactly. Touching pairs may have
    /// equal flags (replies are not merged here; see `crate::extents`).
    /// Queries in steps of up to 4 GiB, one at a time, and continues from
    /// wherever the server's replies stop; each reply is due within the
    /// command timeout, like any command's. Fails with `E2BIG` once the
    /// lists hold more than `max` pairs together (memory: at most that
    /// many, 16 bytes each, plus one reply: qemu-nbd sends at most 131,072
    /// pairs per context a reply). Call it with no command queued. Dropped
    /// before it returns, its command stays queued (and its state alive)
    /// until retired.
    pub async fn block_status(
        &mut self,
        offset: u64,
        len: u64,
        contexts: &[&str],
        max: usize,
    ) -> Result<Vec<Vec<(u64, u32)>>> {
        self.usable()?;
        if !self.queue.is_empty() {
            return Err(Error::new(
                libc::EINVAL,
                "block status is asked with other NBD commands queued",
            ));
        }
        let mut query = BlockStatus::new(&self.conn, offset, len, contexts, max)?;
        while let Some((from, count)) = query.next()? {
            self.queue_block_status(&query, from, count)?;
            poll_fn(|cx| self.poll_oldest(cx)).await?;
        }
        Ok(query.finish())
    }

    /// Waits until no command is queued, handing each that retires to
    /// `retired` and each error to `failed`. Stops early only when an error
    /// leaves the queue as it was (the connection died or timed out):
    /// nothing more can retire then.
    pub async fn settle(
        &mut self,
        mut retired: impl FnMut(Retired),
        mut failed: impl FnMut(Error),
    ) {
        while self.queued() > 0 {
            let before = self.queued();
            match poll_fn(|cx| self.poll_oldest(cx)).await {
                Ok(done) => retired(done),
                Err(e) => {
                    failed(e);
                    if self.queued() >= before {
                        break;
                    }
                }
            }
        }
    }

    /// Retires the oldest queued command once it has completed, driving
    /// libnbd's non-blocking state machine whenever its socket is ready;
    /// never blocks. The last command of a read gives back the filled
    /// buffer; see [`Retired`]. A command the server failed is a
    /// recoverable error (and is retired). When the connection dies, or no
    /// reply comes within the command timeout, the error is fatal: the
    /// commands stay queued (their buffers are freed with the pipeline) and
    /// every later call fails the same way.
    pub fn poll_oldest(&mut self, cx: &mut Context<'_>) -> Poll<Result<Retired>> {
        if !self.waiting {
            // The caller starts waiting: the time since it last did (the
            // server may have been waiting for it) is not the server's.
            self.progress = Instant::now();
        }
        let r = self.retire_oldest(cx);
        self.waiting = r.is_pending();
        r
    }

    /// [`Pipeline::poll_oldest`], but for the start of the wait.
    fn retire_oldest(&mut self, cx: &mut Context<'_>) -> Poll<Result<Retired>> {
        if let Err(e) = self.usable() {
            return Poll::Ready(Err(e));
        }
        let Some(cookie) = self.queue.front().map(|q| q.cookie) else {
            return Poll::Ready(Err(Error::new(libc::EINVAL, "no NBD command queued")));
        };
        loop {
            // SAFETY: valid handle; the cookie came from this handle and has
            // not been retired (it is still in the queue).
            let rc = unsafe { sys::nbd_aio_command_completed(self.conn.h(), cookie) };
            if rc != 0 {
                // Retired (successfully or not): libnbd no longer uses the
                // buffer, so it may leave the queue.
                let err = (rc < 0).then(|| self.conn.last_error());
                let q = self.queue.pop_front();
                self.progress = Instant::now();
                if let Some(e) = err {
                    return Poll::Ready(Err(self.note(e)));
                }
                return Poll::Ready(Ok(match q.map(|q| q.owned) {
                    Some(Owned::Read(buf, len)) => Retired::Read(buf, len),
                    Some(Owned::Write(data)) => Retired::Done(data.len() as u64),
                    Some(Owned::Zero(n)) => Retired::Done(n),
                    Some(Owned::Nothing) | None => Retired::Done(0),
                }));
            }
            if self.conn.is_dead() {
                let e = Error::fatal(
                    libc::ENOTCONN,
                    "NBD connection died with requests in flight",
                );
                return Poll::Ready(Err(self.note(e)));
            }
            // SAFETY: valid handle; only reads state.
            let dir = unsafe { sys::nbd_aio_get_direction(self.conn.h()) };
            let want_write = dir & sys::LIBNBD_AIO_DIRECTION_WRITE != 0;
            let want_read = dir & sys::LIBNBD_AIO_DIRECTION_READ != 0;
            let mut ready = None;
            if want_write {
                match self.reactor.poll_write_ready(cx) {
                    Poll::Ready(Ok(g)) => ready = Some((g, true)),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(self.note(Error::os(e)))),
                    Poll::Pending => {}
                }
            }
            if ready.is_none() && want_read {
                match self.reactor.poll_read_ready(cx) {
                    Poll::Ready(Ok(g)) => ready = Some((g, false)),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(self.note(Error::os(e)))),
                    Poll::Pending => {}
                }
            }
            let Some((mut guard, write)) = ready else {
                if !want_read && !want_write {
                    let e = Error::fatal(
                        libc::EIO,
                        "NBD connection waits for nothing with a command in flight",
                    );
                    return Poll::Ready(Err(self.note(e)));
                }
                return match self.poll_deadline(cx) {
                    Ok(()) => Poll::Pending,
                    Err(e) => Poll::Ready(Err(self.note(e))),
                };
            };
            // SAFETY: valid handle; libnbd does non-blocking I/O on its own
            // socket and writes only into buffers the queue owns.
            let rc = unsafe {
                if write {
                    sys::nbd_aio_notify_write(self.conn.h())
                } else {
                    sys::nbd_aio_notify_read(self.conn.h())
                }
            };
            if let Err(e) = self.conn.check(rc) {
                if self.conn.is_dead() {
                    // The server went away: libnbd has failed the commands
                    // in flight (ENOTCONN); retiring the oldest reports that.
                    continue;
                }
                return Poll::Ready(Err(self.note(e)));
            }
            // libnbd may stop before the socket would block (e.g. after a
            // whole reply), and the reactor's readiness is edge-triggered:
            // forget readiness only when the socket really is not ready.
            if !socket_ready(guard.get_inner(), write) {
                guard.clear_ready();
            }
        }
    }

    /// Before `poll_oldest` waits: arms the deadline (so this task is woken
    /// when it passes), and fails with a timeout once the command timeout
    /// passed since the last progress.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Result<()> {
        let Some(timeout) = self.conn.command_timeout() else {
            return Ok(());
        };
        let Some(due) = self.progress.checked_add(timeout) else {
            return Ok(());
        };
        let sleep = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        // The timer may have been armed from an earlier `progress`: it then
        // fires early, and is re-armed to the real deadline.
        while sleep.as_mut().poll(cx).is_ready() {
            if Instant::now() >= due {
                return Err(Error::timed_out(timeout.as_secs_f64()));
            }
            sleep.as_mut().reset(due);
        }
        Ok(())
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // SAFETY: `conn` is taken exactly once: here, where the pipeline
        // ends (`Drop` runs once, and `into_connection` drops the pipeline
        // too). Nothing reads it afterwards: the fields' own drops that
        // follow do not touch a `ManuallyDrop`.
        let conn = unsafe { ManuallyDrop::take(&mut self.conn) };
        match self.home.take() {
            // Idle: libnbd holds no buffer of ours.
            Some(home) if self.queue.is_empty() => home(conn),
            // nbd_close, before the queue (a field, dropped after this)
            // frees the buffers of the commands still in flight.
            _ => drop(conn),
        }
    }
}

/// Whether `fd` is readable (or writable) right now: a zero-timeout poll.
fn socket_ready(fd: &OwnedFd, write: bool) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: if write { libc::POLLOUT } else { libc::POLLIN },
        revents: 0,
    };
    // SAFETY: one valid pollfd on a descriptor we own (open while borrowed),
    // zero timeout.
    unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
}
