//! Request handlers: route, parse and validate, take the limits and locks,
//! then let `ops` move the bytes. Every failure is an [`ApiError`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, MessageBody, SizedStream};
use actix_web::http::{header, StatusCode};
use actix_web::web::{self, Payload};
use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::error::ApiError;
use super::patch_op::{parse_patch_json, PatchOp};
use super::range::{parse_content_range, parse_range, RangeError};
use super::routes::{route, Op, Route};
use super::AppState;
use crate::backend::file::FileUpload;
use crate::backend::{BackendError, Handle, Lease, Transfer};
use crate::checksum;
use crate::config::BackendConfig;
use crate::direct_body::{DirectBody, Outbox};
use crate::extents;
use crate::ops::{self, OpLog, Sink};

type Res = Result<HttpResponse, ApiError>;

/// Largest JSON body PATCH accepts.
pub const MAX_JSON_BODY: u64 = 64 * 1024;

/// The first value of query parameter `name`.
fn query_param(req: &HttpRequest, name: &str) -> Result<Option<String>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(req.query_string())
        .map_err(|_| ApiError::bad_request("invalid query string"))?;
    Ok(pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v))
}

/// A header as text; a header that is not visible ASCII is a 400.
fn header_str(req: &HttpRequest, name: header::HeaderName) -> Result<Option<&str>, ApiError> {
    match req.headers().get(&name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("invalid {name} header"))),
    }
}

/// `Content-Length`, required (400 when missing or not a number).
fn content_length(req: &HttpRequest) -> Result<u64, ApiError> {
    let v = header_str(req, header::CONTENT_LENGTH)?
        .ok_or_else(|| ApiError::bad_request("Content-Length required"))?;
    v.trim()
        .parse::<u64>()
        .map_err(|_| ApiError::bad_request("Invalid Content-Length"))
}

fn json_ok(value: &Value) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(value.to_string())
}

/// Runs blocking backend work on the blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    web::block(f)
        .await
        .map_err(|_| ApiError::internal("internal error"))?
}

/// Opens the transfer's storage for one request, once it is the request's
/// turn (only a not-multi-conn NBD export makes requests of a transfer take
/// turns; see `crate::backend::nbd`).
async fn open(t: &Arc<Transfer>) -> Result<Handle, ApiError> {
    let turn = t.turn().await;
    let t = t.clone();
    blocking(move || t.open_in_turn(turn).map_err(ApiError::from)).await
}

/// The transfer `id` for one request (see `AppState::lookup`), or 404.
async fn lookup(state: &web::Data<AppState>, id: &str) -> Result<Lease, ApiError> {
    let state = state.clone();
    let id = id.to_string();
    blocking(move || state.lookup(&id).ok_or_else(ApiError::unknown_image)).await
}

/// The single entry point: every request comes through here. What it asks
/// for is decided by [`route`]; the request's lease ends in [`finish`], or
/// with a GET's body.
pub async fn dispatch(req: HttpRequest, payload: Payload, state: web::Data<AppState>) -> Res {
    let (id, op) = match route(req.method(), req.path()) {
        Route::Info => return Ok(json_ok(&json!({"version": env!("CARGO_PKG_VERSION")}))),
        // Server information, as in imageio: no transfer needed.
        Route::ChecksumAlgorithms => {
            return Ok(json_ok(
                &json!({"algorithms": checksum::Algorithm::names()}),
            ))
        }
        Route::OptionsAll => return Ok(options_all(&state)),
        Route::NotFound => return Err(ApiError::not_found()),
        Route::MethodNotAllowed => return Err(method_not_allowed()),
        Route::Transfer(id, op) => (id, op),
    };
    let t = lookup(&state, &id).await?;
    let result = match op {
        // The body holds the lease and counts the request when it ends.
        Op::Read => return get_image(&req, &state, t).await,
        Op::Options => options(&state, &t).await,
        Op::Head => head_image(&t).await,
        Op::Extents => get_extents(&req, &t).await,
        Op::Checksum => get_checksum(&req, &state, &t).await,
        Op::Write => put(&req, payload, &state, &t).await,
        Op::Patch => patch(&req, payload, &state, &t).await,
        Op::Flush => flush(&t).await,
        Op::UnknownTail => Err(ApiError::not_found()),
    };
    finish(result, t)
}

/// Ends a request's use of its transfer: counted as served when it
/// succeeded, as failed otherwise (see [`Lease`]).
fn finish(result: Res, mut lease: Lease) -> Res {
    if result.is_ok() {
        lease.served();
    }
    result
}

fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

/// The OPTIONS reply body: `max_readers`/`max_writers` are what one client
/// may run in parallel on the transfer (nothing refuses more; see
/// `super::limits`).
fn options_body(state: &AppState, features: &[&str], max_writers: usize) -> String {
    json!({
        "unix_socket": null,
        "features": features,
        "max_readers": state.max_readers,
        "max_writers": max_writers,
    })
    .to_string()
}

/// `OPTIONS /images/*`: what the server can do for any image (imageio
/// clients ask before a transfer exists).
fn options_all(state: &AppState) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(("Access-Control-Allow-Methods", "GET, PUT, PATCH, OPTIONS"))
        .content_type("application/json")
        .body(options_body(
            state,
            &["extents", "zero", "flush"],
            state.max_writers,
        ))
}

async fn options(state: &web::Data<AppState>, t: &Lease) -> Res {
    let (methods, features, max_writers) = if t.is_file() {
        ("GET, PUT, POST, OPTIONS", vec!["flush"], state.max_writers)
    } else {
        let h = open(t.transfer()).await?;
        let caps = h.caps()?;
        if caps.read_only {
            ("GET, OPTIONS", vec!["extents"], 0)
        } else {
            let mut f = vec!["extents"];
            if caps.can_zero {
                f.push("zero");
            }
            if caps.can_flush {
                f.push("flush");
            }
            ("GET, PUT, PATCH, OPTIONS", f, state.max_writers)
        }
    };
    Ok(HttpResponse::Ok()
        .insert_header(("Access-Control-Allow-Methods", methods))
        .content_type("application/json")
        .body(options_body(state, &features, max_writers)))
}

async fn get_image(req: &HttpRequest, state: &web::Data<AppState>, t: Lease) -> Res {
    let slot = state.requests.try_acquire()?;
    let range = header_str(req, header::RANGE)?;
    let spec = match range.map(parse_range).transpose() {
        Ok(s) => s,
        Err(RangeError::Invalid(_)) => return Err(ApiError::bad_request("invalid Range header")),
        Err(RangeError::Unsatisfiable) => None,
    };
    let log = OpLog::start(
        "GET",
        t.id(),
        format_args!("range={}", range.unwrap_or("-")),
    );
    let handle = open(t.transfer()).await?;
    let size = handle.size();
    let (start, len, status) = match spec {
        None => (0, size, StatusCode::OK),
        Some(spec) => {
            let (a, b) = spec
                .for_read(size)
                .map_err(|e| ApiError::from_range(e, "Range", size))?;
            (a, b - a + 1, StatusCode::PARTIAL_CONTENT)
        }
    };
    let mut resp = HttpResponse::build(status);
    resp.content_type("application/octet-stream");
    if status == StatusCode::PARTIAL_CONTENT {
        resp.insert_header((
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{}", start, start + len - 1, size),
        ));
    }
    // The body keeps the request slot and the lease until it is dropped. The
    // head goes out with the first chunk: a backend that fails (or times
    // out) before it is a JSON error, not a truncated body.
    let mut body = ops::read_stream(handle, start, len, log, t, slot, state.body_timeout);
    body.first_chunk().await?;
    // Written around actix-http's write buffer where the connection can
    // (every connection of this server; see `direct_body`).
    match req.conn_data::<Outbox>() {
        Some(outbox) => Ok(resp
            .no_chunking(len)
            .body(DirectBody::new(body, len, outbox.clone()))),
        None => Ok(resp.body(SizedStream::new(len, body))),
    }
}

/// The body of a HEAD reply: declares the size a GET would send (actix
/// writes it as Content-Length and never sends a body for HEAD) and has no
/// bytes.
struct HeadBody(u64);

impl MessageBody for HeadBody {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Sized(self.0)
    }

    fn poll_next(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Poll::Ready(None)
    }
}

/// `HEAD /images/{id}`: the headers of a full GET (200, Content-Length = the
/// image size, Content-Type, Accept-Ranges, Access-Control-Allow-Methods),
/// no body. nbdkit's curl plugin and qemu's curl driver learn the size this
/// way. Takes no request slot and reads no data (the NBD handshake gives
/// the size). A Range header is ignored, as HTTP allows for HEAD.
async fn head_image(t: &Lease) -> Res {
    let size = open(t.transfer()).await?.size();
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .body(HeadBody(size)))
}

async fn get_extents(req: &HttpRequest, t: &Lease) -> Res {
    if t.is_file() {
        return Err(ApiError::bad_request(
            "extents not supported for file backend",
        ));
    }
    let context = query_param(req, "context")?;
    let dirty = match context.as_deref() {
        None | Some("zero") => false,
        Some("dirty") => true,
        Some(_) => return Err(ApiError::bad_request("unsupported extents context")),
    };
    let _log = OpLog::start(
        "EXTENTS",
        t.id(),
        format_args!("context={}", context.as_deref().unwrap_or("-")),
    );
    let mut h = open(t.transfer()).await?;
    let body = blocking(move || {
        let r = if dirty {
            match h.dirty_extents()? {
                Some(list) => serde_json::to_vec(&list),
                None => serde_json::to_vec(&extents::all_dirty(&h.allocation_extents()?)),
            }
        } else {
            serde_json::to_vec(&h.allocation_extents()?)
        };
        r.map_err(|e| ApiError::internal(format!("cannot encode extents: {e}")))
    })
    .await?;
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(body))
}

/// `GET /images/{id}/checksum[?algorithm=…&block_size=…]`: imageio's
/// whole-image checksum (see `crate::checksum`). Takes a request slot, like
/// a GET of the whole image.
async fn get_checksum(req: &HttpRequest, state: &web::Data<AppState>, t: &Lease) -> Res {
    let params = checksum::Params::parse(
        query_param(req, "algorithm")?.as_deref(),
        query_param(req, "block_size")?.as_deref(),
    )
    .map_err(ApiError::bad_request)?;
    let _slot = state.requests.try_acquire()?;
    let mut log = OpLog::start(
        "CHECKSUM",
        t.id(),
        format_args!(
            "algorithm={} block_size={}",
            params.algorithm.name(),
            params.block_size
        ),
    );
    let mut h = open(t.transfer()).await?;
    let size = h.size();
    let id = t.id().to_string();
    let sum = blocking(move || {
        checksum::compute(&mut h, &params).map_err(|e| {
            log::error!("CHECKSUM error image_id={id} err={e}");
            ApiError::from(e)
        })
    })
    .await?;
    log.bytes = size;
    let body =
        serde_json::to_value(&sum).map_err(|e| ApiError::internal(format!("encode: {e}")))?;
    Ok(json_ok(&body))
}

fn parse_flush_param(req: &HttpRequest) -> Result<bool, ApiError> {
    Ok(matches!(
        query_param(req, "flush")?
            .map(|v| v.to_ascii_lowercase())
            .as_deref(),
        Some("y" | "yes" | "true" | "1")
    ))
}

fn read_only() -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "image is read-only")
}

async fn put(
    req: &HttpRequest,
    mut payload: Payload,
    state: &web::Data<AppState>,
    t: &Lease,
) -> Res {
    if req.headers().contains_key(header::RANGE) {
        return Err(ApiError::bad_request(
            "Range header not supported for PUT; use Content-Range or PATCH",
        ));
    }
    let length = content_length(req)?;
    let flush = parse_flush_param(req)?;
    let content_range = match header_str(req, header::CONTENT_RANGE)? {
        None => None,
        Some(_) if t.is_file() => {
            return Err(ApiError::bad_request(
                "Content-Range PUT not supported for file backend; use full PUT",
            ))
        }
        Some(h) => Some(
            parse_content_range(h)
                .map_err(|e| ApiError::bad_request(format!("invalid Content-Range header: {e}")))?,
        ),
    };
    // Full-image PUTs of one image run one at a time (the next waits here,
    // holding no slot); ranged PUTs run concurrently with everything.
    let _lock = match content_range {
        None => Some(state.locks.lock(t.id()).await),
        Some(_) => None,
    };
    let _slot = state.requests.try_acquire()?;
    let mut log = OpLog::start(
        "PUT",
        t.id(),
        format_args!(
            "content_length={length} content_range={} flush={flush}",
            header_str(req, header::CONTENT_RANGE)?.unwrap_or("-")
        ),
    );
    let sink = match &t.config().backend {
        BackendConfig::File { path } => {
            let path = path.clone();
            Sink::Upload(blocking(move || FileUpload::create(&path).map_err(ApiError::from)).await?)
        }
        BackendConfig::Nbd { .. } => {
            let handle = open(t.transfer()).await?;
            let size = handle.size();
            let caps = handle.caps()?;
            if caps.read_only {
                return Err(read_only());
            }
            let start = content_range.map(|(a, _)| a).unwrap_or(0);
            if start >= size && (content_range.is_some() || length > 0) {
                return Err(ApiError::range_not_satisfiable(size));
            }
            if length > size - start.min(size) {
                return Err(ApiError::range_not_satisfiable(size));
            }
            Sink::Handle {
                handle,
                offset: start,
                zero_ok: caps.can_zero,
            }
        }
    };
    let written = ops::write_body(
        &mut payload,
        length,
        sink,
        flush,
        state.body_timeout,
        &mut log,
        t.stats().clone(),
    )
    .await?;
    if t.is_file() && !flush {
        t.mark_written();
    }
    Ok(json_ok(
        &json!({"ok": true, "bytes_written": written, "flushed": flush}),
    ))
}

async fn patch(
    req: &HttpRequest,
    mut payload: Payload,
    state: &web::Data<AppState>,
    t: &Lease,
) -> Res {
    if t.is_file() {
        return Err(ApiError::bad_request(
            "range writes and PATCH not supported for file backend; use PUT for full upload",
        ));
    }
    let content_type = header_str(req, header::CONTENT_TYPE)?
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let range = header_str(req, header::RANGE)?;
    let _slot = state.requests.try_acquire()?;
    if let (Some(range), false) = (range, content_type == "application/json") {
        return patch_range(req, payload, state, t, range).await;
    }
    if content_type != "application/json" {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "PATCH requires Content-Type: application/json (for zero/flush) or Range with binary body",
        ));
    }
    let length = content_length(req)?;
    if length == 0 || length > MAX_JSON_BODY {
        return Err(ApiError::bad_request("Invalid Content-Length"));
    }
    let body = read_small_body(&mut payload, length as usize, state).await?;
    match parse_patch_json(&body)? {
        PatchOp::Flush => flush(t).await,
        PatchOp::Zero {
            offset,
            size,
            flush,
        } => zero(t, offset, size, flush).await,
    }
}

/// Reads a small body of exactly `length` bytes (already bounded by the caller).
async fn read_small_body(
    payload: &mut Payload,
    length: usize,
    state: &web::Data<AppState>,
) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::with_capacity(length);
    while body.len() < length {
        match tokio::time::timeout(state.body_timeout, payload.next()).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timed out waiting for the request body",
                ))
            }
            Ok(Some(Ok(chunk))) => {
                let take = chunk.len().min(length - body.len());
                body.extend_from_slice(&chunk[..take]);
            }
            Ok(_) => break,
        }
    }
    if body.len() != length {
        return Err(ApiError::bad_request("request body truncated"));
    }
    Ok(body)
}

async fn patch_range(
    req: &HttpRequest,
    mut payload: Payload,
    state: &web::Data<AppState>,
    t: &Lease,
    range: &str,
) -> Res {
    let length = content_length(req)?;
    if length == 0 {
        return Err(ApiError::bad_request("Content-Length must be positive"));
    }
    let spec = parse_range(range).map_err(|e| ApiError::from_range(e, "Range", 0))?;
    let mut log = OpLog::start(
        "PATCH range",
        t.id(),
        format_args!("range={range} content_length={length}"),
    );
    let handle = open(t.transfer()).await?;
    let size = handle.size();
    let caps = handle.caps()?;
    if caps.read_only {
        return Err(read_only());
    }
    let (a, b) = spec
        .for_write(size)
        .map_err(|e| ApiError::from_range(e, "Range", size))?;
    if length != b - a + 1 {
        return Err(ApiError::bad_request(format!(
            "Content-Length ({length}) must equal range length ({})",
            b - a + 1
        )));
    }
    let sink = Sink::Handle {
        handle,
        offset: a,
        zero_ok: caps.can_zero,
    };
    let written = ops::write_body(
        &mut payload,
        length,
        sink,
        false,
        state.body_timeout,
        &mut log,
        t.stats().clone(),
    )
    .await?;
    Ok(json_ok(&json!({"ok": true, "bytes_written": written})))
}

async fn zero(t: &Lease, offset: u64, size: u64, flush: bool) -> Res {
    let mut log = OpLog::start(
        "PATCH zero",
        t.id(),
        format_args!("offset={offset} size={size} flush={flush}"),
    );
    let mut h = open(t.transfer()).await?;
    let zeroed = blocking(move || {
        let image_size = h.size();
        if h.caps()?.read_only {
            return Err(read_only());
        }
        if offset >= image_size {
            return Err(ApiError::bad_request("offset must be less than image size"));
        }
        let n = size.min(image_size - offset);
        let r = h
            .zero(offset, n)
            .and_then(|_| if flush { h.flush() } else { Ok(()) });
        r.map(|_| n).map_err(|e: BackendError| {
            log::error!("PATCH zero error err={e}");
            ApiError::from(e)
        })
    })
    .await?;
    log.bytes = zeroed;
    t.stats().add_zeroed(zeroed);
    Ok(json_ok(&json!({"ok": true})))
}

async fn flush(t: &Lease) -> Res {
    let _log = OpLog::start("FLUSH", t.id(), format_args!(""));
    let mut h = open(t.transfer()).await?;
    blocking(move || {
        h.flush().map_err(|e| {
            log::error!("FLUSH error err={e}");
            ApiError::from(e)
        })
    })
    .await?;
    Ok(json_ok(&json!({"ok": true})))
}
