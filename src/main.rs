//! `cloudstack-image-server`: CLI → settings → server.

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};

use cloudstack_image_server::http::limits::{
    Queue, DEFAULT_MAX_WAITING, DEFAULT_QUEUE_TIMEOUT_SECS, MAX_REQUESTS_LIMIT, MAX_WAITING_LIMIT,
};
use cloudstack_image_server::server::{self, Settings, TlsFiles};
use cloudstack_image_server::{control, http, transfers};

/// imageio-compatible HTTP server for CloudStack KVM image transfers over NBD.
///
/// Each transfer id names a disk: registered over the control socket by the
/// CloudStack agent, or a JSON file `<config-dir>/<id>`; its config says
/// whether it is an NBD export on a Unix socket or a local file.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    long_about = None,
    // The CloudStack agent's flags come after the operator's
    // (packaging/imageserver): the agent's win.
    args_override_self = true,
    after_help = "A flag given twice counts once, with its last value."
)]
struct Cli {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    listen: String,
    /// Port to listen on (0 picks a free port, printed at start).
    #[arg(long, default_value_t = 54322)]
    port: u16,
    /// Directory of per-transfer JSON configs (`<config-dir>/<transferId>`).
    #[arg(long, default_value = "/tmp/imagetransfer")]
    config_dir: PathBuf,
    /// Reads one client may run in parallel on a transfer, as OPTIONS
    /// advertises it (`max_readers`). Advertised only: nothing is refused
    /// per transfer (see --max-requests).
    #[arg(long, default_value_t = 4)]
    max_readers: usize,
    /// Writes one client may run in parallel on a writable transfer, as
    /// OPTIONS advertises it (`max_writers`; 0 for a read-only export).
    /// ovirt-imageio's client uploads with min(4, max_writers) workers.
    /// Advertised only: nothing is refused per transfer.
    #[arg(long, default_value_t = 4)]
    max_writers: usize,
    /// Data requests (image GET, PUT, PATCH, checksum) in flight at once
    /// across the whole server. The next one waits for a slot (first come,
    /// first served across transfers), holding no buffer, NBD connection or
    /// lease; it gets `503` with `Retry-After: 1` only after
    /// --queue-timeout, or at once when --max-waiting requests already
    /// wait. Bounds memory: a GET or PUT holds at most about 5 MiB of
    /// buffers, a checksum 8.5 MiB (SECURITY.md, "Memory").
    #[arg(long, default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=MAX_REQUESTS_LIMIT as i64))]
    max_requests: u32,
    /// Seconds a data request (or an extents request) may wait for a slot
    /// before it gets `503 {"error":"timed out waiting for a request
    /// slot"}` with `Retry-After: 1`. Below the 60 s read timeouts common
    /// in HTTP clients, so a client is answered before it gives up.
    #[arg(long, default_value_t = DEFAULT_QUEUE_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    queue_timeout: u64,
    /// Requests that may wait for a slot at once; the next one gets
    /// `503 {"error":"too many requests"}` with `Retry-After: 1` at once. 0
    /// refuses a data request at once whenever --max-requests are in
    /// flight.
    #[arg(long, default_value_t = DEFAULT_MAX_WAITING as u32,
          value_parser = clap::value_parser!(u32).range(0..=MAX_WAITING_LIMIT as i64))]
    max_waiting: u32,
    /// Seconds to wait for the next piece of a request body before failing
    /// the request and releasing its locks and slots; and for a client to
    /// take more of a response before closing its connection.
    #[arg(long, default_value_t = 60)]
    body_timeout: u64,
    /// Seconds a client has to send a complete request head.
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Seconds an NBD command may go without a reply (qemu-nbd stopped or
    /// stuck) before its request fails (504 before the response head, a
    /// truncated body after it) and the NBD connection is discarded. 0
    /// waits for ever.
    #[arg(long, default_value_t = cloudstack_image_server::backend::nbd_export::DEFAULT_COMMAND_TIMEOUT_SECS)]
    nbd_timeout: u64,
    /// Seconds in-flight requests may run on after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    /// HTTP worker threads (0: one per CPU core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Unix socket where the agent registers and unregisters transfers
    /// (mode 0660; its directory is created if missing). An empty value
    /// turns it off.
    #[arg(long, default_value = control::DEFAULT_SOCKET)]
    control_socket: String,
    /// Also serve the HTTP API, plain HTTP (never TLS), on this Unix socket
    /// for clients on this host (mode 0660: the server's user and group;
    /// its directory is created if missing). OPTIONS advertises it as
    /// `unix_socket`, and ovirt-imageio's client switches to it by itself
    /// when its TCP connection is local: local transfers skip TLS and TCP.
    /// On by default, next to the control socket, as the packaged service
    /// (root, RuntimeDirectory=cloudstack) wants it; a server run by an
    /// ordinary user names a writable path here, as for --control-socket.
    /// An empty value turns it off.
    #[arg(long, default_value = server::DEFAULT_UNIX_SOCKET)]
    unix_socket: String,
    /// Serve HTTPS with --tls-cert-file and --tls-key-file (both required
    /// then). As CloudStack's newer image server: without this flag the
    /// server speaks plain HTTP even when a certificate and key are given
    /// (a warning is logged).
    #[arg(long)]
    tls_enabled: bool,
    /// PEM certificate (chain) for HTTPS; needs --tls-key-file, and is used
    /// only with --tls-enabled.
    #[arg(long, requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, RSA or EC) for HTTPS; needs --tls-cert-file,
    /// and is used only with --tls-enabled.
    #[arg(long, requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Move GET and PUT bodies around actix-http's buffers: a GET's chunks
    /// go from the buffer the image was read into straight to the socket,
    /// and the rest of a PUT body of 1 MiB or more is read from the socket
    /// straight into the buffer its write is sent from (the `bytes_direct`
    /// of the control socket's status). `off` sends and takes every body
    /// through actix-http's own buffers, with a copy each way and more CPU
    /// per byte; for when an actix-http change is suspected.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    direct_io: Switch,
}

/// A feature on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

/// HTTPS files when TLS is on; `--tls-enabled` without them is a usage error.
fn tls_files(cli: &mut Cli) -> Option<TlsFiles> {
    let files = match (cli.tls_cert_file.take(), cli.tls_key_file.take()) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        _ => None,
    };
    match (cli.tls_enabled, files) {
        (true, None) => Cli::command()
            .error(
                ErrorKind::MissingRequiredArgument,
                "--tls-enabled needs --tls-cert-file and --tls-key-file",
            )
            .exit(),
        (true, files) => files,
        (false, Some(files)) => {
            log::warn!(
                "--tls-cert-file {} and --tls-key-file {} are ignored without --tls-enabled: \
                 serving plain HTTP",
                files.cert.display(),
                files.key.display()
            );
            None
        }
        (false, None) => None,
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let tls = tls_files(&mut cli);
    let settings = Settings {
        listen: cli.listen,
        port: cli.port,
        config_dir: cli.config_dir,
        http: http::HttpSettings {
            max_readers: cli.max_readers,
            max_writers: cli.max_writers,
            max_requests: cli.max_requests as usize,
            queue: Queue {
                timeout: Duration::from_secs(cli.queue_timeout),
                max_waiting: cli.max_waiting as usize,
            },
            body_timeout: Duration::from_secs(cli.body_timeout.max(1)),
        },
        transfers: transfers::TransferSettings {
            nbd_timeout: (cli.nbd_timeout > 0).then(|| Duration::from_secs(cli.nbd_timeout)),
        },
        header_timeout: Duration::from_secs(cli.header_timeout.max(1)),
        shutdown_timeout: Duration::from_secs(cli.shutdown_timeout),
        workers: cli.workers,
        control_socket: Some(PathBuf::from(cli.control_socket))
            .filter(|p| !p.as_os_str().is_empty()),
        tls,
        unix_socket: Some(PathBuf::from(cli.unix_socket)).filter(|p| !p.as_os_str().is_empty()),
        direct_io: cli.direct_io == Switch::On,
    };
    match actix_web::rt::System::new().block_on(server::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("cloudstack-image-server: {e}");
            ExitCode::FAILURE
        }
    }
}
