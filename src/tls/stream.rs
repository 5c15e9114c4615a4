//! The streams under and over rustls, read in large pieces (an HTTPS
//! connection is `Fill<TlsStream<ReadAhead<TcpStream>>>`).
//!
//! - Under it, [`ReadAhead`]: rustls asks its transport for at most 4 KiB
//!   per read (`READ_SIZE` in rustls' `DeframerVecBuffer::prepare_read`,
//!   0.23), so a 16 KiB record took four or five `recv` calls straight from
//!   the socket. `ReadAhead` receives up to [`READ_AHEAD`] bytes at once and
//!   hands them to rustls from memory.
//! - Over it, [`Fill`]: tokio-rustls returns at most one record's
//!   plaintext per read, and each read of an upload is a round through
//!   actix's dispatcher and the body reader (`direct_body`). `Fill` reads
//!   on while rustls has plaintext to give without waiting.
//!
//! Writes go through both unchanged. Together, over HTTPS (A/B against the
//! server without them): one `curl -T` 0.90 -> 0.62 s of server CPU per
//! GiB, four ranged PUTs 1.05 -> 0.84 (bench/RESULTS.md, issue 24).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use actix_rt::net::{ActixStream, Ready};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

/// Bytes asked of the socket per receive.
pub(crate) const READ_AHEAD: usize = 256 * 1024;

/// A receive smaller than this, once read, gives the buffer back: a
/// connection between requests, or sending request heads and small
/// bodies, holds no [`READ_AHEAD`] bytes.
const KEEP_ABOVE: usize = 16 * 1024;

/// A stream whose reads go through one buffer of up to [`READ_AHEAD`]
/// bytes, allocated (not zeroed) when a receive needs it.
pub(crate) struct ReadAhead<T> {
    inner: T,
    /// The bytes received and not yet read.
    buf: BytesMut,
    /// How many bytes the last receive brought.
    last: usize,
}

impl<T> ReadAhead<T> {
    pub(crate) fn new(inner: T) -> Self {
        ReadAhead {
            inner,
            buf: BytesMut::new(),
            last: 0,
        }
    }

    pub(crate) fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            if out.remaining() >= READ_AHEAD {
                // As large as the buffer: no reason to copy.
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            // Empty: reserving reuses the allocation from its start.
            this.buf.reserve(READ_AHEAD);
            this.last = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.buf
            ))?;
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        if this.buf.is_empty() && this.last < KEEP_ABOVE {
            this.buf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

write_through!(ReadAhead, inner);

impl<T: ActixStream> ActixStream for ReadAhead<T> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        if !self.buf.is_empty() {
            return Poll::Ready(Ok(Ready::READABLE));
        }
        self.inner.poll_read_ready(cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        self.inner.poll_write_ready(cx)
    }
}

/// The TLS stream as actix reads it: a read returns as much plaintext as
/// the reader has room for and rustls can give without waiting, not one
/// record (tokio-rustls returns at most one 16 KiB record per read, and
/// each read is a round through actix's dispatcher and the body reader).
pub(crate) struct Fill<T> {
    inner: T,
    /// An error met after some bytes were already returned: the next read's.
    error: Option<io::Error>,
}

impl<T> Fill<T> {
    pub(crate) fn new(inner: T) -> Self {
        Fill { inner, error: None }
    }

    #[cfg(test)]
    pub(crate) fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Fill<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.error.take() {
            return Poll::Ready(Err(e));
        }
        let start = buf.filled().len();
        // Bounded: every round either fills more of `buf` or returns.
        while buf.remaining() > 0 {
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Pending if before == start => return Poll::Pending,
                Poll::Pending => break,
                Poll::Ready(Err(e)) if before == start => return Poll::Ready(Err(e)),
                Poll::Ready(Err(e)) => {
                    this.error = Some(e);
                    break;
                }
                Poll::Ready(Ok(())) if buf.filled().len() == before => break, // end of stream
                Poll::Ready(Ok(())) => {}
            }
        }
        Poll::Ready(Ok(()))
    }
}

write_through!(Fill, inner);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A stream that returns its pieces one per read, then `Pending` (or
    /// the error it was given), counting reads.
    struct Pieces {
        pieces: VecDeque<io::Result<Vec<u8>>>,
        reads: usize,
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.reads += 1;
            match this.pieces.pop_front() {
                None => Poll::Pending,
                Some(Err(e)) => Poll::Ready(Err(e)),
                Some(Ok(p)) => {
                    let n = p.len().min(buf.remaining());
                    buf.put_slice(&p[..n]);
                    if n < p.len() {
                        this.pieces.push_front(Ok(p[n..].to_vec()));
                    }
                    Poll::Ready(Ok(()))
                }
            }
        }
    }

    fn pieces(p: Vec<io::Result<Vec<u8>>>) -> Pieces {
        Pieces {
            pieces: p.into(),
            reads: 0,
        }
    }

    fn read<R: AsyncRead + Unpin>(r: &mut R, n: usize) -> Poll<io::Result<Vec<u8>>> {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut space = vec![0u8; n];
        let mut buf = ReadBuf::new(&mut space);
        match Pin::new(r).poll_read(&mut cx, &mut buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.filled().to_vec())),
        }
    }

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn read_ahead_receives_once_and_hands_out_small_reads_in_order() {
        let data = bytes(100_000, 1);
        let mut r = ReadAhead::new(pieces(vec![Ok(data.clone())]));
        let mut got = Vec::new();
        while got.len() < data.len() {
            match read(&mut r, 4096) {
                Poll::Ready(Ok(b)) => got.extend_from_slice(&b),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, data);
        assert_eq!(r.get_ref().reads, 1);
        assert!(read(&mut r, 4096).is_pending());
    }

    #[test]
    fn read_ahead_passes_large_reads_and_errors_through() {
        let data = bytes(READ_AHEAD, 2);
        let mut r = ReadAhead::new(pieces(vec![
            Ok(data.clone()),
            Err(io::Error::other("boom")),
        ]));
        match read(&mut r, READ_AHEAD) {
            Poll::Ready(Ok(b)) => assert_eq!(b, data),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(r.buf.capacity(), 0, "no buffer for a read as large as it");
        match read(&mut r, 10) {
            Poll::Ready(Err(e)) => assert_eq!(e.to_string(), "boom"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn read_ahead_keeps_its_buffer_after_a_large_receive_and_not_after_a_small_one() {
        let (big, small) = (bytes(100_000, 8), bytes(500, 9));
        let mut r = ReadAhead::new(pieces(vec![Ok(big.clone()), Ok(small.clone())]));
        let mut got = Vec::new();
        while got.len() < big.len() {
            match read(&mut r, 16384) {
                Poll::Ready(Ok(b)) => got.extend_from_slice(&b),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, big);
        assert!(r.buf.capacity() > 0, "kept for the next receive");
        match read(&mut r, 4096) {
            Poll::Ready(Ok(b)) => assert_eq!(b, small),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(r.buf.capacity(), 0, "given back after a small receive");
        assert!(read(&mut r, 4096).is_pending());
    }

    #[test]
    fn fill_reads_every_piece_ready_then_returns_what_it_has() {
        let (a, b, c) = (bytes(16384, 3), bytes(16384, 4), bytes(100, 5));
        let mut f = Fill::new(pieces(vec![Ok(a.clone()), Ok(b.clone()), Ok(c.clone())]));
        match read(&mut f, 1 << 20) {
            Poll::Ready(Ok(got)) => assert_eq!(got, [a, b, c].concat()),
            other => panic!("unexpected {other:?}"),
        }
        // Three pieces and the read that found nothing more.
        assert_eq!(f.get_ref().reads, 4);
        assert!(read(&mut f, 10).is_pending());
    }

    #[test]
    fn fill_stops_when_the_reader_is_full_and_keeps_the_rest() {
        let a = bytes(30000, 6);
        let mut f = Fill::new(pieces(vec![Ok(a.clone())]));
        match read(&mut f, 20000) {
            Poll::Ready(Ok(got)) => assert_eq!(got, a[..20000]),
            other => panic!("unexpected {other:?}"),
        }
        match read(&mut f, 20000) {
            Poll::Ready(Ok(got)) => assert_eq!(got, a[20000..]),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn fill_returns_the_bytes_before_an_error_or_the_end_and_then_it() {
        let a = bytes(5000, 7);
        let mut f = Fill::new(pieces(vec![
            Ok(a.clone()),
            Err(io::Error::other("bad record")),
        ]));
        match read(&mut f, 1 << 20) {
            Poll::Ready(Ok(got)) => assert_eq!(got, a),
            other => panic!("unexpected {other:?}"),
        }
        match read(&mut f, 1 << 20) {
            Poll::Ready(Err(e)) => assert_eq!(e.to_string(), "bad record"),
            other => panic!("unexpected {other:?}"),
        }
        let mut f = Fill::new(pieces(vec![Ok(a.clone()), Ok(Vec::new())]));
        match read(&mut f, 1 << 20) {
            Poll::Ready(Ok(got)) => assert_eq!(got, a),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(f.get_ref().reads, 2, "stops at the end of the stream");
    }
}
