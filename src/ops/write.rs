//! The write path: a request body, as `CHUNK`-sized chunks (from
//! `direct_body::BodyReader`, which reads around actix where it can), into
//! the backend's [`Writer`]: an NBD export with requests in flight, or a
//! file replaced whole.

use std::future::poll_fn;
use std::sync::Arc;

use actix_web::rt::task::spawn_blocking;
use actix_web::web::Payload;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{retire_all, Buffers, OpError, OpLog, CHUNK, DEPTH, WINDOW};
use crate::backend::file::FileUpload;
use crate::backend::nbd_export::{ExportConn, Retired};
use crate::backend::{BackendError, Writer};
use crate::direct_body::BodyReader;
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

/// A write request's own parts besides its body, held until no write of it
/// is in flight: the count of what it wrote, its log line, guard (request
/// slot, full-PUT lock) and lease. Dropped, it ends them in that order (as
/// a handler's locals end): the log line says what landed before the next full PUT
/// may start, and before the lease ends (which an unregister waits for);
/// the request counts as failed unless its lease was marked served.
struct WriteRequest<G> {
    written: Written,
    log: Option<OpLog>,
    guard: Option<G>,
    lease: Lease,
}

impl<G> WriteRequest<G> {
    fn log(&mut self) -> &mut OpLog {
        self.log
            .as_mut()
            .expect("the log line ends with WriteRequest")
    }

    /// Logs that the request ended with NBD writes in flight, once they
    /// all retired: how many bytes landed.
    fn log_drained(&mut self) {
        let op = self.log().op;
        log::info!(
            "{op} image_id={} ended with NBD writes in flight: {} bytes landed",
            self.lease.id(),
            self.written.bytes
        );
    }
}

impl<G> Drop for WriteRequest<G> {
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
    request: Option<WriteRequest<G>>,
}

impl<G: Send + 'static> Inflight<G> {
    /// The queue and the count (present until the end).
    fn parts(&mut self) -> (&mut ExportConn, &mut Written) {
        match (&mut self.queue, &mut self.request) {
            (Some(q), Some(h)) => (q, &mut h.written),
            _ => unreachable!("an Inflight is whole until it ends"),
        }
    }

    /// No command is in flight: the connection goes back (or is closed),
    /// then what the request holds is returned.
    fn finish(mut self) -> Option<WriteRequest<G>> {
        drop(self.queue.take());
        self.request.take()
    }
}

impl<G: Send + 'static> Drop for Inflight<G> {
    fn drop(&mut self) {
        let (Some(mut queue), Some(mut request)) = (self.queue.take(), self.request.take()) else {
            return;
        };
        if queue.queued() == 0 {
            drop(queue);
            return drop(request);
        }
        queue.discard();
        let drain = async move {
            retire_all(&mut queue, |r| request.written.retired(r)).await;
            request.log_drained();
            drop(queue);
            drop(request);
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

/// The request body as lent `CHUNK`-sized chunks (the last one shorter),
/// from the handler's [`Body`] (which reads around actix where it can: see
/// `direct_body`), the bytes it read directly counted in the transfer's
/// stats as they arrive.
struct BodyChunks {
    body: Body,
    buffers: Buffers,
    /// The transfer's counters, where direct bytes are added too.
    stats: Arc<TransferStats>,
    /// Direct bytes counted in `stats` so far.
    counted: u64,
}

impl BodyChunks {
    /// Chunks of at most `chunk` bytes.
    fn new(body: Body, stats: Arc<TransferStats>, chunk: usize) -> BodyChunks {
        let size = chunk.min(usize::try_from(body.length()).unwrap_or(usize::MAX));
        BodyChunks {
            body,
            buffers: Buffers::new(size),
            stats,
            counted: 0,
        }
    }

    /// The next chunk, `None` once the whole body was returned. Cancel-safe.
    async fn next(&mut self) -> Result<Option<Bytes>, OpError> {
        let next = self.body.next_chunk(&self.buffers).await;
        let direct = self.body.direct_bytes();
        self.stats.add_direct(direct - self.counted);
        self.counted = direct;
        Ok(next?.map(|chunk| {
            let len = chunk.len();
            self.buffers.lend(chunk, len)
        }))
    }
}

/// The body of a write request: `length` bytes from actix's payload, with
/// at most the body timeout between its pieces (see
/// [`BodyReader::new`]).
pub(crate) type Body = BodyReader<Payload>;

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
    body: Body,
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
    // A body read straight from a socket is received into larger chunks
    // (see `BodyReader::chunk_size`), still written as `CHUNK`-sized NBD
    // requests. The file backend writes on a thread of its own with a few
    // chunks queued: its chunks stay small.
    let chunk = match writer {
        Writer::At(_) => body.chunk_size(CHUNK),
        Writer::Replace(_) => CHUNK,
    };
    let mut body = BodyChunks::new(body, lease.stats().clone(), chunk);
    let request = WriteRequest {
        written: Written {
            bytes: 0,
            stats: lease.stats().clone(),
        },
        log: Some(log),
        guard: Some(guard),
        lease,
    };
    let (result, request) = match writer {
        Writer::At(h) => write_nbd(&mut body, h, offset, flush, request).await,
        Writer::Replace(u) => write_file(&mut body, u, flush, request).await,
    };
    let written = request.as_ref().map_or(0, |h| h.written.bytes);
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
    if let Some(mut request) = request {
        request.log().direct = Some(body.body.direct_bytes());
        if result.is_ok() {
            request.lease.served();
        }
    }
    result
}

/// Writes the body to an NBD export with up to `WINDOW` requests or
/// `WINDOW` × `CHUNK` bytes of chunks in flight (to disjoint ranges, so
/// their order does not matter), keeping them moving while the next chunk
/// arrives. On failure, waits for what is in flight.
/// Gives `request` back once nothing is (`None`: lost with a writer thread).
async fn write_nbd<G: Send + 'static>(
    body: &mut BodyChunks,
    handle: ExportConn,
    offset: u64,
    flush: bool,
    request: WriteRequest<G>,
) -> (Result<(), Failure>, Option<WriteRequest<G>>) {
    let caps = match handle.caps() {
        Ok(caps) => caps,
        Err(e) => return (Err(Failure::Backend(e)), Some(request)),
    };
    let queue = handle;
    let mut inflight = Inflight {
        queue: Some(queue),
        request: Some(request),
    };
    let (queue, written) = inflight.parts();
    let r = pump_nbd(body, queue, offset, caps.can_zero, flush, written).await;
    if r.is_err() {
        // The same wait, and the same log line, as when the handler is
        // dropped instead (see `Inflight`): which of the two a client that
        // goes away mid-body causes depends on who sees it first.
        let in_flight = queue.queued() > 0;
        queue.discard();
        retire_all(queue, |r| written.retired(r)).await;
        if in_flight {
            if let Some(request) = inflight.request.as_mut() {
                request.log_drained();
            }
        }
    }
    (r, inflight.finish())
}

async fn pump_nbd(
    body: &mut BodyChunks,
    handle: &mut ExportConn,
    mut offset: u64,
    zero_ok: bool,
    flush: bool,
    written: &mut Written,
) -> Result<(), Failure> {
    // Bytes of the chunks queued since the window was last drained.
    let mut queued_bytes = 0;
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
        // meanwhile). Counted in bytes too, so that chunks written mostly
        // as zeroes (a request each) cannot hold more buffers.
        if handle.queued() >= WINDOW || queued_bytes >= WINDOW * CHUNK {
            while handle.queued() > 0 {
                let done = poll_fn(|cx| handle.poll_oldest(cx)).await;
                written.retired(done.map_err(Failure::Backend)?);
            }
            queued_bytes = 0;
        }
        queued_bytes += chunk.len();
        let len = chunk.len() as u64;
        // Zero runs become WRITE_ZEROES, data runs writes of `CHUNK`-sized
        // slices of the chunk (no copy).
        let runs = if zero_ok {
            zero_runs(&chunk, offset)
        } else {
            vec![(0..chunk.len(), false)]
        };
        for (run, zero) in runs {
            if zero {
                handle
                    .start_zero(offset + run.start as u64, run.len() as u64)
                    .map_err(Failure::Backend)?;
                continue;
            }
            for start in run.clone().step_by(CHUNK) {
                let end = run.end.min(start + CHUNK);
                handle
                    .start_write(chunk.slice(start..end), offset + start as u64)
                    .map_err(Failure::Backend)?;
            }
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
    body: &mut BodyChunks,
    upload: FileUpload,
    flush: bool,
    mut request: WriteRequest<G>,
) -> (Result<(), Failure>, Option<WriteRequest<G>>) {
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
                    request.written.add(b.len() as u64);
                }
                // Every byte arrived.
                Some(None) => break upload.commit(flush).map(|_| ()),
                // The body failed: the upload is dropped, the target unchanged.
                None => break Err(BackendError::Io("upload aborted".into())),
            }
        };
        (result, request)
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
    let (result, request) = match writer.await {
        Ok((result, request)) => (result, Some(request)),
        Err(_) => (Err(BackendError::Io("writer thread panicked".into())), None),
    };
    let result = match client_error {
        Some(e) => Err(Failure::Client(e)),
        None => result.map_err(Failure::Backend),
    };
    (result, request)
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
