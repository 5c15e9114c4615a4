//! Bodies moved between the socket and our buffers without actix-http's
//! copies: GET response bodies written as they are ([`outbox`]), and long
//! PUT bodies read straight into the buffers they are written to storage
//! from ([`inbox`]). Both go through the connection's stream, [`DirectIo`],
//! which wraps what actix-http reads and writes (outside [`HeadDeadline`]
//! and [`RequestGate`]: see `server.rs`).
//!
//! - [`outbox`]: a GET's body ([`DirectBody`]) puts each chunk into the
//!   connection's [`Outbox`] instead of yielding it to actix, and
//!   [`DirectIo`] writes it to the socket when actix flushes.
//! - [`inbox`]: a PUT's body ([`BodyReader`]) is a source of filled chunks
//!   to the writer. It takes actix's payload pieces, and once a probe read
//!   proves that it holds every body byte actix read, has [`DirectIo`] read
//!   the rest straight into its chunks (its [`Inbox`]), giving actix zero
//!   placeholders so that its framing stays in step.
//! - [`low_water`]: a direct read that would block waits for up to 1 MiB
//!   on plain TCP (`SO_RCVLOWAT`), or 100 ms.
//! - Here too: [`Abort`] (a GET's reader that gave up on its client ends
//!   the connection) and the deadline on actix's own writes to a client
//!   that takes nothing ([`DirectIo::with_write_timeout`]).
//!
//! Both directions rest on how actix-http 3.20.0's HTTP/1 dispatcher reads,
//! decodes and writes (cited by line in `outbox` and `inbox`); the pin in
//! `Cargo.toml` and the review an upgrade needs are in
//! `docs/actix-upgrade.md`. `--direct-io off` turns both off without a
//! rebuild: the connection's [`Outbox`] and [`Inbox`] are then not offered
//! to the handlers, which send and take bodies through actix's buffers.
//!
//! [`HeadDeadline`]: crate::head_timeout::HeadDeadline
//! [`RequestGate`]: crate::request_gate::RequestGate

mod inbox;
mod low_water;
mod outbox;

pub(crate) use inbox::{BodyError, BodyReader, ChunkBuffers, Inbox};
pub(crate) use low_water::{LowWater, LowWaterStream};
pub(crate) use outbox::{DirectBody, Outbox};

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

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

/// A connection's stream: writes its [`Outbox`] when flushed, and reads
/// the rest of a long request body into the chunks of its [`Inbox`].
pub(crate) struct DirectIo<T> {
    io: T,
    outbox: Outbox,
    inbox: Inbox,
    abort: Abort,
    write_deadline: Option<WriteDeadline>,
    /// The receive low-water mark its reads want while they wait (set on
    /// the socket by a [`LowWaterStream`] under it, plain TCP only): up to
    /// [`LOW_WATER`](low_water::LOW_WATER) for a direct read, 1 for actix's.
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

    /// Marks direct reads as receives from the socket itself, not from a
    /// TLS session: long bodies are then read in larger chunks
    /// ([`SOCKET_CHUNK`](inbox::SOCKET_CHUNK)).
    pub(crate) fn reading_a_socket(self) -> Self {
        self.inbox.set_from_socket();
        self
    }

    /// Direct reads that wait wait for up to [`LOW_WATER`](low_water::LOW_WATER) bytes, through
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
        unless_aborted!(
            this.abort,
            cx,
            this.inbox
                .poll_read_for_actix(&mut this.io, cx, buf, &this.low_water)
        )
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for DirectIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.outbox.check_order()?;
        let r = unless_aborted!(this.abort, cx, Pin::new(&mut this.io).poll_write(cx, buf));
        this.timed(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.outbox.check_order()?;
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
        ready!(self.outbox.poll_write_to(&mut self.io, cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

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
