//! The HTTP side: routing, request validation and responses. Handlers parse
//! and validate, then hand the byte moving to `crate::ops` and the storage
//! work to `crate::backend` on the blocking pool.

pub mod error;
pub mod handlers;
pub mod limits;
pub mod patch_op;
pub mod range;
pub mod routes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::DefaultHeaders;
use actix_web::web;

use crate::backend::{Lease, Transfer};
use crate::config::{valid_transfer_id, ConfigDir};
use crate::registry::Registry;
use limits::{ImageLocks, RequestSlots};

/// `Access-Control-Allow-Methods` on every response that does not set its own.
pub const DEFAULT_ALLOWED_METHODS: &str = "GET, PUT, OPTIONS";

/// Server-wide state shared by all workers.
pub struct AppState {
    /// Transfers registered over the control socket.
    pub registry: Registry,
    /// Transfers configured as files in the config dir.
    pub configs: ConfigDir,
    /// What OPTIONS advertises per transfer: reads one client may run in
    /// parallel on it.
    pub max_readers: usize,
    /// What OPTIONS advertises per writable transfer: writes one client may
    /// run in parallel on it.
    pub max_writers: usize,
    /// The server-wide bound on data requests in flight.
    pub requests: RequestSlots,
    /// Full-image PUTs of one image run one at a time.
    pub locks: ImageLocks,
    /// Longest wait for the next piece of a request body.
    pub body_timeout: Duration,
    /// The HTTP Unix socket's path, as OPTIONS advertises it (`None`: off).
    pub unix_socket: Option<String>,
}

impl AppState {
    pub fn new(
        configs: ConfigDir,
        max_readers: usize,
        max_writers: usize,
        max_requests: usize,
        body_timeout: Duration,
    ) -> AppState {
        AppState {
            registry: Registry::new(),
            configs,
            max_readers,
            max_writers,
            requests: RequestSlots::new(max_requests),
            locks: ImageLocks::new(),
            body_timeout,
            unix_socket: None,
        }
    }

    /// Every transfer currently known: registered ones and those loaded from
    /// the config dir and still cached.
    pub fn transfers(&self) -> Vec<Arc<Transfer>> {
        let mut all = self.registry.all();
        all.extend(self.configs.cached());
        all
    }

    /// The one place that decides what an id names: a registered transfer
    /// if there is one (even while it is being unregistered, so that the id
    /// is refused then), else the config dir's. Returns a lease for one
    /// request; `None` (404) for an unknown or closed transfer. Blocking
    /// (may read the config dir).
    pub fn lookup(&self, id: &str) -> Option<Lease> {
        if !valid_transfer_id(id) {
            return None;
        }
        let (t, registered) = match self.registry.get(id) {
            Some(t) => (t, true),
            None => (self.configs.lookup(id)?, false),
        };
        let lease = t.lease();
        if lease.is_none() {
            if registered {
                log::info!("image_id={id} refused: being unregistered");
            } else {
                log::info!(
                    "image_id={id} refused: closed after its idle timeout until its config file changes"
                );
            }
        }
        lease
    }

    /// The transfer `id` as the server holds it now, for the control
    /// socket's `status`: the one [`AppState::lookup`] would use, except
    /// that it takes no lease (so it counts as no request and no activity)
    /// and reads nothing from disk: a config-dir transfer is found once an
    /// HTTP request loaded it. Closed transfers (being unregistered, or
    /// idle) are found too. Returns it with where it comes from
    /// (`"registered"` or `"config_dir"`).
    pub fn find(&self, id: &str) -> Option<(Arc<Transfer>, &'static str)> {
        if !valid_transfer_id(id) {
            return None;
        }
        if let Some(t) = self.registry.get(id) {
            return Some((t, "registered"));
        }
        self.configs.loaded(id).map(|t| (t, "config_dir"))
    }

    /// Closes every transfer (registered or config-dir) idle for longer than
    /// its idle timeout; returns them so they can be retired (see
    /// [`Transfer::retire`]) off the async workers.
    pub fn expire_idle(&self, now: Instant) -> Vec<Arc<Transfer>> {
        let registered = self.registry.expire_idle(now);
        for t in &registered {
            log::info!(
                "image_id={} unregistered: no request for {} s (idle_timeout_seconds)",
                t.id(),
                t.config().idle_timeout.as_secs()
            );
        }
        let from_dir = self.configs.expire_idle(now);
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
