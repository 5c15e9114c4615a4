//! qemu fixtures: images made with qemu-img and qemu-io (or written
//! directly), blkdebug fault injection, `qemu-nbd` exports, `nbdinfo` maps,
//! and the temporary directories they live in.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
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

/// Runs qemu-io commands on an image that is not in use.
pub fn qemu_io(path: &Path, format: &str, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    run(cmd.arg(path));
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
            .arg("--cache=writeback");
        // No format: `image` is an `--image-opts` spec (in `extra`).
        if !opts.format.is_empty() {
            cmd.arg("-f").arg(&opts.format);
        }
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

/// Sockets a process holds open (for qemu-nbd: its listening socket and
/// one per client connection).
pub fn socket_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_link(e.path())
                .map(|l| l.to_string_lossy().starts_with("socket:"))
                .unwrap_or(false)
        })
        .count()
}
