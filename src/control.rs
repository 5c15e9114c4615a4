//! The control socket: how the CloudStack agent registers and unregisters
//! transfers (newer upstream servers). A Unix stream socket, mode 0660; per
//! connection one newline-terminated JSON request and one JSON reply (also
//! newline-terminated), then the server closes the connection:
//!
//! - `{"action":"register","transfer_id":ID,"config":{…}}` →
//!   `{"status":"ok","active_transfers":N}`
//! - `{"action":"unregister","transfer_id":ID}` → waits for the requests in
//!   flight on that transfer, drops it, flushes what was written since the
//!   last flush and closes its NBD connections, then
//!   `{"status":"ok","active_transfers":N}` (N: registered transfers left;
//!   the agent stops the server when it reaches 0)
//! - `{"action":"status"}` → `{"status":"ok","active_transfers":N}`
//! - `{"action":"status","transfer_id":ID}` → the same plus
//!   `"transfer":{…}`, that transfer's figures (see [`transfer_status`]);
//!   an id the server does not hold is an error
//! - anything else → `{"status":"error","message":…}`
//!
//! Requests are bounded in size and in time; nothing a client sends can stop
//! the listener. Runs as tasks on the actix system runtime, never on the
//! HTTP workers.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::config::{valid_transfer_id, BackendConfig, Source, TransferConfig};
use crate::transfers::{Transfer, Transfers};
use crate::unix_socket::{self, SocketFile};
use crate::validate::{self, Object};

/// Where the agent expects the control socket.
pub const DEFAULT_SOCKET: &str = "/var/run/cloudstack/image-server.sock";
/// Longest accepted request line.
pub(crate) const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Time a client has to send its whole request.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to take the reply.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Control connections served at once; more get an error reply at once.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// After the reply, what the client still sends (the rest of an oversized
/// request) is read and dropped, up to this much and this long, so that
/// closing does not reset the connection before the client read the reply.
const MAX_DRAIN_BYTES: usize = 1024 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A bound control socket. Its file is removed when this is dropped (if it
/// is still the one we made).
pub(crate) struct ControlSocket {
    listener: UnixListener,
    file: SocketFile,
}

impl ControlSocket {
    /// Binds `path` (see [`unix_socket::bind`]: parent directory created,
    /// a stale socket replaced, mode 0660). Must run inside the tokio
    /// runtime.
    pub(crate) fn bind(path: &Path) -> io::Result<ControlSocket> {
        let (listener, file) = unix_socket::bind(path, "control socket")?;
        listener.set_nonblocking(true)?;
        Ok(ControlSocket {
            listener: UnixListener::from_std(listener)?,
            file,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        self.file.path()
    }

    /// Accepts connections until the runtime stops. `unregister_wait`
    /// bounds how long an unregister waits for requests in flight before
    /// it replies with an error (the transfer is still dropped once they
    /// end).
    pub(crate) async fn serve(self, state: Arc<Transfers>, unregister_wait: Duration) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let stream = match self.listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and the like: do not spin.
                    log::error!("control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = state.clone();
            match limit.clone().try_acquire_owned() {
                Ok(permit) => {
                    actix_web::rt::spawn(async move {
                        handle(stream, &state, unregister_wait).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    actix_web::rt::spawn(async move {
                        reply(stream, error("too many control connections")).await;
                    });
                }
            }
        }
    }
}

fn error(message: impl Into<String>) -> Value {
    json!({"status": "error", "message": message.into()})
}

fn ok(state: &Transfers) -> Value {
    json!({"status": "ok", "active_transfers": state.registered_count()})
}

async fn handle(mut stream: UnixStream, state: &Arc<Transfers>, unregister_wait: Duration) {
    let answer = match tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await {
        Err(_) => error("timed out reading the request"),
        Ok(Err(e)) => error(e),
        Ok(Ok(line)) => process(&line, state, unregister_wait).await,
    };
    if answer["status"] == "error" {
        log::warn!("control request failed: {}", answer["message"]);
    }
    reply(stream, answer).await;
}

/// Reads one request: up to the first newline, or to the end of the stream.
async fn read_request(stream: &mut UnixStream) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read failed: {e}"))?;
        if n == 0 {
            break;
        }
        if let Some(nl) = chunk[..n].iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&chunk[..nl]);
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST_BYTES {
            break;
        }
    }
    if buf.len() > MAX_REQUEST_BYTES {
        return Err(format!("request larger than {MAX_REQUEST_BYTES} bytes"));
    }
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Err("empty request".into());
    }
    Ok(buf)
}

async fn reply(mut stream: UnixStream, answer: Value) {
    let mut out = answer.to_string();
    out.push('\n');
    let sent = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(out.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        log::info!("control client went away before taking its reply");
        return;
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < MAX_DRAIN_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

async fn process(line: &[u8], state: &Arc<Transfers>, unregister_wait: Duration) -> Value {
    let value = match validate::parse(line) {
        Ok(v) => v,
        Err(e) => return error(e),
    };
    let obj = match validate::object(&value, "request") {
        Ok(obj) => obj,
        Err(e) => return error(e),
    };
    match validate::required_str(obj, "action") {
        Ok("status") => status(obj, state),
        Ok("register") => register(obj, state).await,
        Ok("unregister") => unregister(obj, state, unregister_wait).await,
        Ok(a) => {
            let shown: String = a.chars().take(64).collect();
            error(format!("unknown action: {shown:?}"))
        }
        Err(e) => error(e),
    }
}

fn transfer_id(obj: &Object) -> Result<&str, Value> {
    match validate::required_str(obj, "transfer_id") {
        Ok(id) if valid_transfer_id(id) => Ok(id),
        Ok(_) => Err(error("invalid transfer_id")),
        Err(e) => Err(error(e)),
    }
}

/// `status`, for the server or (with `transfer_id`) for one transfer.
fn status(obj: &Object, state: &Transfers) -> Value {
    if validate::present(obj, "transfer_id").is_none() {
        return ok(state);
    }
    let id = match transfer_id(obj) {
        Ok(id) => id,
        Err(e) => return e,
    };
    match state.find(id) {
        None => error("unknown transfer_id"),
        Some((t, source)) => {
            let mut reply = ok(state);
            reply["transfer"] = transfer_status(&t, source.name(), Instant::now());
            reply
        }
    }
}

/// One transfer's figures, since the server made it (registered it, or
/// loaded its config file; a new registration with another config, or a
/// changed config file, starts from zero):
///
/// - `bytes_read`: image bytes sent in GET response bodies
/// - `bytes_written`: request-body bytes stored by PUT and PATCH with Range
///   (all-zero chunks stored sparsely count too)
/// - `bytes_zeroed`: bytes zeroed by PATCH `{"op":"zero"}`
/// - `bytes_direct`: PUT body bytes read straight from the connection,
///   around actix's payload decoder (a `PUT end` log line's `direct_bytes=`
///   is one request's share)
/// - `requests_served` / `requests_failed`: requests on this transfer that
///   ended, successfully or not (an error reply, including 503 too many
///   requests, or a GET body cut short by a backend error or the client
///   going away); `requests_in_flight`: those running now
/// - `nbd_timeouts`: requests that failed because an NBD command timed out
///   (`--nbd-timeout`; one per request, like its `NBD timeout` log line)
/// - `idle_seconds`: whole seconds since the last request started or ended
///   (0 while one is running)
/// - `idle_timeout_seconds`: after how many idle seconds it is dropped
///   (from its config; absent there: 600 registered, 86400 config dir)
/// - `started_at`: when the server made the transfer, Unix time in seconds
/// - `closed`: refuses new requests (being unregistered, or idle)
pub(crate) fn transfer_status(t: &Transfer, source: &str, now: Instant) -> Value {
    let s = t.stats().snapshot();
    json!({
        "transfer_id": t.id(),
        "source": source,
        "closed": t.is_closed(),
        "bytes_read": s.bytes_read,
        "bytes_written": s.bytes_written,
        "bytes_zeroed": s.bytes_zeroed,
        "bytes_direct": s.bytes_direct,
        "requests_served": s.requests_served,
        "requests_failed": s.requests_failed,
        "requests_in_flight": t.in_flight(),
        "nbd_timeouts": s.nbd_timeouts,
        "idle_seconds": t.idle_for(now).as_secs(),
        "idle_timeout_seconds": t.config().idle_timeout.as_secs(),
        "started_at": s.started_at,
    })
}

fn describe(config: &TransferConfig) -> String {
    match &config.backend {
        BackendConfig::Nbd {
            socket,
            export,
            export_bitmap,
        } => format!(
            "backend=nbd socket={} export={} export_bitmap={}",
            socket.display(),
            export.as_deref().unwrap_or("-"),
            export_bitmap.as_deref().unwrap_or("-")
        ),
        BackendConfig::File { path } => format!("backend=file file={}", path.display()),
    }
}

async fn register(obj: &Object, state: &Arc<Transfers>) -> Value {
    let id = match transfer_id(obj) {
        Ok(id) => id,
        Err(e) => return e,
    };
    let Some(raw) = validate::present(obj, "config") else {
        return error("missing \"config\"");
    };
    // The same validation as config files: absolute, normalised paths,
    // nothing under /etc, /proc, /sys or /dev.
    let config = match TransferConfig::from_value(raw, Source::Registered) {
        Ok(c) => c,
        Err(e) => {
            log::error!("control: register refused transfer_id={id} err={e}");
            return error(format!("invalid config: {e}"));
        }
    };
    let detail = describe(&config);
    let idle = config.idle_timeout.as_secs();
    match state.register(id, config) {
        Ok(replaced) => {
            log::info!("control: registered transfer_id={id} {detail} idle_timeout_s={idle}");
            if let Some(old) = replaced {
                log::info!("control: transfer_id={id} replaced its previous config");
                // Retired once its own requests are done (in the background).
                actix_web::rt::spawn(async move {
                    old.drained().await;
                    let _ = actix_web::rt::task::spawn_blocking(move || {
                        old.retire("as its config was replaced")
                    })
                    .await;
                });
            }
            ok(state)
        }
        Err(e) => {
            log::error!("control: register refused transfer_id={id} err={e}");
            error(e)
        }
    }
}

async fn unregister(obj: &Object, state: &Arc<Transfers>, wait: Duration) -> Value {
    let id = match transfer_id(obj) {
        Ok(id) => id.to_string(),
        Err(e) => return e,
    };
    let Some(t) = state.begin_unregister(&id) else {
        // Already gone (never registered, or dropped by its idle timeout):
        // nothing to do, and the agent only wants the count.
        log::info!("control: unregister of unknown transfer_id={id}");
        return ok(state);
    };
    log::info!(
        "control: unregistering transfer_id={id} requests_in_flight={}",
        t.in_flight()
    );
    // The rest runs on even if this client gives up or the wait times out.
    let finish = actix_web::rt::spawn({
        let state = state.clone();
        let id = id.clone();
        async move {
            t.drained().await;
            state.unregistered(&id, &t);
            let _ = actix_web::rt::task::spawn_blocking(move || t.retire("as it was unregistered"))
                .await;
            log::info!("control: unregistered transfer_id={id}");
        }
    });
    match tokio::time::timeout(wait, finish).await {
        Ok(_) => ok(state),
        Err(_) => error(format!(
            "requests still in flight after {} s; transfer_id {id} is refused and will be dropped when they end",
            wait.as_secs()
        )),
    }
}
