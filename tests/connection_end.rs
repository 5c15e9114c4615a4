//! How connections and requests end when the client does not play along:
//! GET clients that never read are disconnected after `--body-timeout`,
//! with every fd and buffer they held; uploads cut off by a TCP reset or a
//! TLS stream ended without close_notify hold their slot, turn and lease
//! until every NBD write they started has landed, and count exactly those.

pub mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::storm::{client_connections, fd_kinds, rss_kib};
use common::*;

/// GET clients per wave: twice the default `--max-requests`.
const CLIENTS: usize = 128;
/// RSS the server may have grown by after a wave of clients that held
/// ~400 MiB between them.
const RSS_SLACK_KIB: u64 = 16 * 1024;

/// Idle NBD connections a transfer may keep pooled (`backend/nbd_export.rs`).
const NBD_POOL: usize = 4;

/// The server's fds once it holds no client connection (waits for that at
/// most `timeout`), but for unnamed Unix sockets (NBD connections among
/// them, which the transfer's pool keeps a few of): their count. A bare
/// `socket` is one accepted after [`fd_kinds`] read the socket tables: a
/// client too, until the next look tells.
fn quiet_fds(pid: u32, timeout: Duration) -> (BTreeMap<String, usize>, usize) {
    poll_until(
        timeout,
        "the server to close every client connection",
        || {
            let mut fds = fd_kinds(pid);
            let clients = fds.keys().any(|kind| {
                (kind.starts_with("tcp ") && kind.as_str() != "tcp LISTEN") || kind == "socket"
            });
            let unix = fds.remove("unix").unwrap_or(0);
            (!clients).then_some((fds, unix))
        },
    )
}

/// 128 clients send a GET of a 1 GiB image, read the response head and
/// nothing more, and stay connected. After `--body-timeout` the server
/// closes each connection (one log line each), and holds no fd and no
/// memory for them: after each of two waves the fds are what they were
/// before, and so is the RSS. (glibc's malloc runs with a fixed mmap
/// threshold here, so that every freed transfer buffer goes back to the
/// kernel at once instead of into its arenas: the RSS then shows what the
/// server still holds, not what the allocator keeps.)
#[test]
fn get_clients_that_never_read_are_disconnected_with_everything_they_held() {
    let dir = TempDir::new("stall-wave");
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let server = Server::start_with_env(
        &cfg,
        &["--max-requests", "128", "--body-timeout", "2"],
        &[("MALLOC_MMAP_THRESHOLD_", "131072")],
    );
    let size = 1024 * MIB;
    let image = dir.join("a.img");
    raw_image(&image, size, 0, b"data");
    let nbd = QemuNbd::start(&image, &dir.join("a.sock"), NbdOpts::raw());
    server.add_nbd("a", &nbd);
    let pid = server.pid();
    let r = server.request("GET", "/images/a", &[("Range", "bytes=0-3")], b"");
    assert_eq!((r.status, r.body.as_slice()), (206, &b"data"[..]));
    let (before, unix_before) = quiet_fds(pid, Duration::from_secs(10));
    let rss_before = rss_kib(pid);
    for wave in 1..=2 {
        let mut clients: Vec<Client> = (0..CLIENTS)
            .map(|_| {
                let mut c = server.client();
                c.send("GET", "/images/a", &[], b"");
                c
            })
            .collect();
        for c in &mut clients {
            let (status, headers) = c.read_head().expect("response head");
            assert_eq!(status, 200);
            assert_eq!(headers["content-length"], size.to_string());
        }
        let in_flight = rss_kib(pid);
        // Not reading; the server gives up after 2 s, well within this.
        let (fds, unix) = quiet_fds(pid, Duration::from_secs(60));
        assert_eq!(fds, before, "wave {wave}: fds left behind");
        assert!(
            unix <= unix_before + NBD_POOL,
            "wave {wave}: {unix} unnamed Unix sockets, {unix_before} before"
        );
        assert_eq!(
            server.stalled_gets_closed("a", 2, wave * CLIENTS, LOG_WAIT),
            wave * CLIENTS,
            "{}",
            server.log()
        );
        for c in &mut clients {
            let got = c.read_until_closed() as u64;
            assert!(got < size, "a stalled client got the whole image");
        }
        drop(clients);
        let rss = rss_kib(pid);
        println!(
            "wave {wave}: RSS {rss_before} KiB before, {in_flight} KiB while stalled, \
             {rss} KiB after"
        );
        assert!(
            rss <= rss_before + RSS_SLACK_KIB,
            "wave {wave}: RSS grew from {rss_before} KiB to {rss} KiB"
        );
        // Every slot is free again.
        let r = server.request("GET", "/images/a", &[("Range", "bytes=0-3")], b"");
        assert_eq!((r.status, r.body.as_slice()), (206, &b"data"[..]));
    }
    assert!(client_connections(pid).is_empty());
}

/// Bytes of the upload in the cut-off tests, and how fast the export takes
/// them: writes are in flight for a second or more after the cut.
const UPLOAD: usize = 8 * MIB as usize;
const WRITE_BPS: u64 = 2 * MIB;
/// Blocks in which the landed bytes are counted (each NBD write covers
/// whole ones).
const BLOCK: usize = 64 * 1024;

/// A zeroed raw image behind qemu-nbd with a write throttle (a blockdev
/// throttle filter over the file), registered as transfer `a`.
fn throttled_export(dir: &TempDir, server: &Server) -> (QemuNbd, std::path::PathBuf) {
    let image = dir.join("a.img");
    raw_image(&image, 2 * UPLOAD as u64, 0, b"");
    let spec = format!(
        "driver=throttle,throttle-group=t,file.driver=raw,file.file.driver=file,\
         file.file.filename={}",
        image.display()
    );
    let opts = NbdOpts {
        extra: vec![
            "--object".into(),
            format!("throttle-group,id=t,x-bps-write={WRITE_BPS}"),
            "--image-opts".into(),
        ],
        ..Default::default()
    };
    let nbd = QemuNbd::start(std::path::Path::new(&spec), &dir.join("a.sock"), opts);
    assert_eq!(server.register_nbd("a", &nbd)["status"], "ok");
    (nbd, image)
}

/// How many bytes of `body` landed in the image (from offset 0): whole
/// blocks equal to the body; every other block must still be zero.
fn landed(image: &std::path::Path, body: &[u8]) -> u64 {
    let now = read_file_at(image, 0, body.len());
    let mut n = 0;
    for (i, (got, sent)) in now.chunks(BLOCK).zip(body.chunks(BLOCK)).enumerate() {
        if got == sent {
            n += got.len() as u64;
        } else {
            assert!(got.iter().all(|&b| b == 0), "block {i} half written");
        }
    }
    n
}

/// The index of the first log line that contains `needle`.
fn log_line(log: &str, needle: &str) -> usize {
    log.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no {needle:?} in the log:\n{log}"))
}

/// `bytes=N` of the first `PUT end image_id=a` log line.
fn put_end_bytes(log: &str) -> u64 {
    let line = log
        .lines()
        .nth(log_line(log, "PUT end image_id=a "))
        .unwrap_or("");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("bytes="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no bytes= in {line:?}"))
}

/// Sends a PUT of `UPLOAD` bytes on `stream` (a full PUT, or ranged), then
/// `sent` bytes of its body (more than one of the chunks the server
/// receives it in, less than its window of writes: see [`sent_before_cut`]),
/// and waits until the first write has landed (so the
/// server has read the rest it was sent, and has writes in flight): then
/// `cut` ends the connection. A second full PUT then waits for the first's
/// writes (they hold the image's full-PUT lock), and `unregister` for every
/// write the request started; afterwards (and once qemu-nbd has stopped,
/// with whatever it took) the request's log line and the image say the
/// same number of bytes (`bytes_written` is the log line's count).
fn cut_mid_upload<S: std::io::Write>(
    server: &Server,
    mut nbd: QemuNbd,
    image: &std::path::Path,
    full: bool,
    sent: usize,
    mut stream: S,
    cut: impl FnOnce(S),
) {
    let body = pattern_bytes(UPLOAD, 9);
    let range = if full {
        String::new()
    } else {
        format!("Content-Range: bytes 0-{}/*\r\n", UPLOAD - 1)
    };
    let head =
        format!("PUT /images/a HTTP/1.1\r\nHost: t\r\nContent-Length: {UPLOAD}\r\n{range}\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body[..sent]).unwrap();
    stream.flush().unwrap();
    poll_until(Duration::from_secs(30), "a first write to land", || {
        (server.counter("a", "bytes_written") > 0).then_some(())
    });
    cut(stream);
    if full {
        let r = server.request("PUT", "/images/a", &[], b"");
        assert_json_ok(&r, r#"{"ok":true,"bytes_written":0,"flushed":false}"#);
    }
    let r = server.control(&serde_json::json!({"action": "unregister", "transfer_id": "a"}));
    assert_eq!(r["status"], "ok", "{r}");
    // Whatever the export had received lands before it exits.
    nbd.stop();
    // The last line read below (the log comes in order).
    server.logged(
        if full {
            "PUT start image_id=a content_length=0 "
        } else {
            "PUT end image_id=a "
        },
        1,
    );
    let log = server.log();
    let logged = put_end_bytes(&log);
    let landed = landed(image, &body);
    assert_eq!(
        logged, landed,
        "the log says {logged} bytes, {landed} landed"
    );
    assert!(landed < UPLOAD as u64 && landed > 0, "{landed}");
    let drained = log_line(
        &log,
        &format!("PUT image_id=a ended with NBD writes in flight: {landed} bytes landed"),
    );
    let ended = log_line(&log, "PUT end image_id=a ");
    assert!(drained < ended, "{log}");
    if full {
        let second = log_line(&log, "PUT start image_id=a content_length=0 ");
        assert!(
            ended < second,
            "the second PUT ran beside the writes:\n{log}"
        );
    }
}

/// Body bytes a cut-off test sends: a 4 MiB chunk and more when the body
/// is read straight from a plain socket (one chunk's writes in flight, the
/// next chunk arriving), else 3 MiB: six 512 KiB chunks, fewer than the 8
/// writes after which the server waits for the window to drain.
fn sent_before_cut(plain_socket: bool) -> usize {
    if plain_socket && direct_io() {
        5 * MIB as usize
    } else {
        3 * MIB as usize
    }
}

/// A full PUT whose client resets the TCP connection mid-body: its request
/// ends only once the writes it had sent to the export landed, and counts
/// exactly those (not 0, not 512 KiB while more keeps landing).
#[test]
fn an_upload_cut_by_a_reset_ends_after_its_writes_and_counts_them() {
    let dir = TempDir::new("cut-reset");
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let server = Server::start(&cfg, &[]);
    let (nbd, image) = throttled_export(&dir, &server);
    let tcp = std::net::TcpStream::connect(server.addr).unwrap();
    cut_mid_upload(
        &server,
        nbd,
        &image,
        true,
        sent_before_cut(true),
        tcp,
        |tcp| {
            // SO_LINGER 0: close sends RST.
            socket2::SockRef::from(&tcp)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(tcp);
        },
    );
}

/// The same with a ranged PUT over HTTPS, the client closing the TCP
/// connection without a TLS close_notify.
#[test]
fn an_upload_cut_by_a_tls_abort_ends_after_its_writes_and_counts_them() {
    let dir = TempDir::new("cut-tls");
    let (cert, key) = common::tls::make_cert(&dir, "srv", &["rsa:2048"]);
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let server = Server::start(&cfg, &common::tls::tls_args(&cert, &key));
    let (nbd, image) = throttled_export(&dir, &server);
    let tcp = std::net::TcpStream::connect(server.addr).unwrap();
    let tls = common::tls::tls_connect(&cert, tcp);
    cut_mid_upload(
        &server,
        nbd,
        &image,
        false,
        sent_before_cut(false),
        tls,
        |tls| {
            let _ = tls.sock.shutdown(std::net::Shutdown::Both);
        },
    );
}

/// A ranged PUT over HTTPS whose client ends TLS cleanly (close_notify)
/// mid-body: everything before the close_notify is read and lands, and
/// the request ends as a body cut short (the end of the stream, not an
/// error), counting it; `unregister` finds nothing left in flight.
#[test]
fn an_upload_cut_by_a_tls_close_notify_lands_what_was_sent_and_ends() {
    let dir = TempDir::new("cut-tls-close");
    let (cert, key) = common::tls::make_cert(&dir, "srv", &["rsa:2048"]);
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let server = Server::start(&cfg, &common::tls::tls_args(&cert, &key));
    let (mut nbd, image) = throttled_export(&dir, &server);
    let tcp = std::net::TcpStream::connect(server.addr).unwrap();
    let mut tls = common::tls::tls_connect(&cert, tcp);
    let body = pattern_bytes(UPLOAD, 10);
    let sent = 3 * MIB as usize;
    let head = format!(
        "PUT /images/a HTTP/1.1\r\nHost: t\r\nContent-Length: {UPLOAD}\r\n\
         Content-Range: bytes 0-{}/*\r\n\r\n",
        UPLOAD - 1
    );
    std::io::Write::write_all(&mut tls, head.as_bytes()).unwrap();
    std::io::Write::write_all(&mut tls, &body[..sent]).unwrap();
    tls.conn.send_close_notify();
    std::io::Write::flush(&mut tls).unwrap();
    server.logged("PUT end image_id=a ", 1);
    let log = server.log();
    assert!(
        log.contains(&format!(
            "request body error after {sent} bytes: payload reached EOF before completing"
        )),
        "{log}"
    );
    assert_eq!(put_end_bytes(&log), sent as u64, "{log}");
    let r = server.control(&serde_json::json!({"action": "unregister", "transfer_id": "a"}));
    assert_eq!(r["status"], "ok", "{r}");
    server.logged(
        "control: unregistering transfer_id=a requests_in_flight=0",
        1,
    );
    nbd.stop();
    assert_eq!(landed(&image, &body), sent as u64);
    drop(tls);
}

/// A client that pipelines many small requests and never reads a response:
/// once the socket buffers are full, the server's write waits, and after
/// `--body-timeout` the server closes the connection (one log line),
/// holding nothing for it.
#[test]
fn a_client_that_reads_no_responses_at_all_is_disconnected() {
    let dir = TempDir::new("no-reader");
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let server = Server::start(&cfg, &["--body-timeout", "2"]);
    let pid = server.pid();
    // The server prints its address before its workers start (each with
    // its own event loop's fds): count the fds once one has served.
    assert_eq!(server.get("/info/").status, 200);
    let (before, _) = quiet_fds(pid, Duration::from_secs(10));
    let mut c = server.client();
    // ~3 MiB of requests whose ~18 MiB of responses fill every buffer.
    let burst = b"GET /info/ HTTP/1.1\r\nHost: t\r\n\r\n".repeat(100_000);
    let mut w = c.stream().try_clone().unwrap();
    // The server reads one request at a time: once it cannot write, it
    // stops reading, and this write waits (until the connection closes).
    let writer = std::thread::spawn(move || {
        let _ = std::io::Write::write_all(&mut w, &burst);
    });
    let (after, _) = quiet_fds(pid, Duration::from_secs(60));
    assert_eq!(after, before);
    assert!(
        server.wait_log(
            "closing a connection: the client took no data for 2 s",
            Duration::from_secs(10)
        ),
        "{}",
        server.log()
    );
    let _ = c.stream().shutdown(std::net::Shutdown::Both);
    writer.join().unwrap();
    assert_eq!(server.get("/info/").status, 200);
}
