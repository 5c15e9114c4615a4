//! `make bench`'s reference copier: the least work any HTTP front end of
//! libnbd can do on the machine, to tell how much of the gap to `nbdcopy` is
//! the server's and how much is the price of HTTP over TCP itself.
//!
//! One blocking thread per connection, no HTTP framework, no keep-alive, no
//! limits, locks or validation: it answers exactly the requests the
//! benchmark makes (`GET` of the whole image or of `Range: bytes=A-B`, `PUT`
//! with `Content-Length`, at the offset of `Content-Range: bytes A-B/*` if
//! given) by moving bytes between one 2 MiB buffer, libnbd
//! (through the server's own NBD engine, `nbd::Pipeline`, on a
//! current-thread runtime of the thread's own, requests pipelined as the
//! server does) and the client socket. It is a measuring stick, not a
//! server: never expose it.
//!
//! Usage: `bench-floor NBD_SOCKET` prints `listening on http://ADDR`;
//! `bench-floor NBD_SOCKET --tls CERT KEY` serves HTTPS behind the server's
//! own rustls configuration (`tls::server_config`: the same provider,
//! versions and cipher suites) and prints `listening on https://ADDR`;
//! it speaks TLS through rustls' unbuffered API (see [`Tls`]).
//! `bench-floor --cipher-cost` prints what the crypto provider's AEADs cost
//! per GiB on this machine (see [`cipher_cost`]).

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cloudstack_image_server::backend::nbd_export::{
    PIPELINE_REQUEST as READ_REQUEST, WRITE_REQUEST,
};
use cloudstack_image_server::nbd::{self, ConnectOptions, Connection, Pipeline, Retired};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
use rustls::ServerConfig;

/// Bytes moved per step: read from one side, then written to the other.
/// The NBD request sizes are the server's own (`backend::nbd_export`), imported.
const BUFFER: usize = 2 * 1024 * 1024;
/// Longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

fn usage() -> ! {
    eprintln!("usage: bench-floor NBD_SOCKET [--tls CERT KEY] | bench-floor --cipher-cost");
    std::process::exit(2);
}

fn main() {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if args.len() == 1 && args[0] == "--cipher-cost" {
        cipher_cost();
        return;
    }
    let tls = match args.len() {
        1 => None,
        4 if args[1] == "--tls" => {
            match cloudstack_image_server::tls::server_config(
                Path::new(&args[2]),
                Path::new(&args[3]),
            ) {
                Ok(config) => Some(Arc::new(config)),
                Err(e) => {
                    eprintln!("bench-floor: {e}");
                    std::process::exit(1);
                }
            }
        }
        _ => usage(),
    };
    let socket = PathBuf::from(&args[0]);
    let listener = match TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench-floor: bind: {e}");
            std::process::exit(1);
        }
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    match listener.local_addr() {
        Ok(addr) => println!("listening on {scheme}://{addr}"),
        Err(e) => {
            eprintln!("bench-floor: {e}");
            std::process::exit(1);
        }
    }
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let socket = socket.clone();
        let tls = tls.clone();
        std::thread::spawn(move || {
            if let Err(e) = accept(stream, tls, &socket) {
                eprintln!("bench-floor: {e}");
            }
        });
    }
}

fn other(msg: impl ToString) -> io::Error {
    io::Error::other(msg.to_string())
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

fn read_head(s: &mut impl Read) -> io::Result<Head> {
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

/// Serves one request on `stream`, over TLS if `tls` is given (see
/// [`Tls`]); the connection ends with its close_notify.
fn accept(stream: TcpStream, tls: Option<Arc<ServerConfig>>, socket: &Path) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let Some(config) = tls else {
        return serve(stream, socket);
    };
    let mut s = Tls::new(config, stream)?;
    serve(&mut s, socket)?;
    s.close()
}

/// Bytes asked of the socket per receive under TLS, and the most
/// plaintext encrypted per send.
const TLS_PIECE: usize = 256 * 1024;
/// Room for a partial record beside a full receive.
const RECORD_ROOM: usize = 18 * 1024;

/// A TLS connection on rustls' unbuffered API. Ciphertext is received up
/// to [`TLS_PIECE`] at a time into one buffer (moved to the front only
/// when full) and decrypted there; rustls 0.23 then moves each record's
/// plaintext into a `Vec` of its own, copied from there into the reader's
/// buffer: two copies per received byte, one fewer than the server's
/// buffered path (`ReadAhead` into rustls' own buffer). Writes: rustls
/// seals each record in a `Vec` of its own and copies it into the send
/// buffer, one copy more than the buffered API, which writes those `Vec`s
/// as they are (bench/RESULTS.md, "Same-run A/B on a quiet machine").
struct Tls {
    conn: UnbufferedServerConnection,
    sock: TcpStream,
    incoming: Vec<u8>,
    /// Ciphertext not yet processed: `incoming[start..used]`.
    start: usize,
    used: usize,
    outgoing: Vec<u8>,
    /// Plaintext of a record the reader had no room for.
    pending: Vec<u8>,
    peer_closed: bool,
}

impl Tls {
    fn new(config: Arc<ServerConfig>, sock: TcpStream) -> io::Result<Self> {
        Ok(Tls {
            conn: UnbufferedServerConnection::new(config).map_err(other)?,
            sock,
            incoming: vec![0; TLS_PIECE + RECORD_ROOM],
            start: 0,
            used: 0,
            outgoing: vec![0; TLS_PIECE + RECORD_ROOM],
            pending: Vec::new(),
            peer_closed: false,
        })
    }

    /// Receives more ciphertext; false at the end of the stream.
    fn receive(&mut self) -> io::Result<bool> {
        if self.used == self.incoming.len() {
            // Move the unprocessed rest to the front only when the buffer
            // is full, not after every record: at most one partial record.
            self.incoming.copy_within(self.start..self.used, 0);
            self.used -= self.start;
            self.start = 0;
        }
        if self.used == self.incoming.len() {
            return Err(other("TLS record larger than the receive buffer"));
        }
        let n = self.sock.read(&mut self.incoming[self.used..])?;
        self.used += n;
        Ok(n > 0)
    }

    /// Drives the connection until it can send application data or has
    /// plaintext for `out` (then returns how much it copied there); 0 at
    /// the end of the stream. With `want_read` false it stops as soon as it
    /// can send.
    fn drive(&mut self, out: &mut [u8], want_read: bool) -> io::Result<usize> {
        // Bounded: each round consumes input, produces output, or receives.
        loop {
            let UnbufferedStatus { mut discard, state } = self
                .conn
                .process_tls_records(&mut self.incoming[self.start..self.used]);
            let mut copied = 0;
            let mut need_input = false;
            let mut can_send = false;
            match state.map_err(other)? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(other)?;
                        discard += record.discard;
                        let n = record.payload.len().min(out.len() - copied);
                        out[copied..copied + n].copy_from_slice(&record.payload[..n]);
                        self.pending.extend_from_slice(&record.payload[n..]);
                        copied += n;
                    }
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    let n = data.encode(&mut self.outgoing).map_err(other)?;
                    self.sock.write_all(&self.outgoing[..n])?;
                }
                ConnectionState::TransmitTlsData(data) => data.done(),
                ConnectionState::BlockedHandshake => need_input = true,
                ConnectionState::WriteTraffic(_) if !want_read => can_send = true,
                ConnectionState::WriteTraffic(_) => need_input = true,
                ConnectionState::PeerClosed | ConnectionState::Closed => self.peer_closed = true,
                _ => return Err(other("unexpected TLS state")),
            }
            self.start += discard;
            if self.start == self.used {
                (self.start, self.used) = (0, 0);
            }
            if copied > 0 || can_send || self.peer_closed {
                return Ok(copied);
            }
            if need_input && discard == 0 && !self.receive()? {
                return Ok(0);
            }
        }
    }

    fn close(mut self) -> io::Result<()> {
        self.drive(&mut [], false)?;
        let UnbufferedStatus { state, .. } = self
            .conn
            .process_tls_records(&mut self.incoming[self.start..self.used]);
        if let Ok(ConnectionState::WriteTraffic(mut w)) = state {
            let n = w.queue_close_notify(&mut self.outgoing).map_err(other)?;
            self.sock.write_all(&self.outgoing[..n])?;
        }
        Ok(())
    }
}

impl Read for Tls {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if !self.pending.is_empty() {
            let n = out.len().min(self.pending.len());
            out[..n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            return Ok(n);
        }
        if self.peer_closed || out.is_empty() {
            return Ok(0);
        }
        self.drive(out, true)
    }
}

impl Write for Tls {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.drive(&mut [], false)?;
        let data = &data[..data.len().min(TLS_PIECE)];
        let UnbufferedStatus { state, .. } = self
            .conn
            .process_tls_records(&mut self.incoming[self.start..self.used]);
        let Ok(ConnectionState::WriteTraffic(mut w)) = state else {
            return Err(other("TLS connection cannot send"));
        };
        let n = w.encrypt(data, &mut self.outgoing).map_err(other)?;
        self.sock.write_all(&self.outgoing[..n])?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Retires every command queued on `p`; returns the buffer of the read
/// among them, if any.
fn retire_all(rt: &tokio::runtime::Runtime, p: &mut Pipeline) -> nbd::Result<Option<Vec<u8>>> {
    rt.block_on(async {
        let mut read = None;
        while p.queued() > 0 {
            if let Retired::Read(buf, _) = std::future::poll_fn(|cx| p.poll_oldest(cx)).await? {
                read = Some(buf);
            }
        }
        Ok(read)
    })
}

fn serve<S: Read + Write>(mut s: S, socket: &Path) -> io::Result<()> {
    let head = read_head(&mut s)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _runtime = rt.enter();
    let conn = Connection::connect_unix(&ConnectOptions {
        socket,
        export: None,
        meta_contexts: &[],
        timeout: Duration::from_secs(10),
        command_timeout: None,
    })
    .map_err(|e| other(e.to_string()))?;
    let mut conn = Pipeline::new(conn).map_err(|e| other(e.to_string()))?;
    let size = conn.connection().size();
    let mut buf = vec![0u8; BUFFER];
    match head.method.as_str() {
        "GET" => {
            let (start, end) = head.range.unwrap_or((0, size));
            if start > end || end > size {
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
                conn.queue_read(buf, n, off, READ_REQUEST)
                    .map_err(|e| other(e.to_string()))?;
                buf = retire_all(&rt, &mut conn)
                    .map_err(|e| other(e.to_string()))?
                    .ok_or_else(|| other("the read gave no buffer back"))?;
                s.write_all(&buf[..n])?;
                off += n as u64;
            }
        }
        "PUT" => {
            let len = head.content_length;
            let start = head.put_offset;
            match start.checked_add(len) {
                Some(end) if end <= size => {}
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
                // The buffer goes to libnbd as `Bytes` and comes back once
                // every command of it retired (no copy either way).
                let mut data = Bytes::from(buf);
                data.truncate(want);
                conn.queue_write(data.clone(), start + off, WRITE_REQUEST)
                    .map_err(|e| other(e.to_string()))?;
                retire_all(&rt, &mut conn).map_err(|e| other(e.to_string()))?;
                buf = data
                    .try_into_mut()
                    .map_err(|_| other("the written buffer is still shared"))?
                    .into();
                buf.resize(BUFFER, 0);
                off += want as u64;
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        }
        m => return Err(other(format!("method {m:?} not supported"))),
    }
    Ok(())
}

/// Bytes sealed or opened per step of [`cipher_cost`]: one full TLS record.
const RECORD: usize = 16 * 1024;

/// What the AEADs of the crypto provider behind `tls::server_config` cost
/// on this machine, as `SUITE seal|open S s/GiB` lines: the least CPU per
/// GiB any TLS server using them can spend on the cipher alone (one core,
/// 16 KiB records sealed and opened in place in a 1 MiB buffer, as warm
/// in cache as a record just received or about to be sent; best of 5
/// passes of 256 MiB). What TLS adds to a transfer is compared with this.
fn cipher_cost() {
    use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
    let algs: [(&str, &'static aead::Algorithm); 3] = [
        ("AES_256_GCM", &aead::AES_256_GCM),
        ("AES_128_GCM", &aead::AES_128_GCM),
        ("CHACHA20_POLY1305", &aead::CHACHA20_POLY1305),
    ];
    const BUFFER: usize = 1024 * 1024;
    const PASS: usize = 256 * 1024 * 1024;
    let nonce = |i: usize| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&(i as u64).to_be_bytes());
        Nonce::assume_unique_for_key(n)
    };
    let aad = || Aad::from([23u8, 3, 3, 0x40, 0x11]);
    for (name, alg) in algs {
        let Ok(unbound) = UnboundKey::new(alg, &[7u8; 32][..alg.key_len()]) else {
            eprintln!("bench-floor: {name}: bad key length");
            std::process::exit(1);
        };
        let key = LessSafeKey::new(unbound);
        let mut buf = vec![0x5au8; BUFFER];
        let mut tags = Vec::with_capacity(BUFFER / RECORD);
        let (mut seal, mut open) = (Duration::MAX, Duration::MAX);
        for _ in 0..5 {
            let (mut sealing, mut opening) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..PASS / BUFFER {
                tags.clear();
                let t0 = Instant::now();
                for (i, record) in buf.chunks_mut(RECORD).enumerate() {
                    match key.seal_in_place_separate_tag(nonce(i), aad(), record) {
                        Ok(tag) => tags.push(tag),
                        Err(_) => std::process::exit(1),
                    }
                }
                let t1 = Instant::now();
                for (i, record) in buf.chunks_mut(RECORD).enumerate() {
                    if key
                        .open_in_place_separate_tag(nonce(i), aad(), tags[i], record, 0..)
                        .is_err()
                    {
                        eprintln!("bench-floor: {name}: a sealed record does not open");
                        std::process::exit(1);
                    }
                }
                opening += t1.elapsed();
                sealing += t1 - t0;
            }
            seal = seal.min(sealing);
            open = open.min(opening);
        }
        let per_gib = (1u64 << 30) as f64 / PASS as f64;
        println!("{name} seal {:.3} s/GiB", seal.as_secs_f64() * per_gib);
        println!("{name} open {:.3} s/GiB", open.as_secs_f64() * per_gib);
    }
}
