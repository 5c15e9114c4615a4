//! How connections and requests end when the client does not play along:
//! GET clients that never read are disconnected after `--body-timeout`,
//! with every fd and buffer they held; uploads cut off by a TCP reset or a
//! TLS stream ended without close_notify hold their slot, turn and lease
//! until every NBD write they started has landed, and count exactly those.

pub mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use common::storm::{client_connections, fd_kinds, rss_kib};
use common::*;

/// GET clients per wave: twice the default `--max-requests`.
const CLIENTS: usize = 128;
/// RSS the server may have grown by after a wave of clients that held
/// ~400 MiB between them.
const RSS_SLACK_KIB: u64 = 16 * 1024;

/// Idle NBD connections a transfer may keep pooled (`backend/nbd.rs`).
const NBD_POOL: usize = 4;

/// The server's fds once it holds no client connection (waits for that at
/// most `timeout`), but for unnamed Unix sockets (NBD connections among
/// them, which the transfer's pool keeps a few of): their count.
fn quiet_fds(pid: u32, timeout: Duration) -> (BTreeMap<String, usize>, usize) {
    poll_until(
        timeout,
        "the server to close every client connection",
        || {
            let mut fds = fd_kinds(pid);
            let clients = fds
                .keys()
                .any(|kind| kind.starts_with("tcp ") && kind.as_str() != "tcp LISTEN");
            let unix = fds.remove("unix").unwrap_or(0);
            (!clients).then_some((fds, unix))
        },
    )
}

/// Reads what the server sent until it closed the connection.
fn drain(client: &mut Client) -> usize {
    let mut n = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match client.reader().read(&mut buf) {
            Ok(0) | Err(_) => return n,
            Ok(k) => n += k,
        }
    }
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
            server.log_count("GET client stopped reading image_id=a"),
            wave * CLIENTS,
            "{}",
            server.log()
        );
        for c in &mut clients {
            let got = drain(c) as u64;
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
