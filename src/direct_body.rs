//! Bodies moved between the socket and our buffers without actix-http's
//! copies: GET response bodies written as they are, and long PUT bodies
//! read straight into the buffers they are written to storage from.
//!
//! # Responses
//!
//! actix-http's HTTP/1 dispatcher encodes every body chunk into its write
//! buffer before writing that buffer to the stream: `TransferEncoding::encode`
//! (actix-http 3.20.0, `src/h1/encoder.rs:450-491`) does
//! `buf.extend_from_slice(msg)` for every kind of framing, called from the
//! dispatcher's `SendPayload` state (`src/h1/dispatcher.rs:686-690`); the
//! buffer is then written by `poll_flush` (`dispatcher.rs:361-409`). There
//! is no body type or setting that skips it (`h1_write_buffer_size` only
//! changes how much is gathered). For a download that is a memmove of every
//! byte: 9-11 % of the server's CPU.
//!
//! So a GET's body goes around it, on the same connection, in two pieces:
//!
//! - [`DirectIo`] wraps the connection's stream (outside [`HeadDeadline`]:
//!   see `server.rs`) and holds an [`Outbox`] of at most one chunk. Its
//!   `poll_flush` writes that chunk to the stream before flushing.
//! - [`DirectBody`] is the response body: instead of yielding a chunk to
//!   actix, it puts it into the outbox and yields nothing; it takes the next
//!   only once the outbox is empty, and ends only then.
//!
//! Why the bytes come out in order, and the connection stays usable:
//!
//! - actix calls the stream's `poll_flush` only after everything in its
//!   write buffer has been written (`dispatcher.rs:381-408`), and its loop
//!   calls `poll_flush` right after polling a body that is pending
//!   (`dispatcher.rs:1390-1437`). The response head is encoded before the
//!   body is first polled, so it is written before the first chunk.
//! - While a body is being sent (`SendPayload`) actix writes nothing else
//!   (`100 Continue` is written before the service is called,
//!   `dispatcher.rs:798-806`); the next response is encoded only after the
//!   body ended, and the body ends only once the outbox is empty. A write
//!   that would overtake a chunk already partly written fails the
//!   connection instead (it cannot happen with this actix-http).
//! - The body reports [`BodySize::Stream`] and the response carries its own
//!   `Content-Length` with chunking off (`HttpResponseBuilder::no_chunking`):
//!   actix then frames it with its `Eof` encoding, which counts nothing and
//!   writes the header as given (`encoder.rs:97-113, 376-387`). The body
//!   counts instead: more or fewer bytes than promised is an error, and
//!   actix closes the connection, never reusing it mid-body.
//! - Keep-alive, timers and the head deadline see an ordinary streaming
//!   response: actix stays in `SendPayload` until the body ends.
//!
//! Over TLS the stream is the TLS stream: the chunk goes into rustls (which
//! must copy to encrypt) without the extra copy in between.
//!
//! # Request bodies
//!
//! actix reads the stream into its own buffer, at most 128 KiB at a time
//! (`MAX_BUFFER_SIZE`, `h1/decoder.rs:14`, `dispatcher.rs:1205`), and hands
//! a body out as views of that buffer, which the writer then copies into
//! the 512 KiB chunks an NBD write takes (one contiguous buffer each): a
//! memmove of every byte and three times the receive calls of a reader that
//! fills its chunk directly (measured: 19-22 % of a four-stream upload's
//! server CPU in that copy, 8,192 receives per GiB against 2,700).
//!
//! So the rest of a long body (framed by its Content-Length alone) is read
//! by [`DirectIo`] straight into the chunk being filled, and actix gets as
//! many zero bytes in its place ("placeholders", which the body reader counts
//! and drops), so its framing, keep-alive and pipelining stay exactly as
//! they would have been. The only delicate point is where the switch
//! happens: the stream's next byte must be the body byte right after the
//! last one the body reader got from actix. The [`Inbox`] makes sure of it:
//!
//! 1. The body reader arms it (`Armed`) and keeps taking actix's payload.
//! 2. actix's next read from the stream is the probe: it reads normally but
//!    leaves actix's buffer `PROBE_SPARE` bytes of room, and the inbox notes
//!    the address where the read ended in that buffer (`Probed`). Every
//!    later read by actix waits.
//! 3. actix decodes what it read into payload pieces, views of its buffer
//!    that do not move (`decoder.rs:569-572`, `split`/`split_to`; with that
//!    room left actix does not compact the buffer before its next read,
//!    `dispatcher.rs:1238-1241`). When the body reader takes the piece that
//!    ends at the probe's address, it holds every byte actix read from the
//!    stream: no other live piece can end there, since nothing was read
//!    after the probe. It then gives the inbox the chunk being filled and
//!    the count of body bytes left (`Direct`).
//! 4. Each read actix then makes fills the chunk from the stream (as much as
//!    the chunk has room for and the body has left) and gives actix the
//!    placeholders; a full chunk waits for the body reader to take it and
//!    give the next. Once the body's last byte is read, actix reads the
//!    stream itself again (a pipelined next request).
//!
//! Nothing depends on timing: if actix ever moved its buffer or read
//! differently, the probe would not be found and the body reader gives up
//! after `PROBE_WAIT` and leaves the body to actix (logged). A body reader
//! that stops (an error, the request dropped) releases the inbox the same
//! way; actix then gets its placeholders and reads the rest of the body
//! itself. A client that closes the stream mid-body gives actix the end of
//! the stream, as it would have; a stall shows as placeholders that stop
//! coming (the body timeout).
//!
//! [`HeadDeadline`]: crate::head_timeout::HeadDeadline

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use actix_http::body::{BodySize, MessageBody};
use bytes::{Buf, BufMut, Bytes};
use futures_util::Stream;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The most a direct read waits for (`SO_RCVLOWAT`): the worker wakes once
/// per this many body bytes instead of once per segment or two.
const LOW_WATER: usize = 256 * 1024;

/// The receive low-water mark a connection's direct reads want while they
/// wait (`SO_RCVLOWAT`): shared by its [`DirectIo`], which says what it
/// wants before each read, and the [`LowWaterStream`] at the bottom of the
/// stream, which sets it on the socket when a read would block. One worker
/// thread.
#[derive(Clone)]
pub(crate) struct LowWater(Rc<Cell<usize>>);

impl Default for LowWater {
    /// The kernel's default mark: 1.
    fn default() -> Self {
        LowWater(Rc::new(Cell::new(1)))
    }
}

impl LowWater {
    /// The mark to set if the next read would block (at least 1).
    fn want(&self, bytes: usize) {
        self.0.set(bytes.max(1));
    }
}

/// A TCP stream whose receive low-water mark follows its connection's
/// [`LowWater`]. The mark matters only while a reader waits (a
/// non-blocking receive returns what is queued whatever the mark), so it is
/// set when a read would block, and only when it changes: a direct read
/// that waits then wakes once per up to [`LOW_WATER`] bytes; actix's reads
/// want 1 again. A socket that refuses the mark keeps the kernel's default.
pub(crate) struct LowWaterStream<T> {
    io: T,
    mark: LowWater,
    /// The mark the socket has.
    set: usize,
    refused: bool,
}

impl<T> LowWaterStream<T> {
    pub(crate) fn new(io: T, mark: LowWater) -> Self {
        LowWaterStream {
            io,
            mark,
            set: 1,
            refused: false,
        }
    }
}

impl<T: AsyncRead + AsFd + Unpin> AsyncRead for LowWaterStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        let want = this.mark.0.get();
        if r.is_pending() && want != this.set && !this.refused {
            // Lowering it signals the bytes already queued (tcp(7)); raising
            // it after data arrived below it was signalled already: either
            // way the waker registered above is woken when it should be.
            match crate::sys::set_recv_lowat(this.io.as_fd(), want) {
                Ok(()) => this.set = want,
                Err(e) => {
                    log::debug!("SO_RCVLOWAT: {e}");
                    this.refused = true;
                }
            }
        }
        r
    }
}

write_through!(LowWaterStream, io);

/// The chunk a connection is to write before anything else, and whether its
/// first byte went out yet. Shared by the connection's stream and the body
/// being sent on it (one worker thread).
#[derive(Debug, Clone, Default)]
pub(crate) struct Outbox(Rc<RefCell<Pending>>);

#[derive(Debug, Default)]
struct Pending {
    chunk: Bytes,
    started: bool,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.0.borrow().chunk.is_empty()
    }

    fn put(&self, chunk: Bytes) {
        let mut p = self.0.borrow_mut();
        debug_assert!(p.chunk.is_empty());
        p.chunk = chunk;
        p.started = false;
    }
}

/// Room the probe read leaves in actix's read buffer: actix-http makes room
/// (moving what its buffer holds to the front) before a read when less than
/// its `LW_BUFFER_SIZE` is left (`h1/dispatcher.rs:39, 1238-1241`).
const PROBE_SPARE: usize = 1024;

/// A connection's request body read from the stream straight into the
/// buffers it is written to storage from, instead of into actix's read
/// buffer and copied from there (see the module docs for why and how).
/// Shared by the connection's stream and the body reader (one worker
/// thread).
#[derive(Debug, Clone, Default)]
pub(crate) struct Inbox(Rc<RefCell<Intake>>);

#[derive(Debug, Default)]
struct Intake {
    mode: Mode,
    /// Body bytes read into a chunk that actix has not yet been given
    /// placeholders for.
    owed: usize,
    /// actix's read waiting in `Probed` or for a chunk.
    waker: Option<Waker>,
}

#[derive(Debug, Default)]
enum Mode {
    /// actix reads the stream.
    #[default]
    Off,
    /// The body reader wants to take over: actix's next read is the probe.
    Armed,
    /// The probe read ended at this address of actix's read buffer. actix
    /// reads nothing more until the body reader has taken the piece that
    /// ends there (so it has every body byte actix read) or gave up.
    Probed(usize),
    /// Body bytes go into `buf` (up to `want` bytes), `budget` more in all;
    /// actix gets as many zero bytes in their place. Once `budget` is 0
    /// actix reads the stream again.
    Direct {
        buf: Option<Vec<u8>>,
        want: usize,
        budget: u64,
    },
}

impl Intake {
    /// Gives actix placeholders for what was read directly.
    fn pay(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.owed.min(buf.remaining());
        buf.initialize_unfilled_to(n);
        buf.advance(n);
        self.owed -= n;
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

impl Inbox {
    /// Asks for the rest of the current request's body (see the module docs):
    /// false if the stream is not free for it.
    pub(crate) fn arm(&self) -> bool {
        let mut s = self.0.borrow_mut();
        if !matches!(s.mode, Mode::Off) || s.owed > 0 {
            return false;
        }
        s.mode = Mode::Armed;
        true
    }

    /// Whether a piece of the body that ends at `end` (an address in
    /// actix's read buffer) ends where the probe read did: then the body
    /// reader has every byte actix read.
    pub(crate) fn is_probe_end(&self, end: usize) -> bool {
        matches!(self.0.borrow().mode, Mode::Probed(e) if e == end)
    }

    /// After the probe was found: the next `budget` bytes of the stream
    /// are the rest of the body, to be read into `buf` up to `want` bytes.
    pub(crate) fn start(&self, buf: Vec<u8>, want: usize, budget: u64) {
        let mut s = self.0.borrow_mut();
        debug_assert!(matches!(s.mode, Mode::Probed(_)));
        s.mode = Mode::Direct {
            buf: Some(buf),
            want,
            budget,
        };
        s.wake();
    }

    /// The chunk being read into, once full.
    pub(crate) fn take_full(&self) -> Option<Vec<u8>> {
        let mut s = self.0.borrow_mut();
        match &mut s.mode {
            Mode::Direct { buf, want, .. } if buf.as_ref().is_some_and(|b| b.len() == *want) => {
                buf.take()
            }
            _ => None,
        }
    }

    /// How full the chunk being read into is (`None`: none given).
    pub(crate) fn filled(&self) -> Option<usize> {
        match &self.0.borrow().mode {
            Mode::Direct { buf: Some(b), .. } => Some(b.len()),
            _ => None,
        }
    }

    /// The next chunk to read into, after [`Inbox::take_full`].
    pub(crate) fn give(&self, chunk: Vec<u8>, size: usize) {
        let mut s = self.0.borrow_mut();
        if let Mode::Direct { buf, want, .. } = &mut s.mode {
            *buf = Some(chunk);
            *want = size;
            s.wake();
        }
    }

    /// The body reader is done or gone: actix reads the stream again, after
    /// the placeholders it is owed. A chunk being read into is dropped.
    pub(crate) fn release(&self) {
        let mut s = self.0.borrow_mut();
        s.mode = Mode::Off;
        s.wake();
    }
}

/// Ends a connection from any thread (a GET's reader that gave up on its
/// client): from then on the connection's stream fails every read and
/// write, so actix drops the connection, and with it every buffer it holds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Abort(Arc<AbortState>);

#[derive(Debug, Default)]
struct AbortState {
    aborted: AtomicBool,
    /// Why the connection ends, once it does.
    reason: Mutex<String>,
    /// The connection's task, while its stream waits.
    waker: Mutex<Option<Waker>>,
}

impl Abort {
    /// Ends the connection (at once if its task is waiting on the socket).
    pub(crate) fn abort(&self, reason: String) {
        *self.0.reason.lock() = reason;
        self.0.aborted.store(true, Ordering::Release);
        if let Some(w) = self.0.waker.lock().take() {
            w.wake();
        }
    }

    /// The error that ends the connection, once aborted.
    fn check(&self) -> io::Result<()> {
        if !self.0.aborted.load(Ordering::Acquire) {
            return Ok(());
        }
        let reason = self.0.reason.lock().clone();
        log::debug!("closing a connection: {reason}");
        Err(io::Error::new(io::ErrorKind::TimedOut, reason))
    }

    /// The stream is about to return `Pending`: leaves the task's waker,
    /// so that an abort wakes it; fails if the abort came first.
    fn wait(&self, cx: &mut Context<'_>) -> io::Result<()> {
        *self.0.waker.lock() = Some(cx.waker().clone());
        self.check()
    }
}

/// How long actix's own writes (response heads, small bodies) may wait for
/// a client that takes no data. A GET body in the outbox is not timed here:
/// its reader gives up on the client and aborts the connection (see
/// [`Abort`]), with its own log line.
#[derive(Debug)]
struct WriteDeadline {
    limit: Duration,
    /// Allocated at the first wait and reset for each later one.
    timer: Option<Pin<Box<Sleep>>>,
    /// The timer runs for the current wait: no byte went out since it was
    /// armed.
    armed: bool,
}

impl WriteDeadline {
    fn progressed(&mut self) {
        self.armed = false;
    }

    /// A write waits for the client: arms the deadline for this wait (so
    /// that the task is woken when it passes), or fails once it passed.
    fn waiting(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.armed {
            let deadline = Instant::now() + self.limit;
            match &mut self.timer {
                Some(t) => t.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed = true;
        }
        let passed = self
            .timer
            .as_mut()
            .is_some_and(|t| t.as_mut().poll(cx).is_ready());
        if passed {
            let e = format!("the client took no data for {} s", self.limit.as_secs());
            log::info!("closing a connection: {e}");
            return Err(io::Error::new(io::ErrorKind::TimedOut, e));
        }
        Ok(())
    }
}

/// A connection's stream that writes its [`Outbox`] when flushed.
pub(crate) struct DirectIo<T> {
    io: T,
    outbox: Outbox,
    inbox: Inbox,
    abort: Abort,
    write_deadline: Option<WriteDeadline>,
    /// The receive low-water mark its reads want while they wait (set on
    /// the socket by a [`LowWaterStream`] under it, plain TCP only): up to
    /// [`LOW_WATER`] for a direct read, 1 for actix's.
    low_water: LowWater,
}

impl<T> DirectIo<T> {
    pub(crate) fn new(io: T) -> Self {
        DirectIo {
            io,
            outbox: Outbox::default(),
            inbox: Inbox::default(),
            abort: Abort::default(),
            write_deadline: None,
            low_water: LowWater::default(),
        }
    }

    /// Direct reads that wait wait for up to [`LOW_WATER`] bytes, through
    /// `mark`, the handle of the [`LowWaterStream`] at the bottom of `io`.
    pub(crate) fn with_low_water(mut self, mark: LowWater) -> Self {
        self.low_water = mark;
        self
    }

    /// Fails the stream once a write of actix's (not the outbox: see
    /// [`WriteDeadline`]) has waited `limit` for a client that takes
    /// nothing; actix then drops the connection.
    pub(crate) fn with_write_timeout(mut self, limit: Duration) -> Self {
        self.write_deadline = Some(WriteDeadline {
            limit,
            timer: None,
            armed: false,
        });
        self
    }

    /// After a write: notes progress, or times a wait for the client while
    /// the outbox is empty.
    fn timed<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if let Some(d) = &mut self.write_deadline {
            match &r {
                Poll::Ready(_) => d.progressed(),
                Poll::Pending if self.outbox.is_empty() => d.waiting(cx)?,
                Poll::Pending => {}
            }
        }
        r
    }

    /// The handle that ends the connection (conn data too).
    pub(crate) fn abort(&self) -> Abort {
        self.abort.clone()
    }

    /// The handle for the connection's responses
    /// (`HttpServiceBuilder::on_connect_ext` puts it into their conn data).
    pub(crate) fn outbox(&self) -> Outbox {
        self.outbox.clone()
    }

    /// The handle for the connection's request bodies (conn data too).
    pub(crate) fn inbox(&self) -> Inbox {
        self.inbox.clone()
    }

    pub(crate) fn get_ref(&self) -> &T {
        &self.io
    }

    /// actix must not write while a chunk is partly written (see the module
    /// docs); if it ever did, the bytes would interleave: fail instead.
    fn check_order(&self) -> io::Result<()> {
        let p = self.outbox.0.borrow();
        if p.started && !p.chunk.is_empty() {
            return Err(io::Error::other(
                "a write would overtake a response body chunk",
            ));
        }
        Ok(())
    }
}

/// Fails `poll` once the connection was aborted (see [`Abort`]).
macro_rules! unless_aborted {
    ($abort:expr, $cx:expr, $poll:expr) => {{
        $abort.check()?;
        let r = $poll;
        if r.is_pending() {
            $abort.wait($cx)?;
        }
        r
    }};
}

impl<T: AsyncRead + Unpin> AsyncRead for DirectIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        unless_aborted!(this.abort, cx, this.read_for_actix(cx, buf))
    }
}

impl<T: AsyncRead + Unpin> DirectIo<T> {
    /// actix's read: see [`Inbox`] for what it gets in each mode.
    fn read_for_actix(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        let mut s = this.inbox.0.borrow_mut();
        if s.owed > 0 {
            s.pay(buf);
            return Poll::Ready(Ok(()));
        }
        match &mut s.mode {
            // The probe: a read that leaves actix's buffer `PROBE_SPARE`
            // bytes of room, so that actix does not make room by moving
            // what it holds before its next read (which waits, below).
            Mode::Armed if buf.remaining() > PROBE_SPARE => {
                this.low_water.want(1);
                let room = buf.remaining() - PROBE_SPARE;
                let mut probe = ReadBuf::new(buf.initialize_unfilled_to(room));
                let r = ready!(Pin::new(&mut this.io).poll_read(cx, &mut probe));
                let n = probe.filled().len();
                buf.advance(n);
                s.mode = match r {
                    Ok(()) if n > 0 => Mode::Probed(buf.filled().as_ptr_range().end as usize),
                    _ => Mode::Off,
                };
                Poll::Ready(r)
            }
            Mode::Off | Mode::Armed | Mode::Direct { budget: 0, .. } => {
                drop(s);
                this.low_water.want(1);
                Pin::new(&mut this.io).poll_read(cx, buf)
            }
            Mode::Direct {
                buf: Some(chunk),
                want,
                budget,
            } if chunk.len() < *want => {
                let room =
                    (*want - chunk.len()).min(usize::try_from(*budget).unwrap_or(usize::MAX));
                // If it has to wait, for up to LOW_WATER of the body's
                // bytes at once (never more than are still to come).
                this.low_water.want(room.min(LOW_WATER));
                let polled = tokio_util::io::poll_read_buf(
                    Pin::new(&mut this.io),
                    cx,
                    &mut chunk.limit(room),
                );
                let Poll::Ready(got) = polled else {
                    return Poll::Pending;
                };
                let got = got?;
                if got == 0 {
                    // The client closed mid-body: actix sees the end of the
                    // stream as it would have, and fails the body. The
                    // chunk stays, so that the body reader can say how
                    // much arrived.
                    *budget = 0;
                    return Poll::Ready(Ok(()));
                }
                *budget -= got as u64;
                s.owed += got;
                s.pay(buf);
                Poll::Ready(Ok(()))
            }
            // Waiting for the body reader: to find the probe, or to take a
            // full chunk and give the next.
            Mode::Probed(_) | Mode::Direct { .. } => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for DirectIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_order()?;
        let r = unless_aborted!(this.abort, cx, Pin::new(&mut this.io).poll_write(cx, buf));
        this.timed(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_order()?;
        let r = unless_aborted!(
            this.abort,
            cx,
            Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
        );
        this.timed(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    /// Writes the outbox (everything actix buffered before it is written
    /// already, see the module docs), then flushes. Wakes the task when it
    /// emptied the outbox, so that the body is polled for its next chunk.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = unless_aborted!(this.abort, cx, this.flush_outbox(cx));
        this.timed(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = unless_aborted!(this.abort, cx, Pin::new(&mut this.io).poll_shutdown(cx));
        this.timed(cx, r)
    }
}

impl<T: AsyncWrite + Unpin> DirectIo<T> {
    /// [`AsyncWrite::poll_flush`]: the outbox first.
    fn flush_outbox(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self;
        let mut emptied = false;
        loop {
            let mut p = this.outbox.0.borrow_mut();
            if p.chunk.is_empty() {
                break;
            }
            p.started = true;
            let n = ready!(Pin::new(&mut this.io).poll_write(cx, &p.chunk))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            p.chunk.advance(n);
            if p.chunk.is_empty() {
                // An empty view still holds the chunk's buffer: let it go
                // back to its transfer now, not with the next chunk (or,
                // after a connection's last GET, never).
                p.chunk = Bytes::new();
                emptied = true;
            }
        }
        if emptied {
            cx.waker().wake_by_ref();
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }
}

pin_project_lite::pin_project! {
    /// A response body of exactly `len` bytes from `stream`, written through
    /// its connection's [`Outbox`]. The response must carry
    /// `Content-Length: len` with chunking off
    /// (`HttpResponseBuilder::no_chunking(len)`).
    pub struct DirectBody<S> {
        #[pin]
        stream: S,
        outbox: Outbox,
        // Bytes promised and not yet taken from `stream`.
        remaining: u64,
    }
}

impl<S> DirectBody<S> {
    pub(crate) fn new(stream: S, len: u64, outbox: Outbox) -> Self {
        DirectBody {
            stream,
            outbox,
            remaining: len,
        }
    }
}

impl<S> MessageBody for DirectBody<S>
where
    S: Stream<Item = io::Result<Bytes>>,
{
    type Error = io::Error;

    /// Not `Sized`: actix's `Length` framing would copy every byte (see the
    /// module docs). The response's own `Content-Length` frames the body.
    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    /// Yields no bytes: moves each chunk into the outbox, which the
    /// connection's stream writes when actix flushes it (right after this
    /// returns `Pending`) and which wakes the task once it is empty.
    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let mut this = self.project();
        if !this.outbox.is_empty() {
            return Poll::Pending;
        }
        loop {
            let chunk = match ready!(this.stream.as_mut().poll_next(cx)) {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None if *this.remaining > 0 => {
                    *this.remaining = 0;
                    return Poll::Ready(Some(Err(io::Error::other("response body ended early"))));
                }
                None => return Poll::Ready(None),
            };
            let n = chunk.len() as u64;
            if n > *this.remaining {
                *this.remaining = 0;
                return Poll::Ready(Some(Err(io::Error::other(
                    "response body longer than its Content-Length",
                ))));
            }
            if n > 0 {
                *this.remaining -= n;
                this.outbox.put(chunk);
                // Written (and the task woken) by actix's flush, next.
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// The mark a connection's reads want reaches its socket when a read
    /// would block, and only then; the reader is woken once it is reached.
    #[tokio::test]
    async fn low_water_is_set_on_the_socket_when_a_read_waits() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (sock, _) = l.accept().await.unwrap();
        let mark = LowWater::default();
        let mut s = LowWaterStream::new(sock, mark.clone());
        let kernel = |s: &LowWaterStream<tokio::net::TcpStream>| {
            crate::sys::recv_lowat(s.io.as_fd()).unwrap()
        };
        let mut buf = [0u8; 64];
        let mut poll_once = |s: &mut LowWaterStream<tokio::net::TcpStream>| {
            let mut rb = ReadBuf::new(&mut buf);
            let r = futures_util::FutureExt::now_or_never(poll_fn(|cx| {
                Poll::Ready(Pin::new(&mut *s).poll_read(cx, &mut rb))
            }))
            .unwrap();
            match r {
                Poll::Pending => (true, 0),
                Poll::Ready(r) => {
                    r.unwrap();
                    (false, rb.filled().len())
                }
            }
        };
        mark.want(8192);
        assert_eq!(kernel(&s), 1, "not set before a read waits");
        assert_eq!(poll_once(&mut s), (true, 0));
        assert_eq!(kernel(&s), 8192);
        // Bytes queued below the mark wake no one; reaching it does.
        client.write_all(&[7u8; 100]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(poll_once(&mut s), (true, 0));
        client.write_all(&[7u8; 8092]).await.unwrap();
        let mut got = 0;
        for _ in 0..500 {
            got += poll_once(&mut s).1;
            if got == 8192 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(got, 8192);
        assert_eq!(kernel(&s), 8192);
        mark.want(1);
        assert_eq!(poll_once(&mut s), (true, 0));
        assert_eq!(kernel(&s), 1);
    }

    /// A chunk's buffer that counts its drops.
    struct Owned(Vec<u8>, Arc<AtomicUsize>);

    impl AsRef<[u8]> for Owned {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    impl Drop for Owned {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn chunks(parts: &[&[u8]], drops: &Arc<AtomicUsize>) -> Vec<io::Result<Bytes>> {
        parts
            .iter()
            .map(|p| Ok(Bytes::from_owner(Owned(p.to_vec(), drops.clone()))))
            .collect()
    }

    type Body = DirectBody<futures_util::stream::Iter<std::vec::IntoIter<io::Result<Bytes>>>>;

    /// What actix's dispatcher does with a body until it ends: poll it, then
    /// flush the stream. Returns how the body ended.
    async fn send(io: &mut DirectIo<DuplexStream>, body: &mut Body) -> io::Result<()> {
        loop {
            let next = poll_fn(|cx| match Pin::new(&mut *body).poll_next(cx) {
                Poll::Pending => Poll::Ready(None),
                ready => ready.map(Some),
            })
            .await;
            match next {
                Some(None) => return io.flush().await,
                Some(Some(r)) => {
                    assert!(r?.is_empty(), "the body yielded bytes to actix");
                }
                None => io.flush().await?,
            }
        }
    }

    #[tokio::test]
    async fn chunks_follow_the_head_in_order_and_their_buffers_are_released() {
        let (mut client, server) = duplex(7);
        let mut io = DirectIo::new(server);
        let drops = Arc::new(AtomicUsize::new(0));
        let mut body = DirectBody::new(
            futures_util::stream::iter(chunks(&[b"hello ", b"", b"world", b"!"], &drops)),
            12,
            io.outbox(),
        );
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.map(|_| got)
        });
        io.write_all(b"HEAD\r\n\r\n").await.unwrap();
        send(&mut io, &mut body).await.unwrap();
        // Every chunk's buffer went back once written, the last one too.
        assert_eq!(drops.load(Ordering::SeqCst), 4);
        assert!(io.outbox.is_empty());
        io.write_all(b"NEXT").await.unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(
            reader.await.unwrap().unwrap(),
            b"HEAD\r\n\r\nhello world!NEXT"
        );
    }

    #[tokio::test]
    async fn a_body_shorter_or_longer_than_promised_fails() {
        let drops = Arc::new(AtomicUsize::new(0));
        for (len, message) in [
            (13, "response body ended early"),
            (11, "response body longer than its Content-Length"),
        ] {
            let (_client, server) = duplex(64);
            let mut io = DirectIo::new(server);
            let mut body = DirectBody::new(
                futures_util::stream::iter(chunks(&[b"hello ", b"world!"], &drops)),
                len,
                io.outbox(),
            );
            let e = send(&mut io, &mut body).await.unwrap_err();
            assert_eq!(e.to_string(), message);
        }
    }

    #[tokio::test]
    async fn a_write_that_would_overtake_a_partly_written_chunk_fails() {
        let (_client, server) = duplex(4);
        let mut io = DirectIo::new(server);
        io.outbox().put(Bytes::from_static(b"0123456789"));
        // Four bytes fit; the rest waits for the client.
        let flushed = poll_fn(|cx| Poll::Ready(Pin::new(&mut io).poll_flush(cx))).await;
        assert!(flushed.is_pending());
        let e = io.write_all(b"next head").await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "a write would overtake a response body chunk"
        );
    }

    #[tokio::test]
    async fn an_abort_ends_a_waiting_write_and_everything_after_it() {
        let (_client, server) = duplex(4);
        let mut io = DirectIo::new(server);
        io.outbox().put(Bytes::from_static(b"0123456789"));
        let abort = io.abort();
        // The flush waits for a client that reads nothing; the abort (from
        // another future of the task) wakes and fails it.
        let (flushed, ()) = tokio::join!(io.flush(), async {
            tokio::task::yield_now().await;
            abort.abort("the client took no data for 2 s".into());
        });
        let e = flushed.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(e.to_string(), "the client took no data for 2 s");
        assert!(io.write_all(b"x").await.is_err());
        assert!(io.read(&mut [0u8; 8]).await.is_err());
    }

    // Paused time: the clock moves only when every task waits, timers in
    // order, so the outcome does not depend on the machine's speed.
    #[tokio::test(start_paused = true)]
    async fn a_write_the_client_takes_nothing_of_fails_after_the_limit() {
        let (mut client, server) = duplex(4);
        let mut io = DirectIo::new(server).with_write_timeout(Duration::from_millis(200));
        // Progress restarts the deadline: the client takes four bytes at a
        // time, each well within it.
        let reader = async {
            let mut buf = [0u8; 4];
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                client.read_exact(&mut buf).await.unwrap();
            }
            client
        };
        let (written, _client) = tokio::join!(io.write_all(b"0123456789ab"), reader);
        written.unwrap();
        // Then nothing more is taken.
        let e = tokio::time::timeout(Duration::from_secs(30), io.write_all(b"cdefgh"))
            .await
            .expect("the write is cut off")
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(e.to_string(), "the client took no data for 0 s");
    }
}
