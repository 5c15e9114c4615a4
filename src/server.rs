//! Builds the actix-web server from the settings and runs it until SIGTERM
//! or SIGINT (then in-flight requests get `shutdown_timeout` to finish).
//! The same application is served on TCP (HTTP or HTTPS) and, when
//! configured, as plain HTTP on a Unix socket for local clients.
//! Next to it, on the same runtime: the control socket and the idle sweeper.

use std::future::ready;
use std::io::{self, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::{error::DispatchError, HttpService, Protocol};
use actix_server::{GracefulShutdownSignal, ServerBuilder};
use actix_service::{
    fn_service, map_config, IntoServiceFactory, ServiceFactory, ServiceFactoryExt,
};
use actix_tls::accept::rustls_0_23::{Acceptor, TlsStream};
use actix_tls::accept::TlsError;
use actix_web::dev::AppConfig;
use actix_web::rt::net::{TcpStream, UnixStream};
use actix_web::{web, App};
use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::control::ControlSocket;
use crate::direct_body::{DirectIo, LowWater, LowWaterStream};
use crate::head_timeout::{track_heads, HeadDeadline};
use crate::http::limits::ConnLimit;
use crate::http::{self, AppState};
use crate::request_gate::RequestGate;
use crate::tls::{Fill, ReadAhead};
use crate::transfers::{self, Transfers};
use crate::unix_socket;

/// Where the HTTP API is also served, as plain HTTP, on a Unix socket for
/// clients on this host (ovirt-imageio's client switches to it by itself
/// once OPTIONS advertises it): next to the control socket, in the
/// directory the packaged service's `RuntimeDirectory=cloudstack` makes.
pub const DEFAULT_UNIX_SOCKET: &str = "/var/run/cloudstack/image-server-http.sock";

/// How the HTTP Unix socket is named in errors and the log.
const UNIX_SOCKET_NAME: &str = "HTTP unix socket";

/// An idle keep-alive connection is closed after this.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(60);

/// Pending connections the kernel queues for `accept` (actix-web's default).
const LISTEN_BACKLOG: i32 = 1024;

/// How often transfers are checked against their idle timeout.
pub(crate) const IDLE_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

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
    /// What the HTTP side takes: request slots and their queue, the body
    /// timeout, what OPTIONS advertises.
    pub http: http::HttpSettings,
    /// What every transfer gets (the NBD command timeout).
    pub transfers: transfers::TransferSettings,
    /// Longest wait for a complete request head.
    pub header_timeout: Duration,
    /// How long in-flight requests may run on after SIGTERM.
    pub shutdown_timeout: Duration,
    /// actix worker threads (0 = one per core).
    pub workers: usize,
    /// The control socket (`None`: no control socket).
    pub control_socket: Option<PathBuf>,
    /// HTTPS instead of HTTP when set.
    pub tls: Option<TlsFiles>,
    /// The same API, plain HTTP, on this Unix socket too (`None`: TCP only).
    pub unix_socket: Option<PathBuf>,
    /// GET and PUT bodies moved around actix-http's buffers (see
    /// `direct_body`); off: through them, as actix-http alone does.
    pub direct_io: bool,
}

/// Closes transfers idle for longer than their idle timeout, forever.
async fn sweep_idle(transfers: Arc<Transfers>) {
    let mut tick = tokio::time::interval(IDLE_SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let expired = transfers.expire_idle(Instant::now());
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

/// File descriptors kept for what is not a client connection, besides one
/// per data request in flight (its NBD connection): idle NBD connections,
/// image files, listeners, the control socket, the log.
const RESERVED_FDS: u64 = 1024;

/// Raises the soft open-file limit to the hard one (the agent starts the
/// server as a transient systemd unit, whose soft limit is 1024 whatever
/// the hard limit allows) and returns the soft limit now in force.
fn raise_nofile() -> u64 {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).ok();
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(now) => {
            log::info!(
                "open-file limit {now} (soft limit was {}, hard limit {})",
                before.map_or("?".into(), |(soft, _)| soft.to_string()),
                before.map_or("?".into(), |(_, hard)| hard.to_string())
            );
            now
        }
        Err(e) => {
            let soft = before.map_or(1024, |(soft, _)| soft);
            log::warn!("cannot raise the open-file limit (stays {soft}): {e}");
            soft
        }
    }
}

/// Worker threads actix starts for `workers` (0: one per core).
fn worker_count(workers: usize) -> usize {
    match workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Runs the server; returns when it has stopped.
pub async fn run(settings: Settings) -> std::io::Result<()> {
    let nofile = raise_nofile();
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
    let unix = match &settings.unix_socket {
        // Made absolute: OPTIONS advertises it to clients, whatever their
        // working directory.
        Some(path) => Some(unix_socket::bind(
            &std::path::absolute(path)?,
            UNIX_SOCKET_NAME,
        )?),
        None => None,
    };
    if !settings.config_dir.is_dir() {
        log::warn!(
            "config dir {} does not exist (yet): every transfer is unknown until it does",
            settings.config_dir.display()
        );
    }
    let transfers = Arc::new(Transfers::new(
        settings.config_dir.clone(),
        settings.transfers,
    ));
    let state = AppState::new(
        transfers.clone(),
        &settings.http,
        unix.as_ref()
            .map(|(_, file)| file.path().to_string_lossy().into_owned()),
    );
    let state = web::Data::new(state);
    let (unix_listener, unix_file) = unix.unzip();
    let workers = worker_count(settings.workers);
    let conns = Arc::new(ConnLimit::new(
        nofile,
        RESERVED_FDS + settings.http.max_requests as u64,
        workers,
    ));
    log::info!(
        "at most {} client connections ({} per worker, {workers} workers)",
        conns.total(),
        conns.per_worker()
    );
    let (server, addrs) = http_server(&settings, tls, unix_listener, state, conns)?;
    for (addr, scheme) in addrs {
        log::info!("listening on {scheme}://{addr}");
        println!("listening on {scheme}://{addr}");
    }
    if let Some(file) = &unix_file {
        log::info!(
            "{UNIX_SOCKET_NAME} listening on {} (plain HTTP)",
            file.path().display()
        );
        println!("listening on unix:{}", file.path().display());
    }
    log::info!(
        "image configs are read from {}/<transferId>",
        settings.config_dir.display()
    );
    if let Some(control) = control {
        log::info!("control socket listening on {}", control.path().display());
        actix_web::rt::spawn(control.serve(transfers.clone(), settings.shutdown_timeout));
    }
    actix_web::rt::spawn(sweep_idle(transfers.clone()));
    std::io::stdout().flush()?;
    let running = server.run();
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        log::debug!("sd_notify: {e}");
    }
    running.await?;
    // Nobody is accepted on it any more: new local clients fail to connect
    // instead of waiting on a socket nobody serves.
    drop(unix_file);
    log::info!("server stopped accepting; flushing what was written");
    let flushed = web::block(move || flush_written(&transfers)).await;
    if let Err(e) = flushed {
        log::error!("flush at shutdown failed: {e}");
    }
    log::info!("server stopped");
    Ok(())
}

/// Binds `settings.listen:settings.port` (every address it resolves to, as
/// actix-web's `HttpServer::bind` does) and builds the HTTP(S) server on it,
/// and plain HTTP on `unix` if given (TLS never applies there: only local
/// users in the socket's group reach it).
///
/// Not `HttpServer`: it hands actix-http the accepted stream as is, and
/// every request head must be bounded (see `head_timeout`), so each stream
/// is wrapped in a [`HeadDeadline`] first, that in a [`RequestGate`] (one
/// request at a time, see `request_gate`), and that in a [`DirectIo`] for
/// bodies moved without actix-http's copies (see `direct_body`).
fn http_server(
    settings: &Settings,
    tls: Option<rustls::ServerConfig>,
    unix: Option<StdUnixListener>,
    state: web::Data<AppState>,
    conns: Arc<ConnLimit>,
) -> io::Result<(ServerBuilder, Vec<(SocketAddr, &'static str)>)> {
    let mut builder = actix_server::Server::build()
        .shutdown_timeout(settings.shutdown_timeout.as_secs())
        .max_concurrent_connections(conns.per_worker());
    if settings.workers > 0 {
        builder = builder.workers(settings.workers);
    }
    if !settings.direct_io {
        log::info!("--direct-io off: request and response bodies go through actix-http's buffers");
    }
    let conn = ConnSettings {
        header_timeout: settings.header_timeout,
        direct_io: settings.direct_io,
        shutdown: builder.graceful_shutdown_signal(),
        state,
        conns,
    };
    let mut addrs = Vec::new();
    for lst in bind_all((settings.listen.as_str(), settings.port))? {
        let addr = lst.local_addr()?;
        let conn = conn.clone();
        builder = match &tls {
            None => {
                addrs.push((addr, "http"));
                builder.listen(format!("http-{addr}"), lst, move || {
                    let http = conn.http_service(Some(addr));
                    let conn = conn.clone();
                    fn_service(move |io: TcpStream| {
                        let peer = io.peer_addr().ok();
                        set_nodelay(&io);
                        let mark = LowWater::default();
                        let io = LowWaterStream::new(io, mark.clone());
                        ready(
                            conn.wrap(io, peer, true)
                                .map(|(io, proto, peer)| (io.with_low_water(mark), proto, peer)),
                        )
                    })
                    .and_then(http)
                })?
            }
            Some(config) => {
                addrs.push((addr, "https"));
                let mut config = config.clone();
                // What actix-web's rustls listener offers (no HTTP/2 here).
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                builder.listen(format!("https-{addr}"), lst, move || {
                    let http = conn.http_service(Some(addr));
                    let conn = conn.clone();
                    fn_service(|io: TcpStream| {
                        set_nodelay(&io);
                        ready(Ok(ReadAhead::new(io)))
                    })
                    .and_then(Acceptor::new(config.clone()).map_err(TlsError::into_service_error))
                    .and_then(fn_service(move |io: TlsStream<ReadAhead<TcpStream>>| {
                        let peer = io.get_ref().0.get_ref().peer_addr().ok();
                        ready(
                            conn.wrap(Fill::new(io), peer, false)
                                .map_err(TlsError::Service),
                        )
                    }))
                    .and_then(http.map_err(TlsError::Service))
                })?
            }
        };
    }
    if let Some(lst) = unix {
        let conn = conn.clone();
        builder = builder.listen_uds("http-unix", lst, move || {
            let http = conn.http_service(None);
            let conn = conn.clone();
            fn_service(move |io: UnixStream| ready(conn.wrap(io, None, true))).and_then(http)
        })?;
    }
    Ok((builder, addrs))
}

/// A response head and its body are separate writes: without NODELAY, Nagle
/// holds the body until the client's delayed ACK (~40 ms per small request
/// on a keep-alive connection).
fn set_nodelay(io: &TcpStream) {
    if let Err(e) = io.set_nodelay(true) {
        log::debug!("TCP_NODELAY: {e}");
    }
}

/// Binds every address `addr` resolves to (SO_REUSEADDR, a backlog of 1024,
/// as actix-web does); fails only if none binds.
fn bind_all(addr: impl ToSocketAddrs) -> io::Result<Vec<std::net::TcpListener>> {
    let mut listeners = Vec::new();
    let mut last_err = None;
    for addr in addr.to_socket_addrs()? {
        let bound = Socket::new(
            Domain::for_address(addr),
            Type::STREAM,
            Some(SockProtocol::TCP),
        )
        .and_then(|s| {
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(LISTEN_BACKLOG)?;
            Ok(s)
        });
        match bound {
            Ok(s) => listeners.push(s.into()),
            Err(e) => last_err = Some(e),
        }
    }
    match (listeners.is_empty(), last_err) {
        (true, Some(e)) => Err(e),
        (true, None) => Err(io::Error::other("the listen address resolves to nothing")),
        (false, _) => Ok(listeners),
    }
}

/// An accepted stream of type `T` as actix-http's service takes it.
type Accepted<T> = (Stream<T>, Protocol, Option<SocketAddr>);

/// An accepted stream of type `T` as the connection reads and writes it.
type Stream<T> = DirectIo<RequestGate<HeadDeadline<T>>>;

/// What every worker's HTTP service is built from.
#[derive(Clone)]
struct ConnSettings {
    header_timeout: Duration,
    /// Whether the handlers get the connection's `Outbox` and `Inbox`
    /// (`--direct-io`).
    direct_io: bool,
    shutdown: GracefulShutdownSignal,
    state: web::Data<AppState>,
    /// Counts the connections, to log when the limit is reached.
    conns: Arc<ConnLimit>,
}

impl ConnSettings {
    /// An accepted stream, its request heads bounded (see `head_timeout`),
    /// handed to actix one request at a time (see `request_gate`), as
    /// actix-http takes it, able to move bodies uncopied (see
    /// `direct_body`). `socket`: the stream is the socket itself (plain
    /// TCP or Unix), not a TLS session over it.
    fn wrap<T>(
        &self,
        io: T,
        peer: Option<SocketAddr>,
        socket: bool,
    ) -> Result<Accepted<T>, DispatchError> {
        let idle = KEEP_ALIVE + self.header_timeout;
        let io = HeadDeadline::new(io, self.header_timeout, idle);
        let clock = io.clock();
        let io = DirectIo::new(RequestGate::new(io, clock))
            .with_write_timeout(self.state.settings.body_timeout);
        let io = if socket { io.reading_a_socket() } else { io };
        Ok((io, Protocol::Http1, peer))
    }

    /// actix-http's HTTP/1 service for streams of type `T`, serving the
    /// application, with the connection timeouts: the one service behind
    /// every listener (TCP, TLS, Unix). `local`: the TCP listener's address.
    fn http_service<T>(
        &self,
        local: Option<SocketAddr>,
    ) -> impl ServiceFactory<
        Accepted<T>,
        Config = (),
        Response = (),
        Error = DispatchError,
        InitError = (),
    >
    where
        T: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        let state = self.state.clone();
        let app = App::new()
            .wrap(http::default_headers())
            .configure(http::configure(state))
            .into_factory()
            .map_err(|e| e.error_response());
        // actix-web keeps `AppConfig`'s constructor to itself; the default
        // (host "localhost:8080", not secure) only feeds `ConnectionInfo`
        // and `url_for`, which the handlers do not use.
        let app = map_config(app, |()| AppConfig::default());
        let shutdown = self.shutdown.clone();
        let mut service = HttpService::build()
            .graceful_shutdown_signal(move || {
                let shutdown = shutdown.clone();
                async move { shutdown.notified().await }
            })
            .keep_alive(KEEP_ALIVE)
            // actix's own deadline for a connection's first head (answered
            // with a bare 408); `HeadDeadline` covers every head.
            .client_request_timeout(self.header_timeout)
            .client_disconnect_timeout(Duration::from_secs(2));
        if let Some(local) = local {
            service = service.local_addr(local);
        }
        let conns = self.conns.clone();
        let direct_io = self.direct_io;
        service
            .on_connect_ext(move |io: &Stream<T>, data| {
                data.insert(conns.opened());
                data.insert(io.get_ref().get_ref().clock());
                // Without them the handlers send and take bodies through
                // actix's buffers.
                if direct_io {
                    data.insert(io.outbox());
                    data.insert(io.inbox());
                }
                data.insert(io.abort());
            })
            .finish(track_heads(app))
    }
}

/// Flushes every transfer written since its last flush, then closes its
/// NBD connections. Blocking.
fn flush_written(transfers: &Transfers) {
    for t in transfers.all() {
        t.retire("at shutdown");
    }
}
