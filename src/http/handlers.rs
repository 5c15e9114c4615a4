//! Request handlers: route, parse and validate, take the limits and locks,
//! then call one operation of `ops`. What a backend can do (OPTIONS, and
//! the refusals of what it cannot) comes from its [`Caps`]. Every failure
//! is an [`ApiError`].

use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, MessageBody, SizedStream};
use actix_web::http::{header, StatusCode};
use actix_web::web::{self, Payload};
use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::error::ApiError;
use super::limits::{RequestSlot, RequestSlots};
use super::patch_op::{parse_patch_json, PatchOp};
use super::range::{parse_content_range, parse_range, RangeError};
use super::routes::{route, Op, Route};
use super::AppState;
use crate::backend::{Caps, KnownCaps};
use crate::checksum;
use crate::direct_body::{Abort, BodyReader, DirectBody, Inbox, Outbox};
use crate::head_timeout::HeadClock;
use crate::ops::{self, OpLog};
use crate::transfers::Lease;

type Res = Result<HttpResponse, ApiError>;

/// Largest JSON body PATCH accepts.
pub(crate) const MAX_JSON_BODY: u64 = 64 * 1024;

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

/// The connection's [`Inbox`] for a body framed by its Content-Length
/// alone (`content_length` required one): a chunked body has framing of its
/// own between its bytes and is left to actix.
fn direct_inbox(req: &HttpRequest) -> Option<Inbox> {
    if req.headers().contains_key(header::TRANSFER_ENCODING) {
        return None;
    }
    req.conn_data::<Inbox>().cloned()
}

/// A slot from `slots` for this request, waiting in its queue (see
/// `super::limits`); the wait ends early when the request's client closes
/// its connection.
async fn slot(req: &HttpRequest, slots: &RequestSlots) -> Result<RequestSlot, ApiError> {
    let clock = req.conn_data::<HeadClock>();
    let gone = async {
        match clock {
            Some(clock) => clock.closed().await,
            None => std::future::pending().await,
        }
    };
    slots.acquire(gone).await
}

fn json_ok(value: &Value) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(value.to_string())
}

/// The single entry point: every request comes through here. What it asks
/// for is decided by [`route`]; the request's lease ends in `finish`, with
/// a GET's body, or with a write's last NBD write; a request dropped before
/// its end keeps it until its backend work is over (see [`detached`] and
/// `ops::write`).
pub(crate) async fn dispatch(
    req: HttpRequest,
    payload: Payload,
    state: web::Data<AppState>,
) -> Res {
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
    let t = state
        .transfers
        .lookup(&id)
        .await
        .ok_or_else(ApiError::unknown_image)?;
    match op {
        // The body holds the lease and counts the request when it ends.
        Op::Read => get_image(&req, &state, t).await,
        // The write holds it until none of its writes is in flight.
        Op::Write => put(&req, payload, &state, t).await,
        Op::Patch => patch(&req, payload, &state, t).await,
        Op::UnknownTail => finish(Err(ApiError::not_found()), t),
        // A backend call each, without a body to read: run to the end.
        op => {
            detached(async move {
                let result = match op {
                    Op::Options => options(&state, &t).await,
                    Op::Head => head_image(&t).await,
                    Op::Extents => get_extents(&req, &state, &t).await,
                    Op::Checksum => get_checksum(&req, &state, &t).await,
                    Op::Flush => flush(&t).await,
                    // Served above.
                    Op::Read | Op::Write | Op::Patch | Op::UnknownTail => {
                        Err(ApiError::not_found())
                    }
                };
                finish(result, t)
            })
            .await
        }
    }
}

/// Runs `work` (which holds a request's lease, and slot if any) as a task
/// of its own on the worker, and waits for it. If the request is dropped
/// first (its connection closed, the server stopping), the work still runs
/// to its end with what it holds: its blocking backend call cannot be
/// stopped, and must not go on without them (unregister waits for the
/// lease; the slot bounds the server's work).
async fn detached(work: impl std::future::Future<Output = Res> + 'static) -> Res {
    actix_web::rt::spawn(work)
        .await
        .unwrap_or_else(|_| Err(ApiError::internal("internal error")))
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

/// The OPTIONS reply for a backend that can do `caps`. `max_readers` /
/// `max_writers` are what one client may run in parallel on the transfer
/// (nothing refuses more; see `super::limits`); `unix_socket` is the HTTP
/// Unix socket's path, which imageio clients on this host switch to
/// (`null` when it is off). PATCH carries zero and flush where ranged
/// writes are taken; elsewhere a flush is `POST /images/{id}/flush`.
fn options_reply(state: &AppState, caps: Caps) -> HttpResponse {
    let writable = !caps.read_only;
    let mut methods = vec!["GET"];
    let mut features = Vec::new();
    if caps.extents {
        features.push("extents");
    }
    if writable {
        methods.push("PUT");
        if caps.ranged_writes {
            methods.push("PATCH");
        } else if caps.can_flush {
            methods.push("POST");
        }
        if caps.can_zero {
            features.push("zero");
        }
        if caps.can_flush {
            features.push("flush");
        }
    }
    methods.push("OPTIONS");
    let body = json!({
        "unix_socket": state.unix_socket,
        "features": features,
        "max_readers": state.settings.max_readers,
        "max_writers": if writable { state.settings.max_writers } else { 0 },
    });
    HttpResponse::Ok()
        .insert_header(("Access-Control-Allow-Methods", methods.join(", ")))
        .content_type("application/json")
        .body(body.to_string())
}

/// `OPTIONS /images/*`: what the server can do for any image (imageio
/// clients ask before a transfer exists): the most any backend offers.
fn options_all(state: &AppState) -> HttpResponse {
    options_reply(state, Caps::NBD_MOST)
}

/// `OPTIONS /images/{id}`: what its backend can do, asking the export when
/// its config does not tell.
async fn options(state: &web::Data<AppState>, t: &Lease) -> Res {
    let caps = match t.storage().known_caps() {
        KnownCaps::All(caps) => caps,
        KnownCaps::AtMost(_) => ops::open(t.transfer()).await?.caps()?,
    };
    Ok(options_reply(state, caps))
}

/// What the transfer's backend can do at most, without opening it.
fn caps_at_most(t: &Lease) -> Caps {
    t.storage().known_caps().at_most()
}

async fn get_image(req: &HttpRequest, state: &web::Data<AppState>, t: Lease) -> Res {
    let range = header_str(req, header::RANGE)?;
    let spec = match range.map(parse_range).transpose() {
        Ok(s) => s,
        Err(RangeError::Invalid(_)) => return Err(ApiError::bad_request("invalid Range header")),
        Err(RangeError::Unsatisfiable) => None,
    };
    let slot = slot(req, &state.requests).await?;
    let log = OpLog::start(
        "GET",
        t.id(),
        format_args!("range={} {}", range.unwrap_or("-"), waited(&slot)),
    );
    let handle = ops::open(t.transfer()).await?;
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
    // out) before it is a JSON error, not a truncated body. A client that
    // takes no data for the body timeout loses its connection.
    let stalled = ops::Stalled {
        timeout: state.settings.body_timeout,
        connection: req.conn_data::<Abort>().cloned(),
    };
    let mut body = ops::read_stream(handle, start, len, log, t, slot, stalled);
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

/// How long a request waited for its slot, for its start log line
/// (`make load` reads the wait times from these).
fn waited(slot: &RequestSlot) -> String {
    format!("slot_wait_ms={}", slot.waited().as_millis())
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
    let size = ops::open(t.transfer()).await?.size();
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .body(HeadBody(size)))
}

async fn get_extents(req: &HttpRequest, state: &web::Data<AppState>, t: &Lease) -> Res {
    if !caps_at_most(t).extents {
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
    let slot = slot(req, &state.extents).await?;
    let _log = OpLog::start(
        "EXTENTS",
        t.id(),
        format_args!(
            "context={} {}",
            context.as_deref().unwrap_or("-"),
            waited(&slot)
        ),
    );
    let resp = match ops::extents(t.transfer(), dirty).await? {
        ops::ExtentList::Allocation(list) => json_array(list, slot)?,
        ops::ExtentList::Dirty(list) => json_array(list, slot)?,
    };
    Ok(resp)
}

/// Extents serialised per response piece.
const JSON_PIECE: usize = 4096;

/// A 200 whose body is `items` as a JSON array, serialised a piece at a time
/// as the client takes it (never the whole text at once: an extents list
/// may hold a million entries); `guard` lives as long as the body.
fn json_array<T, G>(items: Vec<T>, guard: G) -> Res
where
    T: serde::Serialize + Unpin + 'static,
    G: Unpin + 'static,
{
    let mut len = Counter(0);
    serde_json::to_writer(&mut len, &items)
        .map_err(|e| ApiError::internal(format!("cannot encode extents: {e}")))?;
    let body = JsonArray {
        items,
        next: 0,
        _guard: guard,
    };
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(SizedStream::new(len.0, body)))
}

/// Counts the bytes written to it.
struct Counter(u64);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The pieces of a JSON array, as `serde_json::to_writer` writes it whole.
struct JsonArray<T, G> {
    items: Vec<T>,
    /// The next item to write (past the end: the array is closed).
    next: usize,
    _guard: G,
}

impl<T: serde::Serialize + Unpin, G: Unpin> futures_util::Stream for JsonArray<T, G> {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.next > this.items.len() {
            return Poll::Ready(None);
        }
        let mut out = Vec::new();
        if this.next == 0 {
            out.push(b'[');
        }
        let end = (this.next + JSON_PIECE).min(this.items.len());
        for (i, item) in this.items[this.next..end].iter().enumerate() {
            if this.next + i > 0 {
                out.push(b',');
            }
            if let Err(e) = serde_json::to_writer(&mut out, item) {
                return Poll::Ready(Some(Err(std::io::Error::other(e))));
            }
        }
        this.next = end;
        if end == this.items.len() {
            out.push(b']');
            this.next = end + 1;
        }
        Poll::Ready(Some(Ok(Bytes::from(out))))
    }
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
    let slot = slot(req, &state.requests).await?;
    let mut log = OpLog::start(
        "CHECKSUM",
        t.id(),
        format_args!(
            "algorithm={} block_size={} {}",
            params.algorithm.name(),
            params.block_size,
            waited(&slot)
        ),
    );
    let sum = ops::checksum(t.transfer(), params, &mut log).await?;
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

async fn put(req: &HttpRequest, payload: Payload, state: &web::Data<AppState>, t: Lease) -> Res {
    if req.headers().contains_key(header::RANGE) {
        return Err(ApiError::bad_request(
            "Range header not supported for PUT; use Content-Range or PATCH",
        ));
    }
    let length = content_length(req)?;
    let flush = parse_flush_param(req)?;
    let content_range = match header_str(req, header::CONTENT_RANGE)? {
        None => None,
        Some(_) if !caps_at_most(&t).ranged_writes => {
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
    let lock = match content_range {
        None => Some(state.locks.lock(t.id()).await),
        Some(_) => None,
    };
    let slot = slot(req, &state.requests).await?;
    let log = OpLog::start(
        "PUT",
        t.id(),
        format_args!(
            "content_length={length} content_range={} flush={flush} {}",
            header_str(req, header::CONTENT_RANGE)?.unwrap_or("-"),
            waited(&slot)
        ),
    );
    let writer = ops::open_writer(t.transfer()).await?;
    let start = content_range.map(|(a, _)| a).unwrap_or(0);
    if let Some(size) = writer.size() {
        if start >= size && (content_range.is_some() || length > 0) {
            return Err(ApiError::range_not_satisfiable(size));
        }
        if length > size - start.min(size) {
            return Err(ApiError::range_not_satisfiable(size));
        }
    }
    let body = BodyReader::new(
        payload,
        length,
        state.settings.body_timeout,
        direct_inbox(req),
    );
    let written = ops::write(body, writer, start, flush, log, t, (slot, lock)).await?;
    Ok(json_ok(
        &json!({"ok": true, "bytes_written": written, "flushed": flush}),
    ))
}

async fn patch(
    req: &HttpRequest,
    mut payload: Payload,
    state: &web::Data<AppState>,
    t: Lease,
) -> Res {
    if !caps_at_most(&t).ranged_writes {
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
    let slot = slot(req, &state.requests).await?;
    if let (Some(range), false) = (range, content_type == "application/json") {
        return patch_range(req, payload, state, t, slot, range).await;
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
    let op = parse_patch_json(&body)?;
    detached(async move {
        let result = match op {
            PatchOp::Flush => flush(&t).await,
            PatchOp::Zero {
                offset,
                size,
                flush,
            } => zero(&t, offset, size, flush).await,
        };
        drop(slot);
        finish(result, t)
    })
    .await
}

/// Reads a small body of exactly `length` bytes (already bounded by the caller).
async fn read_small_body(
    payload: &mut Payload,
    length: usize,
    state: &web::Data<AppState>,
) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::with_capacity(length);
    while body.len() < length {
        match tokio::time::timeout(state.settings.body_timeout, payload.next()).await {
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
    payload: Payload,
    state: &web::Data<AppState>,
    t: Lease,
    slot: RequestSlot,
    range: &str,
) -> Res {
    let length = content_length(req)?;
    if length == 0 {
        return Err(ApiError::bad_request("Content-Length must be positive"));
    }
    let spec = parse_range(range).map_err(|e| ApiError::from_range(e, "Range", 0))?;
    let log = OpLog::start(
        "PATCH range",
        t.id(),
        format_args!("range={range} content_length={length} {}", waited(&slot)),
    );
    let writer = ops::open_writer(t.transfer()).await?;
    // Never `None`: a replacing writer takes no range writes (refused above).
    let size = writer.size().unwrap_or(0);
    let (a, b) = spec
        .for_write(size)
        .map_err(|e| ApiError::from_range(e, "Range", size))?;
    if length != b - a + 1 {
        return Err(ApiError::bad_request(format!(
            "Content-Length ({length}) must equal range length ({})",
            b - a + 1
        )));
    }
    let body = BodyReader::new(
        payload,
        length,
        state.settings.body_timeout,
        direct_inbox(req),
    );
    let written = ops::write(body, writer, a, false, log, t, slot).await?;
    Ok(json_ok(&json!({"ok": true, "bytes_written": written})))
}

async fn zero(t: &Lease, offset: u64, size: u64, flush: bool) -> Res {
    let mut log = OpLog::start(
        "PATCH zero",
        t.id(),
        format_args!("offset={offset} size={size} flush={flush}"),
    );
    ops::zero(t.transfer(), offset, size, flush, &mut log).await?;
    Ok(json_ok(&json!({"ok": true})))
}

async fn flush(t: &Lease) -> Res {
    let _log = OpLog::start("FLUSH", t.id(), format_args!(""));
    ops::flush(t.transfer()).await?;
    Ok(json_ok(&json!({"ok": true})))
}
