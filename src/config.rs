//! Transfer configuration: what a transfer's config says (a JSON object,
//! from a config file or a control-socket registration), parsed and
//! validated. Pure: no I/O, and nothing else of the crate but the JSON field
//! readers of `crate::validate` (see `crate::transfers` for where configs
//! come from and what they make).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::validate;

/// A config file larger than this is refused (`image_server.py` reads 4 KiB).
pub(crate) const MAX_CONFIG_BYTES: u64 = 4096;
/// Longest accepted transfer id (one file name component).
pub(crate) const MAX_ID_LEN: usize = 255;
/// `idle_timeout_seconds` below 1 means this; so does its absence from a
/// config file (`image_server.py` had no idle timeout).
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(86400);
/// A transfer registered over the control socket without
/// `idle_timeout_seconds` is dropped after this long without a request, as
/// CloudStack's newer image server does: an agent that forgets to
/// unregister (or dies) leaves no transfer behind for a day.
pub(crate) const REGISTERED_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Where a config comes from: decides the idle timeout when it sets none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Registered over the control socket.
    Registered,
    /// A file in the config dir.
    ConfigDir,
}

impl Source {
    /// How the control socket's `status` names it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Source::Registered => "registered",
            Source::ConfigDir => "config_dir",
        }
    }

    /// The idle timeout of a config without `idle_timeout_seconds`.
    pub(crate) fn default_idle_timeout(self) -> Duration {
        match self {
            Source::Registered => REGISTERED_IDLE_TIMEOUT,
            Source::ConfigDir => DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Where a transfer's bytes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    /// An NBD export on a Unix socket.
    Nbd {
        socket: PathBuf,
        export: Option<String>,
        export_bitmap: Option<String>,
    },
    /// A plain local file.
    File { path: PathBuf },
}

/// One validated transfer configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferConfig {
    pub backend: BackendConfig,
    pub idle_timeout: Duration,
}

impl TransferConfig {
    /// Parses and validates a config file's raw JSON bytes.
    pub fn parse(raw: &[u8]) -> Result<TransferConfig, String> {
        Self::from_value(&validate::parse(raw)?, Source::ConfigDir)
    }

    /// Validates a config given as a JSON value. Keys the server does not
    /// use (such as the `token` newer agents send) are accepted and ignored.
    pub(crate) fn from_value(value: &Value, source: Source) -> Result<TransferConfig, String> {
        let obj = validate::object(value, "config")?;
        let backend = validate::optional_str(obj, "backend")?
            .map_or_else(|| "nbd".to_string(), str::to_ascii_lowercase);
        let idle_timeout = match validate::optional_number(obj, "idle_timeout_seconds")? {
            None => source.default_idle_timeout(),
            Some(secs) if secs < 1.0 || !secs.is_finite() => DEFAULT_IDLE_TIMEOUT,
            Some(secs) => Duration::from_secs_f64(secs.min(10.0 * 365.0 * 86400.0)),
        };
        let backend = match backend.as_str() {
            "file" => {
                let path = required_path(obj, "file")?;
                BackendConfig::File { path }
            }
            "nbd" => {
                let socket = required_path(obj, "socket")?;
                let export = validate::optional(
                    obj,
                    "export",
                    |v| v.as_str().filter(|s| !s.is_empty() && !s.contains('\0')),
                    "\"export\" must be a non-empty string",
                )?;
                let export_bitmap = validate::optional(
                    obj,
                    "export_bitmap",
                    |v| v.as_str().filter(|s| !s.contains('\0')),
                    "\"export_bitmap\" must be a string",
                )?
                .filter(|s| !s.is_empty());
                BackendConfig::Nbd {
                    socket,
                    export: export.map(str::to_string),
                    export_bitmap: export_bitmap.map(str::to_string),
                }
            }
            other => return Err(format!("unsupported backend {other:?}")),
        };
        Ok(TransferConfig {
            backend,
            idle_timeout,
        })
    }
}

/// A path from the config: a non-blank string, absolute, normalised (no `.`
/// or `..` components), and not under /etc, /proc, /sys or /dev.
fn required_path(obj: &validate::Object, key: &str) -> Result<PathBuf, String> {
    let s = validate::required(obj, key, |v| {
        v.as_str().map(str::trim).filter(|s| !s.is_empty())
    })?;
    if s.contains('\0') {
        return Err(format!("\"{key}\" contains a NUL byte"));
    }
    let path = Path::new(s);
    if !path.is_absolute() {
        return Err(format!("\"{key}\" must be an absolute path"));
    }
    if s.split('/').any(|c| c == "." || c == "..")
        || s.contains("//")
        || (s.len() > 1 && s.ends_with('/'))
    {
        return Err(format!("\"{key}\" must be a normalised path"));
    }
    for denied in ["/etc", "/proc", "/sys", "/dev"] {
        if path.starts_with(denied) {
            return Err(format!("\"{key}\" must not be under {denied}"));
        }
    }
    Ok(path.to_path_buf())
}

/// A transfer id is one path component: not empty, not `.` or `..`, without
/// `/`, `\` or NUL, at most 255 bytes.
pub(crate) fn valid_transfer_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && !id.contains(['/', '\\', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<TransferConfig, String> {
        TransferConfig::from_value(&v, Source::ConfigDir)
    }

    #[test]
    fn ids() {
        for bad in ["", ".", "..", "a/b", "a\\b", "a\0b", &"x".repeat(256)] {
            assert!(!valid_transfer_id(bad), "{bad:?}");
        }
        for good in ["demo", "a.b", "...", "6c1f-uuid", &"x".repeat(255)] {
            assert!(valid_transfer_id(good), "{good:?}");
        }
    }

    #[test]
    fn nbd_defaults_and_fields() {
        let c = parse(json!({"socket": "/run/x.sock"})).unwrap();
        assert_eq!(
            c.backend,
            BackendConfig::Nbd {
                socket: "/run/x.sock".into(),
                export: None,
                export_bitmap: None
            }
        );
        assert_eq!(c.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        let c = parse(json!({"backend": "NBD", "socket": " /s ", "export": "vda",
                             "export_bitmap": "b1", "idle_timeout_seconds": 30}))
        .unwrap();
        assert_eq!(
            c.backend,
            BackendConfig::Nbd {
                socket: "/s".into(),
                export: Some("vda".into()),
                export_bitmap: Some("b1".into())
            }
        );
        assert_eq!(c.idle_timeout, Duration::from_secs(30));
        let c = parse(json!({"socket": "/s", "idle_timeout_seconds": 0})).unwrap();
        assert_eq!(c.idle_timeout, DEFAULT_IDLE_TIMEOUT);
    }

    #[test]
    fn idle_timeout_defaults_by_source() {
        let reg = |v: Value| TransferConfig::from_value(&v, Source::Registered).unwrap();
        assert_eq!(
            reg(json!({"socket": "/s"})).idle_timeout,
            REGISTERED_IDLE_TIMEOUT
        );
        assert_eq!(REGISTERED_IDLE_TIMEOUT, Duration::from_secs(600));
        assert_eq!(
            reg(json!({"socket": "/s", "idle_timeout_seconds": null})).idle_timeout,
            REGISTERED_IDLE_TIMEOUT
        );
        // Below 1 means a day, wherever the config comes from.
        for v in [0.0, 0.5, -3.0] {
            assert_eq!(
                reg(json!({"socket": "/s", "idle_timeout_seconds": v})).idle_timeout,
                DEFAULT_IDLE_TIMEOUT
            );
        }
        assert_eq!(
            reg(json!({"socket": "/s", "idle_timeout_seconds": 42})).idle_timeout,
            Duration::from_secs(42)
        );
        let file = TransferConfig::parse(br#"{"socket": "/s"}"#).unwrap();
        assert_eq!(file.idle_timeout, DEFAULT_IDLE_TIMEOUT);
    }

    #[test]
    fn unknown_keys_are_accepted() {
        for source in [Source::Registered, Source::ConfigDir] {
            let c = TransferConfig::from_value(
                &json!({"backend": "nbd", "socket": "/s", "token": "abc.def",
                        "transfer_id": "x", "extra": {"nested": [1, 2]}}),
                source,
            )
            .unwrap();
            assert_eq!(
                c.backend,
                BackendConfig::Nbd {
                    socket: "/s".into(),
                    export: None,
                    export_bitmap: None
                }
            );
        }
    }

    #[test]
    fn file_backend() {
        let c = parse(json!({"backend": "File", "file": "/var/lib/x.img"})).unwrap();
        assert_eq!(
            c.backend,
            BackendConfig::File {
                path: "/var/lib/x.img".into()
            }
        );
    }

    #[test]
    fn refused() {
        for v in [
            json!([]),
            json!("x"),
            json!({}),
            json!({"backend": 3, "socket": "/s"}),
            json!({"backend": "ceph", "socket": "/s"}),
            json!({"socket": ""}),
            json!({"socket": "   "}),
            json!({"socket": 5}),
            json!({"socket": "relative.sock"}),
            json!({"socket": "/a/../b"}),
            json!({"socket": "/a/./b"}),
            json!({"socket": "/etc/x.sock"}),
            json!({"socket": "/proc/1/fd/3"}),
            json!({"socket": "/sys/x"}),
            json!({"socket": "/dev/nbd0"}),
            json!({"socket": "/s", "export": ""}),
            json!({"socket": "/s", "export": 1}),
            json!({"socket": "/s", "export_bitmap": 1}),
            json!({"socket": "/s", "idle_timeout_seconds": "10"}),
            json!({"backend": "file"}),
            json!({"backend": "file", "file": "img"}),
        ] {
            assert!(parse(v.clone()).is_err(), "{v}");
        }
        assert!(TransferConfig::parse(b"{not json").is_err());
    }
}
