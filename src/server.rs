//! Builds the actix-web server from the settings and runs it until SIGTERM
//! or SIGINT (then in-flight requests get `shutdown_timeout` to finish).
//! Next to it, on the same runtime: the control socket and the idle sweeper.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpServer};

use crate::config::ConfigDir;
use crate::control::ControlSocket;
use crate::http::{self, AppState};

/// How often transfers are checked against their idle timeout.
pub const IDLE_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// PEM files that turn on HTTPS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

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
    /// Longest wait for a reply to an NBD command (`None`: no limit).
    pub nbd_timeout: Option<Duration>,
    /// actix worker threads (0 = one per core).
    pub workers: usize,
    /// The control socket (`None`: no control socket).
    pub control_socket: Option<PathBuf>,
    /// HTTPS instead of HTTP when set.
    pub tls: Option<TlsFiles>,
}

/// Closes transfers idle for longer than their idle timeout, forever.
async fn sweep_idle(state: web::Data<AppState>) {
    let mut tick = tokio::time::interval(IDLE_SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let expired = state.expire_idle(Instant::now());
        if !expired.is_empty() {
            let _ = actix_web::rt::task::spawn_blocking(move || {
                for t in expired {
                    t.retire("as it went idle");
                }
            })
            .await;
        }
    }
}

/// Runs the server; returns when it has stopped.
pub async fn run(settings: Settings) -> std::io::Result<()> {
    crate::backend::nbd::set_command_timeout(settings.nbd_timeout);
    // Everything that can fail at start fails before the server is up.
    let tls = match &settings.tls {
        Some(files) => Some(
            crate::tls::server_config(&files.cert, &files.key)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
        ),
        None => None,
    };
    let control = match &settings.control_socket {
        Some(path) => Some(ControlSocket::bind(path)?),
        None => None,
    };
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
    let addr = (settings.listen.as_str(), settings.port);
    let server = match tls {
        Some(config) => server.bind_rustls_0_23(addr, config)?,
        None => server.bind(addr)?,
    };
    for (addr, scheme) in server.addrs_with_scheme() {
        log::info!("listening on {scheme}://{addr}");
        println!("listening on {scheme}://{addr}");
    }
    log::info!(
        "image configs are read from {}/<transferId>",
        settings.config_dir.display()
    );
    if let Some(control) = control {
        log::info!("control socket listening on {}", control.path().display());
        actix_web::rt::spawn(control.serve(state.clone(), settings.shutdown_timeout));
    }
    actix_web::rt::spawn(sweep_idle(state.clone()));
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

/// Flushes every transfer written since its last flush, then closes its
/// NBD connections. Blocking.
fn flush_written(state: &AppState) {
    for t in state.transfers() {
        t.retire("at shutdown");
    }
}
