//! The real server binary on an ephemeral port with its own config dir and
//! control socket, the control-socket exchange, and [`Env`]: a server with
//! the qemu-nbd exports it serves.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::client::{Client, Response};
use super::qemu::{pattern_bytes, raw_image, NbdOpts, QemuNbd, TempDir};

/// How long [`Server::logged`] waits for the lines it wants.
pub const LOG_WAIT: Duration = Duration::from_secs(10);

/// The real server binary on an ephemeral port with its own config dir and
/// control socket.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// "http" or "https", as the server printed it.
    pub scheme: String,
    pub config_dir: PathBuf,
    /// The control socket (`<config_dir>/.control.sock` unless the test
    /// passed its own `--control-socket`).
    pub control_socket: PathBuf,
    /// The HTTP Unix socket: off (`--unix-socket ''`) unless the test
    /// passed its own `--unix-socket`.
    pub unix_socket: Option<PathBuf>,
    log: Arc<Mutex<Vec<String>>>,
}

/// Whether the servers the tests start move bodies around actix-http's
/// buffers: `CSIS_TEST_DIRECT_IO=off` (`make test-no-direct`) starts every
/// one with `--direct-io off` (unless a test passes its own), so that the
/// whole suite runs through actix's ordinary buffers too.
pub fn direct_io() -> bool {
    match std::env::var("CSIS_TEST_DIRECT_IO") {
        Ok(v) if v == "off" => false,
        Ok(v) if v == "on" || v.is_empty() => true,
        Ok(v) => panic!("CSIS_TEST_DIRECT_IO={v:?}: on or off"),
        Err(_) => true,
    }
}

pub fn server_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cloudstack-image-server"))
}

/// Runs the server on `127.0.0.1`, an ephemeral port and `args`, expecting
/// it to refuse to start: returns its stderr (panics if it started).
pub fn failed_start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = Command::new(server_binary())
        .args(["--listen", "127.0.0.1", "--port", "0"])
        .args(args)
        .output()
        .expect("run the server binary");
    assert!(!out.status.success(), "the server started with {:?}", out);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

impl Server {
    /// Starts the server with `--config-dir config_dir --port 0
    /// --control-socket config_dir/.control.sock --unix-socket ''` (and
    /// `--direct-io off` if [`direct_io`] says so) plus `extra` (which may
    /// name another `--control-socket`, or a `--unix-socket`).
    pub fn start(config_dir: &Path, extra: &[&str]) -> Server {
        Self::start_with_env(config_dir, extra, &[])
    }

    pub fn start_with_env(config_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(server_binary());
        cmd.arg("--listen")
            .arg("127.0.0.1")
            .arg("--port")
            .arg("0")
            .arg("--config-dir")
            .arg(config_dir);
        let control_socket = match extra.iter().position(|a| *a == "--control-socket") {
            Some(i) => PathBuf::from(extra.get(i + 1).copied().unwrap_or_default()),
            None => {
                let p = config_dir.join(".control.sock");
                cmd.arg("--control-socket").arg(&p);
                p
            }
        };
        let unix_socket = match extra.iter().position(|a| *a == "--unix-socket") {
            Some(i) => extra
                .get(i + 1)
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
            None => {
                // Not the binary's default (/var/run/cloudstack): tests run
                // side by side, and as ordinary users.
                cmd.arg("--unix-socket").arg("");
                None
            }
        };
        if !direct_io() && !extra.contains(&"--direct-io") {
            cmd.args(["--direct-io", "off"]);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn server");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        // The server prints "listening on ADDR" on stdout once bound.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("listening on ") {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("CSIS_TEST_VERBOSE").is_some() {
                    eprintln!("server: {line}");
                }
                log2.lock().unwrap().push(line);
            }
        });
        let (scheme, addr) = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => {
                let (scheme, addr) = a.split_once("://").expect("listening on SCHEME://ADDR");
                (
                    scheme.to_string(),
                    addr.parse().expect("server printed a socket address"),
                )
            }
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not report its address; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Server {
            child: Some(child),
            addr,
            scheme,
            config_dir: config_dir.to_path_buf(),
            control_socket,
            unix_socket,
            log,
        }
    }

    /// `SCHEME://ADDR/images/ID`
    pub fn url(&self, id: &str) -> String {
        format!("{}://{}/images/{id}", self.scheme, self.addr)
    }

    /// Sends raw bytes to the control socket (then shuts down writing) and
    /// returns the whole reply.
    pub fn control_raw(&self, request: &[u8]) -> Vec<u8> {
        control_request(&self.control_socket, request)
    }

    /// Sends one JSON request line to the control socket and returns the
    /// JSON reply (which must be one newline-terminated line).
    pub fn control(&self, request: &serde_json::Value) -> serde_json::Value {
        let mut line = request.to_string().into_bytes();
        line.push(b'\n');
        parse_control_reply(&self.control_raw(&line))
    }

    /// The figures of transfer `id` from the control socket's `status`
    /// (its `transfer` object; the reply must be ok).
    #[track_caller]
    pub fn transfer_status(&self, id: &str) -> serde_json::Value {
        let r = self.control(&serde_json::json!({"action": "status", "transfer_id": id}));
        assert_eq!(r["status"], "ok", "status of {id}: {r}");
        r["transfer"].clone()
    }

    /// One counter of transfer `id`'s `status`.
    #[track_caller]
    pub fn counter(&self, id: &str, name: &str) -> u64 {
        let t = self.transfer_status(id);
        t[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name:?} in {t}"))
    }

    /// Registers an nbd transfer for `nbd` over the control socket.
    pub fn register_nbd(&self, id: &str, nbd: &QemuNbd) -> serde_json::Value {
        self.control(&serde_json::json!({
            "action": "register",
            "transfer_id": id,
            "config": nbd_config(nbd),
        }))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// How many log lines so far contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_lines(needle, 1, timeout).is_some()
    }

    /// How many log lines contain `needle`, once at least `n` do. The log
    /// reaches the test through a reader thread, so a line the server has
    /// written may not be here yet: read a log line that is the behaviour
    /// under test through this, never from one snapshot of [`Server::log`].
    /// Waits up to [`LOG_WAIT`], then panics with the log.
    #[track_caller]
    pub fn logged(&self, needle: &str, n: usize) -> usize {
        self.wait_lines(needle, n, LOG_WAIT).unwrap_or_else(|| {
            panic!(
                "fewer than {n} log lines with {needle:?} after {LOG_WAIT:?}:\n{}",
                self.log()
            )
        })
    }

    /// How many GETs of transfer `id` whose client stopped reading the
    /// server disconnected, once it logged `n` of them or `timeout` passed.
    /// Their readers log each one (`GET client stopped reading`); with
    /// `--direct-io off` ([`direct_io`]) actix's own write of the body may
    /// wait for the client first, and then the stream's write deadline (the
    /// same `--body-timeout`, `secs`) closes the connection with a line of
    /// its own, counted too.
    pub fn stalled_gets_closed(&self, id: &str, secs: u64, n: usize, timeout: Duration) -> usize {
        let reader = format!("GET client stopped reading image_id={id}");
        if direct_io() {
            return self.wait_lines(&reader, n, timeout).unwrap_or(0);
        }
        eprintln!(
            "CSIS_TEST_DIRECT_IO=off: a stalled GET is closed by its reader or the write deadline"
        );
        let deadline = format!("closing a connection: the client took no data for {secs} s");
        let count = || self.log_count(&reader) + self.log_count(&deadline);
        let end = Instant::now() + timeout;
        while count() < n && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        count()
    }

    /// Polls the log until at least `n` lines contain `needle` (their count
    /// then), or `timeout` passes (`None`).
    fn wait_lines(&self, needle: &str, n: usize, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.log_count(needle);
            if count >= n {
                return Some(count);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Writes the transfer config `<config-dir>/<id>`.
    pub fn add_transfer(&self, id: &str, config: &serde_json::Value) {
        std::fs::write(self.config_dir.join(id), config.to_string()).expect("write config");
    }

    /// Writes an nbd transfer config for `nbd`.
    pub fn add_nbd(&self, id: &str, nbd: &QemuNbd) {
        self.add_transfer(id, &nbd_config(nbd));
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    /// A client on the HTTP Unix socket (the test must have turned it on).
    pub fn unix_client(&self) -> Client<UnixStream> {
        Client::connect_unix(self.unix_socket.as_deref().expect("--unix-socket given"))
    }

    /// One request on a fresh connection.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        self.client().request(method, path, headers, body)
    }

    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], b"")
    }

    /// Sends `signal` to the server.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Waits for the server to exit and returns its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The transfer config that names `nbd`'s export.
pub fn nbd_config(nbd: &QemuNbd) -> serde_json::Value {
    let mut cfg = serde_json::json!({"backend": "nbd", "socket": nbd.socket});
    if let Some(x) = &nbd.opts.export_name {
        cfg["export"] = x.clone().into();
    }
    if let Some(b) = &nbd.opts.bitmap {
        cfg["export_bitmap"] = b.clone().into();
    }
    cfg
}

/// One exchange on a control socket: sends `request`, shuts down writing,
/// reads the reply to the end (bounded by a timeout).
pub fn control_request(socket: &Path, request: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect to control socket {}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(request).expect("send control request");
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).expect("read control reply");
    reply
}

/// A control reply: exactly one JSON object followed by a newline.
#[track_caller]
pub fn parse_control_reply(reply: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(reply);
    assert!(
        text.ends_with('\n') && text.matches('\n').count() == 1,
        "control reply must be one line: {text:?}"
    );
    serde_json::from_str(text.trim_end())
        .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {text:?}"))
}

/// A test environment: a temp dir, the server on its config dir `cfg/`, and
/// the qemu-nbd exports it serves (dropped in that order: server, exports, dir).
pub struct Env {
    pub server: Server,
    pub nbd: Vec<QemuNbd>,
    pub dir: TempDir,
}

impl Env {
    pub fn new(tag: &str, server_args: &[&str]) -> Env {
        let dir = TempDir::new(tag);
        let cfg = dir.join("cfg");
        std::fs::create_dir(&cfg).expect("create config dir");
        let server = Server::start(&cfg, server_args);
        Env {
            server,
            nbd: Vec::new(),
            dir,
        }
    }

    /// Serves `image` with qemu-nbd on `<dir>/<id>.sock` and configures
    /// transfer `id` for it. Returns the export.
    pub fn export(&mut self, id: &str, image: &Path, opts: NbdOpts) -> &QemuNbd {
        let nbd = QemuNbd::start(image, &self.dir.join(&format!("{id}.sock")), opts);
        self.server.add_nbd(id, &nbd);
        self.nbd.push(nbd);
        self.nbd.last().expect("just pushed")
    }

    /// A raw image `<dir>/<id>.img` of `size` bytes filled with pattern
    /// `seed`, exported as transfer `id`. Returns its path and contents.
    pub fn raw_export(&mut self, id: &str, size: u64, seed: u64) -> (PathBuf, Vec<u8>) {
        let path = self.dir.join(&format!("{id}.img"));
        let data = pattern_bytes(size as usize, seed);
        raw_image(&path, size, 0, &data);
        self.export(id, &path, NbdOpts::raw());
        (path, data)
    }

    /// Configures transfer `id` as the file backend over `path`.
    pub fn file_transfer(&self, id: &str, path: &Path) {
        self.server
            .add_transfer(id, &serde_json::json!({"backend": "file", "file": path}));
    }
}
