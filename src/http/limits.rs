//! The one place that knows the limits and locks: at most `max_readers`
//! image reads and `max_writers` writes at once across the server (the next
//! one is refused at once), and one lock per image (PUT waits for it; the
//! other operations that take it are refused while it is held).
//!
//! Every grant is an RAII guard: dropping it (request done, failed, or its
//! client gone) releases it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use actix_web::http::StatusCode;
use parking_lot::Mutex;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use super::error::ApiError;

/// A counting limit refused at once when full.
pub struct Slots {
    max: usize,
    used: Arc<AtomicUsize>,
    what: &'static str,
}

/// One granted slot.
#[derive(Debug)]
pub struct Slot {
    used: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.used.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Slots {
    pub fn new(max: usize, what: &'static str) -> Slots {
        Slots {
            max,
            used: Arc::new(AtomicUsize::new(0)),
            what,
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// A slot, or 503 `too many parallel …` when all are taken.
    pub fn try_acquire(&self) -> Result<Slot, ApiError> {
        let mut cur = self.used.load(Ordering::Acquire);
        loop {
            if cur >= self.max {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("too many parallel {}", self.what),
                ));
            }
            match self
                .used
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Ok(Slot {
                        used: self.used.clone(),
                    })
                }
                Err(now) => cur = now,
            }
        }
    }
}

/// A held per-image lock.
pub type ImageGuard = OwnedMutexGuard<()>;

/// Per-image locks, created on demand and forgotten when unused.
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

    /// Waits for the image lock (PUT).
    pub async fn lock(&self, id: &str) -> ImageGuard {
        self.get(id).lock_owned().await
    }

    /// The image lock now, or 409 `image busy`.
    pub fn try_lock(&self, id: &str) -> Result<ImageGuard, ApiError> {
        self.get(id).try_lock_owned().map_err(|_| ApiError::busy())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_refuse_when_full_and_release_on_drop() {
        let s = Slots::new(2, "reads");
        let a = s.try_acquire().unwrap();
        let _b = s.try_acquire().unwrap();
        let e = s.try_acquire().unwrap_err();
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.message(), "too many parallel reads");
        drop(a);
        assert_eq!(s.in_use(), 1);
        assert!(s.try_acquire().is_ok());
        assert!(Slots::new(0, "writes").try_acquire().is_err());
    }

    #[test]
    fn image_lock_is_per_image() {
        let l = ImageLocks::new();
        let g = l.try_lock("a").unwrap();
        assert_eq!(l.try_lock("a").unwrap_err(), ApiError::busy());
        let _other = l.try_lock("b").unwrap();
        drop(g);
        assert!(l.try_lock("a").is_ok());
    }
}
