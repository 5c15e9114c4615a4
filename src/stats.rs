//! Per-transfer accounting: what the control socket's `status` reports for
//! one transfer. Byte counters are bumped once per chunk (512 KiB) on the data
//! path with a relaxed atomic add; request outcomes once per request when
//! its [`crate::transfers::Lease`] ends. Requests in flight and idleness come
//! from the lease tracking in [`crate::transfers::Transfer`], not from here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Counters of one transfer, from when the server made it (registered, or
/// its config file loaded).
#[derive(Debug)]
pub(crate) struct TransferStats {
    started_at: SystemTime,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    bytes_zeroed: AtomicU64,
    bytes_direct: AtomicU64,
    requests_served: AtomicU64,
    requests_failed: AtomicU64,
    nbd_timeouts: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// Unix time, seconds.
    pub started_at: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub bytes_direct: u64,
    pub requests_served: u64,
    pub requests_failed: u64,
    pub nbd_timeouts: u64,
}

impl Default for TransferStats {
    fn default() -> Self {
        Self::new()
    }
}

impl TransferStats {
    pub(crate) fn new() -> TransferStats {
        TransferStats {
            started_at: SystemTime::now(),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            bytes_zeroed: AtomicU64::new(0),
            bytes_direct: AtomicU64::new(0),
            requests_served: AtomicU64::new(0),
            requests_failed: AtomicU64::new(0),
            nbd_timeouts: AtomicU64::new(0),
        }
    }

    /// Image bytes handed to a GET response body.
    pub(crate) fn add_read(&self, n: u64) {
        self.bytes_read.fetch_add(n, Ordering::Relaxed);
    }

    /// Request-body bytes the backend accepted (PUT, PATCH with Range).
    pub(crate) fn add_written(&self, n: u64) {
        self.bytes_written.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes zeroed by PATCH `{"op":"zero"}`.
    pub(crate) fn add_zeroed(&self, n: u64) {
        self.bytes_zeroed.fetch_add(n, Ordering::Relaxed);
    }

    /// PUT body bytes read straight from the connection, around actix's
    /// payload decoder (the `direct_bytes=` of `PUT end` log lines).
    pub(crate) fn add_direct(&self, n: u64) {
        self.bytes_direct.fetch_add(n, Ordering::Relaxed);
    }

    /// A request failed because an NBD command timed out (once per
    /// request, like its `NBD timeout` log line).
    pub(crate) fn add_nbd_timeout(&self) {
        self.nbd_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_request(&self, served: bool) {
        let c = if served {
            &self.requests_served
        } else {
            &self.requests_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            started_at: self
                .started_at
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            bytes_zeroed: self.bytes_zeroed.load(Ordering::Relaxed),
            bytes_direct: self.bytes_direct.load(Ordering::Relaxed),
            requests_served: self.requests_served.load(Ordering::Relaxed),
            requests_failed: self.requests_failed.load(Ordering::Relaxed),
            nbd_timeouts: self.nbd_timeouts.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up() {
        let s = TransferStats::new();
        s.add_read(5);
        s.add_read(7);
        s.add_written(3);
        s.add_zeroed(9);
        s.add_direct(4);
        s.add_direct(6);
        s.add_nbd_timeout();
        s.add_request(true);
        s.add_request(false);
        s.add_request(true);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let snap = s.snapshot();
        assert!(snap.started_at <= now && snap.started_at + 60 > now);
        assert_eq!(
            snap,
            Snapshot {
                started_at: snap.started_at,
                bytes_read: 12,
                bytes_written: 3,
                bytes_zeroed: 9,
                bytes_direct: 10,
                requests_served: 2,
                requests_failed: 1,
                nbd_timeouts: 1,
            }
        );
    }
}
