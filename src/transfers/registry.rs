//! Transfers registered over the control socket: held in memory for the
//! life of the process, next to the config-dir ones (a registered id wins;
//! see [`super::Transfers::lookup`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::{Transfer, TransferSettings};
use crate::config::{valid_transfer_id, TransferConfig};

/// Most transfers registered at once; more are refused.
pub(crate) const MAX_REGISTERED: usize = 4096;

pub(super) struct Registry {
    map: Mutex<HashMap<String, Arc<Transfer>>>,
    /// What every transfer registered here gets.
    settings: TransferSettings,
}

impl Registry {
    pub(super) fn new(settings: TransferSettings) -> Registry {
        Registry {
            map: Mutex::new(HashMap::new()),
            settings,
        }
    }

    /// Registers (or re-registers) `id`. Registering the same config again
    /// keeps the transfer (and its pooled connections) and counts as
    /// activity; a different config replaces it: requests in flight finish
    /// on the old one, whose connections are closed when they end. Returns
    /// the replaced transfer, which the caller should retire.
    pub(super) fn register(
        &self,
        id: &str,
        config: TransferConfig,
    ) -> Result<Option<Arc<Transfer>>, String> {
        if !valid_transfer_id(id) {
            return Err("invalid transfer_id".into());
        }
        let mut map = self.map.lock();
        if let Some(old) = map.get(id) {
            if *old.config() == config {
                // Touch it (activity, but no request). A closed transfer
                // (being unregistered) is replaced below.
                if old.touch() {
                    return Ok(None);
                }
            }
        } else if map.len() >= MAX_REGISTERED {
            return Err(format!("too many transfers (at most {MAX_REGISTERED})"));
        }
        let new = Arc::new(Transfer::new(id.to_string(), config, &self.settings));
        let old = map.insert(id.to_string(), new);
        if let Some(old) = &old {
            old.mark_closed();
        }
        Ok(old)
    }

    /// The registered transfer `id` (possibly closed: being unregistered).
    pub(super) fn get(&self, id: &str) -> Option<Arc<Transfer>> {
        self.map.lock().get(id).cloned()
    }

    /// Starts unregistering `id`: from now on it grants no new requests
    /// (they get 404, whatever the config dir holds). The caller waits for
    /// [`Transfer::drained`] and then calls [`Registry::remove`].
    pub(super) fn begin_unregister(&self, id: &str) -> Option<Arc<Transfer>> {
        let t = self.map.lock().get(id).cloned()?;
        t.mark_closed();
        Some(t)
    }

    /// Removes `id` if it still names `t` (it may have been registered anew
    /// meanwhile).
    pub(super) fn remove(&self, id: &str, t: &Arc<Transfer>) {
        let mut map = self.map.lock();
        if map.get(id).is_some_and(|cur| Arc::ptr_eq(cur, t)) {
            map.remove(id);
        }
    }

    /// Every registered transfer (also those being unregistered).
    pub(super) fn all(&self) -> Vec<Arc<Transfer>> {
        self.map.lock().values().cloned().collect()
    }

    /// Registered transfers that are not being unregistered.
    pub(super) fn active_count(&self) -> usize {
        self.map.lock().values().filter(|t| !t.is_closed()).count()
    }

    /// Unregisters every transfer idle for longer than its idle timeout
    /// and returns them (still to be retired: see [`Transfer::retire`]).
    pub(super) fn expire_idle(&self, now: Instant) -> Vec<Arc<Transfer>> {
        let mut expired = Vec::new();
        self.map.lock().retain(|_, t| {
            if t.close_if_idle(now) {
                expired.push(t.clone());
                false
            } else {
                true
            }
        });
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn cfg(socket: &str, idle: u64) -> TransferConfig {
        TransferConfig::from_value(
            &json!({"socket": socket, "idle_timeout_seconds": idle}),
            crate::config::Source::Registered,
        )
        .unwrap()
    }

    #[test]
    fn register_replace_and_unregister() {
        let r = Registry::new(TransferSettings::default());
        assert!(r.register("a/b", cfg("/s", 10)).is_err());
        assert!(r.register("", cfg("/s", 10)).is_err());
        assert!(r.register("t", cfg("/s", 10)).unwrap().is_none());
        let first = r.get("t").unwrap();
        // Same config: kept.
        assert!(r.register("t", cfg("/s", 10)).unwrap().is_none());
        assert!(Arc::ptr_eq(&first, &r.get("t").unwrap()));
        // Other config: replaced, the old one closed.
        let old = r.register("t", cfg("/other", 10)).unwrap().unwrap();
        assert!(Arc::ptr_eq(&first, &old));
        assert!(old.is_closed());
        assert_eq!(r.active_count(), 1);

        let t = r.begin_unregister("t").unwrap();
        assert!(t.lease().is_none());
        assert_eq!(r.active_count(), 0);
        assert!(r.get("t").is_some(), "kept until drained");
        r.remove("t", &first);
        assert!(r.get("t").is_some(), "removes only the same transfer");
        r.remove("t", &t);
        assert!(r.get("t").is_none());
        assert!(r.begin_unregister("t").is_none());
    }

    #[test]
    fn idle_expiry_spares_busy_transfers() {
        let r = Registry::new(TransferSettings::default());
        r.register("busy", cfg("/s", 1)).unwrap();
        r.register("idle", cfg("/s", 1)).unwrap();
        r.register("long", cfg("/s", 1000)).unwrap();
        let lease = r.get("busy").unwrap().lease().unwrap();
        let later = Instant::now() + Duration::from_secs(5);
        let expired = r.expire_idle(later);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].id(), "idle");
        assert!(expired[0].is_closed());
        assert!(r.get("idle").is_none());
        assert!(r.get("busy").is_some());
        drop(lease);
        assert_eq!(
            r.expire_idle(Instant::now() + Duration::from_secs(5))
                .iter()
                .map(|t| t.id().to_string())
                .collect::<Vec<_>>(),
            vec!["busy".to_string()]
        );
    }

    #[test]
    fn drained_waits_for_the_last_lease() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let t = Arc::new(Transfer::new(
            "x".into(),
            cfg("/s", 10),
            &TransferSettings::default(),
        ));
        let a = t.lease().unwrap();
        let b = t.lease().unwrap();
        assert_eq!(t.in_flight(), 2);
        t.mark_closed();
        assert!(t.lease().is_none());
        rt.block_on(async {
            let waiter = tokio::spawn({
                let t = t.clone();
                async move { t.drained().await }
            });
            tokio::task::yield_now().await;
            drop(a);
            tokio::task::yield_now().await;
            assert!(!waiter.is_finished());
            drop(b);
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("drained after the last lease")
                .unwrap();
        });
    }
}
