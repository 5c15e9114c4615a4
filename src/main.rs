//! `cloudstack-image-server`: CLI → settings → server.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use cloudstack_image_server::control;
use cloudstack_image_server::server::{self, Settings, TlsFiles};

/// imageio-compatible HTTP server for CloudStack KVM image transfers over NBD.
///
/// Each transfer id names a disk: registered over the control socket by the
/// CloudStack agent, or a JSON file `<config-dir>/<id>`; its config says
/// whether it is an NBD export on a Unix socket or a local file.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    listen: String,
    /// Port to listen on (0 picks a free port, printed at start).
    #[arg(long, default_value_t = 54323)]
    port: u16,
    /// Directory of per-transfer JSON configs (`<config-dir>/<transferId>`).
    #[arg(long, default_value = "/tmp/imagetransfer")]
    config_dir: PathBuf,
    /// Image reads (GET) served at once across the server; more get 503.
    #[arg(long, default_value_t = 8)]
    max_readers: usize,
    /// Writes (PUT, PATCH) served at once across the server; more get 503.
    #[arg(long, default_value_t = 1)]
    max_writers: usize,
    /// Seconds to wait for the next piece of a request body (or for a GET
    /// client to take more of its response) before failing the request and
    /// releasing its locks and slots.
    #[arg(long, default_value_t = 60)]
    body_timeout: u64,
    /// Seconds a client has to send a complete request head.
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Seconds an NBD command may go without a reply (qemu-nbd stopped or
    /// stuck) before its request fails (504 before the response head, a
    /// truncated body after it) and the NBD connection is discarded. 0
    /// waits for ever.
    #[arg(long, default_value_t = cloudstack_image_server::backend::nbd::DEFAULT_COMMAND_TIMEOUT_SECS)]
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
    /// PEM certificate (chain) for HTTPS; needs --tls-key-file.
    #[arg(long, requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, RSA or EC) for HTTPS; needs --tls-cert-file.
    #[arg(long, requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let settings = Settings {
        listen: cli.listen,
        port: cli.port,
        config_dir: cli.config_dir,
        max_readers: cli.max_readers,
        max_writers: cli.max_writers,
        body_timeout: Duration::from_secs(cli.body_timeout.max(1)),
        header_timeout: Duration::from_secs(cli.header_timeout.max(1)),
        shutdown_timeout: Duration::from_secs(cli.shutdown_timeout),
        nbd_timeout: (cli.nbd_timeout > 0).then(|| Duration::from_secs(cli.nbd_timeout)),
        workers: cli.workers,
        control_socket: Some(PathBuf::from(cli.control_socket))
            .filter(|p| !p.as_os_str().is_empty()),
        tls: match (cli.tls_cert_file, cli.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            _ => None,
        },
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
