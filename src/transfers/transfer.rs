//! One transfer: its config, its storage (`backend::Storage`: the NBD
//! connection pool, what is unflushed) and the requests in flight on it ([`Lease`]), from the moment the server makes it (registered,
//! or its config file loaded) until it is retired.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::backend::{nbd_export, Storage};
use crate::config::TransferConfig;
use crate::stats::TransferStats;

/// What every transfer of the server gets, whatever its config says: the
/// server's command-line settings for transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferSettings {
    /// Longest wait for a reply to an NBD command before its request fails
    /// and the connection is discarded (`--nbd-timeout`; `None`: no limit).
    pub nbd_timeout: Option<Duration>,
}

impl Default for TransferSettings {
    fn default() -> TransferSettings {
        TransferSettings {
            nbd_timeout: Some(Duration::from_secs(
                nbd_export::DEFAULT_COMMAND_TIMEOUT_SECS,
            )),
        }
    }
}

/// One configured transfer: its config plus runtime state (its storage,
/// the requests in flight). A changed config file or a new
/// registration makes a new `Transfer`, so a stale connection is never reused.
///
/// Requests use a transfer through a [`Lease`]. Once the transfer is closed
/// (unregistered, or idle for longer than its `idle_timeout`) it grants no
/// more leases, so the id is unknown to new requests.
pub(crate) struct Transfer {
    id: String,
    config: TransferConfig,
    /// The storage: how it is opened, the NBD pool, what is unflushed.
    storage: Arc<Storage>,
    activity: Mutex<Activity>,
    /// Woken whenever the last lease is returned.
    drained: Notify,
    /// Bytes moved and requests ended, for the control socket's `status`.
    stats: Arc<TransferStats>,
}

/// What closing and the idle timeout look at.
struct Activity {
    in_flight: usize,
    closed: bool,
    /// When the last request started or ended (or the transfer was made).
    last_active: Instant,
}

impl Transfer {
    pub(crate) fn new(id: String, config: TransferConfig, settings: &TransferSettings) -> Transfer {
        let pool = nbd_export::Pool::new(settings.nbd_timeout);
        let stats = Arc::new(TransferStats::new());
        Transfer {
            storage: Storage::new(&id, config.backend.clone(), pool, stats.clone()),
            id,
            config,
            activity: Mutex::new(Activity {
                in_flight: 0,
                closed: false,
                last_active: Instant::now(),
            }),
            drained: Notify::new(),
            stats,
        }
    }

    /// This transfer's counters.
    pub(crate) fn stats(&self) -> &Arc<TransferStats> {
        &self.stats
    }

    /// The storage: open it, flush it, what it can do.
    pub(crate) fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn config(&self) -> &TransferConfig {
        &self.config
    }

    /// Starts a request on this transfer; `None` once it is closed.
    pub(crate) fn lease(self: &Arc<Self>) -> Option<Lease> {
        let mut a = self.activity.lock();
        if a.closed {
            return None;
        }
        a.in_flight += 1;
        a.last_active = Instant::now();
        Some(Lease {
            transfer: self.clone(),
            served: false,
        })
    }

    /// Counts as activity (restarts the idle timeout) without being a
    /// request; false once the transfer is closed.
    pub(crate) fn touch(&self) -> bool {
        let mut a = self.activity.lock();
        if a.closed {
            return false;
        }
        a.last_active = Instant::now();
        true
    }

    /// Requests holding a lease right now.
    pub(crate) fn in_flight(&self) -> usize {
        self.activity.lock().in_flight
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.activity.lock().closed
    }

    /// Refuses new leases from now on. Requests in flight go on; see
    /// [`Transfer::drained`] and [`Transfer::close_connections`].
    pub(crate) fn mark_closed(&self) {
        self.activity.lock().closed = true;
    }

    /// Closes the transfer if no request is in flight and none has started
    /// or ended for `idle_timeout` before `now`. True when this call closed it.
    pub(crate) fn close_if_idle(&self, now: Instant) -> bool {
        let mut a = self.activity.lock();
        if a.closed || a.in_flight > 0 {
            return false;
        }
        if now.saturating_duration_since(a.last_active) < self.config.idle_timeout {
            return false;
        }
        a.closed = true;
        true
    }

    /// How long the transfer has been without a request (zero while one is
    /// in flight).
    pub(crate) fn idle_for(&self, now: Instant) -> Duration {
        let a = self.activity.lock();
        if a.in_flight > 0 {
            Duration::ZERO
        } else {
            now.saturating_duration_since(a.last_active)
        }
    }

    /// Waits until no request holds a lease.
    pub(crate) async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a lease returned in between
            // still wakes us.
            notified.as_mut().enable();
            if self.activity.lock().in_flight == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Closes the pooled NBD connections, and every connection still lent
    /// out as soon as it comes back. Blocking (NBD disconnects).
    pub(crate) fn close_connections(&self) {
        self.storage.close();
    }

    /// The end of a transfer (unregistered, replaced, idle, or the server
    /// stopping): what was written since the last flush is flushed, then
    /// its connections are closed. Call it once no request is in flight, or
    /// requests still running may write after the flush. `when` completes
    /// the log lines ("at shutdown"). Blocking.
    pub(crate) fn retire(self: &Arc<Self>, when: &str) {
        match self.storage.flush_if_written() {
            Ok(true) => log::info!("flushed image_id={} {when}", self.id),
            Ok(false) => {}
            Err(e) => log::error!("flush {when} failed image_id={} err={e}", self.id),
        }
        self.close_connections();
    }
}

/// One request's use of a transfer: while any lease is alive the transfer
/// counts as busy (never idle, and unregistering waits for it). Dropping it
/// ends the request's use, whatever way the request ended, and counts the
/// request as served if [`Lease::served`] was called, else as failed.
pub(crate) struct Lease {
    transfer: Arc<Transfer>,
    served: bool,
}

impl Lease {
    pub(crate) fn transfer(&self) -> &Arc<Transfer> {
        &self.transfer
    }

    /// Marks the request as served (completed successfully).
    pub(crate) fn served(&mut self) {
        self.served = true;
    }
}

impl Deref for Lease {
    type Target = Transfer;
    fn deref(&self) -> &Transfer {
        &self.transfer
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Counted before the request leaves the in-flight count, so that
        // served + failed + in flight never misses a finished request.
        self.transfer.stats.add_request(self.served);
        let mut a = self.transfer.activity.lock();
        a.in_flight -= 1;
        a.last_active = Instant::now();
        let last = a.in_flight == 0;
        drop(a);
        if last {
            self.transfer.drained.notify_waiters();
        }
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lease({})", self.transfer.id)
    }
}
