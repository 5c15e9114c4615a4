//! The NBD backend: a pooled [`Connection`] per request.
//!
//! Connections are reused across requests of the same transfer only when the
//! server advertises multi-conn (qemu-nbd does with `--shared` other than 1):
//! a server that takes one client at a time must see each connection closed
//! after its request, as the seed did, or a second client would wait forever.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{BackendError, Caps, Result, Transfer};
use crate::extents::{self, DirtyExtent, Extent};
use crate::nbd::{self, ConnectOptions, Connection};

/// Idle connections kept per transfer.
const MAX_IDLE: usize = 4;
/// Bound on connect + handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Size of each NBD request when a buffer is read or written with several
/// requests in flight.
pub const PIPELINE_REQUEST: usize = 512 * 1024;

/// Idle connections of one transfer.
pub struct Pool {
    inner: Mutex<PoolInner>,
}

struct PoolInner {
    idle: Vec<Connection>,
    /// Set when the transfer goes away: returned connections are closed.
    closed: bool,
}

impl Pool {
    pub fn new() -> Pool {
        Pool {
            inner: Mutex::new(PoolInner {
                idle: Vec::new(),
                closed: false,
            }),
        }
    }

    fn take(&self) -> Option<Connection> {
        loop {
            let conn = self.inner.lock().idle.pop()?;
            if conn.probe_alive() {
                return Some(conn);
            }
            log::info!("dropping a pooled NBD connection the server closed");
        }
    }

    fn put(&self, conn: Connection) {
        let mut inner = self.inner.lock();
        if !inner.closed && inner.idle.len() < MAX_IDLE {
            inner.idle.push(conn);
            return;
        }
        drop(inner);
        drop(conn);
    }

    /// Closes the idle connections and, from now on, every connection that
    /// is returned.
    pub fn close(&self) {
        let drained: Vec<Connection> = {
            let mut inner = self.inner.lock();
            inner.closed = true;
            std::mem::take(&mut inner.idle)
        };
        drop(drained);
    }

    pub fn idle_count(&self) -> usize {
        self.inner.lock().idle.len()
    }
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

fn io_err(e: nbd::Error) -> BackendError {
    BackendError::Io(e.to_string())
}

/// One NBD connection lent to one request.
pub struct NbdHandle {
    transfer: Arc<Transfer>,
    conn: Option<Connection>,
    bitmap_context: Option<String>,
    reusable: bool,
}

impl NbdHandle {
    pub fn open(
        transfer: Arc<Transfer>,
        socket: &Path,
        export: Option<&str>,
        export_bitmap: Option<&str>,
    ) -> Result<NbdHandle> {
        let bitmap_context =
            export_bitmap.map(|b| format!("{}{b}", nbd::CONTEXT_DIRTY_BITMAP_PREFIX));
        let conn = match transfer.pool().take() {
            Some(c) => c,
            None => {
                // qemu:allocation-depth tells holes (unallocated in every
                // layer); a server without it simply does not agree to it.
                let mut contexts =
                    vec![nbd::CONTEXT_BASE_ALLOCATION, nbd::CONTEXT_ALLOCATION_DEPTH];
                if let Some(b) = &bitmap_context {
                    contexts.push(b);
                }
                Connection::connect_unix(&ConnectOptions {
                    socket,
                    export,
                    meta_contexts: &contexts,
                    timeout: CONNECT_TIMEOUT,
                })
                .map_err(|e| {
                    log::error!(
                        "NBD connect failed image_id={} socket={} err={e}",
                        transfer.id(),
                        socket.display()
                    );
                    BackendError::Unavailable(e.to_string())
                })?
            }
        };
        Ok(NbdHandle {
            transfer,
            conn: Some(conn),
            bitmap_context,
            reusable: true,
        })
    }

    fn conn(&mut self) -> &mut Connection {
        self.conn.as_mut().expect("connection present until drop")
    }

    fn conn_ref(&self) -> &Connection {
        self.conn.as_ref().expect("connection present until drop")
    }

    /// Runs `f` on the connection; an error makes the connection unreusable.
    fn with<T>(&mut self, f: impl FnOnce(&mut Connection) -> nbd::Result<T>) -> Result<T> {
        let r = f(self.conn());
        if r.is_err() {
            self.reusable = false;
        }
        r.map_err(io_err)
    }

    pub fn size(&self) -> u64 {
        self.conn_ref().size()
    }

    pub fn caps(&self) -> Result<Caps> {
        let c = self.conn_ref();
        Ok(Caps {
            read_only: c.is_read_only().map_err(io_err)?,
            can_zero: c.can_zero().map_err(io_err)?,
            can_flush: c.can_flush().map_err(io_err)?,
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BackendError::OutOfRange { size }),
        }
    }

    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        if buf.len() > PIPELINE_REQUEST {
            self.with(|c| c.pread_pipelined(buf, offset, PIPELINE_REQUEST))
        } else {
            self.with(|c| c.pread_into(buf, offset))
        }
    }

    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.transfer.mark_written();
        if buf.len() > PIPELINE_REQUEST {
            self.with(|c| c.pwrite_pipelined(buf, offset, PIPELINE_REQUEST))
        } else {
            self.with(|c| c.pwrite(buf, offset))
        }
    }

    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.transfer.mark_written();
        if self.conn_ref().can_zero().unwrap_or(false) {
            return self.with(|c| c.zero(offset, len));
        }
        // The server cannot zero: write zeroes.
        let zeroes = vec![0u8; (1 << 20).min(len) as usize];
        let mut off = offset;
        let end = offset + len;
        while off < end {
            let n = (end - off).min(zeroes.len() as u64) as usize;
            self.write_at(&zeroes[..n], off)?;
            off += n as u64;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.with(|c| c.flush())?;
        self.transfer.mark_flushed();
        Ok(())
    }

    fn allocation_available(&self) -> bool {
        self.conn_ref()
            .can_meta_context(nbd::CONTEXT_BASE_ALLOCATION)
            .unwrap_or(false)
    }

    pub fn allocation_extents(&mut self) -> Result<Vec<Extent>> {
        let size = self.size();
        if size == 0 {
            return Ok(Vec::new());
        }
        if !self.allocation_available() {
            return Ok(extents::whole(size, false));
        }
        let depth = self
            .conn_ref()
            .can_meta_context(nbd::CONTEXT_ALLOCATION_DEPTH)
            .unwrap_or(false);
        if depth {
            let lists = self.with(|c| {
                c.block_status(
                    0,
                    size,
                    &[nbd::CONTEXT_BASE_ALLOCATION, nbd::CONTEXT_ALLOCATION_DEPTH],
                )
            })?;
            return Ok(extents::from_allocation(&lists[0], Some(&lists[1]), size));
        }
        let lists = self.with(|c| c.block_status(0, size, &[nbd::CONTEXT_BASE_ALLOCATION]))?;
        Ok(extents::from_allocation(&lists[0], None, size))
    }

    /// Extents whose `zero` flag means the range reads as zeroes (see
    /// [`extents::reads_as_zero`]); one data extent without `base:allocation`.
    pub fn reads_as_zero_extents(&mut self) -> Result<Vec<Extent>> {
        let size = self.size();
        if size == 0 {
            return Ok(Vec::new());
        }
        if !self.allocation_available() {
            return Ok(extents::whole(size, false));
        }
        let lists = self.with(|c| c.block_status(0, size, &[nbd::CONTEXT_BASE_ALLOCATION]))?;
        Ok(extents::reads_as_zero(&lists[0], size))
    }

    pub fn dirty_extents(&mut self) -> Result<Option<Vec<DirtyExtent>>> {
        let Some(ctx) = self.bitmap_context.clone() else {
            return Ok(None);
        };
        if !self.conn_ref().can_meta_context(&ctx).unwrap_or(false) {
            log::warn!(
                "dirty bitmap context {ctx:?} not negotiated image_id={}",
                self.transfer.id()
            );
            return Ok(None);
        }
        let size = self.size();
        if size == 0 {
            return Ok(Some(Vec::new()));
        }
        if !self.allocation_available() {
            let mut lists = self.with(|c| c.block_status(0, size, &[ctx.as_str()]))?;
            return Ok(Some(extents::merge_dirty(
                &extents::whole(size, false),
                &lists.remove(0),
                size,
            )));
        }
        let lists =
            self.with(|c| c.block_status(0, size, &[nbd::CONTEXT_BASE_ALLOCATION, ctx.as_str()]))?;
        let alloc = extents::from_allocation(&lists[0], None, size);
        Ok(Some(extents::merge_dirty(&alloc, &lists[1], size)))
    }

    pub fn discard(&mut self) {
        self.reusable = false;
    }
}

impl Drop for NbdHandle {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.reusable && !conn.is_dead() && conn.can_multi_conn().unwrap_or(false) {
                self.transfer.pool().put(conn);
            }
        }
    }
}
