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
//! it speaks TLS through the server's own session on rustls' unbuffered
//! API (see [`Tls`]).
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
use cloudstack_image_server::tls::{Session, SessionRead};
use rustls::ServerConfig;
use tokio::io::ReadBuf;

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

/// A TLS connection through the server's own session on rustls'
/// unbuffered API (`tls::Session`: ciphertext received up to 256 KiB at a
/// time and decrypted in place, up to 256 KiB of plaintext encrypted per
/// write into one send buffer), driven here with blocking calls
/// instead of the server's async stream.
struct Tls {
    session: Session,
    sock: TcpStream,
}

impl Tls {
    fn new(config: Arc<ServerConfig>, sock: TcpStream) -> io::Result<Self> {
        let mut tls = Tls {
            session: Session::new(config).map_err(other)?,
            sock,
        };
        while !tls.session.handshake()? {
            tls.send()?;
            tls.receive()?;
        }
        tls.send()?;
        Ok(tls)
    }

    /// Sends what the session has queued.
    fn send(&mut self) -> io::Result<()> {
        while !self.session.to_send().is_empty() {
            let n = self.sock.write(self.session.to_send())?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.session.sent(n);
        }
        Ok(())
    }

    /// Receives more ciphertext.
    fn receive(&mut self) -> io::Result<()> {
        let n = self.sock.read(self.session.receive_room()?)?;
        self.session.received(n);
        Ok(())
    }

    fn close(mut self) -> io::Result<()> {
        self.session.close()?;
        self.send()
    }
}

impl Read for Tls {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(out);
        // Bounded: every round returns or receives (the end of the stream
        // is an error or `Eof`).
        loop {
            let got = self.session.read(&mut buf)?;
            self.send()?;
            match got {
                SessionRead::Data(n) => return Ok(n),
                SessionRead::Eof => return Ok(0),
                SessionRead::NeedInput => self.receive()?,
            }
        }
    }
}

impl Write for Tls {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.session.write(data)?;
        self.send()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
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
