//! The one place that knows the limits and locks (the newest upstream
//! server's model):
//!
//! - Server-wide, at most `--max-requests` data requests (image GET, PUT,
//!   PATCH, checksum) at once; the next is refused at once with 503 `too
//!   many requests`. It bounds memory (each data request holds a few
//!   fixed-size buffers, see `crate::ops`), never a normal client.
//! - Per image, full-image PUTs (no `Content-Range`) run one at a time: the
//!   next one waits. Nothing else of a transfer is serialised or refused
//!   because another request of it is in flight: ranged PUTs, PATCH
//!   write/zero, flush and extents run concurrently (each on a connection of
//!   its own, see `crate::backend::nbd`).
//!
//! `--max-readers`/`--max-writers` are only what OPTIONS advertises per
//! transfer: how many requests one client may run in parallel on it.
//!
//! Every grant is an RAII guard: dropping it (request done, failed, or its
//! client gone) releases it.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use actix_web::http::StatusCode;
use parking_lot::Mutex;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

/// The reply to a data request over `--max-requests`.
pub const TOO_MANY_REQUESTS: &str = "too many requests";

/// Largest `--max-requests` (far above what memory allows anyway: each data
/// request may hold several MiB of buffers).
pub const MAX_REQUESTS_LIMIT: usize = 65536;

/// The server-wide bound on data requests in flight, refused at once when
/// full.
pub struct RequestSlots {
    max: usize,
    slots: Arc<Semaphore>,
}

/// One granted data-request slot, released when dropped.
pub type RequestSlot = OwnedSemaphorePermit;

impl RequestSlots {
    /// `max` slots (clamped to 1..=[`MAX_REQUESTS_LIMIT`]).
    pub fn new(max: usize) -> RequestSlots {
        let max = max.clamp(1, MAX_REQUESTS_LIMIT);
        RequestSlots {
            max,
            slots: Arc::new(Semaphore::new(max)),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn in_use(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// A slot, or 503 [`TOO_MANY_REQUESTS`] when all are taken.
    pub fn try_acquire(&self) -> Result<RequestSlot, ApiError> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            log::warn!(
                "refused a data request: {} already in flight (--max-requests)",
                self.max
            );
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, TOO_MANY_REQUESTS)
        })
    }
}

/// A held per-image full-PUT lock.
pub type ImageGuard = OwnedMutexGuard<()>;

/// Per-image locks serialising full-image PUTs, created on demand and
/// forgotten when unused.
#[derive(Default)]
pub struct ImageLocks {
    locks: Mutex<HashMap<String, Weak<AsyncMutex<()>>>>,
}

impl ImageLocks {
    pub fn new() -> ImageLocks {
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
    pub async fn lock(&self, id: &str) -> ImageGuard {
        self.get(id).lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_slots_refuse_when_full_and_release_on_drop() {
        let s = RequestSlots::new(2);
        let a = s.try_acquire().unwrap();
        let _b = s.try_acquire().unwrap();
        assert_eq!(s.in_use(), 2);
        let e = s.try_acquire().unwrap_err();
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.message(), TOO_MANY_REQUESTS);
        drop(a);
        assert_eq!(s.in_use(), 1);
        assert!(s.try_acquire().is_ok());
        assert_eq!(RequestSlots::new(0).max(), 1);
        assert_eq!(RequestSlots::new(usize::MAX).max(), MAX_REQUESTS_LIMIT);
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
