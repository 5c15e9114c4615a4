//! The receive low-water mark of a plain TCP connection (`SO_RCVLOWAT`):
//! a direct read of a request body (see `inbox`) that would block waits
//! for up to [`LOW_WATER`] bytes, so the worker wakes once per that many
//! body bytes instead of once per segment or two; actix's own reads want
//! 1 byte, the kernel's default.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The most a direct read waits for (`SO_RCVLOWAT`): the worker wakes once
/// per this many body bytes instead of once per segment or two. 1 MiB
/// against 256 KiB: one `curl -T` 0.26-0.27 -> 0.24-0.25 s/GiB of server
/// CPU (1.29-1.32 -> 1.15-1.20x the floor), four ranged PUTs 0.48-0.49 ->
/// 0.44-0.46; 2 MiB no better (A/B, 5 rounds, bench/RESULTS.md, issue 24).
pub(super) const LOW_WATER: usize = 1024 * 1024;

/// How long a read waits for its mark: then the mark falls to 1 (which
/// signals what is queued below it) until the read gets bytes. A client
/// that stops mid-body with less than the mark still to come would
/// otherwise have those bytes unread until the body timeout, which would
/// then count fewer bytes than arrived. A client sending faster than
/// `LOW_WATER` per `LOW_WATER_WAIT` (10 MB/s) never meets it; a slower one
/// is read at least every `LOW_WATER_WAIT`.
const LOW_WATER_WAIT: Duration = Duration::from_millis(100);

/// The receive low-water mark a connection's direct reads want while they
/// wait (`SO_RCVLOWAT`): shared by its [`DirectIo`](super::DirectIo), which says what it
/// wants before each read, and the [`LowWaterStream`] at the bottom of the
/// stream, which sets it on the socket when a read would block. One worker
/// thread.
#[derive(Clone)]
pub(crate) struct LowWater(Rc<Cell<usize>>);

impl Default for LowWater {
    /// The kernel's default mark: 1.
    fn default() -> Self {
        LowWater(Rc::new(Cell::new(1)))
    }
}

impl LowWater {
    /// The mark to set if the next read would block (at least 1).
    pub(super) fn want(&self, bytes: usize) {
        self.0.set(bytes.max(1));
    }
}

/// A TCP stream whose receive low-water mark follows its connection's
/// [`LowWater`]. The mark matters only while a reader waits (a
/// non-blocking receive returns what is queued whatever the mark), so it is
/// set when a read would block, and only when it changes: a direct read
/// that waits then wakes once per up to [`LOW_WATER`] bytes, or after
/// [`LOW_WATER_WAIT`] with what came; actix's reads want 1 again. A socket
/// that refuses the mark keeps the kernel's default.
pub(crate) struct LowWaterStream<T> {
    io: T,
    mark: LowWater,
    /// The mark the socket has.
    set: usize,
    refused: bool,
    /// How long a read waits for a mark above 1.
    wait: Duration,
    /// Ends a wait for a mark above 1 (made on the first, then reset).
    deadline: Option<Pin<Box<Sleep>>>,
    wait_state: Wait,
}

/// Where a read's wait for a mark above 1 is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// No such wait: the last read got bytes, or wanted 1.
    None,
    /// `deadline` runs for it.
    Running,
    /// It outlasted `wait`: the mark is 1 until bytes come.
    Out,
}

impl<T> LowWaterStream<T> {
    pub(crate) fn new(io: T, mark: LowWater) -> Self {
        LowWaterStream {
            io,
            mark,
            set: 1,
            refused: false,
            wait: LOW_WATER_WAIT,
            deadline: None,
            wait_state: Wait::None,
        }
    }

    /// The mark for a read that waits: the one wanted, unless the wait
    /// for a mark above 1 has lasted `wait` (then 1). Registers `cx` with
    /// the wait's deadline.
    fn mark_for_wait(&mut self, cx: &mut Context<'_>) -> usize {
        let want = self.mark.0.get();
        if want <= 1 {
            self.wait_state = Wait::None;
            return 1;
        }
        if self.wait_state == Wait::Out {
            return 1;
        }
        let wait = self.wait;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
        if self.wait_state == Wait::None {
            deadline.as_mut().reset(Instant::now() + wait);
            self.wait_state = Wait::Running;
        }
        if deadline.as_mut().poll(cx).is_ready() {
            self.wait_state = Wait::Out;
            return 1;
        }
        want
    }
}

impl<T: AsyncRead + AsFd + Unpin> AsyncRead for LowWaterStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if r.is_ready() {
            this.wait_state = Wait::None;
            return r;
        }
        let want = this.mark_for_wait(cx);
        if want != this.set && !this.refused {
            // Lowering it signals the bytes already queued (tcp(7)); raising
            // it after data arrived below it was signalled already: either
            // way the waker registered above is woken when it should be.
            match crate::sys::set_recv_lowat(this.io.as_fd(), want) {
                Ok(()) => this.set = want,
                Err(e) => {
                    log::debug!("SO_RCVLOWAT: {e}");
                    this.refused = true;
                }
            }
        }
        r
    }
}

write_through!(LowWaterStream, io);

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    /// A connected client, and the server's end as a [`LowWaterStream`]
    /// whose reads wait for a mark at most `wait`, with its mark.
    async fn connected(wait: Duration) -> (TcpStream, LowWaterStream<TcpStream>, LowWater) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (sock, _) = l.accept().await.unwrap();
        let mark = LowWater::default();
        let mut s = LowWaterStream::new(sock, mark.clone());
        s.wait = wait;
        (client, s, mark)
    }

    /// One read into `buf`: how many bytes came.
    async fn read_once(s: &mut LowWaterStream<TcpStream>, buf: &mut [u8]) -> io::Result<usize> {
        poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut *buf);
            Pin::new(&mut *s)
                .poll_read(cx, &mut rb)
                .map(|r| r.map(|()| rb.filled().len()))
        })
        .await
    }

    /// The mark is set on the socket when a read that wants one above 1
    /// would block, and only then; the reader is woken once it is reached.
    #[tokio::test]
    async fn low_water_is_set_on_the_socket_when_a_read_waits() {
        // Not waited out in this test (see the next).
        let (mut client, mut s, mark) = connected(Duration::from_secs(3600)).await;
        let kernel = |s: &LowWaterStream<TcpStream>| crate::sys::recv_lowat(s.io.as_fd()).unwrap();
        let mut buf = [0u8; 64];
        let mut poll_once = |s: &mut LowWaterStream<TcpStream>| {
            let mut rb = ReadBuf::new(&mut buf);
            let r = futures_util::FutureExt::now_or_never(poll_fn(|cx| {
                Poll::Ready(Pin::new(&mut *s).poll_read(cx, &mut rb))
            }))
            .unwrap();
            match r {
                Poll::Pending => (true, 0),
                Poll::Ready(r) => {
                    r.unwrap();
                    (false, rb.filled().len())
                }
            }
        };
        mark.want(8192);
        assert_eq!(kernel(&s), 1, "not set before a read waits");
        assert_eq!(poll_once(&mut s), (true, 0));
        assert_eq!(kernel(&s), 8192);
        // Bytes queued below the mark wake no one; reaching it does.
        client.write_all(&[7u8; 100]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(poll_once(&mut s), (true, 0));
        client.write_all(&[7u8; 8092]).await.unwrap();
        let mut got = 0;
        for _ in 0..500 {
            got += poll_once(&mut s).1;
            if got == 8192 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(got, 8192);
        assert_eq!(kernel(&s), 8192);
        mark.want(1);
        assert_eq!(poll_once(&mut s), (true, 0));
        assert_eq!(kernel(&s), 1);
    }

    /// A read that waits for its mark longer than `wait` lowers it to 1,
    /// which has the bytes queued below it read: a client that stops
    /// mid-body has everything it sent read. The next wait wants the mark
    /// again.
    #[tokio::test]
    async fn a_mark_not_reached_in_time_falls_to_one() {
        let (mut client, mut s, mark) = connected(Duration::from_millis(200)).await;
        mark.want(8192);
        let mut buf = [0u8; 64];
        let started = std::time::Instant::now();
        let read = read_once(&mut s, &mut buf);
        let writer = async {
            client.write_all(&[7u8; 100]).await.unwrap();
            client
        };
        let (got, mut client) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(read, writer)
        })
        .await
        .expect("the bytes below the mark are read once the wait is out");
        assert_eq!(got.unwrap(), 64);
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "read before the wait was out: {:?}",
            started.elapsed()
        );
        assert_eq!(crate::sys::recv_lowat(s.io.as_fd()).unwrap(), 1);
        // The rest is queued: read at once, whatever the mark.
        let mut rest = [0u8; 64];
        let n = read_once(&mut s, &mut rest).await.unwrap();
        assert_eq!(n, 36);
        // The next wait wants the mark again.
        let waits = futures_util::FutureExt::now_or_never(poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut rest);
            Poll::Ready(Pin::new(&mut s).poll_read(cx, &mut rb).is_pending())
        }))
        .unwrap();
        assert!(waits);
        assert_eq!(crate::sys::recv_lowat(s.io.as_fd()).unwrap(), 8192);
        client.shutdown().await.unwrap();
    }
}
