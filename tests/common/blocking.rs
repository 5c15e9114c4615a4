//! Blocking calls on an NBD connection for the wrapper's own tests
//! (`tests/nbd_connection.rs`, `tests/nbd_queue.rs`): each call goes
//! through the server's one engine, an `nbd::Pipeline`, driven on a
//! current-thread runtime of the [`Blocking`] connection's own until every
//! command it started has retired (or the connection died), then gets its
//! connection back. Errors are the library's: a dead connection fails with
//! `Connection::check_alive`'s, a request with the pipeline's.

use std::ops::Deref;

use bytes::Bytes;
use cloudstack_image_server::nbd::{Connection, Pipeline, Result, Retired, MAX_EXTENTS};

/// A connection and a runtime to drive its calls on. `Send`, like the
/// connection.
pub struct Blocking {
    /// `None` only during a call.
    state: Option<State>,
    rt: tokio::runtime::Runtime,
}

enum State {
    /// No command in flight.
    Idle(Connection),
    /// A call failed fatally with commands still queued (the connection
    /// died or timed out): they stay with their pipeline until it is
    /// dropped.
    Stuck(Box<Pipeline>),
}

impl From<Connection> for Blocking {
    fn from(conn: Connection) -> Blocking {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
        Blocking {
            state: Some(State::Idle(conn)),
            rt,
        }
    }
}

/// The connection's flags, size and liveness.
impl Deref for Blocking {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        match self.state.as_ref().expect("between calls") {
            State::Idle(c) => c,
            State::Stuck(p) => p.connection(),
        }
    }
}

impl Blocking {
    /// The connection, for a pipeline of the test's own.
    pub fn into_connection(mut self) -> Connection {
        match self.state.take() {
            Some(State::Idle(c)) => c,
            _ => panic!("the connection has commands in flight"),
        }
    }

    /// A pipeline of the connection, registered with this runtime; a dead
    /// connection fails as `Connection::check_alive` says.
    fn pipeline(&mut self) -> Result<Pipeline> {
        let conn = match self.state.take().expect("between calls") {
            State::Idle(c) => c,
            State::Stuck(p) => {
                let e = p.connection().check_alive().err();
                self.state = Some(State::Stuck(p));
                return Err(e.expect("a stuck pipeline's connection is dead"));
            }
        };
        if let Err(e) = conn.check_alive() {
            self.state = Some(State::Idle(conn));
            return Err(e);
        }
        let _runtime = self.rt.enter();
        Pipeline::new(conn)
    }

    /// Keeps the pipeline's connection (or, with commands in flight, the
    /// pipeline).
    fn keep(&mut self, pipe: Pipeline) {
        self.state = Some(match pipe.into_connection() {
            Ok(c) => State::Idle(c),
            Err(p) => State::Stuck(p),
        });
    }

    /// Runs `start` on a pipeline of the connection, then retires every
    /// command it queued (handing each to `retired`); the first error wins:
    /// a refused start, else the first failed command. Stops early only when
    /// nothing more can retire (the connection died or timed out).
    fn call(
        &mut self,
        start: impl FnOnce(&mut Pipeline) -> Result<()>,
        mut retired: impl FnMut(Retired),
    ) -> Result<()> {
        let mut pipe = self.pipeline()?;
        let mut first = start(&mut pipe);
        self.rt.block_on(pipe.settle(&mut retired, |e| {
            if first.is_ok() {
                first = Err(e);
            }
        }));
        self.keep(pipe);
        first
    }

    /// Fills `buf` from the export at `offset`, as commands of the largest
    /// size the server accepts.
    pub fn pread_into(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.pread_pipelined(buf, offset, usize::MAX)
    }

    /// Writes `buf` at `offset`, as commands of the largest size the server
    /// accepts.
    pub fn pwrite(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.pwrite_pipelined(buf, offset, usize::MAX)
    }

    /// Reads `buf` at `offset` with commands of `request_size` bytes (at
    /// most what the server accepts), all in flight at once.
    pub fn pread_pipelined(
        &mut self,
        buf: &mut [u8],
        offset: u64,
        request_size: usize,
    ) -> Result<()> {
        let len = buf.len();
        let mut filled = None;
        self.call(
            |p| p.queue_read(vec![0; len], len, offset, request_size),
            |r| {
                if let Retired::Read(b, n) = r {
                    filled = Some((b, n));
                }
            },
        )?;
        if let Some((b, n)) = filled {
            buf.copy_from_slice(&b[..n]);
        }
        Ok(())
    }

    /// Writes `buf` at `offset` with several commands in flight at once.
    pub fn pwrite_pipelined(&mut self, buf: &[u8], offset: u64, request_size: usize) -> Result<()> {
        let data = Bytes::copy_from_slice(buf);
        self.call(|p| p.queue_write(data, offset, request_size), |_| ())
    }

    /// NBD WRITE_ZEROES of `len` bytes at `offset`.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.call(|p| p.queue_zero(offset, len), |_| ())
    }

    /// NBD FLUSH.
    pub fn flush(&mut self) -> Result<()> {
        self.call(|p| p.queue_flush(), |_| ())
    }

    /// Block status of `offset..offset+len` for each of `contexts` (see
    /// `Pipeline::block_status`), at most `MAX_EXTENTS` pairs.
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u64,
        contexts: &[&str],
    ) -> Result<Vec<Vec<(u64, u32)>>> {
        let mut pipe = self.pipeline()?;
        let r = self
            .rt
            .block_on(pipe.block_status(offset, len, contexts, MAX_EXTENTS));
        self.keep(pipe);
        r
    }
}
