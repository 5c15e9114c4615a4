//! Builds the actix-web server from the settings and runs it until SIGTERM
//! or SIGINT (then in-flight requests get `shutdown_timeout` to finish).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use actix_web::{web, App, HttpServer};

use crate::config::ConfigDir;
use crate::http::{self, AppState};

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: String,
    pub port: u16,
    pub config_dir: PathBuf,
    pub max_readers: usize,
    pub max_writers: usize,
    /// Longest wait for the next piece of a request body.
    pub body_timeout: Duration,
    /// Longest wait for a complete request head.
    pub header_timeout: Duration,
    /// How long in-flight requests may run on after SIGTERM.
    pub shutdown_timeout: Duration,
    /// actix worker threads (0 = one per core).
    pub workers: usize,
}

/// Runs the server; returns when it has stopped.
pub async fn run(settings: Settings) -> std::io::Result<()> {
    if !settings.config_dir.is_dir() {
        log::warn!(
            "config dir {} does not exist (yet): every transfer is unknown until it does",
            settings.config_dir.display()
        );
    }
    let state = web::Data::new(AppState::new(
        ConfigDir::new(settings.config_dir.clone()),
        settings.max_readers,
        settings.max_writers,
        settings.body_timeout,
    ));
    let app_state = state.clone();
    let mut server = HttpServer::new(move || {
        App::new()
            .wrap(http::default_headers())
            .configure(http::configure(app_state.clone()))
    })
    .client_request_timeout(settings.header_timeout)
    .client_disconnect_timeout(Duration::from_secs(2))
    .keep_alive(Duration::from_secs(60))
    // A response head and its body are separate writes: without NODELAY,
    // Nagle holds the body until the client's delayed ACK (~40 ms per small
    // request on a keep-alive connection).
    .tcp_nodelay(true)
    .shutdown_timeout(settings.shutdown_timeout.as_secs());
    if settings.workers > 0 {
        server = server.workers(settings.workers);
    }
    let server = server.bind((settings.listen.as_str(), settings.port))?;
    for addr in server.addrs() {
        log::info!("listening on http://{addr}");
        println!("listening on http://{addr}");
    }
    log::info!(
        "image configs are read from {}/<transferId>",
        settings.config_dir.display()
    );
    std::io::stdout().flush()?;
    let running = server.run();
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        log::debug!("sd_notify: {e}");
    }
    running.await?;
    log::info!("server stopped accepting; flushing what was written");
    let flushed = web::block(move || flush_written(&state)).await;
    if let Err(e) = flushed {
        log::error!("flush at shutdown failed: {e}");
    }
    log::info!("server stopped");
    Ok(())
}

/// Flushes every transfer written since its last flush, then closes the
/// idle NBD connections. Blocking.
fn flush_written(state: &AppState) {
    for t in state.transfers() {
        match t.flush_if_written() {
            Ok(true) => log::info!("flushed image_id={} at shutdown", t.id()),
            Ok(false) => {}
            Err(e) => log::error!("flush at shutdown failed image_id={} err={e}", t.id()),
        }
        t.close_idle();
    }
}
