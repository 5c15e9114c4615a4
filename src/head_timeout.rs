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
//!   first byte that arrives arms a deadline; once it has passed, a read
//!   fails the stream with `TimedOut`, and actix drops the connection.
//! - [`track_heads`] wraps the application: a request reaching it means its
//!   head is complete (the deadline no longer matters), and dropping the
//!   response body means the response is done (the next byte starts a new
//!   head). The clock also counts those responses, for `request_gate`,
//!   which hands actix the next request only then.
//!
//! Between requests only a backstop is armed, longer than actix's keep-alive
//! timeout (see [`HeadDeadline`]), so an idle keep-alive connection lives
//! until that timeout closes it; while a request runs (a body streaming in
//! or out for hours) reads pass straight through: one `Cell` read per poll,
//! no timer per chunk. A deadline is reset at most twice per request.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use actix_http::body::{BodySize, BoxBody, EitherBody, MessageBody};
use actix_http::{Request, Response};
use actix_service::{apply_fn_factory, Service, ServiceFactory};
use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Where a connection is between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    /// Waiting for the first byte of a request head. Armed with the idle
    /// deadline once a response has been sent; not armed before the first
    /// request (actix-http times the first head from the connection's start).
    #[default]
    Idle,
    /// A response has just been sent: the idle deadline is to be armed.
    Done,
    /// A head has started arriving: the head deadline is armed.
    Head,
    /// A request is being served: its body and response are not timed here.
    Busy,
}

/// A connection's phase, how many of its responses are complete and
/// whether the client closed its side, shared by its stream and its
/// requests (through actix's per-connection data). Connections live on one
/// worker thread.
#[derive(Debug, Clone, Default)]
pub(crate) struct HeadClock(Rc<ClockState>);

#[derive(Debug, Default)]
struct ClockState {
    phase: Cell<Phase>,
    /// Responses completed on the connection.
    responses: Cell<u64>,
    /// Woken when a response completes (see [`HeadClock::wake_on_response`]).
    waker: RefCell<Option<Waker>>,
    /// A read found the end of the stream: the client closed (or half
    /// closed) the connection.
    closed: Cell<bool>,
    /// The task waiting in [`HeadClock::closed`].
    on_close: RefCell<Option<Waker>>,
}

impl HeadClock {
    fn get(&self) -> Phase {
        self.0.phase.get()
    }

    fn set(&self, phase: Phase) {
        self.0.phase.set(phase)
    }

    /// How many responses of the connection are complete: actix has encoded
    /// their last byte and is done with them.
    pub(crate) fn responses(&self) -> u64 {
        self.0.responses.get()
    }

    /// Wakes `waker` when the next response completes.
    pub(crate) fn wake_on_response(&self, waker: &Waker) {
        *self.0.waker.borrow_mut() = Some(waker.clone());
    }

    /// A response is complete.
    fn responded(&self) {
        self.set(Phase::Done);
        self.0.responses.set(self.0.responses.get() + 1);
        let waker = self.0.waker.borrow_mut().take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn set_closed(&self) {
        self.0.closed.set(true);
        let waker = self.0.on_close.borrow_mut().take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Completes once the client has closed its side of the connection
    /// (seen by the reads that go on while a request waits for a slot:
    /// actix's, until unread request body bytes fill its buffer, then
    /// `request_gate`'s read-ahead once the request was read whole, until
    /// 16 KiB more are stashed). For a request that waits: its client is
    /// gone.
    pub(crate) fn closed(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            if self.0.closed.get() {
                return Poll::Ready(());
            }
            *self.0.on_close.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
    }
}

/// A stream whose request heads must each be complete within `head` of
/// their first byte.
///
/// After a response, a next head must also have started within `idle`.
/// actix-http's keep-alive timer does that already, and `idle` is meant to
/// be longer (keep-alive plus the head timeout, so that a head begun at the
/// last moment still has its full time): it is the backstop for what that
/// timer misses. actix stops its keep-alive timer whenever its read buffer
/// holds bytes, and the start of a head pipelined behind a request stays in
/// that buffer, unseen here (it was read while the request was busy).
pub(crate) struct HeadDeadline<T> {
    io: T,
    clock: HeadClock,
    head: Duration,
    idle: Duration,
    /// Allocated at the first deadline and reset for each later one.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> HeadDeadline<T> {
    pub(crate) fn new(io: T, head: Duration, idle: Duration) -> Self {
        HeadDeadline {
            io,
            clock: HeadClock::default(),
            head,
            idle,
            timer: None,
        }
    }

    /// The handle for the connection's requests
    /// (`HttpServiceBuilder::on_connect_ext` puts it into their conn data).
    pub(crate) fn clock(&self) -> HeadClock {
        self.clock.clone()
    }

    /// Arms the deadline `limit` from now and enters `phase`.
    fn arm(&mut self, limit: Duration, phase: Phase) {
        let deadline = Instant::now() + limit;
        match &mut self.timer {
            Some(timer) => timer.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        self.clock.set(phase);
    }

    /// Whether the armed deadline has passed; registers the task's waker
    /// for it otherwise, so that a connection that goes quiet is still cut.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.timer
            .as_mut()
            .is_some_and(|timer| timer.as_mut().poll(cx).is_ready())
    }

    /// The error that ends the connection (actix drops it, unanswered).
    fn timed_out(&self, phase: Phase) -> io::Error {
        let e = io::Error::new(
            io::ErrorKind::TimedOut,
            match phase {
                Phase::Head => {
                    format!("request head not complete within {} s", self.head.as_secs())
                }
                _ => format!("no request head within {} s", self.idle.as_secs()),
            },
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
        let mut phase = this.clock.get();
        if phase == Phase::Busy {
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
            if buf.filled().len() == before && buf.remaining() > 0 {
                this.clock.set_closed();
            }
            return Poll::Ready(Ok(()));
        }
        if phase == Phase::Done {
            this.arm(this.idle, Phase::Idle);
            phase = Phase::Idle;
        }
        if this.expired(cx) {
            return Poll::Ready(Err(this.timed_out(phase)));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if phase == Phase::Idle && buf.filled().len() > before {
            this.arm(this.head, Phase::Head);
            // Registers the waker for the new deadline (which cannot have
            // passed yet: the head limit is at least a second).
            if this.expired(cx) {
                return Poll::Ready(Err(this.timed_out(Phase::Head)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

write_through!(HeadDeadline, io);

/// Sets its connection to [`Phase::Done`] and counts the response complete
/// (see [`HeadClock::responses`]) when dropped, which actix does
/// with a response body once the response is complete.
struct DoneOnDrop(Option<HeadClock>);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        if let Some(clock) = &self.0 {
            clock.responded();
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that marks the end of its request when dropped.
    pub struct TrackedBody<B> {
        #[pin]
        body: B,
        done: DoneOnDrop,
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
pub(crate) type TrackedResponse<B> = Response<TrackedBody<EitherBody<B, BoxBody>>>;

/// Wraps the application so that each request marks its connection busy
/// when it arrives and done when its response is.
pub(crate) fn track_heads<SF, B>(
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
                done: DoneOnDrop(clock),
            }))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    const HEAD: Duration = Duration::from_secs(1);
    const IDLE: Duration = Duration::from_secs(2);

    fn pair() -> (DuplexStream, HeadDeadline<DuplexStream>) {
        let (client, server) = duplex(1024);
        (client, HeadDeadline::new(server, HEAD, IDLE))
    }

    /// One read, under a hang guard far beyond any deadline here.
    async fn read(s: &mut HeadDeadline<DuplexStream>) -> io::Result<Vec<u8>> {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .expect("read hangs")?;
        Ok(buf[..n].to_vec())
    }

    #[track_caller]
    fn assert_timed_out(r: io::Result<Vec<u8>>, message: &str) {
        let e = r.expect_err("the connection must be cut off");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(e.to_string(), message);
    }

    /// Ends a response as actix does: by dropping its body.
    fn respond(clock: HeadClock) {
        drop(DoneOnDrop(Some(clock)));
    }

    #[tokio::test]
    async fn a_head_that_stops_arriving_is_cut_off() {
        let (mut client, mut server) = pair();
        client.write_all(b"GET /ima").await.unwrap();
        assert_eq!(read(&mut server).await.unwrap(), b"GET /ima");
        assert_timed_out(
            read(&mut server).await,
            "request head not complete within 1 s",
        );
    }

    #[tokio::test]
    async fn nothing_is_timed_before_the_first_byte_or_while_busy() {
        let (mut client, mut server) = pair();
        let margin = Duration::from_millis(500);
        // Before the first request actix-http times the head, not this.
        tokio::time::sleep(IDLE + margin).await;
        client.write_all(b"PUT / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(!read(&mut server).await.unwrap().is_empty());
        server.clock().set(Phase::Busy);
        // Past the deadline armed by the head's first byte.
        tokio::time::sleep(HEAD + margin).await;
        client.write_all(b"body").await.unwrap();
        assert_eq!(read(&mut server).await.unwrap(), b"body");
    }

    #[tokio::test]
    async fn after_a_response_each_head_has_its_own_deadline() {
        let (mut client, mut server) = pair();
        for _ in 0..3 {
            client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            assert!(!read(&mut server).await.unwrap().is_empty());
            client.write_all(b"\r\n").await.unwrap();
            assert_eq!(read(&mut server).await.unwrap(), b"\r\n");
            server.clock().set(Phase::Busy);
            respond(server.clock());
        }
        client.write_all(b"G").await.unwrap();
        assert_eq!(read(&mut server).await.unwrap(), b"G");
        assert_timed_out(
            read(&mut server).await,
            "request head not complete within 1 s",
        );
    }

    #[tokio::test]
    async fn after_a_response_a_silent_connection_is_cut_off_as_a_backstop() {
        let (mut client, mut server) = pair();
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\nGET /nex")
            .await
            .unwrap();
        assert!(!read(&mut server).await.unwrap().is_empty());
        server.clock().set(Phase::Busy);
        respond(server.clock());
        assert_timed_out(read(&mut server).await, "no request head within 2 s");
    }
}
