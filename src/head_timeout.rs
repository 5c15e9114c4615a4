//! The request-head deadline on every request of a connection.
//!
//! actix-http bounds only the first request head of a connection
//! (`client_request_timeout`): after a response its keep-alive timer runs
//! until the next request's first byte, and then nothing, so a client could
//! trickle a later head a byte at a time for ever. Two small pieces close
//! that, for plain HTTP and HTTPS alike:
//!
//! - [`HeadDeadline`] wraps the connection's stream (the TLS stream, for
//!   HTTPS: it sees plaintext). While the connection waits for a head, the
//!   first byte that arrives arms a deadline; a read after it fails the
//!   stream with `TimedOut`, and actix drops the connection.
//! - [`track_heads`] wraps the application: a request reaching it means its
//!   head is complete (the deadline no longer matters), and dropping the
//!   response body means the response is done (the next byte starts a new
//!   head).
//!
//! Between requests nothing is armed, so an idle keep-alive connection lives
//! until actix's keep-alive timeout; while a request runs (a body streaming
//! in or out for hours) reads pass straight through: one `Cell` read per
//! poll, no timer per chunk.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use actix_http::body::{BodySize, BoxBody, EitherBody, MessageBody};
use actix_http::{Request, Response};
use actix_service::{apply_fn_factory, Service, ServiceFactory};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Where a connection is between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first byte of a request head (nothing armed).
    Idle,
    /// A head has started arriving: the deadline is armed.
    Head,
    /// A request is being served: its body and response are not timed here.
    Busy,
}

/// A connection's phase, shared by its stream and its requests (through
/// actix's per-connection data). Connections live on one worker thread.
#[derive(Debug, Clone)]
pub struct HeadClock(Rc<Cell<Phase>>);

impl HeadClock {
    fn new() -> Self {
        HeadClock(Rc::new(Cell::new(Phase::Idle)))
    }

    fn get(&self) -> Phase {
        self.0.get()
    }

    fn set(&self, phase: Phase) {
        self.0.set(phase)
    }
}

/// A stream whose request heads must each be complete within `limit` of
/// their first byte.
pub struct HeadDeadline<T> {
    io: T,
    clock: HeadClock,
    limit: Duration,
    /// Allocated at the first head and reset for each later one.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> HeadDeadline<T> {
    pub fn new(io: T, limit: Duration) -> Self {
        HeadDeadline {
            io,
            clock: HeadClock::new(),
            limit,
            timer: None,
        }
    }

    /// The handle for the connection's requests
    /// (`HttpServiceBuilder::on_connect_ext` puts it into their conn data).
    pub fn clock(&self) -> HeadClock {
        self.clock.clone()
    }

    fn arm(&mut self) {
        let deadline = Instant::now() + self.limit;
        match &mut self.timer {
            Some(timer) => timer.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        self.clock.set(Phase::Head);
    }

    /// Whether the armed deadline has passed; registers the task's waker
    /// for it otherwise, so that a head that stops arriving is still cut.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.timer
            .as_mut()
            .is_some_and(|timer| timer.as_mut().poll(cx).is_ready())
    }

    /// The error that ends the connection (actix drops it, unanswered).
    fn timed_out(&self) -> io::Error {
        let e = io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "request head not complete within {} s",
                self.limit.as_secs()
            ),
        );
        log::debug!("closing a connection: {e}");
        e
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HeadDeadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.clock.get() {
            Phase::Busy => Pin::new(&mut this.io).poll_read(cx, buf),
            Phase::Idle => {
                let before = buf.filled().len();
                ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
                if buf.filled().len() > before {
                    this.arm();
                    if this.expired(cx) {
                        return Poll::Ready(Err(this.timed_out()));
                    }
                }
                Poll::Ready(Ok(()))
            }
            Phase::Head => {
                if this.expired(cx) {
                    return Poll::Ready(Err(this.timed_out()));
                }
                Pin::new(&mut this.io).poll_read(cx, buf)
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Sets its connection back to [`Phase::Idle`] when dropped, which actix
/// does with a response body once the response is complete.
struct IdleOnDrop(Option<HeadClock>);

impl Drop for IdleOnDrop {
    fn drop(&mut self) {
        if let Some(clock) = &self.0 {
            clock.set(Phase::Idle);
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that marks the end of its request when dropped.
    pub struct TrackedBody<B> {
        #[pin]
        body: B,
        done: IdleOnDrop,
    }
}

impl<B: MessageBody> MessageBody for TrackedBody<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        self.project().body.poll_next(cx)
    }
}

/// What [`track_heads`] answers with: the application's response (or its
/// error response), its body tracked.
pub type TrackedResponse<B> = Response<TrackedBody<EitherBody<B, BoxBody>>>;

/// Wraps the application so that each request marks its connection busy
/// when it arrives and idle when its response is done.
pub fn track_heads<SF, B>(
    app: SF,
) -> impl ServiceFactory<
    Request,
    Config = (),
    Response = TrackedResponse<B>,
    Error = SF::Error,
    InitError = SF::InitError,
>
where
    SF: ServiceFactory<Request, Config = ()>,
    SF::Response: Into<Response<B>>,
    SF::Error: Into<Response<BoxBody>>,
    B: MessageBody,
{
    apply_fn_factory(app, |req: Request, app: &SF::Service| {
        let clock = req.conn_data::<HeadClock>().cloned();
        if let Some(clock) = &clock {
            clock.set(Phase::Busy);
        }
        let response = app.call(req);
        async move {
            let response = match response.await {
                Ok(res) => res.into().map_body(|_, body| EitherBody::left(body)),
                Err(err) => {
                    let res: Response<BoxBody> = err.into();
                    res.map_body(|_, body| EitherBody::right(body))
                }
            };
            Ok::<_, SF::Error>(response.map_body(|_, body| TrackedBody {
                body,
                done: IdleOnDrop(clock),
            }))
        }
    })
}
