//! Soak test (`make soak`; ignored by `make test`): 32 concurrent clients
//! doing ranged GETs, ranged PUTs, PATCH range writes, PATCH zeroes, flushes
//! and extents on 4 transfers (qemu-nbd with --shared=0) for
//! `CSIS_SOAK_SECS` seconds (default 180), all on loopback, checked against
//! an in-memory model of every image.
//!
//! The model: each client owns one 1 MiB region of one image and is the only
//! writer there, so writes to an image really run concurrently on the server
//! (ranged PUTs, PATCH writes and zeroes, flushes and extents of one transfer
//! all run at once; nothing is refused with 409, and 32 clients stay below
//! `--max-requests`, so every request must succeed) while the expected bytes
//! of every region stay exact. Every GET checks the part that overlaps its client's region; at
//! the end every byte of every image is compared. The server's RSS and open
//! fds must not grow past a small margin after warm-up, and no NBD
//! connection may leak (counted on qemu-nbd's side).

pub mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const IMAGES: usize = 4;
const CLIENTS: usize = 32;
const REGION: u64 = MIB;
const IMAGE_SIZE: u64 = REGION * (CLIENTS / IMAGES) as u64;
const MAX_IO: u64 = 256 * 1024;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Default)]
struct Totals {
    requests: u64,
    bytes_down: u64,
    bytes_up: u64,
    by_status: BTreeMap<String, u64>,
    failures: Vec<String>,
}

struct Shared {
    totals: Mutex<Totals>,
    stop: AtomicBool,
    verified_bytes: AtomicU64,
}

impl Shared {
    fn count(&self, op: &str, status: u16, down: u64, up: u64) {
        let mut t = self.totals.lock().unwrap();
        t.requests += 1;
        t.bytes_down += down;
        t.bytes_up += up;
        *t.by_status.entry(format!("{op} {status}")).or_default() += 1;
    }
    fn fail(&self, msg: String) {
        eprintln!("soak failure: {msg}");
        let mut t = self.totals.lock().unwrap();
        if t.failures.len() < 50 {
            t.failures.push(msg);
        }
    }
}

/// A keep-alive client that reconnects when the server closes.
struct Conn {
    addr: std::net::SocketAddr,
    client: Option<Client>,
}

impl Conn {
    fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let client = self
            .client
            .get_or_insert_with(|| Client::connect(self.addr));
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: soak\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if method != "GET" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let sent = client
            .stream()
            .write_all(head.as_bytes())
            .and_then(|_| client.stream().write_all(body));
        let r = sent.and_then(|_| client.try_read_response(false));
        match &r {
            Ok(resp) if resp.header("connection") != Some("close") => {}
            _ => self.client = None,
        }
        r
    }
}

struct Region {
    image: usize,
    start: u64,
    model: Vec<u8>,
}

fn client_loop(
    id: usize,
    addr: std::net::SocketAddr,
    mut region: Region,
    shared: &Shared,
) -> Region {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1).wrapping_mul(0x1234_5678_9ABC_DEF1));
    let mut conn = Conn { addr, client: None };
    let path = format!("/images/img{}", region.image);
    let json = [("Content-Type", "application/json")];
    while !shared.stop.load(Ordering::Relaxed) {
        let op = rng.below(100);
        // An offset/length inside our own region.
        let len = 1 + rng.below(MAX_IO);
        let off = rng.below(REGION - len + 1);
        let abs = region.start + off;
        let result = if op < 45 {
            // Ranged GET anywhere in the image; check the overlap with our region.
            let glen = 1 + rng.below(2 * MAX_IO);
            let gstart = rng.below(IMAGE_SIZE);
            let range = format!("bytes={gstart}-{}", gstart + glen - 1);
            conn.call("GET", &path, &[("Range", &range)], b"").map(|r| {
                shared.count("GET", r.status, r.body.len() as u64, 0);
                if r.status == 206 {
                    let end = (gstart + glen).min(IMAGE_SIZE);
                    if r.body.len() as u64 != end - gstart {
                        shared.fail(format!("GET {range}: {} bytes", r.body.len()));
                    }
                    let lo = gstart.max(region.start);
                    let hi = end.min(region.start + REGION);
                    if lo < hi {
                        let got = &r.body[(lo - gstart) as usize..(hi - gstart) as usize];
                        let want = &region.model
                            [(lo - region.start) as usize..(hi - region.start) as usize];
                        if got != want {
                            shared.fail(format!("GET {path} {range}: bytes differ in {lo}..{hi}"));
                        }
                        shared.verified_bytes.fetch_add(hi - lo, Ordering::Relaxed);
                    }
                }
                r.status
            })
        } else if op < 65 {
            let data = pattern_bytes(len as usize, rng.next());
            let cr = format!("bytes {abs}-{}/*", abs + len - 1);
            conn.call("PUT", &path, &[("Content-Range", &cr)], &data)
                .map(|r| {
                    shared.count("PUT", r.status, 0, len);
                    if r.status == 200 {
                        region.model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    }
                    r.status
                })
        } else if op < 75 {
            let data = pattern_bytes(len as usize, rng.next());
            let range = format!("bytes={abs}-{}", abs + len - 1);
            conn.call("PATCH", &path, &[("Range", &range)], &data)
                .map(|r| {
                    shared.count("PATCH-range", r.status, 0, len);
                    if r.status == 200 {
                        region.model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    }
                    r.status
                })
        } else if op < 88 {
            let body = format!(r#"{{"op":"zero","offset":{abs},"size":{len}}}"#);
            conn.call("PATCH", &path, &json, body.as_bytes()).map(|r| {
                shared.count("PATCH-zero", r.status, 0, 0);
                if r.status == 200 {
                    region.model[off as usize..(off + len) as usize].fill(0);
                }
                r.status
            })
        } else if op < 94 {
            let r = if op.is_multiple_of(2) {
                conn.call("POST", &format!("{path}/flush"), &[], b"")
            } else {
                conn.call("PATCH", &path, &json, br#"{"op":"flush"}"#)
            };
            r.map(|r| {
                shared.count("FLUSH", r.status, 0, 0);
                r.status
            })
        } else if op < 97 {
            conn.call("GET", &format!("{path}/extents"), &[], b"")
                .map(|r| {
                    shared.count("EXTENTS", r.status, r.body.len() as u64, 0);
                    if r.status == 200 {
                        let v = r.json();
                        let mut pos = 0;
                        for e in v.as_array().unwrap() {
                            if e["start"].as_u64() != Some(pos) {
                                shared.fail(format!("extents not contiguous at {pos}"));
                                break;
                            }
                            pos += e["length"].as_u64().unwrap_or(0);
                        }
                        if pos != IMAGE_SIZE {
                            shared.fail(format!("extents end at {pos}"));
                        }
                    }
                    r.status
                })
        } else {
            conn.call("OPTIONS", &path, &[], b"").map(|r| {
                shared.count("OPTIONS", r.status, 0, 0);
                r.status
            })
        };
        match result {
            Ok(200 | 206) => {}
            Ok(s) => shared.fail(format!("client {id}: unexpected status {s}")),
            Err(e) => shared.fail(format!("client {id}: I/O error {e}")),
        }
    }
    region
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
#[ignore = "soak test: run with `make soak`"]
fn soak() {
    let secs: u64 = std::env::var("CSIS_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    let tmp = TempDir::new("soak");
    let cfg = tmp.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let server = Server::start(&cfg, &[]);
    let mut nbds = Vec::new();
    let mut regions = Vec::new();
    for i in 0..IMAGES {
        let img = tmp.join(&format!("img{i}.raw"));
        let data = pattern_bytes(IMAGE_SIZE as usize, 100 + i as u64);
        std::fs::write(&img, &data).unwrap();
        let nbd = QemuNbd::start(&img, &tmp.join(&format!("img{i}.sock")), NbdOpts::raw());
        server.add_nbd(&format!("img{i}"), &nbd);
        nbds.push(nbd);
        for r in 0..CLIENTS / IMAGES {
            let start = r as u64 * REGION;
            regions.push(Region {
                image: i,
                start,
                model: data[start as usize..(start + REGION) as usize].to_vec(),
            });
        }
    }
    let nbd_baseline: Vec<usize> = nbds.iter().map(|n| socket_fds(n.pid())).collect();
    let shared = Arc::new(Shared {
        totals: Mutex::new(Totals::default()),
        stop: AtomicBool::new(false),
        verified_bytes: AtomicU64::new(0),
    });
    let started = Instant::now();
    let addr = server.addr;
    let handles: Vec<_> = regions
        .into_iter()
        .enumerate()
        .map(|(id, region)| {
            let shared = shared.clone();
            std::thread::spawn(move || client_loop(id, addr, region, &shared))
        })
        .collect();

    let pid = server.pid();
    let warmup = Duration::from_secs((secs / 5).clamp(5, 30));
    std::thread::sleep(warmup);
    let (rss0, fds0) = (rss_kib(pid), fd_count(pid));
    let mut rss_max = rss0;
    let mut fds_max = fds0;
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        rss_max = rss_max.max(rss_kib(pid));
        fds_max = fds_max.max(fd_count(pid));
    }
    let (rss1, fds1) = (rss_kib(pid), fd_count(pid));
    shared.stop.store(true, Ordering::Relaxed);
    let regions: Vec<Region> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let elapsed = started.elapsed();

    // Every byte of every image matches the model.
    let mut mismatched = Vec::new();
    for i in 0..IMAGES {
        let r = server.get(&format!("/images/img{i}"));
        assert_eq!(r.status, 200);
        for reg in regions.iter().filter(|r| r.image == i) {
            let got = &r.body[reg.start as usize..(reg.start + REGION) as usize];
            if got != &reg.model[..] {
                mismatched.push(format!("img{i} region at {}", reg.start));
            }
        }
    }
    // NBD connections on qemu-nbd's side: at most the pool (4 idle per
    // transfer) once every request is done.
    std::thread::sleep(Duration::from_millis(500));
    let nbd_conns: Vec<usize> = nbds
        .iter()
        .zip(&nbd_baseline)
        .map(|(n, base)| socket_fds(n.pid()).saturating_sub(*base))
        .collect();
    let fds_idle = fd_count(pid);

    let t = shared.totals.lock().unwrap();
    println!(
        "soak: {} s, {CLIENTS} clients, {IMAGES} images",
        elapsed.as_secs()
    );
    println!(
        "soak: requests {} ({:.0}/s), down {} MiB, up {} MiB, verified {} MiB",
        t.requests,
        t.requests as f64 / elapsed.as_secs_f64(),
        t.bytes_down / MIB,
        t.bytes_up / MIB,
        shared.verified_bytes.load(Ordering::Relaxed) / MIB
    );
    for (k, v) in &t.by_status {
        println!("soak:   {k}: {v}");
    }
    println!(
        "soak: server RSS {rss0} KiB after warm-up, {rss1} KiB at end (max {rss_max}); fds {fds0} → {fds1} (max {fds_max}), {fds_idle} idle"
    );
    println!("soak: NBD connections left per export: {nbd_conns:?}");
    assert!(t.failures.is_empty(), "failures: {:#?}", t.failures);
    assert!(mismatched.is_empty(), "image bytes differ: {mismatched:?}");
    let ok = t
        .by_status
        .iter()
        .filter(|(k, _)| k.ends_with(" 200") || k.ends_with(" 206"))
        .map(|(_, v)| v)
        .sum::<u64>();
    assert!(ok > t.requests / 2, "most requests were refused");
    assert!(
        rss1 <= rss0 + rss0 / 4 + 32 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB"
    );
    assert!(fds1 <= fds0 + 8, "fds grew from {fds0} to {fds1}");
    assert!(
        nbd_conns.iter().all(|&n| n <= 4),
        "NBD connections leaked: {nbd_conns:?}"
    );
}
