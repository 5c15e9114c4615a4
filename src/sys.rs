//! System calls that neither the standard library nor the socket crates
//! this project uses wrap (socket2 0.6, rustix 1.1, nix 0.32: none sets
//! `SO_RCVLOWAT`), each one audited: with `nbd`, the only `unsafe` in the
//! server.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, bytes)`; `bytes` above
/// `c_int::MAX` is set as `c_int::MAX`.
pub(crate) fn set_recv_lowat(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is an open descriptor for the whole call (a
    // `BorrowedFd` cannot outlive it); `&value` points to a live, aligned
    // `c_int` and the length passed is `size_of::<c_int>()`, exactly what
    // setsockopt reads from it; nothing is written through the pointer.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            std::ptr::from_ref(&value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
/// `getsockopt(fd, SOL_SOCKET, SO_RCVLOWAT)`: the mark the kernel holds.
pub(crate) fn recv_lowat(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is an open descriptor for the whole call; `&mut value`
    // points to a live, aligned `c_int` and `len` says its size, so the
    // kernel writes at most that many bytes there and the new length into
    // `len`, a live `socklen_t`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            std::ptr::from_mut(&mut value).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(value).map_err(|_| io::Error::other("negative SO_RCVLOWAT"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        (a, b)
    }

    #[test]
    fn the_kernel_holds_the_mark_set_and_the_handle_follows_it() {
        let (_a, b) = pair();
        assert_eq!(recv_lowat(b.as_fd()).expect("get"), 1);
        set_recv_lowat(b.as_fd(), 65536).expect("set");
        assert_eq!(recv_lowat(b.as_fd()).expect("get"), 65536);
        set_recv_lowat(b.as_fd(), 1).expect("set");
        assert_eq!(recv_lowat(b.as_fd()).expect("get"), 1);
        // Passed as c_int::MAX; TCP caps the mark at what its receive
        // buffer may grow to (on Linux half of net.ipv4.tcp_rmem's maximum).
        set_recv_lowat(b.as_fd(), usize::MAX).expect("set");
        let capped = recv_lowat(b.as_fd()).expect("get");
        assert!((65536..=libc::c_int::MAX as usize).contains(&capped));
    }

    /// What direct reads rely on: the socket is not reported readable
    /// below the mark, and lowering the mark reports it at once (so a
    /// reader that lowers it is woken for the bytes already queued).
    #[tokio::test]
    async fn readiness_waits_for_the_mark_and_lowering_it_wakes() {
        let (mut a, b) = pair();
        b.set_nonblocking(true).expect("nonblocking");
        let b = tokio::net::TcpStream::from_std(b).expect("tokio stream");
        set_recv_lowat(b.as_fd(), 8).expect("set");
        a.write_all(b"1234").expect("write");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), b.readable())
                .await
                .is_err(),
            "readable with 4 bytes queued below a mark of 8"
        );
        set_recv_lowat(b.as_fd(), 1).expect("set");
        tokio::time::timeout(Duration::from_secs(10), b.readable())
            .await
            .expect("readable once the mark is lowered")
            .expect("readiness");
        let mut buf = [0u8; 16];
        assert_eq!(b.try_read(&mut buf).expect("read"), 4);
        assert_eq!(&buf[..4], b"1234");

        set_recv_lowat(b.as_fd(), 8).expect("set");
        a.write_all(b"5678").expect("write");
        a.write_all(b"9abc").expect("write");
        let mut got = Vec::new();
        // Bounded: the 8 bytes arrive in at most two readiness rounds.
        for _ in 0..8 {
            if got.len() == 8 {
                break;
            }
            tokio::time::timeout(Duration::from_secs(10), b.readable())
                .await
                .expect("readable at the mark")
                .expect("readiness");
            match b.try_read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
        }
        assert_eq!(got, b"56789abc");
    }

    #[test]
    fn not_a_socket_is_an_error() {
        let f = tempfile::tempfile().expect("tempfile");
        let e = set_recv_lowat(f.as_fd(), 8).expect_err("not a socket");
        assert_eq!(e.raw_os_error(), Some(libc::ENOTSOCK));
    }
}
