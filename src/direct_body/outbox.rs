//! A GET's response body written around actix-http's write buffer.
//!
//! ## Why, and why it is safe
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
//! [`DirectIo`]: super::DirectIo
//! [`HeadDeadline`]: crate::head_timeout::HeadDeadline

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};

use actix_http::body::{BodySize, MessageBody};
use bytes::{Buf, Bytes};
use futures_util::Stream;
use tokio::io::AsyncWrite;

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
    pub(super) fn is_empty(&self) -> bool {
        self.0.borrow().chunk.is_empty()
    }

    pub(super) fn put(&self, chunk: Bytes) {
        let mut p = self.0.borrow_mut();
        debug_assert!(p.chunk.is_empty());
        p.chunk = chunk;
        p.started = false;
    }

    /// actix must not write while a chunk is partly written (see the module
    /// docs); if it ever did, the bytes would interleave: fail instead.
    pub(super) fn check_order(&self) -> io::Result<()> {
        let p = self.0.borrow();
        if p.started && !p.chunk.is_empty() {
            return Err(io::Error::other(
                "a write would overtake a response body chunk",
            ));
        }
        Ok(())
    }

    /// Writes the chunk to `io` (everything actix buffered before it is
    /// written already, see the module docs). Wakes the task when it emptied
    /// the outbox, so that the body is polled for its next chunk.
    pub(super) fn poll_write_to<T: AsyncWrite + Unpin>(
        &self,
        io: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let mut emptied = false;
        loop {
            let mut p = self.0.borrow_mut();
            if p.chunk.is_empty() {
                break;
            }
            p.started = true;
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &p.chunk))?;
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
        Poll::Ready(Ok(()))
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
    use crate::direct_body::DirectIo;
    use std::future::poll_fn;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A chunk's buffer that counts its drops.
    struct DropCounted(Vec<u8>, Arc<AtomicUsize>);

    impl AsRef<[u8]> for DropCounted {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    impl Drop for DropCounted {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn chunks(parts: &[&[u8]], drops: &Arc<AtomicUsize>) -> Vec<io::Result<Bytes>> {
        parts
            .iter()
            .map(|p| Ok(Bytes::from_owner(DropCounted(p.to_vec(), drops.clone()))))
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
}
