//! The transfers the server holds, and the one policy that says what a
//! transfer id names.
//!
//! A transfer comes from one of two sources:
//!
//! - registered over the control socket (`crate::control`), held in memory
//!   (`registry`);
//! - a JSON file `<config-dir>/<id>`, as `image_server.py` (CloudStack's
//!   Python image server, which this one replaces) reads them, loaded on
//!   demand and cached while the file is unchanged (`config_dir`).
//!
//! [`Transfers`] holds both and decides: a registered transfer if there is
//! one (even while it is being unregistered, so that the id is refused
//! then), else the config dir's. The HTTP side asks it for a [`Lease`] per
//! request ([`Transfers::lookup`]); the control socket registers,
//! unregisters and reports; the server's idle sweeper and shutdown go
//! through [`Transfers::expire_idle`] and [`Transfers::all`].
//!
//! Every transfer gets the same [`TransferSettings`] (the server's command-line
//! settings for transfers, such as `--nbd-timeout`).

mod config_dir;
mod registry;
mod transfer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::config::{valid_transfer_id, Source, TransferConfig};
use config_dir::ConfigDir;
use registry::Registry;

pub use transfer::TransferSettings;
pub(crate) use transfer::{Lease, Transfer};

/// Every transfer of the server: the registered ones and the config dir's.
pub(crate) struct Transfers {
    registry: Registry,
    /// Shared with the blocking thread that reads a config file.
    config_dir: Arc<ConfigDir>,
}

impl Transfers {
    /// No transfer registered yet; config files are read from `config_dir`.
    pub(crate) fn new(config_dir: PathBuf, settings: TransferSettings) -> Transfers {
        Transfers {
            registry: Registry::new(settings),
            config_dir: Arc::new(ConfigDir::new(config_dir, settings)),
        }
    }

    /// What `id` names for one request: a lease on the registered transfer
    /// if there is one (even while it is being unregistered, so that the id
    /// is refused then), else on the config dir's. `None` (404) for an
    /// unknown or closed transfer. A registered transfer is found without
    /// leaving the calling task; only the config-dir fallback (it stats and
    /// may read a file) runs on the blocking pool.
    pub(crate) async fn lookup(&self, id: &str) -> Option<Lease> {
        if !valid_transfer_id(id) {
            return None;
        }
        if let Some(t) = self.registry.get(id) {
            return lease(&t, Source::Registered);
        }
        let dir = self.config_dir.clone();
        let owned = id.to_string();
        match tokio::task::spawn_blocking(move || dir.load(&owned)).await {
            Ok(t) => lease(&t?, Source::ConfigDir),
            Err(e) => {
                log::error!("cfg lookup failed image_id={id} err={e}");
                None
            }
        }
    }

    /// The transfer `id` as the server holds it now, for the control
    /// socket's `status`: the one [`Transfers::lookup`] would use, except
    /// that it takes no lease (so it counts as no request and no activity)
    /// and reads nothing from disk: a config-dir transfer is found once an
    /// HTTP request loaded it. Closed transfers (being unregistered, or
    /// idle) are found too.
    pub(crate) fn find(&self, id: &str) -> Option<(Arc<Transfer>, Source)> {
        if !valid_transfer_id(id) {
            return None;
        }
        if let Some(t) = self.registry.get(id) {
            return Some((t, Source::Registered));
        }
        self.config_dir.cached(id).map(|t| (t, Source::ConfigDir))
    }

    /// Every transfer currently held: registered ones (also those being
    /// unregistered) and those loaded from the config dir and still cached.
    pub(crate) fn all(&self) -> Vec<Arc<Transfer>> {
        let mut all = self.registry.all();
        all.extend(self.config_dir.all());
        all
    }

    /// Closes every transfer (registered or config-dir) idle for longer than
    /// its idle timeout; returns them so they can be retired (see
    /// [`Transfer::retire`]) off the async workers. Registered ones are
    /// dropped; config-dir ones stay, closed, until their file changes.
    pub(crate) fn expire_idle(&self, now: Instant) -> Vec<Arc<Transfer>> {
        let registered = self.registry.expire_idle(now);
        for t in &registered {
            log::info!(
                "image_id={} unregistered: no request for {} s (idle_timeout_seconds)",
                t.id(),
                t.config().idle_timeout.as_secs()
            );
        }
        let from_dir = self.config_dir.expire_idle(now);
        for t in &from_dir {
            log::info!(
                "image_id={} closed: no request for {} s (idle_timeout_seconds); refused until its config file changes",
                t.id(),
                t.config().idle_timeout.as_secs()
            );
        }
        let mut all = registered;
        all.extend(from_dir);
        all
    }

    /// Registers (or re-registers) `id`; see `Registry::register`. Returns
    /// the transfer it replaced, which the caller should retire once drained.
    pub(crate) fn register(
        &self,
        id: &str,
        config: TransferConfig,
    ) -> Result<Option<Arc<Transfer>>, String> {
        self.registry.register(id, config)
    }

    /// Starts unregistering `id`: from now on it grants no new requests
    /// (they get 404, whatever the config dir holds). The caller waits for
    /// [`Transfer::drained`], then calls [`Transfers::unregistered`]. `None`
    /// when `id` is not registered.
    pub(crate) fn begin_unregister(&self, id: &str) -> Option<Arc<Transfer>> {
        self.registry.begin_unregister(id)
    }

    /// Ends unregistering `t`: drops it, if `id` still names it (it may have
    /// been registered anew meanwhile).
    pub(crate) fn unregistered(&self, id: &str, t: &Arc<Transfer>) {
        self.registry.remove(id, t);
    }

    /// Registered transfers that are not being unregistered.
    pub(crate) fn registered_count(&self) -> usize {
        self.registry.active_count()
    }
}

/// A lease on `t` for one request, or `None` (logged) once it is closed.
fn lease(t: &Arc<Transfer>, source: Source) -> Option<Lease> {
    let lease = t.lease();
    if lease.is_none() {
        let id = t.id();
        match source {
            Source::Registered => log::info!("image_id={id} refused: being unregistered"),
            Source::ConfigDir => log::info!(
                "image_id={id} refused: closed after its idle timeout until its config file changes"
            ),
        }
    }
    lease
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;
    use serde_json::json;
    use std::time::Duration;

    fn socket_of(t: &Transfer) -> PathBuf {
        match &t.config().backend {
            BackendConfig::Nbd { socket, .. } => socket.clone(),
            BackendConfig::File { path } => path.clone(),
        }
    }

    /// A runtime whose blocking pool has one thread, and a way to keep that
    /// thread busy: what runs on the blocking pool then cannot finish.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .max_blocking_threads(1)
            .build()
            .unwrap()
    }

    #[test]
    fn a_registered_id_wins_even_while_unregistering_else_the_config_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t"), r#"{"socket":"/from-dir.sock"}"#).unwrap();
        let transfers = Transfers::new(dir.path().to_path_buf(), TransferSettings::default());
        let registered =
            TransferConfig::from_value(&json!({"socket": "/registered.sock"}), Source::Registered)
                .unwrap();
        runtime().block_on(async {
            assert!(transfers.lookup("..").await.is_none());
            assert!(transfers.lookup("missing").await.is_none());
            let lease = transfers.lookup("t").await.unwrap();
            assert_eq!(socket_of(&lease), PathBuf::from("/from-dir.sock"));
            drop(lease);
            assert_eq!(transfers.find("t").unwrap().1, Source::ConfigDir);

            assert!(transfers.register("t", registered).unwrap().is_none());
            let lease = transfers.lookup("t").await.unwrap();
            assert_eq!(socket_of(&lease), PathBuf::from("/registered.sock"));
            drop(lease);
            assert_eq!(transfers.registered_count(), 1);
            assert_eq!(transfers.all().len(), 2);

            // Being unregistered: refused, although the config dir has it.
            let t = transfers.begin_unregister("t").unwrap();
            assert!(transfers.lookup("t").await.is_none());
            let (found, source) = transfers.find("t").unwrap();
            assert_eq!(source, Source::Registered);
            assert!(found.is_closed());
            assert_eq!(transfers.registered_count(), 0);

            transfers.unregistered("t", &t);
            let lease = transfers.lookup("t").await.unwrap();
            assert_eq!(socket_of(&lease), PathBuf::from("/from-dir.sock"));
        });
    }

    #[test]
    fn only_the_config_dir_fallback_uses_the_blocking_pool() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), r#"{"socket":"/d.sock"}"#).unwrap();
        let transfers = Transfers::new(dir.path().to_path_buf(), TransferSettings::default());
        let cfg =
            TransferConfig::from_value(&json!({"socket": "/r.sock"}), Source::Registered).unwrap();
        transfers.register("reg", cfg).unwrap();
        let rt = runtime();
        rt.block_on(async {
            // The blocking pool's one thread is busy until `release` is sent.
            let (release, busy) = std::sync::mpsc::channel::<()>();
            let blocker = tokio::task::spawn_blocking(move || busy.recv());
            let hang_guard = Duration::from_secs(30);
            let lease = tokio::time::timeout(hang_guard, transfers.lookup("reg"))
                .await
                .expect("a registered transfer is found without the blocking pool");
            assert_eq!(lease.unwrap().id(), "reg");
            // The config-dir fallback waits for the blocking pool.
            let from_dir = transfers.lookup("file");
            let mut from_dir = std::pin::pin!(from_dir);
            assert!(
                tokio::time::timeout(Duration::from_millis(100), from_dir.as_mut())
                    .await
                    .is_err(),
                "the config dir is read on the blocking pool"
            );
            release.send(()).unwrap();
            let lease = tokio::time::timeout(hang_guard, from_dir).await.unwrap();
            assert_eq!(lease.unwrap().id(), "file");
            blocker.await.unwrap().unwrap();
        });
    }
}
