//! The one place that knows the limits and locks (the newest upstream
//! server's model):
//!
//! - Server-wide, at most `--max-requests` data requests (image GET, PUT,
//!   PATCH, checksum) run at once. The next one waits for a slot, first come
//!   first served across all transfers (tokio's semaphore is FIFO), holding
//!   nothing of ours but its place in the queue: no buffer, NBD connection
//!   or lease is taken before the slot. A wait is bounded: past
//!   `--queue-timeout`, or when `--max-waiting` requests already wait, the
//!   request gets 503 with `Retry-After`. The slots bound memory (each data
//!   request holds a few fixed-size buffers, see `crate::ops`), never a
//!   normal client.
//! - Extents lists take a slot of a pool of their own
//!   ([`MAX_EXTENTS_LISTS`], the same kind of queue): they never wait behind
//!   data requests, and the lists held at once are bounded.
//! - Per image, full-image PUTs (no `Content-Range`) run one at a time: the
//!   next one waits. Nothing else of a transfer is serialised or refused
//!   because another request of it is in flight: ranged PUTs, PATCH
//!   write/zero, flush and extents run concurrently (each on a connection of
//!   its own, see `crate::backend::nbd_export`).
//! - Connections: [`ConnLimit`] is actix's per-worker connection limit,
//!   chosen from the open-file limit, and logs once when it is reached.
//!
//! `--max-readers`/`--max-writers` are only what OPTIONS advertises per
//! transfer: how many requests one client may run in parallel on it.
//!
//! Every grant is an RAII guard: dropping it (request done, failed, or its
//! client gone, also while it waits) releases it or leaves the queue.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use parking_lot::Mutex;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

/// The reply to a data request when `--max-waiting` requests already wait.
pub(crate) const TOO_MANY_REQUESTS: &str = "too many requests";
/// The reply to a request that waited `--queue-timeout` for a slot.
pub(crate) const QUEUE_TIMEOUT: &str = "timed out waiting for a request slot";
/// The reply to a request whose client went away while it waited.
pub(crate) const CLIENT_GONE: &str = "client went away while waiting";

/// Largest `--max-requests` (far above what memory allows anyway: each data
/// request may hold several MiB of buffers).
pub const MAX_REQUESTS_LIMIT: usize = 65536;
/// Largest `--max-waiting`.
pub const MAX_WAITING_LIMIT: usize = 1 << 20;
/// Default `--queue-timeout`, seconds: below the 60 s read timeouts common
/// in HTTP clients and proxies, so a client is answered (503, then retries
/// or fails cleanly) before it gives up on its own.
pub const DEFAULT_QUEUE_TIMEOUT_SECS: u64 = 30;
/// Default `--max-waiting`.
pub const DEFAULT_MAX_WAITING: usize = 1024;

/// How a wait for a slot is bounded.
#[derive(Debug, Clone, Copy)]
pub struct Queue {
    /// Longest wait for a slot.
    pub timeout: Duration,
    /// Requests that may wait at once; 0 refuses at once when all slots are
    /// taken.
    pub max_waiting: usize,
}

/// A FIFO pool of slots with a bounded queue: the server-wide bound on data
/// requests in flight ([`RequestSlots`]) and the extents pool.
pub(crate) struct RequestSlots {
    what: &'static str,
    max: usize,
    slots: Arc<Semaphore>,
    queue: Queue,
    waiting: AtomicUsize,
}

/// Extents lists built at once, server-wide.
pub(crate) const MAX_EXTENTS_LISTS: usize = 2;

/// One granted slot, released when dropped; says how long it was waited for.
pub(crate) struct RequestSlot {
    _permit: OwnedSemaphorePermit,
    waited: Duration,
}

impl RequestSlot {
    /// How long the request waited for it.
    pub(crate) fn waited(&self) -> Duration {
        self.waited
    }
}

/// A place in the queue, given back when dropped (slot granted, timed out,
/// or the waiting request dropped because its client went away).
struct Waiter<'a>(&'a AtomicUsize);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RequestSlots {
    /// `max` slots (clamped to 1..=[`MAX_REQUESTS_LIMIT`]) for `what`
    /// (named in the log), waited for as `queue` says.
    pub(crate) fn new(what: &'static str, max: usize, queue: Queue) -> RequestSlots {
        let max = max.clamp(1, MAX_REQUESTS_LIMIT);
        RequestSlots {
            what,
            max,
            slots: Arc::new(Semaphore::new(max)),
            queue: Queue {
                max_waiting: queue.max_waiting.min(MAX_WAITING_LIMIT),
                ..queue
            },
            waiting: AtomicUsize::new(0),
        }
    }

    #[cfg(test)]
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    #[cfg(test)]
    pub(crate) fn in_use(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// Requests waiting for a slot now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Joins the queue, unless `max_waiting` requests wait already.
    fn join(&self) -> Option<Waiter<'_>> {
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.queue.max_waiting).then_some(n + 1)
            })
            .ok()
            .map(|_| Waiter(&self.waiting))
    }

    /// A slot: at once when one is free, else after the requests that came
    /// first, across every transfer. 503 with `Retry-After` when
    /// `max_waiting` requests wait already or none came free within the
    /// queue timeout; [`CLIENT_GONE`] as soon as `gone` completes (the
    /// request's client closed its connection). Holds nothing while it
    /// waits but its place in the queue, which dropping the future gives up.
    pub(crate) async fn acquire(
        &self,
        gone: impl Future<Output = ()>,
    ) -> Result<RequestSlot, ApiError> {
        let started = Instant::now();
        // FIFO: a free permit is never left for a newcomer while others
        // wait (tokio's semaphore hands released permits to waiters first).
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(RequestSlot {
                _permit: permit,
                waited: Duration::ZERO,
            });
        }
        let Some(_waiter) = self.join() else {
            log::warn!(
                "refused a {}: {} waiting already (--max-waiting), {} in flight",
                self.what,
                self.queue.max_waiting,
                self.max
            );
            return Err(self.busy(TOO_MANY_REQUESTS));
        };
        log::debug!(
            "a {} waits for a slot: {} waiting",
            self.what,
            self.waiting()
        );
        let acquire = tokio::time::timeout(self.queue.timeout, self.slots.clone().acquire_owned());
        tokio::select! {
            biased;
            r = acquire => match r {
                Ok(Ok(permit)) => Ok(RequestSlot {
                    _permit: permit,
                    waited: started.elapsed(),
                }),
                // The semaphore is never closed.
                Ok(Err(_)) => Err(ApiError::internal("request slots closed")),
                Err(_) => {
                    log::warn!(
                        "refused a {} after waiting {} s for a slot (--queue-timeout)",
                        self.what,
                        self.queue.timeout.as_secs()
                    );
                    Err(self.busy(QUEUE_TIMEOUT))
                }
            },
            () = gone => {
                log::info!(
                    "a {} left the queue after {:.3} s: its client went away",
                    self.what,
                    started.elapsed().as_secs_f64()
                );
                Err(self.busy(CLIENT_GONE))
            }
        }
    }

    /// 503 with `Retry-After`.
    fn busy(&self, message: &str) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message).retry_after(RETRY_AFTER_SECS)
    }
}

/// `Retry-After` of a 503 from the request queue, seconds.
pub(crate) const RETRY_AFTER_SECS: u64 = 1;

/// actix's per-worker connection limit: what the open-file limit leaves
/// after `reserved` fds (NBD connections, files, listeners, the control
/// socket), shared by `workers`, at most actix's own default. Logs once
/// when the server holds that many connections (new ones then wait in the
/// listen backlog; actix resumes accepting as connections close), and again
/// only after the count fell well below it.
pub(crate) struct ConnLimit {
    per_worker: usize,
    total: usize,
    open: AtomicUsize,
    warned: AtomicBool,
}

/// actix-server's default connections per worker.
pub(crate) const ACTIX_MAX_CONNECTIONS: usize = 25_600;

impl ConnLimit {
    pub(crate) fn new(nofile: u64, reserved: u64, workers: usize) -> ConnLimit {
        let workers = workers.max(1);
        let usable = usize::try_from(nofile.saturating_sub(reserved)).unwrap_or(usize::MAX);
        let per_worker = (usable / workers).clamp(1, ACTIX_MAX_CONNECTIONS);
        ConnLimit {
            per_worker,
            total: per_worker * workers,
            open: AtomicUsize::new(0),
            warned: AtomicBool::new(false),
        }
    }

    /// actix-server's `max_concurrent_connections`.
    pub(crate) fn per_worker(&self) -> usize {
        self.per_worker
    }

    pub(crate) fn total(&self) -> usize {
        self.total
    }

    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Counts a new connection until the guard is dropped with it.
    pub(crate) fn opened(self: &Arc<Self>) -> ConnGuard {
        let n = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.total && !self.warned.swap(true, Ordering::AcqRel) {
            log::warn!(
                "{n} connections open, the limit ({} per worker, from the open-file limit): \
                 new connections wait in the listen backlog until some close",
                self.per_worker
            );
        }
        ConnGuard(self.clone())
    }
}

/// One open connection, counted by its [`ConnLimit`] until dropped.
pub(crate) struct ConnGuard(Arc<ConnLimit>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let n = self.0.open.fetch_sub(1, Ordering::AcqRel) - 1;
        if n * 10 < self.0.total * 9 {
            self.0.warned.store(false, Ordering::Release);
        }
    }
}

/// A held per-image full-PUT lock.
pub(crate) type ImageGuard = OwnedMutexGuard<()>;

/// Per-image locks serialising full-image PUTs, created on demand and
/// forgotten when unused.
#[derive(Default)]
pub(crate) struct ImageLocks {
    locks: Mutex<HashMap<String, Weak<AsyncMutex<()>>>>,
}

impl ImageLocks {
    pub(crate) fn new() -> ImageLocks {
        ImageLocks::default()
    }

    fn get(&self, id: &str) -> Arc<AsyncMutex<()>> {
        let mut map = self.locks.lock();
        if let Some(l) = map.get(id).and_then(Weak::upgrade) {
            return l;
        }
        if map.len() >= 1024 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let l = Arc::new(AsyncMutex::new(()));
        map.insert(id.to_string(), Arc::downgrade(&l));
        l
    }

    /// Waits for the image's full-PUT lock (FIFO: tokio's mutex is fair).
    pub(crate) async fn lock(&self, id: &str) -> ImageGuard {
        self.get(id).lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    fn queue(max_waiting: usize) -> Queue {
        Queue {
            timeout: Duration::from_secs(3600),
            max_waiting,
        }
    }

    #[test]
    fn slots_wait_in_order_and_the_queue_is_bounded() {
        rt().block_on(async {
            let s = RequestSlots::new("data request", 1, queue(2));
            let never = std::future::pending::<()>;
            let a = s.acquire(never()).await.unwrap();
            assert_eq!(a.waited(), Duration::ZERO);
            let mut b = std::pin::pin!(s.acquire(never()));
            let mut c = std::pin::pin!(s.acquire(never()));
            assert!(futures_util::FutureExt::now_or_never(b.as_mut()).is_none());
            assert!(futures_util::FutureExt::now_or_never(c.as_mut()).is_none());
            assert_eq!(s.waiting(), 2);
            // A third waiter does not fit: 503 at once, with Retry-After.
            let e = s.acquire(never()).await.err().unwrap();
            assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(e.message(), TOO_MANY_REQUESTS);
            assert_eq!(e.retry_after_secs(), Some(RETRY_AFTER_SECS));
            // First come, first served: b gets the slot, then c.
            drop(a);
            let b = b.await.unwrap();
            assert!(futures_util::FutureExt::now_or_never(c.as_mut()).is_none());
            assert_eq!(s.in_use(), 1);
            drop(b);
            let _c = c.await.unwrap();
            assert_eq!(s.waiting(), 0);
        });
    }

    #[test]
    fn a_waiter_leaves_when_its_client_goes_or_its_time_is_up() {
        rt().block_on(async {
            let s = RequestSlots::new("data request", 1, queue(8));
            let _a = s.acquire(std::future::pending()).await.unwrap();
            // Its client is gone: it leaves the queue at once.
            let e = s.acquire(std::future::ready(())).await.err().unwrap();
            assert_eq!(e.message(), CLIENT_GONE);
            assert_eq!(s.waiting(), 0);
            // A waiter dropped (actix dropped the request) leaves too.
            let mut w = Box::pin(s.acquire(std::future::pending()));
            assert!(futures_util::FutureExt::now_or_never(w.as_mut()).is_none());
            assert_eq!(s.waiting(), 1);
            drop(w);
            assert_eq!(s.waiting(), 0);
            // No slot within the queue timeout: 503.
            let short = RequestSlots::new(
                "data request",
                1,
                Queue {
                    timeout: Duration::from_millis(50),
                    max_waiting: 8,
                },
            );
            let _held = short.acquire(std::future::pending()).await.unwrap();
            let e = short.acquire(std::future::pending()).await.err().unwrap();
            assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(e.message(), QUEUE_TIMEOUT);
            assert_eq!(e.retry_after_secs(), Some(RETRY_AFTER_SECS));
            assert_eq!(short.waiting(), 0);
        });
        // No waiting allowed: refused at once; clamps.
        rt().block_on(async {
            let s = RequestSlots::new("data request", 1, queue(0));
            let _a = s.acquire(std::future::pending()).await.unwrap();
            let e = s.acquire(std::future::pending()).await.err().unwrap();
            assert_eq!(e.message(), TOO_MANY_REQUESTS);
        });
        assert_eq!(RequestSlots::new("x", 0, queue(0)).max(), 1);
        assert_eq!(
            RequestSlots::new("x", usize::MAX, queue(0)).max(),
            MAX_REQUESTS_LIMIT
        );
    }

    #[test]
    fn conn_limit_shares_the_fd_limit_and_caps_at_actix_default() {
        let l = ConnLimit::new(65536, 1536, 4);
        assert_eq!(l.per_worker(), 16000);
        assert_eq!(l.total(), 64000);
        assert_eq!(
            ConnLimit::new(1 << 20, 1536, 2).per_worker(),
            ACTIX_MAX_CONNECTIONS
        );
        assert_eq!(ConnLimit::new(1024, 1536, 2).per_worker(), 1);
        let l = Arc::new(ConnLimit::new(3, 0, 1));
        let g: Vec<_> = (0..3).map(|_| l.opened()).collect();
        assert_eq!(l.open(), 3);
        assert!(l.warned.load(Ordering::Acquire));
        drop(g);
        assert_eq!(l.open(), 0);
        assert!(!l.warned.load(Ordering::Acquire));
    }

    #[test]
    fn image_lock_is_per_image_and_waits() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = ImageLocks::new();
            let g = l.lock("a").await;
            let _other = l.lock("b").await;
            let second = l.lock("a");
            let mut second = std::pin::pin!(second);
            assert!(futures_util::FutureExt::now_or_never(second.as_mut()).is_none());
            drop(g);
            let _g2 = second.await;
        });
    }
}
