//! `--header-timeout` bounds every request head of a keep-alive connection
//! (not only the first, which is all actix-http does by itself), over HTTP
//! and HTTPS, and nothing else: not the idle time between requests, not a
//! slow request body, not a slow reader of a response.

pub mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::tls::{make_cert, tls_args, tls_connect};
use common::*;

const IMAGE_SIZE: u64 = 8 * MIB;

/// One keep-alive connection over any stream, speaking just enough HTTP/1.1.
struct Conn<S: Read + Write> {
    stream: BufReader<S>,
}

impl<S: Read + Write> Conn<S> {
    fn new(stream: S) -> Self {
        Conn {
            stream: BufReader::new(stream),
        }
    }

    /// Writes `bytes` as `pieces` writes with `pause` after each but the last.
    fn send_in_pieces(&mut self, bytes: &[u8], pieces: usize, pause: Duration) {
        let size = bytes.len().div_ceil(pieces);
        let mut chunks = bytes.chunks(size).peekable();
        while let Some(chunk) = chunks.next() {
            let s = self.stream.get_mut();
            s.write_all(chunk).expect("send");
            s.flush().expect("flush");
            if chunks.peek().is_some() {
                std::thread::sleep(pause);
            }
        }
    }

    /// Reads a response head: its status and Content-Length.
    fn read_head(&mut self) -> (u16, usize) {
        let mut line = String::new();
        self.stream.read_line(&mut line).expect("status line");
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut len = None;
        loop {
            let mut h = String::new();
            self.stream.read_line(&mut h).expect("header line");
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().ok();
                }
            }
        }
        (status, len.expect("Content-Length"))
    }

    /// Reads a response: status and body.
    fn read_response(&mut self) -> (u16, Vec<u8>) {
        let (status, len) = self.read_head();
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).expect("body");
        (status, body)
    }
}

fn head(method: &str, range: &str, length: Option<usize>) -> String {
    let mut h = format!("{method} /images/a HTTP/1.1\r\nHost: t\r\n{range}");
    if let Some(n) = length {
        h.push_str(&format!("Content-Length: {n}\r\n"));
    }
    h.push_str("\r\n");
    h
}

/// With `--header-timeout 2` on one keep-alive connection: a prompt first
/// request; an idle gap longer than the header timeout; a second and a third
/// head in pieces but in time; a ranged PUT whose body takes longer than the
/// header timeout; a full GET read slowly; then a head trickled a byte per
/// 100 ms, which is cut off before it is complete and never reaches a
/// handler.
fn keep_alive_session<S: Read + Write>(server: &Server, data: &mut [u8], stream: S) {
    let pause = Duration::from_millis(300);
    let mut c = Conn::new(stream);

    c.send_in_pieces(
        head("GET", "Range: bytes=0-9\r\n", None).as_bytes(),
        1,
        pause,
    );
    assert_eq!(c.read_response(), (206, data[..10].to_vec()));
    std::thread::sleep(Duration::from_secs(3));

    for range in ["bytes=100-199", "bytes=4096-8191"] {
        let h = head("GET", &format!("Range: {range}\r\n"), None);
        c.send_in_pieces(h.as_bytes(), 3, pause);
        let (status, body) = c.read_response();
        assert_eq!(status, 206, "{range}: {}", String::from_utf8_lossy(&body));
        let first: usize = range[6..].split('-').next().unwrap().parse().unwrap();
        assert!(body == data[first..first + body.len()], "{range}");
    }

    // 1 MiB in 16 pieces, 300 ms apart: ~4.5 s in all.
    let piece = pattern_bytes(MIB as usize, 5);
    let h = head(
        "PUT",
        &format!("Content-Range: bytes {MIB}-{}/*\r\n", 2 * MIB - 1),
        Some(piece.len()),
    );
    c.send_in_pieces(h.as_bytes(), 1, pause);
    c.send_in_pieces(&piece, 16, pause);
    let (status, body) = c.read_response();
    assert_eq!(
        (status, String::from_utf8_lossy(&body).as_ref()),
        (
            200,
            r#"{"ok":true,"bytes_written":1048576,"flushed":false}"#
        )
    );
    data[MIB as usize..2 * MIB as usize].copy_from_slice(&piece);

    // The whole image in 1 MiB reads, 300 ms apart.
    c.send_in_pieces(head("GET", "", None).as_bytes(), 1, pause);
    let (status, len) = c.read_head();
    assert_eq!((status, len as u64), (200, IMAGE_SIZE));
    let mut body = vec![0; len];
    for part in body.chunks_mut(MIB as usize) {
        c.stream.read_exact(part).expect("GET body");
        std::thread::sleep(pause);
    }
    assert!(body == data, "full GET differs");

    // The slow loris: 100 ms per byte would take ~45 s; the server closes
    // the connection 2 s into it, and a write soon fails.
    let h = format!(
        "{}X-Pad: {}\r\n\r\n",
        head("GET", "Range: bytes=77-77\r\n", None).trim_end(),
        "p".repeat(400)
    );
    let mut sent = 0;
    for b in h.as_bytes() {
        let s = c.stream.get_mut();
        if s.write_all(std::slice::from_ref(b))
            .and_then(|()| s.flush())
            .is_err()
        {
            break;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(sent < h.len(), "the whole slow head was accepted");
    let mut rest = Vec::new();
    let _ = c.stream.read_to_end(&mut rest);
    assert!(rest.is_empty(), "reply to a cut-off head: {rest:?}");
    assert_eq!(
        server.log_count("range=77-77"),
        0,
        "the slow head was served"
    );
}

fn start(tag: &str, tls: &[&str]) -> (Env, Vec<u8>) {
    let mut args = vec!["--header-timeout", "2"];
    args.extend_from_slice(tls);
    let mut env = Env::new(tag, &args);
    let (_, data) = env.raw_export("a", IMAGE_SIZE, 3);
    (env, data)
}

fn connect(server: &Server) -> TcpStream {
    let tcp = TcpStream::connect(server.addr).expect("connect");
    // A hang guard only: every read here is answered in well under this.
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    tcp.set_nodelay(true).expect("nodelay");
    tcp
}

#[test]
fn every_head_of_a_keep_alive_connection_is_bounded() {
    let (env, mut data) = start("head-ka", &[]);
    keep_alive_session(&env.server, &mut data, connect(&env.server));
}

#[test]
fn every_head_of_a_keep_alive_https_connection_is_bounded() {
    let certs = TempDir::new("head-ka-tls-cert");
    let (cert, key) = make_cert(&certs, "ec", &["ec", "-pkeyopt", "ec_paramgen_curve:P-256"]);
    let (env, mut data) = start("head-ka-tls", &tls_args(&cert, &key));
    assert_eq!(env.server.scheme, "https");
    let stream = tls_connect(&cert, connect(&env.server));
    keep_alive_session(&env.server, &mut data, stream);
}
