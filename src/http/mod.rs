//! The HTTP side: routing, request validation and responses. Handlers look
//! the transfer up in `crate::transfers`, parse and validate, take the
//! limits and locks, then call one operation of `crate::ops`.

pub(crate) mod error;
pub(crate) mod handlers;
pub mod limits;
pub mod patch_op;
pub mod range;
pub(crate) mod routes;

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::DefaultHeaders;
use actix_web::web;

use crate::transfers::Transfers;
use limits::{ImageLocks, Queue, RequestSlots, MAX_EXTENTS_LISTS};

/// `Access-Control-Allow-Methods` on every response that does not set its own.
pub(crate) const DEFAULT_ALLOWED_METHODS: &str = "GET, PUT, OPTIONS";

/// Server-wide state shared by all workers.
pub(crate) struct AppState {
    /// What a transfer id names (shared with the control socket).
    pub(crate) transfers: Arc<Transfers>,
    /// The flags it was made from, as given (what OPTIONS advertises, the
    /// body timeout).
    pub(crate) settings: HttpSettings,
    /// The server-wide bound on data requests in flight, and their queue.
    pub(crate) requests: RequestSlots,
    /// The server-wide bound on extents lists being built (never behind
    /// data requests).
    pub(crate) extents: RequestSlots,
    /// Full-image PUTs of one image run one at a time.
    pub(crate) locks: ImageLocks,
    /// The HTTP Unix socket's path, as OPTIONS advertises it (`None`: off).
    pub(crate) unix_socket: Option<String>,
}

/// What the HTTP side takes from the command line.
#[derive(Debug, Clone, Copy)]
pub struct HttpSettings {
    /// Advertised by OPTIONS per transfer (parallel reads for one client).
    pub max_readers: usize,
    /// Advertised by OPTIONS per writable transfer (parallel writes).
    pub max_writers: usize,
    /// Data requests (image GET, PUT, PATCH, checksum) in flight at once
    /// across the server; the next waits in `queue`.
    pub max_requests: usize,
    /// How long, and how many, requests wait for a slot.
    pub queue: Queue,
    /// Longest wait for the next piece of a request body.
    pub body_timeout: Duration,
}

impl AppState {
    /// The state for `settings`; `unix_socket`: the HTTP Unix socket's path
    /// as OPTIONS advertises it (`None`: off).
    pub(crate) fn new(
        transfers: Arc<Transfers>,
        settings: &HttpSettings,
        unix_socket: Option<String>,
    ) -> AppState {
        AppState {
            transfers,
            settings: *settings,
            requests: RequestSlots::new("data request", settings.max_requests, settings.queue),
            extents: RequestSlots::new("extents request", MAX_EXTENTS_LISTS, settings.queue),
            locks: ImageLocks::new(),
            unix_socket,
        }
    }
}

/// Registers the routes and the headers every response carries.
pub(crate) fn configure(state: web::Data<AppState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(state)
            .default_service(web::to(handlers::dispatch));
    }
}

/// Middleware adding `Access-Control-Allow-Methods` and `Accept-Ranges`
/// where a handler did not set them.
pub(crate) fn default_headers() -> DefaultHeaders {
    DefaultHeaders::new()
        .add((
            HeaderName::from_static("access-control-allow-methods"),
            HeaderValue::from_static(DEFAULT_ALLOWED_METHODS),
        ))
        .add((
            HeaderName::from_static("accept-ranges"),
            HeaderValue::from_static("bytes"),
        ))
}
