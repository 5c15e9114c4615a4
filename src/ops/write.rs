//! The write path: a request body, cut into `CHUNK`-sized chunks (read
//! around actix where it can be), into the backend's [`Writer`]: an NBD
//! export with requests in flight, or a file replaced whole.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use actix_web::rt::task::spawn_blocking;
use actix_web::web::Payload;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{retire_all, Buffers, OpError, OpLog, CHUNK, DEPTH, WINDOW};
use crate::backend::file::FileUpload;
use crate::backend::nbd_export::ExportConn;
use crate::backend::{BackendError, Writer};
use crate::direct_body::Inbox;
use crate::nbd::Retired;
use crate::stats::TransferStats;
use crate::transfers::Lease;
use crate::zeroes::is_zero;

/// Granularity of zero detection in uploads: qcow2's default cluster size,
/// so a zero run leaves whole clusters unallocated.
const ZERO_BLOCK: u64 = 64 * 1024;

/// Splits `data`, to be written at image offset `offset`, into maximal runs
/// of whole `ZERO_BLOCK`s (aligned to the image) that are all zero or not:
/// `(range in data, all zero)`, in order, covering `data`.
fn zero_runs(data: &[u8], offset: u64) -> Vec<(std::ops::Range<usize>, bool)> {
    let mut runs: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let block_end = (offset + pos as u64) / ZERO_BLOCK * ZERO_BLOCK + ZERO_BLOCK;
        let end = data.len().min((block_end - offset) as usize);
        let zero = is_zero(&data[pos..end]);
        match runs.last_mut() {
            Some((r, z)) if *z == zero => r.end = end,
            _ => runs.push((pos..end, zero)),
        }
        pos = end;
    }
    runs
}

/// Bytes a write completed so far, counted in the transfer's stats too.
struct Written {
    bytes: u64,
    stats: Arc<TransferStats>,
}

impl Written {
    fn add(&mut self, n: u64) {
        self.bytes += n;
        self.stats.add_written(n);
    }

    /// Counts what a retired request wrote or zeroed.
    fn retired(&mut self, r: Retired) {
        if let Retired::Done(n) = r {
            self.add(n);
        }
    }
}

/// What a write request holds until no write of it is in flight: the
/// count of what it wrote, its log line, guard (request slot, full-PUT
/// lock) and lease. Dropped, it ends them in that order (as a handler's
/// locals end): the log line says what landed before the next full PUT
/// may start, and before the lease ends (which an unregister waits for);
/// the request counts as failed unless its lease was marked served.
struct Held<G> {
    written: Written,
    log: Option<OpLog>,
    guard: Option<G>,
    lease: Lease,
}

impl<G> Held<G> {
    fn log(&mut self) -> &mut OpLog {
        self.log.as_mut().expect("the log line ends with Held")
    }
}

impl<G> Drop for Held<G> {
    fn drop(&mut self) {
        if let Some(mut log) = self.log.take() {
            log.bytes = self.written.bytes;
        }
        drop(self.guard.take());
        // Then the lease (a field).
    }
}

/// An NBD write's queue and what its request holds. Whatever ends the
/// request, they go together: when dropped with commands still in flight
/// (the handler was dropped: a client reset, a TLS stream cut, shutdown), a
/// task of its own on the worker takes them and waits for every command to
/// retire, counting what landed, before anything is given back. Nothing
/// blocks the event loop.
struct Inflight<G: Send + 'static> {
    queue: Option<ExportConn>,
    held: Option<Held<G>>,
}

impl<G: Send + 'static> Inflight<G> {
    /// The queue and the count (present until the end).
    fn parts(&mut self) -> (&mut ExportConn, &mut Written) {
        match (&mut self.queue, &mut self.held) {
            (Some(q), Some(h)) => (q, &mut h.written),
            _ => unreachable!("an Inflight is whole until it ends"),
        }
    }

    /// No command is in flight: the connection goes back (or is closed),
    /// then what the request holds is returned.
    fn finish(mut self) -> Option<Held<G>> {
        drop(self.queue.take());
        self.held.take()
    }
}

impl<G: Send + 'static> Drop for Inflight<G> {
    fn drop(&mut self) {
        let (Some(mut queue), Some(mut held)) = (self.queue.take(), self.held.take()) else {
            return;
        };
        if queue.queued() == 0 {
            drop(queue);
            return drop(held);
        }
        queue.discard();
        let drain = async move {
            retire_all(&mut queue, |r| held.written.retired(r)).await;
            let op = held.log().op;
            log::info!(
                "{op} image_id={} ended with NBD writes in flight: {} bytes landed",
                held.lease.id(),
                held.written.bytes
            );
            drop(queue);
            drop(held);
        };
        // The worker's runtime, whose reactor the queue is registered with.
        // Without one (the runtime is going away) the queue is closed here.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(drain)),
            Err(_) => drop(drain),
        }
    }
}

/// Why a write stopped.
enum Failure {
    /// The client: the body stalled or ended early.
    Client(OpError),
    Backend(BackendError),
}

/// Bodies at least this long are read around actix (see [`Direct`]).
const DIRECT_MIN: u64 = 1024 * 1024;
/// How long a probe may stay unanswered before the body is left to actix:
/// only a change in actix-http would make it (see `direct_body`), or a
/// client that stops sending right after the head.
const PROBE_WAIT: Duration = Duration::from_secs(1);

/// How the rest of a body is read.
enum Direct {
    /// Through actix's payload only.
    Never,
    /// Through the payload; the connection's stream can be asked for the
    /// rest once the body is long enough.
    Possible(Inbox),
    /// Asked: through the payload until the piece that ends at the probe.
    Probing(Inbox),
    /// Straight from the stream into the chunk the inbox holds; the
    /// payload brings only placeholders (counted, not copied).
    Reading(Inbox),
}

/// The request body as `CHUNK`-sized chunks (the last one shorter).
///
/// A body goes through actix-http's payload in pieces of at most 128 KiB
/// (its read size), each a view of actix's read buffer that is copied here
/// into the chunk being filled. A body of at least `DIRECT_MIN` is read
/// around that: once the [`Inbox`] shows that every body byte actix read is
/// here, the rest is read from the stream straight into the chunk, in reads
/// as large as the chunk's room (see `direct_body`). Chunk boundaries stay
/// where they would be either way.
///
/// Each piece is copied and dropped before anything awaits: only once no
/// view is left can actix reuse its read buffer whole and read the next
/// 128 KiB in one call. A piece kept alive (even an empty slice of it)
/// makes actix start a fresh 8 KiB buffer and read in 8-64 KiB steps: five
/// times the receive calls, each of which can send a window update that
/// wakes the client (measured: 44k receive calls per 1.5 GiB upload against
/// 26k, and less server CPU).
struct BodyChunks<'a> {
    payload: &'a mut Payload,
    length: u64,
    /// Body bytes taken from the payload so far (placeholders included).
    received: u64,
    timeout: Duration,
    /// Chunks filled and not yet returned (at most the few one piece ends).
    ready: std::collections::VecDeque<Bytes>,
    filling: Vec<u8>,
    /// Size of the chunk being filled (0: none started).
    want: usize,
    /// Body bytes in chunks so far (copied or read directly).
    copied: u64,
    buffers: Buffers,
    direct: Direct,
    /// How full the chunk was when it was given to the inbox.
    given: usize,
    /// Body bytes read straight from the stream.
    direct_bytes: u64,
    /// The transfer's counters, where `direct_bytes` are added too.
    stats: Arc<TransferStats>,
}

impl<'a> BodyChunks<'a> {
    fn new(body: Body<'a>, stats: Arc<TransferStats>) -> BodyChunks<'a> {
        let length = body.length;
        BodyChunks {
            payload: body.payload,
            length,
            received: 0,
            timeout: body.timeout,
            ready: std::collections::VecDeque::new(),
            filling: Vec::new(),
            want: 0,
            copied: 0,
            buffers: Buffers::new(CHUNK.min(usize::try_from(length).unwrap_or(usize::MAX))),
            direct: body.direct.map_or(Direct::Never, Direct::Possible),
            given: 0,
            direct_bytes: 0,
            stats,
        }
    }

    /// Starts a chunk if none is being filled.
    fn start_chunk(&mut self) {
        if self.want == 0 {
            let left = self.length - self.copied;
            self.want = self.buffers.size.min(left as usize);
            self.filling = self.buffers.get_empty();
        }
    }

    /// Queues the chunk being filled (full).
    fn finish_chunk(&mut self, full: Vec<u8>) {
        self.want = 0;
        let len = full.len();
        self.ready.push_back(self.buffers.lend(full, len));
    }

    /// Copies all of `piece` into chunks, queueing the ones it completes.
    fn absorb(&mut self, mut piece: &[u8]) {
        while !piece.is_empty() {
            self.start_chunk();
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

    /// Asks the stream for the rest of a long body, once.
    fn arm(&mut self) {
        if let Direct::Possible(inbox) = &self.direct {
            if self.length - self.received >= DIRECT_MIN {
                let inbox = inbox.clone();
                self.direct = if inbox.arm() {
                    Direct::Probing(inbox)
                } else {
                    Direct::Never
                };
            }
        }
    }

    /// The piece that ended at the probe was taken: the rest of the body
    /// is the next bytes of the stream.
    fn start_reading(&mut self, inbox: Inbox) {
        let budget = self.length - self.received;
        if budget == 0 {
            inbox.release();
            self.direct = Direct::Never;
            return;
        }
        self.start_chunk();
        self.given = self.filling.len();
        inbox.start(std::mem::take(&mut self.filling), self.want, budget);
        self.direct = Direct::Reading(inbox);
    }

    /// Queues the inbox's chunk once full, and gives it the next.
    fn take_direct(&mut self) {
        let Direct::Reading(inbox) = &self.direct else {
            return;
        };
        let Some(full) = inbox.take_full() else {
            return;
        };
        let inbox = inbox.clone();
        let n = (full.len() - self.given) as u64;
        self.direct_bytes += n;
        self.stats.add_direct(n);
        self.copied += n;
        self.finish_chunk(full);
        if self.copied < self.length {
            self.start_chunk();
            self.given = 0;
            inbox.give(std::mem::take(&mut self.filling), self.want);
        }
    }

    /// Body bytes that arrived so far: taken from actix or read directly
    /// (not placeholders, which actix may drop when the stream ends).
    fn arrived(&self) -> u64 {
        match &self.direct {
            Direct::Reading(inbox) => {
                self.copied + inbox.filled().map_or(0, |n| (n - self.given) as u64)
            }
            _ => self.received,
        }
    }

    /// Leaves the rest of the body to actix.
    fn stop_direct(&mut self) {
        if let Direct::Probing(inbox) | Direct::Reading(inbox) =
            std::mem::replace(&mut self.direct, Direct::Never)
        {
            inbox.release();
        }
    }

    /// The next chunk, `None` once `length` bytes were returned. Waits at
    /// most `timeout` for each piece of the body. Cancel-safe: all progress
    /// is kept in `self`.
    async fn next(&mut self) -> Result<Option<Bytes>, OpError> {
        loop {
            self.take_direct();
            if let Some(chunk) = self.ready.pop_front() {
                return Ok(Some(chunk));
            }
            if self.received == self.length {
                self.stop_direct();
                return Ok(None);
            }
            self.arm();
            let probing = matches!(self.direct, Direct::Probing(_));
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
                    return Err(OpError::BodyTimeout {
                        received: self.arrived(),
                    })
                }
                Ok(Some(Ok(piece))) => piece,
                Ok(end) => {
                    if let Some(Err(e)) = end {
                        log::info!("request body error after {} bytes: {e}", self.arrived());
                    }
                    return Err(OpError::BodyEnded {
                        received: self.arrived(),
                    });
                }
            };
            let take = piece.len().min((self.length - self.received) as usize);
            self.received += take as u64;
            match &self.direct {
                // Placeholders for bytes already in the inbox's chunk.
                Direct::Reading(_) => {}
                Direct::Probing(inbox) => {
                    let inbox = inbox.clone();
                    self.absorb(&piece[..take]);
                    if inbox.is_probe_end(piece.as_ptr_range().end as usize) {
                        self.start_reading(inbox);
                    }
                }
                Direct::Never | Direct::Possible(_) => self.absorb(&piece[..take]),
            }
            // `piece` is dropped here, before the next await.
        }
    }
}

impl Drop for BodyChunks<'_> {
    fn drop(&mut self) {
        self.stop_direct();
    }
}

/// The body of a write request: `length` bytes, with at most `timeout`
/// between its pieces. `direct`: the connection's [`Inbox`], when the body
/// is framed by its Content-Length alone (so that the rest of it can be
/// read around actix).
pub(crate) struct Body<'a> {
    pub payload: &'a mut Payload,
    pub length: u64,
    pub timeout: Duration,
    pub direct: Option<Inbox>,
}

/// Writes exactly `length` bytes of the request body to `writer` at
/// `offset` (0 for a replacing writer), then flushes when asked. The body is
/// read with at most `timeout` between pieces; a body that ends early or
/// stalls is an error, and nothing is committed for a replacing writer.
/// All-zero runs become zero requests where the backend can zero (the
/// export keeps them sparse). Returns the bytes written; bytes are added to
/// the transfer's stats as the backend completes them.
///
/// The request's `lease` (counted as served on success), `guard` and `log`
/// are given back only once no write of the request is in flight, however
/// the request ends: also when this future is dropped before it completes
/// (see [`Inflight`]; for a file, its writer thread holds them).
pub(crate) async fn write<G: Send + 'static>(
    body: Body<'_>,
    writer: Writer,
    offset: u64,
    flush: bool,
    log: OpLog,
    lease: Lease,
    guard: G,
) -> Result<u64, OpError> {
    if matches!(writer, Writer::Replace(_)) && offset != 0 {
        return Err(OpError::NotSupported(
            "ranged writes are not supported by the file backend",
        ));
    }
    let id = log.id.clone();
    let mut body = BodyChunks::new(body, lease.stats().clone());
    let held = Held {
        written: Written {
            bytes: 0,
            stats: lease.stats().clone(),
        },
        log: Some(log),
        guard: Some(guard),
        lease,
    };
    let (result, held) = match writer {
        Writer::At(h) => write_nbd(&mut body, h, offset, flush, held).await,
        Writer::Replace(u) => write_file(&mut body, u, flush, held).await,
    };
    let written = held.as_ref().map_or(0, |h| h.written.bytes);
    let result = match result {
        Ok(()) => Ok(written),
        Err(Failure::Client(e)) => Err(e),
        Err(Failure::Backend(e)) => {
            // A timeout was logged by the backend already.
            if !matches!(e, BackendError::Timeout(_)) {
                log::error!("write error image_id={id} err={e}");
            }
            Err(e.into())
        }
    };
    if let Some(mut held) = held {
        held.log().direct = Some(body.direct_bytes);
        if result.is_ok() {
            held.lease.served();
        }
    }
    result
}

/// Writes the body to an NBD export with up to `WINDOW` requests in flight
/// (to disjoint ranges, so their order does not matter), keeping them moving
/// while the next chunk arrives. On failure, waits for what is in flight.
/// Gives `held` back once nothing is (`None`: lost with a writer thread).
async fn write_nbd<G: Send + 'static>(
    body: &mut BodyChunks<'_>,
    handle: ExportConn,
    offset: u64,
    flush: bool,
    held: Held<G>,
) -> (Result<(), Failure>, Option<Held<G>>) {
    let caps = match handle.caps() {
        Ok(caps) => caps,
        Err(e) => return (Err(Failure::Backend(e)), Some(held)),
    };
    let queue = handle;
    let mut inflight = Inflight {
        queue: Some(queue),
        held: Some(held),
    };
    let (queue, written) = inflight.parts();
    let r = pump_nbd(body, queue, offset, caps.can_zero, flush, written).await;
    if r.is_err() {
        queue.discard();
        retire_all(queue, |r| written.retired(r)).await;
    }
    (r, inflight.finish())
}

async fn pump_nbd(
    body: &mut BodyChunks<'_>,
    handle: &mut ExportConn,
    mut offset: u64,
    zero_ok: bool,
    flush: bool,
    written: &mut Written,
) -> Result<(), Failure> {
    loop {
        let next = if handle.queued() > 0 {
            tokio::select! {
                biased;
                done = poll_fn(|cx| handle.poll_oldest(cx)) => {
                    written.retired(done.map_err(Failure::Backend)?);
                    continue;
                }
                next = body.next() => next,
            }
        } else {
            body.next().await
        };
        let Some(chunk) = next.map_err(Failure::Client)? else {
            break;
        };
        // A full window is drained completely before the next chunk goes
        // out: the worker then alternates between receiving a window's worth
        // of body and handing it to qemu-nbd, which costs both of them less
        // CPU than keeping the window topped up one request at a time
        // (measured: server 0.67 -> 0.56 s, qemu-nbd 0.74 -> 0.70 s per
        // 1.5 GiB upload; the client keeps sending into the socket buffer
        // meanwhile).
        if handle.queued() >= WINDOW {
            while handle.queued() > 0 {
                let done = poll_fn(|cx| handle.poll_oldest(cx)).await;
                written.retired(done.map_err(Failure::Backend)?);
            }
        }
        let len = chunk.len() as u64;
        if zero_ok {
            // Zero runs become WRITE_ZEROES, data runs writes of slices of
            // the chunk (no copy).
            for (run, zero) in zero_runs(&chunk, offset) {
                let at = offset + run.start as u64;
                let started = if zero {
                    handle.start_zero(at, run.len() as u64)
                } else {
                    handle.start_write(chunk.slice(run), at)
                };
                started.map_err(Failure::Backend)?;
            }
        } else {
            handle
                .start_write(chunk, offset)
                .map_err(Failure::Backend)?;
        }
        offset += len;
    }
    // A flush covers only writes that completed before it was sent.
    while handle.queued() > 0 {
        let done = poll_fn(|cx| handle.poll_oldest(cx)).await;
        written.retired(done.map_err(Failure::Backend)?);
    }
    if flush {
        handle.start_flush().map_err(Failure::Backend)?;
        poll_fn(|cx| handle.poll_oldest(cx))
            .await
            .map_err(Failure::Backend)?;
        handle.flushed();
    }
    Ok(())
}

/// Writes the body to a new file on a blocking thread, committing it only
/// when every byte arrived.
async fn write_file<G: Send + 'static>(
    body: &mut BodyChunks<'_>,
    upload: FileUpload,
    flush: bool,
    mut held: Held<G>,
) -> (Result<(), Failure>, Option<Held<G>>) {
    let (tx, mut rx) = mpsc::channel::<Option<Bytes>>(DEPTH);
    // The thread holds what the request holds until its last write: if
    // this future is dropped, it finds the channel closed and ends there.
    let writer = spawn_blocking(move || {
        let mut upload = upload;
        let result = loop {
            match rx.blocking_recv() {
                Some(Some(b)) => {
                    if let Err(e) = upload.write(&b) {
                        break Err(e);
                    }
                    held.written.add(b.len() as u64);
                }
                // Every byte arrived.
                Some(None) => break upload.commit(flush).map(|_| ()),
                // The body failed: the upload is dropped, the target unchanged.
                None => break Err(BackendError::Io("upload aborted".into())),
            }
        };
        (result, held)
    });
    let mut client_error = None;
    loop {
        match body.next().await {
            Ok(Some(chunk)) => {
                if tx.send(Some(chunk)).await.is_err() {
                    break;
                }
            }
            Ok(None) => {
                let _ = tx.send(None).await;
                break;
            }
            Err(e) => {
                client_error = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let (result, held) = match writer.await {
        Ok((result, held)) => (result, Some(held)),
        Err(_) => (Err(BackendError::Io("writer thread panicked".into())), None),
    };
    let result = match client_error {
        Some(e) => Err(Failure::Client(e)),
        None => result.map_err(Failure::Backend),
    };
    (result, held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_follow_image_aligned_blocks() {
        let b = ZERO_BLOCK as usize;
        let mut data = vec![0u8; 4 * b];
        assert_eq!(zero_runs(&data, 0), vec![(0..4 * b, true)]);
        assert_eq!(zero_runs(&[], 0), vec![]);
        // One byte of data makes its whole block data.
        data[b + 7] = 1;
        assert_eq!(
            zero_runs(&data, 0),
            vec![(0..b, true), (b..2 * b, false), (2 * b..4 * b, true)]
        );
        // Blocks are aligned to the image, not to the data: written at
        // offset 100, the first block is the first b - 100 bytes.
        assert_eq!(
            zero_runs(&data, 100),
            vec![
                (0..b - 100, true),
                (b - 100..2 * b - 100, false),
                (2 * b - 100..4 * b, true)
            ]
        );
        // Adjacent data blocks merge into one run; a short tail is a run.
        data[2 * b] = 1;
        data[4 * b - 1] = 1;
        assert_eq!(
            zero_runs(&data[..4 * b - 10], 0),
            vec![(0..b, true), (b..3 * b, false), (3 * b..4 * b - 10, true)]
        );
        assert_eq!(zero_runs(&data, 0), vec![(0..b, true), (b..4 * b, false)]);
    }
}
