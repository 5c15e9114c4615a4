//! `make bench`'s reference copier: the least work any HTTP front end of
//! libnbd can do on the machine, to tell how much of the gap to `nbdcopy` is
//! the server's and how much is the price of HTTP over TCP itself.
//!
//! One blocking thread per connection, no HTTP framework, no keep-alive, no
//! limits, locks or validation: it answers exactly the requests the
//! benchmark makes (`GET` of the whole image or of `Range: bytes=A-B`, `PUT`
//! with `Content-Length`, at the offset of `Content-Range: bytes A-B/*` if
//! given) by moving bytes between one 2 MiB buffer, libnbd
//! (through the server's own `nbd::Connection`, requests pipelined as the
//! server does) and the client socket. It is a measuring stick, not a
//! server: never expose it.
//!
//! Usage: `bench-floor NBD_SOCKET` prints `listening on http://ADDR`.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudstack_image_server::backend::nbd::{PIPELINE_REQUEST as READ_REQUEST, WRITE_REQUEST};
use cloudstack_image_server::nbd::{ConnectOptions, Connection};

/// Bytes moved per step: read from one side, then written to the other.
/// The NBD request sizes are the server's own (`backend::nbd`), imported.
const BUFFER: usize = 2 * 1024 * 1024;
/// Longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

fn main() {
    let Some(socket) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: bench-floor NBD_SOCKET");
        std::process::exit(2);
    };
    let listener = match TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench-floor: bind: {e}");
            std::process::exit(1);
        }
    };
    match listener.local_addr() {
        Ok(addr) => println!("listening on http://{addr}"),
        Err(e) => {
            eprintln!("bench-floor: {e}");
            std::process::exit(1);
        }
    }
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let socket = socket.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve(stream, &socket) {
                eprintln!("bench-floor: {e}");
            }
        });
    }
}

fn other(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

/// The request head, and the body bytes that came with it.
struct Head {
    method: String,
    range: Option<(u64, u64)>,
    content_length: u64,
    /// Where a PUT's body goes (`Content-Range`'s first byte; 0 without).
    put_offset: u64,
    expect_continue: bool,
    early_body: Vec<u8>,
}

fn read_head(s: &mut TcpStream) -> io::Result<Head> {
    let mut buf = Vec::new();
    let mut piece = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(other("request head too long"));
        }
        let n = s.read(&mut piece)?;
        if n == 0 {
            return Err(other("connection closed in the request head"));
        }
        buf.extend_from_slice(&piece[..n]);
    };
    let text = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut lines = text.split("\r\n");
    let method = lines
        .next()
        .and_then(|l| l.split(' ').next())
        .unwrap_or("")
        .to_string();
    let mut head = Head {
        method,
        range: None,
        content_length: 0,
        put_offset: 0,
        expect_continue: false,
        early_body: buf[end..].to_vec(),
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                head.content_length = value.parse().map_err(|_| other("bad Content-Length"))?
            }
            "content-range" => {
                head.put_offset = value
                    .strip_prefix("bytes ")
                    .and_then(|r| r.split_once('-'))
                    .and_then(|(a, _)| a.parse().ok())
                    .ok_or_else(|| other("bad Content-Range"))?
            }
            "expect" => head.expect_continue = value.eq_ignore_ascii_case("100-continue"),
            "range" => {
                let (a, b) = value
                    .strip_prefix("bytes=")
                    .and_then(|r| r.split_once('-'))
                    .ok_or_else(|| other("bad Range"))?;
                let a: u64 = a.parse().map_err(|_| other("bad Range"))?;
                let b: u64 = b.parse().map_err(|_| other("bad Range"))?;
                head.range = Some((a, b + 1));
            }
            _ => {}
        }
    }
    Ok(head)
}

fn serve(mut s: TcpStream, socket: &Path) -> io::Result<()> {
    s.set_nodelay(true)?;
    let head = read_head(&mut s)?;
    let mut conn = Connection::connect_unix(&ConnectOptions {
        socket,
        export: None,
        meta_contexts: &[],
        timeout: Duration::from_secs(10),
        command_timeout: None,
    })
    .map_err(|e| other(e.to_string()))?;
    let mut buf = vec![0u8; BUFFER];
    match head.method.as_str() {
        "GET" => {
            let (start, end) = head.range.unwrap_or((0, conn.size()));
            if start > end || end > conn.size() {
                return Err(other("range outside the image"));
            }
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                end - start
            )?;
            let mut off = start;
            while off < end {
                let n = (end - off).min(BUFFER as u64) as usize;
                conn.pread_pipelined(&mut buf[..n], off, READ_REQUEST)
                    .map_err(|e| other(e.to_string()))?;
                s.write_all(&buf[..n])?;
                off += n as u64;
            }
        }
        "PUT" => {
            let len = head.content_length;
            let start = head.put_offset;
            match start.checked_add(len) {
                Some(end) if end <= conn.size() => {}
                _ => return Err(other("body beyond the end of the image")),
            }
            if head.expect_continue {
                s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            }
            let mut early: &[u8] = &head.early_body;
            let mut off = 0u64;
            while off < len {
                let want = (len - off).min(BUFFER as u64) as usize;
                let k = early.len().min(want);
                buf[..k].copy_from_slice(&early[..k]);
                early = &early[k..];
                s.read_exact(&mut buf[k..want])?;
                conn.pwrite_pipelined(&buf[..want], start + off, WRITE_REQUEST)
                    .map_err(|e| other(e.to_string()))?;
                off += want as u64;
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        }
        m => return Err(other(format!("method {m:?} not supported"))),
    }
    Ok(())
}
