//! A fault storm: four qemu-nbd exports read at once by fast, slow and
//! bursty clients, each request on a new connection, while one export is
//! SIGKILLed mid-transfer and restarted on the same socket again and again.
//! The server runs one worker, so the fd numbers that dying NBD connections
//! free are taken at once by new client and NBD sockets on the same reactor.
//!
//! Every request to a live export completes with the right bytes; requests
//! to the killed export may end short or get a JSON 5xx but never hang (each
//! read has a timeout: a hang fails the test with what hung); afterwards
//! every export answers at once; and the server's fds and RSS do not grow
//! from round to round. `STORM_ROUNDS=60 cargo nextest run --test
//! fault_storm` runs a longer storm.

pub mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::storm::{client_connections, fd_kinds, get, rss_kib, Got, Pace};
use common::*;

const LIVE_SIZE: usize = 16 * MIB as usize;
const VICTIM_SIZE: usize = 32 * MIB as usize;
/// The export that is killed and restarted.
const VICTIM: &str = "d";
/// Kill rounds of the warm-up (before the baseline figures) and of the storm.
const WARM_UP_ROUNDS: usize = 2;
const STORM_ROUNDS: usize = 10;

/// `STORM_ROUNDS` from the environment (a longer storm by hand), or 10.
fn storm_rounds() -> usize {
    std::env::var("STORM_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(STORM_ROUNDS)
}

/// RSS may end this much above the warm-up's: measured, it moves by up to
/// ~15 MiB either way between runs (malloc arenas of the blocking threads,
/// 2 MiB request buffers), far below what a leak per request (the storm
/// makes several hundred) or per round would add.
const RSS_SLACK_KIB: u64 = 32 * 1024;

struct Export {
    id: &'static str,
    image: PathBuf,
    socket: PathBuf,
    data: Vec<u8>,
}

/// What the clients saw in one phase.
#[derive(Default)]
struct Tally {
    live_complete: AtomicUsize,
    victim_complete: AtomicUsize,
    victim_truncated: AtomicUsize,
    victim_failed: AtomicUsize,
    /// Victim GETs that have their first body bytes and are still reading.
    victim_mid_body: AtomicUsize,
    errors: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Tally {
    fn fail(&self, e: String) {
        self.errors.lock().unwrap().push(e);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::SeqCst)
    }

    /// A request to a live export: it must complete.
    fn live(&self, r: Result<Got, String>) {
        match r {
            Ok(Got::Complete) => {
                self.live_complete.fetch_add(1, Ordering::Relaxed);
            }
            Ok(other) => self.fail(format!("a GET of a live export ended with {other:?}")),
            Err(e) => self.fail(e),
        }
    }

    /// A request to the victim: anything but a hang or wrong bytes.
    fn victim(&self, r: Result<Got, String>) {
        let counter = match r {
            Ok(Got::Complete) => &self.victim_complete,
            Ok(Got::Truncated(_)) => &self.victim_truncated,
            Ok(Got::Failed(status, _)) if (500..600).contains(&status) => &self.victim_failed,
            Ok(other) => return self.fail(format!("a GET of the victim got {other:?}")),
            Err(e) => return self.fail(e),
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// 1 MiB ranges at offsets that walk through the image.
fn range_at(i: usize, size: usize) -> (u64, u64) {
    let piece = MIB as usize;
    let start = (i * 7 * piece / 3) % (size - piece);
    (start as u64, (start + piece - 1) as u64)
}

const SLOW: Pace = Pace {
    piece: 256 * 1024,
    pause: Duration::from_millis(10),
};

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Waits for a GET of the victim in mid-body, SIGKILLs its qemu-nbd,
/// restarts it on the same socket and waits until the victim is served
/// again (a first request may still find a connection to the old one).
fn kill_and_restart(
    server: &Server,
    v: &Export,
    nbd: &mut QemuNbd,
    tally: &Tally,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tally.victim_mid_body.load(Ordering::SeqCst) == 0 {
        if !tally.running() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("no GET of the victim got going".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    nbd.stop_with(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(200));
    *nbd = QemuNbd::start(&v.image, &v.socket, NbdOpts::raw());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match get(
            server.addr,
            v.id,
            Some((0, 4095)),
            &v.data,
            Pace::FAST,
            || {},
        )? {
            Got::Complete => return Ok(()),
            other if Instant::now() > deadline => {
                return Err(format!("the victim is not served again: {other:?}"))
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Runs the clients and `rounds` kill/restart rounds of the victim, then
/// checks that every export answers at once and unregisters them all.
fn phase(server: &Server, exports: &[Export], nbd: &mut [QemuNbd], rounds: usize) -> Tally {
    for (e, n) in exports.iter().zip(nbd.iter()) {
        let r = server.register_nbd(e.id, n);
        assert_eq!(r["status"], "ok", "register {}: {r}", e.id);
    }
    let tally = Tally::default();
    let addr = server.addr;
    let victim = exports.iter().position(|e| e.id == VICTIM).unwrap();
    let (live, victims) = (&exports[..victim], &exports[victim]);
    std::thread::scope(|s| {
        let tally = &tally;
        for (k, e) in live.iter().enumerate() {
            // Ranged GETs, every fifth a full one.
            s.spawn(move || {
                let mut i = k;
                while tally.running() {
                    let range = (i % 5 != 4).then(|| range_at(i, LIVE_SIZE));
                    tally.live(get(addr, e.id, range, &e.data, Pace::FAST, || {}));
                    i += 1;
                }
            });
        }
        // A slow reader of each of two live exports.
        for e in &live[..2] {
            s.spawn(move || {
                while tally.running() {
                    tally.live(get(addr, e.id, None, &e.data, SLOW, || {}));
                }
            });
        }
        // Bursts of four ranged GETs at once on the third: new NBD
        // connections beside the pooled ones.
        let e = &live[2];
        s.spawn(move || {
            let mut i = 0;
            while tally.running() {
                std::thread::scope(|b| {
                    for j in 0..4 {
                        let range = range_at(i * 4 + j, LIVE_SIZE);
                        b.spawn(move || {
                            tally.live(get(addr, e.id, Some(range), &e.data, Pace::FAST, || {}))
                        });
                    }
                });
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        // The victim's readers: one fast, two slow (which the kills catch
        // mid-body, each with an NBD connection in use).
        for pace in [Pace::FAST, SLOW, SLOW] {
            let e = victims;
            s.spawn(move || {
                while tally.running() {
                    let mut counted = false;
                    let r = get(addr, e.id, None, &e.data, pace, || {
                        tally.victim_mid_body.fetch_add(1, Ordering::SeqCst);
                        counted = true;
                    });
                    if counted {
                        tally.victim_mid_body.fetch_sub(1, Ordering::SeqCst);
                    }
                    tally.victim(r);
                    // Past a failure, not a busy loop on a dead export.
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }

        // Whatever happens below (a panic too), the clients stop, so that
        // the scope can end.
        let _stop = StopOnDrop(&tally.stop);
        let v = victims;
        for round in 0..rounds {
            if let Err(e) = kill_and_restart(server, v, &mut nbd[victim], tally) {
                tally.fail(format!("round {round}: {e}"));
            }
            if !tally.running() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let errors = tally.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "{} failures: {errors:#?}", errors.len());

    // Afterwards every export answers at once, every byte right.
    for e in exports {
        let r = get(addr, e.id, None, &e.data, Pace::FAST, || {});
        assert_eq!(r, Ok(Got::Complete), "{} after the storm", e.id);
    }
    for e in exports {
        let r = server.control(&serde_json::json!({"action": "unregister", "transfer_id": e.id}));
        assert_eq!(r["status"], "ok", "unregister {}: {r}", e.id);
    }
    tally
}

/// The server's fds once every client connection is closed: clients close
/// theirs when done, and the server must notice at once. One it still
/// holds after 10 s (in CLOSE_WAIT) is a connection it stopped watching.
fn quiet_fds(pid: u32) -> BTreeMap<String, usize> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let fds = fd_kinds(pid);
        let clients: usize = fds
            .iter()
            .filter(|(kind, _)| kind.starts_with("tcp ") && kind.as_str() != "tcp LISTEN")
            .map(|(_, n)| n)
            .sum();
        if clients == 0 {
            return fds;
        }
        assert!(
            Instant::now() < until,
            "the server still holds {clients} client connections 10 s after the clients \
             closed them: {:?}",
            client_connections(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kill_and_restart_storm_hangs_nothing_and_leaks_nothing() {
    let dir = TempDir::new("storm");
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let server = Server::start(&cfg, &["--workers", "1", "--max-readers", "16"]);
    let exports: Vec<Export> = ["a", "b", "c", VICTIM]
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let size = if id == VICTIM { VICTIM_SIZE } else { LIVE_SIZE };
            let image = dir.join(&format!("{id}.img"));
            let data = pattern_bytes(size, 40 + i as u64);
            raw_image(&image, size as u64, 0, &data);
            let socket = dir.join(&format!("{id}.sock"));
            Export {
                id,
                image,
                socket,
                data,
            }
        })
        .collect();
    let mut nbd: Vec<QemuNbd> = exports
        .iter()
        .map(|e| QemuNbd::start(&e.image, &e.socket, NbdOpts::raw()))
        .collect();
    let pid = server.pid();

    phase(&server, &exports, &mut nbd, WARM_UP_ROUNDS);
    let fds = quiet_fds(pid);
    let rss = rss_kib(pid);

    let started = Instant::now();
    let rounds = storm_rounds();
    let t = phase(&server, &exports, &mut nbd, rounds);
    let n = |c: &AtomicUsize| c.load(Ordering::Relaxed);
    println!(
        "storm: {rounds} rounds in {:?}: live GETs complete {}, victim GETs complete {} \
         truncated {} failed {}",
        started.elapsed(),
        n(&t.live_complete),
        n(&t.victim_complete),
        n(&t.victim_truncated),
        n(&t.victim_failed),
    );
    // The kills did hit transfers in flight.
    assert!(n(&t.victim_truncated) > 0, "no GET was cut short by a kill");

    // With no transfer registered and no client connected, the server holds
    // only its fixed fds (listener, control socket, runtimes, stdio): the
    // same set after the storm as after the warm-up.
    assert_eq!(
        quiet_fds(pid),
        fds,
        "open fds after the storm vs after the warm-up"
    );
    let rss_end = rss_kib(pid);
    println!("server RSS: {rss} KiB after the warm-up, {rss_end} KiB after the storm");
    assert!(
        rss_end <= rss + RSS_SLACK_KIB,
        "RSS grew from {rss} KiB to {rss_end} KiB"
    );
}
