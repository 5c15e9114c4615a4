//! One request at a time on a connection: actix-http is given the bytes of
//! the next request only once the response to the one before is complete.
//!
//! # Why
//!
//! actix-http 3.20's HTTP/1 dispatcher decodes pipelined requests while an
//! earlier one is still being answered (`h1/dispatcher.rs:928-976`, queued
//! in `messages`), and its codec keeps per-request state in single fields
//! that the decoder sets and the encoder reads: whether the request was a
//! HEAD, its version and its connection type (`h1/codec.rs:124-131`, read
//! at `codec.rs:159-177`). A request decoded before the response to the one
//! before was encoded gives that response its own framing: a PUT answered
//! with a HEAD's `Content-Length` and no body, a response that says
//! `connection: close` while the connection goes on serving a request it
//! had already read (the unread body of the pipelined request is what makes
//! actix add the `close`, `dispatcher.rs:497-511`).
//!
//! # How
//!
//! The connection's stream ([`RequestGate`], under `direct_body`'s
//! `DirectIo`) finds where each request ends, with the parser actix uses
//! (`httparse`, the same framing rules as `h1/decoder.rs:75-340`: a head,
//! then a chunked body, a `Content-Length` body, or none), and hands actix
//! no byte past that end until the response to that request is complete
//! ([`HeadClock::responses`], counted as actix drops a response body, after
//! it encoded its last byte). Bytes read past the end (the start of a
//! pipelined request) wait in a small stash. So actix never holds more than
//! one request: each response carries its own request's framing, and after
//! a response that says `connection: close` actix shuts the connection
//! without having read anything more (`dispatcher.rs:1470-1478`).
//! Pipelining still works, one request at a time, which is all HTTP/1.1
//! promises.
//!
//! Why here and not in actix-http: a fix upstream would change the codec's
//! state handling (a release away, and the pin in Cargo.toml would have to
//! move with it); a patched copy of actix-http in this repository would
//! have to be carried and re-patched at every upgrade. The gate relies only
//! on what HTTP framing is, and on two facts about actix that are checked
//! by `tests/pipelining.rs`: it asks for more bytes when it needs them, and
//! a response is complete when its body is dropped.
//!
//! What the gate cannot frame it does not hold back: a head that does not
//! parse, too many headers, a malformed `Content-Length` or chunk size, an
//! upgrade or CONNECT (whose body is the rest of the stream). actix refuses
//! each of those itself and closes the connection, or (an upgrade) reads
//! everything after it as that request's body, so no second request is
//! decoded either way.
//!
//! Costs: the bytes of each head are scanned once more (and copied, to
//! parse a head that arrives in pieces); body bytes are counted, not
//! copied, except those read in the same read as the head. Reads are never
//! made smaller, so `direct_body`'s reads straight into upload chunks keep
//! their size (they never reach past their body: see `Inbox`).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

use crate::head_timeout::HeadClock;

/// Longest head the gate frames: actix refuses a longer one itself (431,
/// `MAX_BUFFER_SIZE`, `h1/decoder.rs:14`).
const MAX_HEAD: usize = 128 * 1024;
/// Headers the gate parses: actix refuses more (431, `MAX_HEADERS`).
const MAX_HEADERS: usize = 96;
/// Longest chunk-size line or trailer section the gate frames.
const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes read on into the stash while a request is held, to see the
/// client close its side (see [`RequestGate::read_ahead`]).
const READ_AHEAD: usize = 16 * 1024;

/// Where the gate is in the current request.
#[derive(Debug)]
enum Framing {
    /// Reading a head; what arrived of it so far.
    Head(Vec<u8>),
    /// Reading a body framed by its Content-Length: bytes left.
    Body(u64),
    /// Reading a chunked body.
    Chunked(Chunk),
    /// The request was read whole: nothing more until its response is
    /// complete.
    Held,
    /// Not framed (see the module docs): everything passes.
    Open,
}

/// Where a chunked body is.
#[derive(Debug)]
enum Chunk {
    /// A chunk-size line so far.
    Size(Vec<u8>),
    /// Data bytes left in the chunk.
    Data(u64),
    /// The line end after a chunk's data: bytes of it seen.
    DataEnd(usize),
    /// Trailer lines after the last chunk: bytes of the current line (its
    /// CR not counted), and of all of them.
    Trailers { line: usize, total: usize },
    /// The empty line after the trailers was read: the body is complete.
    Done,
}

impl Chunk {
    /// How many of `bytes` belong to the chunked body, at most up to the
    /// end of the current step; `None` for what the gate does not frame
    /// (actix refuses it).
    fn take(&mut self, bytes: &[u8]) -> Option<usize> {
        match self {
            Chunk::Size(line) => {
                let n = bytes.iter().position(|&b| b == b'\n');
                let end = n.map_or(bytes.len(), |i| i + 1);
                line.extend_from_slice(&bytes[..end]);
                if line.len() > MAX_CHUNK_LINE {
                    return None;
                }
                if n.is_some() {
                    *self = match httparse::parse_chunk_size(line) {
                        Ok(httparse::Status::Complete((_, 0))) => {
                            Chunk::Trailers { line: 0, total: 0 }
                        }
                        Ok(httparse::Status::Complete((_, size))) => Chunk::Data(size),
                        _ => return None,
                    };
                }
                Some(end)
            }
            Chunk::Data(left) => {
                let n = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                *left -= n as u64;
                if *left == 0 {
                    *self = Chunk::DataEnd(0);
                }
                Some(n)
            }
            Chunk::DataEnd(seen) => {
                let b = bytes[0];
                *seen += 1;
                match (b, *seen) {
                    (b'\n', _) => *self = Chunk::Size(Vec::new()),
                    (b'\r', 1) => {}
                    _ => return None,
                }
                Some(1)
            }
            Chunk::Trailers { line, total } => {
                let b = bytes[0];
                *total += 1;
                if *total > MAX_CHUNK_LINE {
                    return None;
                }
                match b {
                    b'\n' if *line == 0 => *self = Chunk::Done,
                    b'\n' => *line = 0,
                    b'\r' => {}
                    _ => *line += 1,
                }
                Some(1)
            }
            Chunk::Done => Some(0),
        }
    }
}

/// The framing of one request: [`Framer::take`] says how many of the next
/// bytes belong to it.
#[derive(Debug)]
struct Framer {
    state: Framing,
}

/// What the head says of the body that follows it.
fn body_framing(head: &[u8]) -> Option<Framing> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    // Called only for a complete head (the caller checked its end); a head
    // that does not parse is left to actix (`None`).
    let Ok(httparse::Status::Complete(_)) = req.parse(head) else {
        return None;
    };
    if req.method == Some("CONNECT") {
        return None;
    }
    let mut chunked = false;
    let mut length = None;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).ok()?.trim();
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // actix takes only `chunked` (and only in HTTP/1.1), never
            // with a Content-Length; it refuses anything else.
            if !value.eq_ignore_ascii_case("chunked") || req.version != Some(1) {
                return None;
            }
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            if length.is_some() || value.starts_with('+') {
                return None;
            }
            length = Some(value.parse::<u64>().ok()?);
        } else if h.name.eq_ignore_ascii_case("upgrade") && value.eq_ignore_ascii_case("websocket")
        {
            return None;
        }
    }
    match (chunked, length) {
        (true, Some(_)) => None,
        (true, None) => Some(Framing::Chunked(Chunk::Size(Vec::new()))),
        (false, Some(n)) => Some(Framing::Body(n)),
        (false, None) => Some(Framing::Body(0)),
    }
}

/// Whether `head` ends with an empty line (CRLF or LF line ends, as
/// httparse takes them), looking only at what follows `from` (and the two
/// bytes before it).
fn ends_head(head: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(2);
    let mut i = start;
    while i < head.len() {
        if head[i] == b'\n' {
            match head.get(i + 1..) {
                Some([b'\n', ..]) => return Some(i + 2),
                Some([b'\r', b'\n', ..]) => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

impl Framer {
    fn new() -> Framer {
        Framer {
            state: Framing::Head(Vec::new()),
        }
    }

    /// How many of `bytes` (the next bytes of the stream) belong to the
    /// current request; once it has all of them the state is
    /// [`Framing::Held`].
    fn take(&mut self, bytes: &[u8]) -> usize {
        let mut used = 0;
        while used < bytes.len() {
            let rest = &bytes[used..];
            let n = match &mut self.state {
                Framing::Held => break,
                Framing::Open => rest.len(),
                // Empty lines before a request line (which httparse skips)
                // are part of this request, not of its head.
                Framing::Head(head)
                    if head.is_empty() && rest.first().is_some_and(|b| b"\r\n".contains(b)) =>
                {
                    rest.iter().take_while(|b| b"\r\n".contains(b)).count()
                }
                Framing::Head(head) => {
                    let before = head.len();
                    // A whole head in one read (the usual case) is parsed
                    // where it is, not copied.
                    let whole = if before == 0 {
                        ends_head(rest, 0)
                    } else {
                        None
                    };
                    let end = match whole {
                        Some(end) => Some((end, &rest[..end])),
                        None => {
                            head.extend_from_slice(rest);
                            ends_head(head, before).map(|end| (end, &head[..end]))
                        }
                    };
                    match end {
                        Some((end, bytes)) => {
                            self.state = body_framing(bytes).unwrap_or(Framing::Open);
                            end - before
                        }
                        None if before + rest.len() > MAX_HEAD => {
                            self.state = Framing::Open;
                            rest.len()
                        }
                        None => rest.len(),
                    }
                }
                Framing::Body(left) => {
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(rest.len());
                    *left -= n as u64;
                    n
                }
                Framing::Chunked(chunk) => match chunk.take(rest) {
                    Some(n) => n,
                    None => {
                        self.state = Framing::Open;
                        0
                    }
                },
            };
            used += n;
            if matches!(self.state, Framing::Body(0) | Framing::Chunked(Chunk::Done)) {
                self.state = Framing::Held;
            }
        }
        used
    }
}

/// A connection's stream that hands actix one request at a time (see the
/// module docs).
pub(crate) struct RequestGate<T> {
    io: T,
    framer: Framer,
    /// Requests read whole (their last byte handed to actix).
    read: u64,
    /// Bytes read past the end of a request, handed on first once the gate
    /// opens.
    stash: BytesMut,
    /// The stream ended (seen while reading ahead); handed on after the
    /// stash.
    eof: bool,
    clock: HeadClock,
}

impl<T> RequestGate<T> {
    /// `clock`: the connection's, whose response count opens the gate.
    pub(crate) fn new(io: T, clock: HeadClock) -> Self {
        RequestGate {
            io,
            framer: Framer::new(),
            read: 0,
            stash: BytesMut::new(),
            eof: false,
            clock,
        }
    }

    pub(crate) fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncRead + Unpin> RequestGate<T> {
    /// While a request is held: reads on into the stash, at most
    /// [`READ_AHEAD`] bytes, until the stream has nothing more now (its
    /// readiness then wakes this task) or ends. So the client's end of the
    /// stream is seen while its request waits (`HeadDeadline` marks the
    /// connection closed, and a request waiting for a slot leaves the
    /// queue), as it was before the gate held anything back. What is read
    /// stays in the stash, for actix once the gate opens, the end last. A
    /// client that sent more than that behind the request is seen to go
    /// only when the request's turn comes. An error (a reset) is actix's at
    /// once, as it would be without the gate.
    fn read_ahead(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while !self.eof && self.stash.len() < READ_AHEAD {
            self.stash.reserve(READ_AHEAD - self.stash.len());
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.stash) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for RequestGate<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.framer.state, Framing::Held) {
            if this.clock.responses() < this.read {
                this.clock.wake_on_response(cx.waker());
                this.read_ahead(cx)?;
                return Poll::Pending;
            }
            this.framer = Framer::new();
        }
        let before = buf.filled().len();
        let stashed = !this.stash.is_empty();
        if stashed {
            let n = this.stash.len().min(buf.remaining());
            buf.put_slice(&this.stash[..n]);
        } else if this.eof {
            return Poll::Ready(Ok(()));
        } else {
            ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        }
        let got = &buf.filled()[before..];
        let used = this.framer.take(got);
        if matches!(this.framer.state, Framing::Held) {
            this.read += 1;
        }
        if stashed {
            this.stash.advance(used);
        } else {
            this.stash.extend_from_slice(&got[used..]);
        }
        if this.stash.is_empty() {
            // Let a large stash go (one read's worth at most).
            this.stash = BytesMut::new();
        }
        buf.set_filled(before + used);
        Poll::Ready(Ok(()))
    }
}

write_through!(RequestGate, io);

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` to a framer in pieces of `step` bytes; the lengths of
    /// the requests it finds.
    fn requests(stream: &[u8], step: usize) -> Vec<usize> {
        let mut found = Vec::new();
        let mut f = Framer::new();
        let (mut pos, mut start) = (0, 0);
        while pos < stream.len() {
            let end = (pos + step).min(stream.len());
            let used = f.take(&stream[pos..end]);
            pos += used;
            if matches!(f.state, Framing::Held) {
                found.push(pos - start);
                start = pos;
                f = Framer::new();
            } else if matches!(f.state, Framing::Open) {
                found.push(usize::MAX);
                break;
            } else {
                assert_eq!(used, end - (pos - used), "a partial request takes all");
            }
        }
        found
    }

    #[test]
    fn requests_end_where_their_framing_says() {
        let get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let put = b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        let chunked = b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nTrailer: v\r\n\r\n";
        let lf = b"\r\nHEAD /a HTTP/1.1\nHost: x\n\n";
        let mut stream = Vec::new();
        for r in [&get[..], put, chunked, lf, get] {
            stream.extend_from_slice(r);
        }
        let want = vec![get.len(), put.len(), chunked.len(), lf.len(), get.len()];
        for step in [1, 2, 3, 7, 64, stream.len()] {
            assert_eq!(requests(&stream, step), want, "step {step}");
        }
    }

    #[test]
    fn what_actix_refuses_or_streams_is_not_framed() {
        for head in [
            &b"PUT /a HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"[..],
            b"PUT /a HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"PUT /a HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"GET /a HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"CONNECT a:1 HTTP/1.1\r\n\r\n",
            b"GET /a HTTP/1.1\r\nbad header\r\n\r\n",
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            assert_eq!(
                requests(head, 1),
                vec![usize::MAX],
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        // A head longer than actix takes.
        let mut long = b"GET /a HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD + 10, b'a');
        assert_eq!(requests(&long, 4096), vec![usize::MAX]);
    }
}
