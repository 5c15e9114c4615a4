//! Shared fixtures for the integration tests: real `qemu-nbd` exports, the real
//! server binary on an ephemeral port with a temporary config dir, and a small
//! raw HTTP/1.1 client (so tests control every byte that goes on the wire).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1024 * 1024;

/// Runs a command and panics with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `qemu-img create -f FORMAT PATH SIZE`
pub fn create_image(path: &Path, format: &str, size: u64) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(size.to_string()));
}

/// Adds an enabled persistent dirty bitmap to a qcow2 image.
pub fn add_bitmap(path: &Path, name: &str) {
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--enable"])
        .arg(path)
        .arg(name));
}

/// Writes `len` bytes of `pattern` at `offset` with qemu-io (image not in use).
pub fn qemu_io_write(path: &Path, format: &str, offset: u64, len: u64, pattern: u8) {
    run(Command::new("qemu-io")
        .args(["-f", format, "-c"])
        .arg(format!("write -P {pattern} {offset} {len}"))
        .arg(path));
}

/// Deterministic pseudo-random bytes (xorshift), different per `seed`.
pub fn pattern_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A temporary directory removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let base = std::env::var_os("CSIS_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let path = tempfile::Builder::new()
            .prefix(&format!("csis-{tag}-"))
            .tempdir_in(base)
            .expect("create temp dir")
            .keep();
        TempDir { path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Options for a qemu-nbd export.
#[derive(Clone, Default)]
pub struct NbdOpts {
    pub format: String,
    pub read_only: bool,
    pub bitmap: Option<String>,
    pub export_name: Option<String>,
    /// `--shared`; 0 (the default here) means unlimited clients.
    pub shared: u32,
    pub extra: Vec<String>,
}

impl NbdOpts {
    pub fn raw() -> NbdOpts {
        NbdOpts {
            format: "raw".into(),
            ..Default::default()
        }
    }
    pub fn qcow2() -> NbdOpts {
        NbdOpts {
            format: "qcow2".into(),
            ..Default::default()
        }
    }
}

/// A running `qemu-nbd` serving one image on a Unix socket. SIGTERM on drop.
pub struct QemuNbd {
    child: Option<Child>,
    pub socket: PathBuf,
    pub image: PathBuf,
    pub opts: NbdOpts,
}

impl QemuNbd {
    pub fn start(image: &Path, socket: &Path, opts: NbdOpts) -> QemuNbd {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg("--socket")
            .arg(socket)
            .arg("--persistent")
            .arg(format!("--shared={}", opts.shared))
            .arg("--cache=writeback")
            .arg("-f")
            .arg(&opts.format);
        if opts.read_only {
            cmd.arg("--read-only");
        }
        if let Some(b) = &opts.bitmap {
            cmd.arg("-B").arg(b);
        }
        if let Some(x) = &opts.export_name {
            cmd.arg("-x").arg(x);
        }
        cmd.args(&opts.extra);
        cmd.arg(image);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("spawn qemu-nbd");
        let nbd = QemuNbd {
            child: Some(child),
            socket: socket.to_path_buf(),
            image: image.to_path_buf(),
            opts,
        };
        nbd.wait_ready();
        nbd
    }

    /// Waits for the NBD greeting, not just a connectable socket: qemu-nbd
    /// listens before its main loop runs, and a SIGTERM in that window is
    /// lost (it then hangs for ever instead of exiting).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut s) = UnixStream::connect(&self.socket) {
                let mut magic = [0u8; 8];
                if s.set_read_timeout(Some(Duration::from_secs(5))).is_ok()
                    && s.read_exact(&mut magic).is_ok()
                    && &magic == b"NBDMAGIC"
                {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("qemu-nbd did not come up on {}", self.socket.display());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.opts.export_name.clone().unwrap_or_default(),
            self.socket.display()
        )
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn stop_with(&mut self, signal: i32) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, signal) };
            let _ = child.wait();
        }
    }

    pub fn stop(&mut self) {
        self.stop_with(libc::SIGTERM);
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.stop();
    }
}

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
    log: Arc<Mutex<Vec<String>>>,
}

pub fn server_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cloudstack-image-server"))
}

impl Server {
    /// Starts the server with `--config-dir config_dir --port 0
    /// --control-socket config_dir/.control.sock` plus `extra` (which may
    /// name another `--control-socket`).
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

    /// Waits until a log line contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
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

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(|s| s.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// Asserts a JSON error response with this status and exact message.
    #[track_caller]
    pub fn assert_error(&self, status: u16, message: &str) {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert_eq!(self.json(), serde_json::json!({ "error": message }));
    }
}

/// A keep-alive HTTP/1.1 client over one TCP connection.
pub struct Client {
    stream: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect to server");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("set timeout");
        stream.set_nodelay(true).ok();
        Client {
            stream: BufReader::new(stream),
        }
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        self.stream.get_mut()
    }

    /// Sends a request. A Content-Length header is added for a non-empty body
    /// unless `headers` sets one (or sets Transfer-Encoding).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        self.send(method, path, headers, body);
        self.read_response(method == "HEAD")
    }

    pub fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !has("content-length")
            && !has("transfer-encoding")
            && (!body.is_empty() || method == "PUT" || method == "PATCH" || method == "POST")
        {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let s = self.stream.get_mut();
        s.write_all(head.as_bytes()).expect("send head");
        s.write_all(body).expect("send body");
        s.flush().expect("flush");
    }

    /// Reads one response (Content-Length or chunked body).
    pub fn read_response(&mut self, head_only: bool) -> Response {
        self.try_read_response(head_only).expect("read response")
    }

    pub fn try_read_response(&mut self, head_only: bool) -> std::io::Result<Response> {
        loop {
            let resp = self.read_one(head_only)?;
            if resp.status == 100 {
                continue;
            }
            return Ok(resp);
        }
    }

    /// Reads a status line and headers, leaving the body unread (see
    /// [`Client::reader`]). Header names lower-cased; repeats joined by ", ".
    pub fn read_head(&mut self) -> std::io::Result<(u16, BTreeMap<String, String>)> {
        let mut line = String::new();
        if self.stream.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ));
        }
        let mut parts = line.split_whitespace();
        let _version = parts.next();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            self.stream.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                let v = v.trim().to_string();
                headers
                    .entry(k)
                    .and_modify(|old: &mut String| {
                        old.push_str(", ");
                        old.push_str(&v);
                    })
                    .or_insert(v);
            }
        }
        Ok((status, headers))
    }

    /// The buffered reader of the connection (to read a body piecewise).
    pub fn reader(&mut self) -> &mut BufReader<TcpStream> {
        &mut self.stream
    }

    fn read_one(&mut self, head_only: bool) -> std::io::Result<Response> {
        let (status, headers) = self.read_head()?;
        let mut body = Vec::new();
        if !head_only && status != 100 && status != 204 && status != 304 {
            if let Some(len) = headers.get("content-length") {
                let len: usize = len.parse().map_err(std::io::Error::other)?;
                body.resize(len, 0);
                self.stream.read_exact(&mut body)?;
            } else if headers
                .get("transfer-encoding")
                .is_some_and(|t| t.contains("chunked"))
            {
                loop {
                    let mut sz = String::new();
                    self.stream.read_line(&mut sz)?;
                    let n = usize::from_str_radix(sz.trim(), 16).map_err(std::io::Error::other)?;
                    let mut chunk = vec![0; n + 2];
                    self.stream.read_exact(&mut chunk)?;
                    if n == 0 {
                        break;
                    }
                    body.extend_from_slice(&chunk[..n]);
                }
            } else {
                self.stream.read_to_end(&mut body)?;
            }
        }
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

/// Runs `nbdinfo --map[=CONTEXT] --json URI` and returns (offset, length, type) triples.
pub fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u32)> {
    let map = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let out = run(Command::new("nbdinfo").arg("--json").arg(map).arg(uri));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap() as u32,
            )
        })
        .collect()
}

/// Merges touching entries with the same type (nbdinfo may split them).
pub fn merge_map(v: Vec<(u64, u64, u32)>) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for (o, l, t) in v {
        if let Some(last) = out.last_mut() {
            if last.0 + last.1 == o && last.2 == t {
                last.1 += l;
                continue;
            }
        }
        out.push((o, l, t));
    }
    out
}

impl Client {
    /// Reads the next response as it comes, interim `1xx` responses included
    /// (`read_response` skips them).
    pub fn read_any(&mut self) -> std::io::Result<Response> {
        self.read_one(false)
    }
}

/// `Access-Control-Allow-Methods` of every response that is not an OPTIONS
/// reply of a known image.
pub const DEFAULT_METHODS: &str = "GET, PUT, OPTIONS";

/// Asserts the headers every response carries.
#[track_caller]
pub fn assert_imageio_headers(resp: &Response, methods: &str) {
    assert_eq!(
        resp.header("access-control-allow-methods"),
        Some(methods),
        "{resp:?}"
    );
    assert_eq!(resp.header("accept-ranges"), Some("bytes"), "{resp:?}");
}

/// Creates a sparse raw image of `size` bytes with `data` written at `offset`.
pub fn raw_image(path: &Path, size: u64, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create raw image");
    f.set_len(size).expect("size raw image");
    f.write_all_at(data, offset).expect("write raw image");
}

/// `len` bytes of `path` from `offset`, read directly from the file.
pub fn read_file_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).expect("open image");
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, offset).expect("read image");
    buf
}

/// Retries `f` until it returns `Some` (at most `timeout`); panics otherwise.
#[track_caller]
pub fn poll_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
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

/// Runs qemu-io commands on an image that is not in use.
pub fn qemu_io(path: &Path, format: &str, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    run(cmd.arg(path));
}

/// One request on a fresh connection whose body the server may refuse
/// without reading it: the body is written from a thread (write errors
/// ignored) while the response is read, then the connection is closed.
pub fn request_unread(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Response {
    let mut c = server.client();
    let len = body.len().to_string();
    let mut all = headers.to_vec();
    all.push(("Content-Length", &len));
    c.send(method, path, &all, b"");
    let mut w = c.stream().try_clone().expect("clone stream");
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&body);
    });
    let resp = c.read_response(false);
    let _ = c.stream().shutdown(std::net::Shutdown::Both);
    writer.join().expect("body writer");
    resp
}

impl Server {
    /// How many log lines so far contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

/// Asserts the 400 of a body that ended before its Content-Length after the
/// client sent `sent` bytes. (actix may drop the last buffered bytes when the
/// client half-closes, so the count reported can be lower.)
#[track_caller]
pub fn assert_body_ended_early(resp: &Response, sent: u64) {
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert_imageio_headers(resp, DEFAULT_METHODS);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let v = resp.json();
    let msg = v["error"].as_str().expect("error message");
    let n: u64 = msg
        .strip_prefix("request body ended early at ")
        .and_then(|m| m.strip_suffix(" bytes"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected error {msg:?}"));
    assert!(n <= sent, "{msg:?} but only {sent} bytes were sent");
    assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
}

/// Asserts a compact JSON success body, byte for byte, with the headers
/// every response carries.
#[track_caller]
pub fn assert_json_ok(resp: &Response, body: &str) {
    assert_eq!(resp.status, 200, "body: {}", resp.text());
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_imageio_headers(resp, DEFAULT_METHODS);
    assert_eq!(resp.text(), body);
}

/// Asserts a JSON error and the headers every response carries.
#[track_caller]
pub fn assert_err(resp: &Response, status: u16, message: &str) {
    resp.assert_error(status, message);
    assert_imageio_headers(resp, DEFAULT_METHODS);
}

/// blkdebug (a qemu block filter) over `image`: fails every request of kind
/// `event` (`read_aio`, `write_aio`) that touches `offset` with EIO. qemu-nbd
/// answers a failed write with an error reply and keeps the connection (a
/// failed read, from qemu-nbd 10 on, with a disconnect). Returns the spec to
/// hand to qemu-nbd; the blkdebug config is written into `dir`.
pub fn blkdebug_spec(dir: &TempDir, image: &Path, offset: u64, event: &str) -> PathBuf {
    let config = dir.join("blkdebug.conf");
    std::fs::write(
        &config,
        format!(
            "[inject-error]\nevent = \"{event}\"\nerrno = \"5\"\nsector = \"{}\"\nonce = \"off\"\n",
            offset / 512
        ),
    )
    .unwrap();
    PathBuf::from(format!("blkdebug:{}:{}", config.display(), image.display()))
}

/// A raw image `disk.raw` in `dir` holding `data`, behind [`blkdebug_spec`].
/// Returns the image file and the spec.
pub fn blkdebug_image(dir: &TempDir, data: &[u8], offset: u64, event: &str) -> (PathBuf, PathBuf) {
    let image = dir.join("disk.raw");
    std::fs::write(&image, data).unwrap();
    let spec = blkdebug_spec(dir, &image, offset, event);
    (image, spec)
}

pub mod storm;
pub mod tls;
