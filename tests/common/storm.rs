//! Helpers for fault storms: GETs that cannot hang the suite (every read
//! has a timeout, and a request that stops is reported as a hang), whose
//! bytes are checked against the image, and the server's fd and RSS figures
//! from /proc.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::Client;

/// Longest wait for any byte of a response: past it the request hangs.
pub const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest a whole request may take, slow readers included.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(45);

/// How a client reads a body: `piece` bytes at a time, `pause` after each.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub piece: usize,
    pub pause: Duration,
}

impl Pace {
    pub const FAST: Pace = Pace {
        piece: 1024 * 1024,
        pause: Duration::ZERO,
    };
}

/// How a GET ended (hangs and wrong bytes are errors, not outcomes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    /// Every byte, all equal to the image's.
    Complete,
    /// The connection ended after this many (correct) body bytes.
    Truncated(usize),
    /// A JSON error answer: status and `error` message.
    Failed(u16, String),
}

/// GET `/images/{id}` (bytes `range` inclusive, or all of it) on a new
/// connection, read at `pace`, checked against `image`. `mid_body` runs
/// once, when the first body piece has come.
pub fn get(
    addr: SocketAddr,
    id: &str,
    range: Option<(u64, u64)>,
    image: &[u8],
    pace: Pace,
    mut mid_body: impl FnMut(),
) -> Result<Got, String> {
    let started = Instant::now();
    let what = match range {
        Some((a, b)) => format!("GET {id} bytes={a}-{b}"),
        None => format!("GET {id}"),
    };
    let hang = |e: std::io::Error, stage: String| -> String {
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            format!("{what} hung: nothing for {READ_TIMEOUT:?} {stage}")
        } else {
            format!("{what}: {e} {stage}")
        }
    };
    let mut c = Client::connect(addr);
    c.stream()
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    c.stream()
        .set_write_timeout(Some(READ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let header = range.map(|(a, b)| format!("bytes={a}-{b}"));
    let headers: Vec<(&str, &str)> = header.iter().map(|h| ("Range", h.as_str())).collect();
    c.send("GET", &format!("/images/{id}"), &headers, b"");
    let (status, head) = c
        .read_head()
        .map_err(|e| hang(e, "waiting for the response head".into()))?;
    let length: usize = head
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| format!("{what}: {status} without Content-Length: {head:?}"))?;
    if status >= 500 {
        let mut body = vec![0; length.min(4096)];
        c.reader()
            .read_exact(&mut body)
            .map_err(|e| hang(e, "reading an error body".into()))?;
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| format!("{what}: {status} with a body that is not JSON ({e})"))?;
        let msg = v["error"]
            .as_str()
            .ok_or_else(|| format!("{what}: {status} {v}"))?;
        return Ok(Got::Failed(status, msg.to_string()));
    }
    let (first, expected) = match range {
        Some((a, b)) => (a as usize, (206, (b - a + 1) as usize)),
        None => (0, (200, image.len())),
    };
    if (status, length) != expected {
        return Err(format!("{what}: status {status}, Content-Length {length}"));
    }
    let want = &image[first..first + length];
    let mut got = 0;
    let mut buf = vec![0; pace.piece];
    while got < length {
        let n = (length - got).min(pace.piece);
        match c.reader().read(&mut buf[..n]) {
            Ok(0) => return Ok(Got::Truncated(got)),
            Ok(n) => {
                if buf[..n] != want[got..got + n] {
                    return Err(format!("{what}: wrong bytes at body offset {got}"));
                }
                if got == 0 {
                    mid_body();
                }
                got += n;
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(Got::Truncated(got)),
            Err(e) => return Err(hang(e, format!("after {got} of {length} body bytes"))),
        }
        if started.elapsed() > REQUEST_DEADLINE {
            return Err(format!(
                "{what} too slow: {got} of {length} bytes in {REQUEST_DEADLINE:?}"
            ));
        }
        std::thread::sleep(pace.pause);
    }
    Ok(Got::Complete)
}

/// The server's open fds by kind and how many of each. Sockets are told
/// apart by what /proc/PID/net says of their inode (`tcp CLOSE_WAIT`,
/// `unix /path`, `unix` for an unnamed one such as an NBD connection);
/// others by their link (`pipe`, `anon_inode:[eventfd]`, a path).
pub fn fd_kinds(pid: u32) -> BTreeMap<String, usize> {
    let sockets = socket_kinds(pid);
    let mut kinds = BTreeMap::new();
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("list /proc/PID/fd");
    for entry in dir.flatten() {
        // An fd closed between listing and reading is not counted.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let kind = match target.split_once(":[") {
            Some(("socket", inode)) => {
                let inode = inode.trim_end_matches(']');
                sockets
                    .get(inode)
                    .cloned()
                    .unwrap_or_else(|| "socket".into())
            }
            Some(("pipe", _)) => "pipe".into(),
            _ => target,
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

/// Socket inode → `tcp STATE` or `unix [PATH]`, from /proc/PID/net.
fn socket_kinds(pid: u32) -> BTreeMap<String, String> {
    const TCP_STATES: [&str; 12] = [
        "?",
        "ESTABLISHED",
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "CLOSE",
        "CLOSE_WAIT",
        "LAST_ACK",
        "LISTEN",
        "CLOSING",
    ];
    let mut kinds = BTreeMap::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let (Some(st), Some(inode)) = (f.get(3), f.get(9)) {
                let st = usize::from_str_radix(st, 16).unwrap_or(0);
                let name = TCP_STATES.get(st).copied().unwrap_or("?");
                kinds.insert(inode.to_string(), format!("tcp {name}"));
            }
        }
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let Some(inode) = f.get(6) {
            let kind = match f.get(7) {
                Some(path) => format!("unix {path}"),
                None => "unix".into(),
            };
            kinds.insert(inode.to_string(), kind);
        }
    }
    kinds
}

/// The server's resident set size in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// The server's TCP connections (not listeners) as `fd N: STATE, watched by
/// epoll fd E` or `…, in no epoll set` (from /proc/PID/fdinfo): a socket in
/// no epoll set can never wake its task again.
pub fn client_connections(pid: u32) -> Vec<String> {
    let sockets = socket_kinds(pid);
    let mut fds = Vec::new();
    let mut epolls = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let fd = entry.file_name().to_string_lossy().into_owned();
        if target == "anon_inode:[eventpoll]" {
            epolls.push(fd);
        } else if let Some(inode) = target.strip_prefix("socket:[") {
            match sockets.get(inode.trim_end_matches(']')) {
                Some(kind) if kind.starts_with("tcp ") && kind != "tcp LISTEN" => {
                    fds.push((fd, kind.clone()))
                }
                _ => {}
            }
        }
    }
    let watched_by = |fd: &str| {
        epolls.iter().find(|e| {
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{e}"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(fd) && l.starts_with("tfd:"))
        })
    };
    fds.iter()
        .map(|(fd, kind)| match watched_by(fd) {
            Some(e) => format!("fd {fd}: {kind}, watched by epoll fd {e}"),
            None => format!("fd {fd}: {kind}, in no epoll set"),
        })
        .collect()
}
