//! The HTTP side: routing, request validation and responses. Handlers parse
//! and validate, then hand the byte moving to `crate::ops` and the storage
//! work to `crate::backend` on the blocking pool.

pub mod error;
pub mod handlers;
pub mod limits;
pub mod patch_op;
pub mod range;

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::DefaultHeaders;
use actix_web::web;

use crate::backend::Transfer;
use crate::config::ConfigDir;
use limits::{ImageLocks, Slots};

/// `Access-Control-Allow-Methods` on every response that does not set its own.
pub const DEFAULT_ALLOWED_METHODS: &str = "GET, PUT, OPTIONS";

/// Server-wide state shared by all workers.
pub struct AppState {
    pub configs: ConfigDir,
    pub readers: Slots,
    pub writers: Slots,
    pub locks: ImageLocks,
    /// Longest wait for the next piece of a request body.
    pub body_timeout: Duration,
}

impl AppState {
    pub fn new(
        configs: ConfigDir,
        max_readers: usize,
        max_writers: usize,
        body_timeout: Duration,
    ) -> AppState {
        AppState {
            configs,
            readers: Slots::new(max_readers, "reads"),
            writers: Slots::new(max_writers, "writes"),
            locks: ImageLocks::new(),
            body_timeout,
        }
    }

    /// Every transfer currently known (loaded and cached).
    pub fn transfers(&self) -> Vec<Arc<Transfer>> {
        self.configs.cached()
    }

    /// The transfer named `id`, if configured. Blocking (reads the config dir).
    pub fn lookup(&self, id: &str) -> Option<Arc<Transfer>> {
        self.configs.lookup(id)
    }
}

/// Registers the routes and the headers every response carries.
pub fn configure(state: web::Data<AppState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(state)
            .default_service(web::to(handlers::dispatch));
    }
}

/// Middleware adding `Access-Control-Allow-Methods` and `Accept-Ranges`
/// where a handler did not set them.
pub fn default_headers() -> DefaultHeaders {
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
