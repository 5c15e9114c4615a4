//! Transfers configured as files `<config-dir>/<id>` (as `image_server.py`
//! reads them): read on demand, cached while the file is unchanged.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::{Transfer, TransferSettings};
use crate::config::{valid_transfer_id, TransferConfig, MAX_CONFIG_BYTES};

/// What identifies one version of a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    mtime_ns: i128,
    ctime_ns: i128,
    len: u64,
    ino: u64,
}

impl Stamp {
    fn of(md: &std::fs::Metadata) -> Stamp {
        Stamp {
            mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
            ctime_ns: i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec()),
            len: md.len(),
            ino: md.ino(),
        }
    }
}

/// Transfers configured as files `<dir>/<id>`, read on demand and cached
/// while the file is unchanged.
pub(super) struct ConfigDir {
    dir: PathBuf,
    cache: Mutex<HashMap<String, (Stamp, Arc<Transfer>)>>,
    /// What every transfer loaded here gets.
    settings: TransferSettings,
}

impl ConfigDir {
    pub(super) fn new(dir: PathBuf, settings: TransferSettings) -> ConfigDir {
        ConfigDir {
            dir,
            cache: Mutex::new(HashMap::new()),
            settings,
        }
    }

    /// Every transfer loaded from the config dir and still cached.
    pub(super) fn all(&self) -> Vec<Arc<Transfer>> {
        self.cache.lock().values().map(|(_, t)| t.clone()).collect()
    }

    /// The transfer `id` if it is loaded (cached), without touching the
    /// disk: possibly closed, possibly older than the file now on disk.
    pub(super) fn cached(&self, id: &str) -> Option<Arc<Transfer>> {
        self.cache.lock().get(id).map(|(_, t)| t.clone())
    }

    /// The transfer `id`, or `None` when the id is invalid or its config is
    /// missing, unreadable or invalid (logged). Blocking: stats and reads a file.
    pub(super) fn load(&self, id: &str) -> Option<Arc<Transfer>> {
        if !valid_transfer_id(id) {
            return None;
        }
        let path = self.dir.join(id);
        let md = match std::fs::metadata(&path) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.cache.lock().remove(id);
                return None;
            }
            Err(e) => {
                log::error!("cfg stat failed image_id={id} err={e}");
                return None;
            }
        };
        let stamp = Stamp::of(&md);
        if let Some(t) = cached_version(&self.cache.lock(), id, stamp) {
            return Some(t);
        }
        let loaded = if !md.is_file() {
            Err("not a regular file".to_string())
        } else if md.len() > MAX_CONFIG_BYTES {
            Err(format!("larger than {MAX_CONFIG_BYTES} bytes"))
        } else {
            read_limited(&path)
                .map_err(|e| format!("read failed: {e}"))
                .and_then(|raw| TransferConfig::parse(&raw))
        };
        match loaded {
            Ok(cfg) => {
                let mut cache = self.cache.lock();
                // A concurrent request may have loaded the same version
                // meanwhile: one transfer per version, or requests would
                // split over transfers (pools, counters, unflushed writes)
                // and those the cache does not hold would be dropped without
                // the flush at shutdown, their connections closed.
                if let Some(t) = cached_version(&cache, id, stamp) {
                    return Some(t);
                }
                let t = Arc::new(Transfer::new(id.to_string(), cfg, &self.settings));
                cache.insert(id.to_string(), (stamp, t.clone()));
                Some(t)
            }
            Err(e) => {
                log::error!("cfg invalid image_id={id} err={e}");
                self.cache.lock().remove(id);
                None
            }
        }
    }
}

impl ConfigDir {
    /// Closes every cached transfer idle for longer than its idle timeout
    /// and returns them (still to be retired: see [`Transfer::retire`]). They
    /// stay cached, closed, so the id is refused until its file changes.
    pub(super) fn expire_idle(&self, now: Instant) -> Vec<Arc<Transfer>> {
        self.cache
            .lock()
            .values()
            .filter(|(_, t)| t.close_if_idle(now))
            .map(|(_, t)| t.clone())
            .collect()
    }
}

/// The transfer made from version `stamp` of `id`'s config file, if cached.
fn cached_version(
    cache: &HashMap<String, (Stamp, Arc<Transfer>)>,
    id: &str,
    stamp: Stamp,
) -> Option<Arc<Transfer>> {
    cache
        .get(id)
        .filter(|(cached, _)| *cached == stamp)
        .map(|(_, t)| t.clone())
}

fn read_limited(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::other("config too large"));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;
    use std::time::Duration;

    #[test]
    fn config_dir_caches_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let reg = ConfigDir::new(dir.path().to_path_buf(), TransferSettings::default());
        assert!(reg.load("t1").is_none());
        std::fs::write(dir.path().join("t1"), r#"{"socket":"/a.sock"}"#).unwrap();
        let a = reg.load("t1").unwrap();
        let b = reg.load("t1").unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "unchanged file is served from the cache"
        );
        std::fs::write(dir.path().join("t1"), r#"{"socket":"/bb.sock"}"#).unwrap();
        let c = reg.load("t1").unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(
            c.config().backend,
            BackendConfig::Nbd {
                socket: "/bb.sock".into(),
                export: None,
                export_bitmap: None
            }
        );
        // Idle expiry keeps the closed transfer until the file changes.
        std::fs::write(
            dir.path().join("t1"),
            r#"{"socket":"/bb.sock","idle_timeout_seconds":1}"#,
        )
        .unwrap();
        let d = reg.load("t1").unwrap();
        let expired = reg.expire_idle(Instant::now() + Duration::from_secs(2));
        assert_eq!(expired.len(), 1);
        assert!(Arc::ptr_eq(&d, &expired[0]));
        assert!(reg.load("t1").unwrap().is_closed());
        std::fs::write(
            dir.path().join("t1"),
            r#"{"socket":"/cc.sock","idle_timeout_seconds":1}"#,
        )
        .unwrap();
        assert!(!reg.load("t1").unwrap().is_closed());
        std::fs::write(dir.path().join("t1"), "x".repeat(5000)).unwrap();
        assert!(reg.load("t1").is_none());
        std::fs::remove_file(dir.path().join("t1")).unwrap();
        assert!(reg.load("t1").is_none());
        assert!(reg.load("..").is_none());
    }

    #[test]
    fn concurrent_first_loads_make_one_transfer() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t"), r#"{"socket":"/a.sock"}"#).unwrap();
        const THREADS: usize = 8;
        for round in 0..50 {
            let cfgs = ConfigDir::new(dir.path().to_path_buf(), TransferSettings::default());
            let start = std::sync::Barrier::new(THREADS);
            let loaded: Vec<Arc<Transfer>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|_| {
                        s.spawn(|| {
                            start.wait();
                            cfgs.load("t").unwrap()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let cached = cfgs.cached("t").unwrap();
            for t in &loaded {
                assert!(
                    Arc::ptr_eq(t, &cached),
                    "round {round}: a request got a transfer the cache does not hold"
                );
            }
        }
    }
}
