//! Load is normal: a data request beyond `--max-requests` waits for a slot
//! (first come, first served across transfers) instead of being refused;
//! the wait is bounded (`--queue-timeout`, `--max-waiting`: then 503 with
//! `Retry-After`); a waiter whose client goes away leaves the queue at once;
//! HEAD, OPTIONS, extents and /info/ never wait behind data requests.
//!
//! Who waits, and in which order, is read from the server's log (the debug
//! line of `http::limits` when a request starts waiting, the start line of
//! each request with its `slot_wait_ms`), never from timing.

pub mod common;

use std::io::Read;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;

const KIB: u64 = 1024;
const WAIT: Duration = Duration::from_secs(60);

/// The log filter that shows when a request starts waiting.
const QUEUE_LOG: (&str, &str) = (
    "RUST_LOG",
    "info,cloudstack_image_server::http::limits=debug",
);
/// The debug line of a data request that starts waiting.
const WAITS: &str = "a data request waits for a slot";

/// A server started with `args` and the queue's debug log, in a fresh env.
fn env(tag: &str, args: &[&str]) -> Env {
    let dir = TempDir::new(tag);
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).expect("create config dir");
    let server = Server::start_with_env(&cfg, args, &[QUEUE_LOG]);
    Env {
        server,
        nbd: Vec::new(),
        dir,
    }
}

/// A server with one request slot (`args` besides), a sparse 256 MiB
/// transfer `big` to hold it, and a 64 KiB transfer `a` (returned: its
/// bytes) to queue requests on.
fn one_slot_env(tag: &str, args: &[&str]) -> (Env, Vec<u8>) {
    let mut all = vec!["--max-requests", "1"];
    all.extend_from_slice(args);
    let mut env = env(tag, &all);
    let big = env.dir.join("big.img");
    raw_image(&big, 256 * MIB, 0, b"big");
    env.export("big", &big, NbdOpts::raw());
    let (_, a) = env.raw_export("a", 64 * KIB, 3);
    (env, a)
}

/// Every `slot_wait_ms=N` of the log's start lines.
fn slot_waits(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.split("slot_wait_ms=").nth(1))
        .map(|v| {
            v.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("bad slot_wait_ms in {v:?}"))
        })
        .collect()
}

/// A GET of the whole of `id` (far larger than the socket buffers) whose
/// body is left unread after its first bytes: it holds its request slot.
fn hold_slot(server: &Server, id: &str) -> Client {
    let mut c = server.client();
    c.send("GET", &format!("/images/{id}"), &[], b"");
    let (status, _) = c.read_head().expect("response head");
    assert_eq!(status, 200);
    let mut first = vec![0u8; 64 * 1024];
    c.reader().read_exact(&mut first).expect("first body bytes");
    c
}

/// Sends a GET of the first 4 KiB of `id` on a new connection and waits
/// until the server logs that `n` data requests have started waiting.
fn queued_get(server: &Server, id: &str, n: usize) -> Client {
    let mut c = server.client();
    c.send(
        "GET",
        &format!("/images/{id}"),
        &[("Range", "bytes=0-4095")],
        b"",
    );
    poll_until(WAIT, "the request to wait for a slot", || {
        (server.log_count(WAITS) >= n).then_some(())
    });
    c
}

/// Waiting instead of refusing, at scale: 200 keep-alive clients across 20 transfers, ranged
/// GETs and PUTs at once, 16 request slots: nothing is refused, nothing
/// fails, every byte read back equals the model, and no request waited for
/// its slot longer than --queue-timeout. (On a server that refuses the 17th
/// request in flight, most of these get 503.)
#[test]
fn two_hundred_clients_on_sixteen_slots_are_all_served() {
    const TRANSFERS: usize = 20;
    const CLIENTS: usize = 10; // per transfer
    const REGION: usize = 256 * KIB as usize; // each client's own part
    const OPS: usize = 6;
    const QUEUE_TIMEOUT_S: u64 = 30;
    let mut env = env(
        "load200",
        &["--max-requests", "16", "--queue-timeout", "30"],
    );
    let size = (CLIENTS * REGION) as u64;
    let mut models = Vec::new();
    for t in 0..TRANSFERS {
        let (_, data) = env.raw_export(&format!("t{t}"), size, 100 + t as u64);
        models.push(data);
    }
    let addr = env.server.addr;
    let start = Arc::new(Barrier::new(TRANSFERS * CLIENTS));
    let mut threads = Vec::new();
    for (t, model) in models.iter().enumerate() {
        for i in 0..CLIENTS {
            let start = start.clone();
            let base = i * REGION;
            let mut mine = model[base..base + REGION].to_vec();
            threads.push(std::thread::spawn(move || {
                let path = format!("/images/t{t}");
                let mut c = Client::connect(addr);
                start.wait();
                for k in 0..OPS {
                    let seed = (t * 1000 + i * 10 + k) as u64;
                    if k % 2 == 0 {
                        // A ranged PUT as imageio's client sends it: a
                        // piece of this client's region.
                        let len = REGION / 2 + (k * 4096) % (REGION / 2);
                        let at = (k * 8192) % (REGION - len + 1);
                        let data = pattern_bytes(len, seed);
                        let cr = format!("bytes {}-{}/*", base + at, base + at + len - 1);
                        let r = c.request("PUT", &path, &[("Content-Range", &cr)], &data);
                        assert_json_ok(
                            &r,
                            &format!(r#"{{"ok":true,"bytes_written":{len},"flushed":false}}"#),
                        );
                        mine[at..at + len].copy_from_slice(&data);
                    } else {
                        let range = format!("bytes={}-{}", base, base + REGION - 1);
                        let r = c.request("GET", &path, &[("Range", &range)], b"");
                        assert_eq!(r.status, 206, "t{t} client {i}: {}", r.text());
                        let want = format!("bytes {}-{}/{size}", base, base + REGION - 1);
                        assert_eq!(r.header("content-range"), Some(want.as_str()));
                        assert!(r.body == mine, "t{t} client {i}: wrong bytes");
                    }
                }
                (t, base, mine)
            }));
        }
    }
    for th in threads {
        let (t, base, mine) = th.join().expect("a client failed");
        models[t][base..base + REGION].copy_from_slice(&mine);
    }
    // Every transfer, read whole, equals its model.
    for (t, model) in models.iter().enumerate() {
        let r = env.server.get(&format!("/images/t{t}"));
        assert_eq!(r.status, 200);
        assert!(&r.body == model, "transfer t{t} differs from its model");
    }
    let log = env.server.log();
    let requests = TRANSFERS * CLIENTS * OPS + TRANSFERS;
    let waits = slot_waits(&log);
    assert_eq!(waits.len(), requests, "one start line per data request");
    assert!(
        waits.iter().all(|&ms| ms <= QUEUE_TIMEOUT_S * 1000),
        "a request waited longer than --queue-timeout"
    );
    assert_eq!(env.server.log_count("refused a data request"), 0, "{log}");
    // 200 clients released at once on 16 slots: the queue was used.
    assert!(env.server.log_count(WAITS) > 0, "no request ever waited");
}

/// Waiting requests get their slots in the order they came, whatever their
/// transfer; HEAD, OPTIONS, extents and /info/ answer while data requests
/// wait.
#[test]
fn waiters_are_served_first_come_first_served_and_metadata_never_waits() {
    let mut env = env("fifo", &["--max-requests", "1"]);
    let big = env.dir.join("big.img");
    raw_image(&big, 256 * MIB, 0, b"big");
    env.export("big", &big, NbdOpts::raw());
    let (_, b) = env.raw_export("b", 64 * KIB, 1);
    let (_, c) = env.raw_export("c", 64 * KIB, 2);
    let s = &env.server;

    let holder = hold_slot(s, "big");
    let mut first = queued_get(s, "b", 1);
    let mut second = queued_get(s, "c", 2);
    // Not data requests: answered at once, with the data slot taken and two
    // requests waiting for it.
    let r = s.request("HEAD", "/images/b", &[], b"");
    assert_eq!((r.status, r.header("content-length")), (200, Some("65536")));
    let r = s.request("OPTIONS", "/images/b", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["features"],
        serde_json::json!(["extents", "zero", "flush"])
    );
    let r = s.get("/images/b/extents");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        serde_json::json!([{"start": 0, "length": 65536, "zero": false, "hole": false}])
    );
    let r = s.get("/info/");
    assert_eq!(
        r.json(),
        serde_json::json!({"version": env!("CARGO_PKG_VERSION")})
    );
    assert_eq!(s.log_count("GET start image_id=b "), 0);

    drop(holder);
    let r = first.read_response(false);
    assert_eq!(r.status, 206);
    assert!(r.body == b[..4096]);
    let r = second.read_response(false);
    assert_eq!(r.status, 206);
    assert!(r.body == c[..4096]);
    // Both lines may still be on their way to the test's log reader.
    s.logged("GET start image_id=c ", 1);
    let log = s.log();
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in the log:\n{log}"))
    };
    assert!(
        at("GET start image_id=b ") < at("GET start image_id=c "),
        "served out of order:\n{log}"
    );
    assert_eq!(s.log_count("refused a data request"), 0, "{log}");
}

/// Past --max-waiting waiters a data request is refused at once; a waiter
/// is refused after --queue-timeout; both with Retry-After. Nothing else
/// is changed: the refused PUT wrote nothing.
#[test]
fn a_full_queue_and_a_long_wait_are_503_with_retry_after() {
    let (env, a) = one_slot_env("qfull", &["--max-waiting", "1", "--queue-timeout", "2"]);
    let s = &env.server;

    let _holder = hold_slot(s, "big");
    let mut waiter = queued_get(s, "a", 1);
    let r = request_unread(
        s,
        "PUT",
        "/images/a",
        &[("Content-Range", "bytes 0-65535/*")],
        vec![7u8; 64 * KIB as usize],
    );
    assert_err(&r, 503, "too many requests");
    assert_eq!(r.header("retry-after"), Some("1"));
    let r = waiter.read_response(false);
    assert_err(&r, 503, "timed out waiting for a request slot");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(s.wait_log("after waiting 2 s for a slot (--queue-timeout)", WAIT));
    drop(_holder);
    let r = poll_until(WAIT, "the slot back", || {
        let r = s.get("/images/a");
        (r.status == 200).then_some(r)
    });
    assert!(r.body == a, "a refused request changed the image");
}

/// A waiting request whose client closes its connection leaves the queue
/// at once: its place is free for the next one (--max-waiting 1), and the
/// request never runs.
#[test]
fn a_waiter_whose_client_goes_away_leaves_the_queue_at_once() {
    let (env, a) = one_slot_env("qgone", &["--max-waiting", "1", "--queue-timeout", "3600"]);
    let s = &env.server;

    let holder = hold_slot(s, "big");
    let gone = queued_get(s, "a", 1);
    drop(gone);
    assert!(
        s.wait_log("a data request left the queue after", WAIT),
        "{}",
        s.log()
    );
    // Its place is free: the next request waits instead of a 503.
    let mut next = queued_get(s, "a", 2);
    drop(holder);
    let r = next.read_response(false);
    assert_eq!(r.status, 206, "{}", r.text());
    assert!(r.body == a[..4096]);
    assert_eq!(s.log_count("GET start image_id=a "), 1, "{}", s.log());
    assert_eq!(s.log_count("refused a data request"), 0, "{}", s.log());
}

/// With an open-file limit of 1200 (and one worker), the server keeps
/// 1024 fds plus one per request slot for itself and takes at most 112
/// client connections: at the cap it logs one warning, keeps serving the
/// connections it holds, and a connection beyond the cap is served once
/// another closes (it waited in the listen backlog, not refused).
#[test]
fn at_the_connection_cap_the_server_logs_once_and_serves_what_it_holds() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    const CAP: usize = 1200 - 1024 - 64;
    let dir = TempDir::new("conncap");
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let mut child = Command::new("prlimit")
        .arg("--nofile=1200:1200")
        .arg(server_binary())
        .args(["--listen", "127.0.0.1", "--port", "0", "--workers", "1"])
        .args(["--control-socket", "", "--unix-socket", ""])
        .arg("--config-dir")
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the server under prlimit");
    let log = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stderr = child.stderr.take().unwrap();
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    });
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let addr: std::net::SocketAddr = first
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("server did not start: {first:?}"))
        .parse()
        .unwrap();
    let count = |needle: &str| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    };
    let info = |c: &mut Client| {
        let r = c.request("GET", "/info/", &[], b"");
        assert_eq!(r.status, 200, "{}", r.text());
    };
    let cap_line = format!("at most {CAP} client connections ({CAP} per worker, 1 workers)");
    poll_until(WAIT, "the connection cap in the log", || {
        (count(&cap_line) == 1).then_some(())
    });
    let mut held: Vec<Client> = (0..CAP).map(|_| Client::connect(addr)).collect();
    for c in &mut held {
        info(c);
    }
    let warning = format!("{CAP} connections open, the limit");
    poll_until(WAIT, "the warning at the cap", || {
        (count(&warning) == 1).then_some(())
    });
    // One more connects (the kernel's backlog) and is served once another
    // connection closes; those held are served meanwhile.
    let mut extra = Client::connect(addr);
    extra.send("GET", "/info/", &[], b"");
    info(&mut held[0]);
    info(&mut held[CAP - 1]);
    drop(held.pop());
    let r = extra.read_response(false);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(count(&warning), 1, "{:?}", log.lock().unwrap());
    assert_eq!(
        count("open-file limit 1200 (soft limit was 1200, hard limit 1200)"),
        1
    );
    let _ = child.kill();
    let _ = child.wait();
}
