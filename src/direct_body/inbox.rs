//! A PUT's body as a source of filled chunks ([`BodyReader`]), read around
//! actix-http's read buffer where it can be (the connection's [`Inbox`]).
//! The writer (`ops::write`) only asks for the next chunk; probes,
//! placeholders and buffer addresses stay here.
//!
//! ## Why, and how the switch-over is proven
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
//! by the connection's stream ([`DirectIo`]) straight into the chunk being
//! filled, and actix gets as many zero bytes in its place ("placeholders",
//! which the body reader counts and drops), so its framing, keep-alive and
//! pipelining stay exactly as they would have been. The only delicate point is where the switch
//! happens: the stream's next byte must be the body byte right after the
//! last one the body reader got from actix. The [`Inbox`] makes sure of it:
//!
//! 1. The body reader arms it (`Phase::Armed`) and keeps taking actix's
//!    payload.
//! 2. actix's next read from the stream is the probe: it reads normally but
//!    leaves actix's buffer `PROBE_SPARE` bytes of room, and the inbox notes
//!    the address where the read ended in that buffer (`Phase::Probed`).
//!    Every later read by actix waits.
//! 3. actix decodes what it read into payload pieces, views of its buffer
//!    that do not move (`decoder.rs:569-572`, `split`/`split_to`; with that
//!    room left actix does not compact the buffer before its next read,
//!    `dispatcher.rs:1238-1241`). When the body reader takes the piece that
//!    ends at the probe's address, it holds every byte actix read from the
//!    stream: no other live piece can end there, since nothing was read
//!    after the probe. It then gives the inbox the chunk being filled and
//!    the count of body bytes left (`Phase::Direct`).
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
//! The tests below drive a [`BodyReader`] and a [`DirectIo`] with a
//! scripted stand-in of actix's dispatcher (its read loop and payload
//! decoder, as cited) and of the client: the probe found, not found (the
//! fall-back taken), the reader dropped mid-body, the client gone, and a
//! pipelined request right after the body.
//!
//! [`DirectIo`]: super::DirectIo

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Display;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{BufMut, Bytes};
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, ReadBuf};

use super::low_water::{LowWater, LOW_WATER};

/// Bodies at least this long are read around actix.
const DIRECT_MIN: u64 = 1024 * 1024;

/// How long a probe may stay unanswered before the body is left to actix:
/// only a change in actix-http would make it (see the module docs), or a
/// client that stops sending right after the head.
const PROBE_WAIT: Duration = Duration::from_secs(1);

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
pub(crate) struct Inbox(Rc<RefCell<InboxState>>);

#[derive(Debug, Default)]
struct InboxState {
    phase: Phase,
    /// Body bytes read into a chunk that actix has not yet been given
    /// placeholders for.
    placeholders_due: usize,
    /// actix's read, waiting in `Probed` or for a chunk.
    waiting_read: Option<Waker>,
    /// Direct reads receive from the socket itself (plain TCP or the Unix
    /// socket), not from a TLS session: see [`SOCKET_CHUNK`].
    from_socket: bool,
}

/// Who reads the connection's stream, and how far the switch-over got: the
/// one state of a direct read, seen by the connection's stream (actix's
/// reads) and by the body reader alike.
#[derive(Debug, Default)]
enum Phase {
    /// actix reads the stream: no body reader asked for it, or it let go.
    #[default]
    Actix,
    /// A body reader asked for the rest of its body: actix's next read is
    /// the probe.
    Armed,
    /// The probe read ended at this address of actix's read buffer. actix
    /// reads nothing more until the body reader has taken the piece that
    /// ends there (so it has every body byte actix read) or gave up.
    Probed(usize),
    /// Body bytes go into `chunk` (up to `want` bytes), `budget` more in
    /// all; actix gets as many zero bytes in their place. Once `budget` is
    /// 0 actix reads the stream again.
    Direct {
        chunk: Option<Vec<u8>>,
        want: usize,
        budget: u64,
    },
}

impl InboxState {
    /// Gives actix the placeholders due for what was read directly.
    fn give_placeholders(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.placeholders_due.min(buf.remaining());
        buf.initialize_unfilled_to(n);
        buf.advance(n);
        self.placeholders_due -= n;
    }

    fn wake_read(&mut self) {
        if let Some(w) = self.waiting_read.take() {
            w.wake();
        }
    }
}

impl Inbox {
    /// Marks the connection's direct reads as receives from the socket
    /// itself (see [`SOCKET_CHUNK`]).
    pub(crate) fn set_from_socket(&self) {
        self.0.borrow_mut().from_socket = true;
    }

    /// Asks for the rest of the current request's body (see the module
    /// docs): false if the stream is not free for it.
    fn arm(&self) -> bool {
        let mut s = self.0.borrow_mut();
        if !matches!(s.phase, Phase::Actix) || s.placeholders_due > 0 {
            return false;
        }
        s.phase = Phase::Armed;
        true
    }

    /// Whether a piece of the body that ends at `end` (an address in
    /// actix's read buffer) ends where the probe read did: then the body
    /// reader has every byte actix read.
    fn probe_ended_at(&self, end: usize) -> bool {
        matches!(self.0.borrow().phase, Phase::Probed(e) if e == end)
    }

    /// Whether body bytes are being read straight from the stream (actix's
    /// payload brings placeholders).
    fn is_direct(&self) -> bool {
        matches!(self.0.borrow().phase, Phase::Direct { .. })
    }

    /// After the probe was found: the next `budget` bytes of the stream
    /// are the rest of the body, to be read into `chunk` up to `want` bytes.
    fn start(&self, chunk: Vec<u8>, want: usize, budget: u64) {
        let mut s = self.0.borrow_mut();
        debug_assert!(matches!(s.phase, Phase::Probed(_)));
        s.phase = Phase::Direct {
            chunk: Some(chunk),
            want,
            budget,
        };
        s.wake_read();
    }

    /// The chunk being read into, once full.
    fn take_full(&self) -> Option<Vec<u8>> {
        let mut s = self.0.borrow_mut();
        match &mut s.phase {
            Phase::Direct { chunk, want, .. }
                if chunk.as_ref().is_some_and(|c| c.len() == *want) =>
            {
                chunk.take()
            }
            _ => None,
        }
    }

    /// How full the chunk being read into is (`None`: none given).
    fn filled(&self) -> Option<usize> {
        match &self.0.borrow().phase {
            Phase::Direct { chunk: Some(c), .. } => Some(c.len()),
            _ => None,
        }
    }

    /// The next chunk to read into, after [`Inbox::take_full`].
    fn give(&self, next: Vec<u8>, size: usize) {
        let mut s = self.0.borrow_mut();
        if let Phase::Direct { chunk, want, .. } = &mut s.phase {
            *chunk = Some(next);
            *want = size;
            s.wake_read();
        }
    }

    /// The body reader is done or gone: actix reads the stream again, after
    /// the placeholders due to it. A chunk being read into is dropped.
    fn release(&self) {
        let mut s = self.0.borrow_mut();
        s.phase = Phase::Actix;
        s.wake_read();
    }

    /// A read of actix's from the connection's stream `io`: what it gets in
    /// each [`Phase`]. `low_water`: the mark a read that waits wants.
    pub(super) fn poll_read_for_actix<T: AsyncRead + Unpin>(
        &self,
        io: &mut T,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        low_water: &LowWater,
    ) -> Poll<io::Result<()>> {
        let mut s = self.0.borrow_mut();
        if s.placeholders_due > 0 {
            s.give_placeholders(buf);
            return Poll::Ready(Ok(()));
        }
        match &mut s.phase {
            // The probe: a read that leaves actix's buffer `PROBE_SPARE`
            // bytes of room, so that actix does not make room by moving
            // what it holds before its next read (which waits, below).
            Phase::Armed if buf.remaining() > PROBE_SPARE => {
                low_water.want(1);
                let room = buf.remaining() - PROBE_SPARE;
                let mut probe = ReadBuf::new(buf.initialize_unfilled_to(room));
                let r = ready!(Pin::new(io).poll_read(cx, &mut probe));
                let n = probe.filled().len();
                buf.advance(n);
                s.phase = match r {
                    Ok(()) if n > 0 => Phase::Probed(buf.filled().as_ptr_range().end as usize),
                    _ => Phase::Actix,
                };
                Poll::Ready(r)
            }
            Phase::Actix | Phase::Armed | Phase::Direct { budget: 0, .. } => {
                drop(s);
                low_water.want(1);
                Pin::new(io).poll_read(cx, buf)
            }
            Phase::Direct {
                chunk: Some(chunk),
                want,
                budget,
            } if chunk.len() < *want => {
                let room =
                    (*want - chunk.len()).min(usize::try_from(*budget).unwrap_or(usize::MAX));
                // If it has to wait, for up to LOW_WATER of the body's
                // bytes at once (never more than are still to come).
                low_water.want(room.min(LOW_WATER));
                let polled =
                    tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut chunk.limit(room));
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
                s.placeholders_due += got;
                s.give_placeholders(buf);
                Poll::Ready(Ok(()))
            }
            // Waiting for the body reader: to find the probe, or to take a
            // full chunk and give the next.
            Phase::Probed(_) | Phase::Direct { .. } => {
                s.waiting_read = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Why a request body stopped short of its length (`received`: the body
/// bytes that arrived).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// No body bytes came for the body timeout.
    Timeout { received: u64 },
    /// The body ended early (the client closed, or its stream failed).
    Ended { received: u64 },
}

/// Bytes per chunk of a body of two such chunks or more read straight
/// from a socket (plain TCP or the Unix socket). Each direct read is one
/// receive as large as the chunk's room, and fewer, larger receives cost
/// less: each can send a window update that has the client's pending data
/// sent in the server's time (four ranged PUTs 0.62 -> 0.45 s of server
/// CPU per GiB against 512 KiB chunks, 1.40 -> 1.02x the floor; 2 MiB
/// half-way, 8 MiB dearer again). Under TLS the plaintext comes out of
/// rustls a record at a time whatever the room, and a larger chunk only
/// costs cache (four ranged PUTs 0.72 -> 0.79): such bodies keep the
/// caller's size. bench/RESULTS.md, issue 24.
pub(crate) const SOCKET_CHUNK: usize = 4 * 1024 * 1024;

/// The buffers a body is read into: empty, with room for [`size`] bytes
/// each (the writer's pool, whose buffers come back once written). The
/// same for every chunk of a body.
///
/// [`size`]: ChunkBuffers::size
pub(crate) trait ChunkBuffers {
    /// Bytes per chunk (the last chunk of a body is shorter).
    fn size(&self) -> usize;
    /// An empty buffer with room for `size()` bytes.
    fn empty(&self) -> Vec<u8>;
}

/// A request body of `length` bytes as chunks of [`ChunkBuffers::size`]
/// bytes (the last one shorter), with at most `timeout` between its pieces.
///
/// The body comes through actix-http's payload in pieces of at most
/// 128 KiB (its read size), each a view of actix's read buffer that is
/// copied here into the chunk being filled. Given the connection's
/// [`Inbox`], a body of at least `DIRECT_MIN` is read around that: once
/// the probe shows that every body byte actix read is here, the rest is
/// read from the stream straight into the chunk, in reads as large as the
/// chunk's room (see the module docs). Chunk boundaries stay where they
/// would be either way.
///
/// Each piece is copied and dropped before anything awaits: only once no
/// view is left can actix reuse its read buffer whole and read the next
/// 128 KiB in one call. A piece kept alive (even an empty slice of it)
/// makes actix start a fresh 8 KiB buffer and read in 8-64 KiB steps: five
/// times the receive calls, each of which can send a window update that
/// wakes the client (measured: 44k receive calls per 1.5 GiB upload against
/// 26k, and less server CPU).
pub(crate) struct BodyReader<S> {
    payload: S,
    length: u64,
    /// Body bytes taken from the payload so far (placeholders included).
    received: u64,
    timeout: Duration,
    /// Chunks filled and not yet returned (at most the few one piece ends).
    ready: VecDeque<Vec<u8>>,
    filling: Vec<u8>,
    /// Size of the chunk being filled (0: none started).
    want: usize,
    /// Body bytes in chunks so far (copied or read directly).
    copied: u64,
    /// The connection's inbox, armed for this body (`None`: the body comes
    /// through actix's payload only).
    inbox: Option<Inbox>,
    /// How full the chunk was when it was given to the inbox.
    given: usize,
    /// Body bytes read straight from the stream.
    direct_bytes: u64,
}

impl<S> BodyReader<S> {
    /// The body of `length` bytes that comes through `payload`; `inbox`:
    /// the connection's, when the body is framed by its Content-Length
    /// alone (so that the rest of it can be read around actix).
    pub(crate) fn new(
        payload: S,
        length: u64,
        timeout: Duration,
        inbox: Option<Inbox>,
    ) -> BodyReader<S> {
        BodyReader {
            payload,
            length,
            received: 0,
            timeout,
            ready: VecDeque::new(),
            filling: Vec::new(),
            want: 0,
            copied: 0,
            // Asks the stream for the rest of a long body, once.
            inbox: inbox.filter(|inbox| length >= DIRECT_MIN && inbox.arm()),
            given: 0,
            direct_bytes: 0,
        }
    }

    pub(crate) fn length(&self) -> u64 {
        self.length
    }

    /// The chunk size this body is best read in, `default` unless it is
    /// read straight from a socket and at least two [`SOCKET_CHUNK`]s long:
    /// then `SOCKET_CHUNK` (a shorter body would be received whole before
    /// its first write, and saves few receives).
    pub(crate) fn chunk_size(&self, default: usize) -> usize {
        match &self.inbox {
            Some(inbox)
                if inbox.0.borrow().from_socket && self.length >= 2 * SOCKET_CHUNK as u64 =>
            {
                SOCKET_CHUNK
            }
            _ => default,
        }
    }

    /// Body bytes read straight from the stream so far (not copied from
    /// actix's buffer).
    pub(crate) fn direct_bytes(&self) -> u64 {
        self.direct_bytes
    }

    /// Starts a chunk if none is being filled.
    fn start_chunk(&mut self, buffers: &impl ChunkBuffers) {
        if self.want == 0 {
            let left = self.length - self.copied;
            self.want = buffers
                .size()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            self.filling = buffers.empty();
        }
    }

    /// Queues a full chunk.
    fn finish_chunk(&mut self, full: Vec<u8>) {
        self.want = 0;
        self.ready.push_back(full);
    }

    /// Copies all of `piece` into chunks, queueing the ones it completes.
    fn absorb(&mut self, mut piece: &[u8], buffers: &impl ChunkBuffers) {
        while !piece.is_empty() {
            self.start_chunk(buffers);
            let n = (self.want - self.filling.len()).min(piece.len());
            self.filling.extend_from_slice(&piece[..n]);
            piece = &piece[n..];
            self.copied += n as u64;
            if self.filling.len() == self.want {
                let full = std::mem::take(&mut self.filling);
                self.finish_chunk(full);
            }
        }
    }

    /// The piece that ended at the probe was taken: the rest of the body
    /// is the next bytes of the stream.
    fn start_reading(&mut self, buffers: &impl ChunkBuffers) {
        let budget = self.length - self.received;
        if budget == 0 {
            self.stop_direct();
            return;
        }
        self.start_chunk(buffers);
        self.given = self.filling.len();
        if let Some(inbox) = &self.inbox {
            inbox.start(std::mem::take(&mut self.filling), self.want, budget);
        }
    }

    /// Queues the inbox's chunk once full, and gives it the next.
    fn take_direct(&mut self, buffers: &impl ChunkBuffers) {
        let Some(inbox) = self.inbox.clone() else {
            return;
        };
        let Some(full) = inbox.take_full() else {
            return;
        };
        let n = (full.len() - self.given) as u64;
        self.direct_bytes += n;
        self.copied += n;
        self.finish_chunk(full);
        if self.copied < self.length {
            self.start_chunk(buffers);
            self.given = 0;
            inbox.give(std::mem::take(&mut self.filling), self.want);
        }
    }

    /// Whether body bytes are being read straight from the stream.
    fn reading_direct(&self) -> bool {
        self.inbox.as_ref().is_some_and(Inbox::is_direct)
    }

    /// Body bytes that arrived so far: taken from actix or read directly
    /// (not placeholders, which actix may drop when the stream ends).
    fn arrived(&self) -> u64 {
        match &self.inbox {
            Some(inbox) if inbox.is_direct() => {
                self.copied + inbox.filled().map_or(0, |n| (n - self.given) as u64)
            }
            _ => self.received,
        }
    }

    /// Leaves the rest of the body to actix.
    fn stop_direct(&mut self) {
        if let Some(inbox) = self.inbox.take() {
            inbox.release();
        }
    }
}

impl<S, E> BodyReader<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Display,
{
    /// The next chunk, `None` once `length` bytes were returned; its buffer
    /// comes from `buffers` (the same for every call). Waits at most
    /// `timeout` for each piece of the body. Cancel-safe: all progress is
    /// kept in `self`.
    pub(crate) async fn next_chunk(
        &mut self,
        buffers: &impl ChunkBuffers,
    ) -> Result<Option<Vec<u8>>, BodyError> {
        loop {
            self.take_direct(buffers);
            if let Some(chunk) = self.ready.pop_front() {
                return Ok(Some(chunk));
            }
            if self.received == self.length {
                self.stop_direct();
                return Ok(None);
            }
            // Asked, and the probe not found yet.
            let probing = self.inbox.is_some() && !self.reading_direct();
            let wait = if probing {
                self.timeout.min(PROBE_WAIT)
            } else {
                self.timeout
            };
            let piece = match tokio::time::timeout(wait, self.payload.next()).await {
                Err(_) if probing && wait < self.timeout => {
                    log::info!("request body left to actix: probe unanswered");
                    self.stop_direct();
                    continue;
                }
                Err(_) => {
                    return Err(BodyError::Timeout {
                        received: self.arrived(),
                    })
                }
                Ok(Some(Ok(piece))) => piece,
                Ok(end) => {
                    if let Some(Err(e)) = end {
                        log::info!("request body error after {} bytes: {e}", self.arrived());
                    }
                    return Err(BodyError::Ended {
                        received: self.arrived(),
                    });
                }
            };
            let take = piece.len().min((self.length - self.received) as usize);
            self.received += take as u64;
            // Placeholders (for bytes already in the inbox's chunk) are
            // only counted.
            if !self.reading_direct() {
                self.absorb(&piece[..take], buffers);
                let end = piece.as_ptr_range().end as usize;
                if self.inbox.as_ref().is_some_and(|i| i.probe_ended_at(end)) {
                    self.start_reading(buffers);
                }
            }
            // `piece` is dropped here, before the next await.
        }
    }
}

impl<S> Drop for BodyReader<S> {
    fn drop(&mut self) {
        self.stop_direct();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::direct_body::DirectIo;
    use bytes::{Buf, BytesMut};
    use std::future::poll_fn;
    use tokio::sync::{mpsc, oneshot};
    use tokio::time::Instant;

    /// What the client does, in order.
    enum Step {
        /// Sends these bytes: they come as fast as they are read.
        Send(Bytes),
        /// Closes its side.
        Eof,
        /// Resets the connection.
        Reset,
    }

    /// The client's side of a connection, scripted. Once its steps are
    /// done it keeps the connection open and sends nothing more (reads
    /// wait for ever; the tests' paused clock then moves on).
    struct Client(VecDeque<Step>);

    impl Client {
        fn done(&self) -> bool {
            self.0.is_empty()
        }
    }

    impl AsyncRead for Client {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let steps = &mut self.get_mut().0;
            match steps.front_mut() {
                None => Poll::Pending,
                Some(Step::Send(bytes)) => {
                    let n = bytes.len().min(buf.remaining());
                    buf.put_slice(&bytes[..n]);
                    bytes.advance(n);
                    if bytes.is_empty() {
                        steps.pop_front();
                    }
                    Poll::Ready(Ok(()))
                }
                Some(Step::Eof) => Poll::Ready(Ok(())),
                Some(Step::Reset) => Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            }
        }
    }

    // actix-http 3.20.0's sizes (`h1/dispatcher.rs:39-40`, `h1/decoder.rs:14`).
    const LW_BUFFER_SIZE: usize = 1024;
    const HW_BUFFER_SIZE: usize = 8 * 1024;
    const MAX_BUFFER_SIZE: usize = 131_072;

    /// actix-http 3.20.0's HTTP/1 dispatcher, as far as one request with a
    /// Content-Length body goes: it reads as `read_available` does
    /// (`h1/dispatcher.rs:1192-1260`: until the stream would block, ends or
    /// its buffer holds `MAX_BUFFER_SIZE`; growing the buffer when less than
    /// `LW_BUFFER_SIZE` is left), decodes the body as `PayloadDecoder` does
    /// (`h1/decoder.rs:560-575`: every body byte it holds, split off as one
    /// piece) and feeds the pieces to the handler's payload, or discards
    /// them once the handler dropped it.
    struct Dispatcher {
        io: DirectIo<Client>,
        buf: BytesMut,
        /// Copies each piece out of its read buffer (as an actix that moved
        /// its buffer would): the probe is never found.
        moves_buffer: bool,
    }

    /// Lets the handler run before the dispatcher reads again, as actix
    /// polls the service right after it decoded a head or fed the payload
    /// (`h1/dispatcher.rs`'s poll loop: read, decode, respond). Run side
    /// by side by `join!`, the handler may have been polled just before the
    /// dispatcher yielded: the second yield is after it.
    async fn handler_runs() {
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
    }

    /// What the dispatcher saw of the connection: body bytes (placeholders
    /// included), and what came after the body.
    #[derive(Debug, PartialEq)]
    struct Seen {
        body: u64,
        next: Vec<u8>,
    }

    /// What actix should see: a body of `body` bytes, then `next`.
    fn actix_saw(body: usize, next: &[u8]) -> Seen {
        Seen {
            body: body as u64,
            next: next.to_vec(),
        }
    }

    enum Read {
        Some,
        Eof,
    }

    impl Dispatcher {
        fn new(client: Vec<Step>) -> Dispatcher {
            Dispatcher {
                io: DirectIo::new(Client(client.into())),
                buf: BytesMut::with_capacity(HW_BUFFER_SIZE),
                moves_buffer: false,
            }
        }

        fn poll_read_available(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Read>> {
            let mut read_some = false;
            while self.buf.len() < MAX_BUFFER_SIZE {
                let remaining = self.buf.capacity() - self.buf.len();
                if remaining < LW_BUFFER_SIZE {
                    self.buf.reserve(HW_BUFFER_SIZE - remaining);
                }
                match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(Read::Eof)),
                    Poll::Ready(Ok(_)) => read_some = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if read_some || self.buf.len() >= MAX_BUFFER_SIZE {
                Poll::Ready(Ok(Read::Some))
            } else {
                Poll::Pending
            }
        }

        /// Serves one request of `length` body bytes: signals `head` once
        /// its head is decoded (the handler starts), feeds `payload`.
        async fn serve(
            mut self,
            length: u64,
            head: oneshot::Sender<()>,
            payload: mpsc::UnboundedSender<io::Result<Bytes>>,
        ) -> Seen {
            let head_len = loop {
                if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                match poll_fn(|cx| self.poll_read_available(cx)).await {
                    Ok(Read::Some) => {}
                    _ => panic!("the client sent no head"),
                }
            };
            let _ = self.buf.split_to(head_len);
            head.send(()).expect("the handler waits for the head");
            handler_runs().await;
            let mut left = length;
            loop {
                if left > 0 && !self.buf.is_empty() {
                    let piece = if left > self.buf.len() as u64 {
                        self.buf.split().freeze()
                    } else {
                        self.buf.split_to(left as usize).freeze()
                    };
                    left -= piece.len() as u64;
                    let piece = if self.moves_buffer {
                        Bytes::copy_from_slice(&piece)
                    } else {
                        piece
                    };
                    // A handler that dropped its payload: discarded.
                    let _ = payload.send(Ok(piece));
                    handler_runs().await;
                    continue;
                }
                if left == 0 {
                    break;
                }
                let e = match poll_fn(|cx| self.poll_read_available(cx)).await {
                    Ok(Read::Some) => continue,
                    Ok(Read::Eof) => io::Error::from(io::ErrorKind::UnexpectedEof),
                    Err(e) => e,
                };
                // The end of the stream or its error, after what was read.
                if !self.buf.is_empty() {
                    let piece = self.buf.split().freeze();
                    left -= piece.len() as u64;
                    let _ = payload.send(Ok(piece));
                }
                let _ = payload.send(Err(e));
                return Seen {
                    body: length - left,
                    next: Vec::new(),
                };
            }
            // What the client sent after the body, all of it.
            while !self.io.get_ref().done() {
                if poll_fn(|cx| self.poll_read_available(cx)).await.is_err() {
                    break;
                }
            }
            Seen {
                body: length,
                next: self.buf.to_vec(),
            }
        }
    }

    /// What a handler's body reader got.
    #[derive(Debug, Default)]
    struct Got {
        body: Vec<u8>,
        chunks: Vec<usize>,
        end: Option<Result<(), BodyError>>,
        direct: u64,
    }

    struct Pool(usize);

    impl ChunkBuffers for Pool {
        fn size(&self) -> usize {
            self.0
        }

        fn empty(&self) -> Vec<u8> {
            Vec::with_capacity(self.0)
        }
    }

    const CHUNK: usize = 512 * 1024;
    const BODY_TIMEOUT: Duration = Duration::from_secs(60);

    /// A PUT handler: once the head is decoded, reads the body from
    /// `payload` (with the connection's `inbox`) until it ends or
    /// `stop_after` chunks came, then drops its reader.
    async fn handler(
        inbox: Inbox,
        length: u64,
        head: oneshot::Receiver<()>,
        mut payload: mpsc::UnboundedReceiver<io::Result<Bytes>>,
        stop_after: Option<usize>,
    ) -> Got {
        head.await.expect("the head");
        let payload = futures_util::stream::poll_fn(move |cx| payload.poll_recv(cx));
        let mut reader = BodyReader::new(payload, length, BODY_TIMEOUT, Some(inbox));
        let pool = Pool(CHUNK);
        let mut got = Got::default();
        while Some(got.chunks.len()) != stop_after {
            match reader.next_chunk(&pool).await {
                Ok(Some(chunk)) => {
                    got.chunks.push(chunk.len());
                    got.body.extend_from_slice(&chunk);
                }
                Ok(None) => {
                    got.end = Some(Ok(()));
                    break;
                }
                Err(e) => {
                    got.end = Some(Err(e));
                    break;
                }
            }
        }
        got.direct = reader.direct_bytes();
        got
    }

    /// Runs `dispatcher` and a handler for a body of `length` bytes side by
    /// side on one task (as actix runs a connection's handler).
    async fn run(dispatcher: Dispatcher, length: u64, stop_after: Option<usize>) -> (Got, Seen) {
        let inbox = dispatcher.io.inbox();
        let (head_tx, head_rx) = oneshot::channel();
        let (tx, rx) = mpsc::unbounded_channel();
        let both = async {
            tokio::join!(
                handler(inbox, length, head_rx, rx, stop_after),
                dispatcher.serve(length, head_tx, tx)
            )
        };
        tokio::time::timeout(Duration::from_secs(3600), both)
            .await
            .expect("the request ends")
    }

    /// A body of `len` bytes that shows a byte out of place.
    fn body(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
            .collect()
    }

    fn head(len: usize) -> Vec<u8> {
        format!("PUT /images/x HTTP/1.1\r\nContent-Length: {len}\r\n\r\n").into_bytes()
    }

    const NEXT: &[u8] = b"GET /images/x HTTP/1.1\r\nRange: bytes=0-1\r\n\r\n";

    /// The client's bytes, cut into steps of `step` bytes.
    fn steps(bytes: &[u8], step: usize) -> Vec<Step> {
        bytes
            .chunks(step)
            .map(|c| Step::Send(Bytes::copy_from_slice(c)))
            .collect()
    }

    fn chunk_sizes(len: usize) -> Vec<usize> {
        let mut sizes = vec![CHUNK; len / CHUNK];
        if !len.is_multiple_of(CHUNK) {
            sizes.push(len % CHUNK);
        }
        sizes
    }

    /// Only a body of two `SOCKET_CHUNK`s or more on a connection whose
    /// direct reads are receives from the socket itself is read in
    /// `SOCKET_CHUNK`s: not under TLS, not a shorter body (direct or not),
    /// not without the inbox (`--direct-io off`).
    #[test]
    fn only_a_long_body_read_straight_from_a_socket_takes_socket_chunks() {
        let long = 2 * SOCKET_CHUNK as u64;
        let reader = |from_socket: bool, length: u64| {
            let inbox = Inbox::default();
            if from_socket {
                inbox.set_from_socket();
            }
            BodyReader::new((), length, BODY_TIMEOUT, Some(inbox)).chunk_size(CHUNK)
        };
        assert_eq!(reader(true, long), SOCKET_CHUNK);
        assert_eq!(reader(false, long), CHUNK, "TLS");
        assert_eq!(reader(true, long - 1), CHUNK, "a short body");
        assert_eq!(
            BodyReader::new((), long, BODY_TIMEOUT, None).chunk_size(CHUNK),
            CHUNK,
            "no inbox"
        );
    }

    /// The probe found: the rest of the body goes straight into the chunks,
    /// every byte in place, and actix sees a body of the right length.
    #[tokio::test(start_paused = true)]
    async fn the_rest_of_a_long_body_is_read_straight_into_the_chunks() {
        let len = 3 * CHUNK + 12_345;
        let want = body(len);
        let client = [head(len), want.clone()].concat();
        let (got, seen) = run(
            Dispatcher::new(steps(&client, client.len())),
            len as u64,
            None,
        )
        .await;
        assert_eq!(got.end, Some(Ok(())));
        assert!(got.body == want, "the body's bytes");
        assert_eq!(got.chunks, chunk_sizes(len));
        // All but what actix read with the head and the probe.
        assert!(
            got.direct >= (len - 2 * MAX_BUFFER_SIZE) as u64 && got.direct <= len as u64,
            "{} bytes read directly",
            got.direct
        );
        assert_eq!(seen, actix_saw(len, &[]));
    }

    /// The next request right behind the body, in the same read or not:
    /// the direct read stops at the body's end and actix gets the next
    /// request's bytes, all of them.
    #[tokio::test(start_paused = true)]
    async fn a_pipelined_request_after_the_body_is_left_to_actix() {
        let len = 2 * CHUNK + 777;
        let want = body(len);
        let client = [head(len), want.clone(), NEXT.to_vec()].concat();
        for step in [client.len(), 64 * 1024, 100_003, 4096 + 17] {
            let (got, seen) = run(Dispatcher::new(steps(&client, step)), len as u64, None).await;
            assert_eq!(got.end, Some(Ok(())), "steps of {step}");
            assert!(got.body == want, "steps of {step}: the body's bytes");
            assert_eq!(got.chunks, chunk_sizes(len), "steps of {step}");
            assert!(got.direct > 0, "steps of {step}: nothing read directly");
            assert_eq!(seen, actix_saw(len, NEXT), "steps of {step}");
        }
    }

    /// An actix that moved its read buffer: no piece ends where the probe
    /// did, so after `PROBE_WAIT` the body reader leaves the body to actix,
    /// which reads the rest itself, every byte in place.
    #[tokio::test(start_paused = true)]
    async fn a_probe_not_found_leaves_the_body_to_actix_after_the_probe_wait() {
        let len = 2 * CHUNK + 99;
        let want = body(len);
        let client = [head(len), want.clone(), NEXT.to_vec()].concat();
        let mut dispatcher = Dispatcher::new(steps(&client, client.len()));
        dispatcher.moves_buffer = true;
        let started = Instant::now();
        let (got, seen) = run(dispatcher, len as u64, None).await;
        assert!(started.elapsed() >= PROBE_WAIT, "{:?}", started.elapsed());
        assert!(started.elapsed() < BODY_TIMEOUT, "{:?}", started.elapsed());
        assert_eq!(got.end, Some(Ok(())));
        assert!(got.body == want, "the body's bytes");
        assert_eq!(got.chunks, chunk_sizes(len));
        assert_eq!(got.direct, 0);
        assert_eq!(seen, actix_saw(len, NEXT));
    }

    /// A request dropped mid-body (its handler ended, e.g. on a backend
    /// error) while a chunk is being read into: actix gets placeholders for
    /// what was read into it, then reads the rest of the body itself and
    /// finds the next request right after it.
    #[tokio::test(start_paused = true)]
    async fn a_reader_dropped_mid_body_leaves_the_rest_to_actix() {
        let len = 5 * CHUNK + 3;
        let want = body(len);
        let client = [head(len), want.clone(), NEXT.to_vec()].concat();
        for step in [client.len(), 200_000] {
            let (got, seen) = run(Dispatcher::new(steps(&client, step)), len as u64, Some(2)).await;
            assert_eq!(got.end, None, "steps of {step}");
            assert!(got.body == want[..2 * CHUNK], "steps of {step}: the bytes");
            assert!(
                got.direct > 0,
                "steps of {step}: dropped before reading directly"
            );
            assert_eq!(seen, actix_saw(len, NEXT), "steps of {step}");
        }
    }

    /// A client that closes or resets its connection mid-body, while the
    /// body is read directly: the body ends with what arrived, which is
    /// what actix saw too.
    #[tokio::test(start_paused = true)]
    async fn a_client_gone_mid_body_ends_the_body_with_what_arrived() {
        let len = 4 * CHUNK;
        let sent = 2 * CHUNK + 100;
        let want = body(len);
        for end in [Step::Eof, Step::Reset] {
            let what = match end {
                Step::Eof => "closed",
                _ => "reset",
            };
            let mut client = steps(&[head(len), want[..sent].to_vec()].concat(), 300_000);
            client.push(end);
            let (got, seen) = run(Dispatcher::new(client), len as u64, None).await;
            assert_eq!(
                got.end,
                Some(Err(BodyError::Ended {
                    received: sent as u64
                })),
                "{what}"
            );
            assert!(got.body == want[..2 * CHUNK], "{what}: the whole chunks");
            assert!(got.direct > 0, "{what}: nothing read directly");
            assert_eq!(seen, actix_saw(sent, &[]), "{what}");
        }
    }
}
