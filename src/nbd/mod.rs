//! A safe connection to an NBD server through the system libnbd. All
//! `unsafe` of the project that talks to libnbd lives in this module.
//!
//! One concept a file:
//! - [`Connection`] (`connection.rs`): the handle, connect, the export's
//!   flags, and driving libnbd's state machine with `poll(2)`.
//! - [`Error`] (`error.rs`): errno, message, and whether the handle is dead
//!   afterwards ([`Error::is_fatal`]).
//! - `chunks.rs`: the one loop that splits a request into NBD commands.
//! - `blocking.rs`: the blocking calls of an idle [`Connection`] (read,
//!   write, zero, flush), each bounded by the command timeout.
//! - [`Pipeline`] (`pipeline.rs`): commands queued and retired oldest first
//!   from a tokio reactor. It owns the connection while commands are in
//!   flight and gives it back only when none is, so a blocking call can
//!   never retire (or wait behind) a queued command: the types forbid it.
//! - `block_status.rs`: block status and its C callback.

mod block_status;
mod blocking;
mod chunks;
mod connection;
mod error;
mod pipeline;

pub use connection::{ConnectOptions, Connection};
pub use error::{Error, Result};
pub use pipeline::{Home, Pipeline, Retired};

use libnbd_sys as sys;

/// `base:allocation`: the standard allocation context.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of qemu's dirty bitmap contexts (`qemu:dirty-bitmap:NAME`).
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// qemu's allocation depth context (0 = not allocated in any layer).
pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// `base:allocation` flag: the range is a hole.
pub const STATE_HOLE: u32 = sys::LIBNBD_STATE_HOLE;
/// `base:allocation` flag: the range reads as zeroes.
pub const STATE_ZERO: u32 = sys::LIBNBD_STATE_ZERO;
/// `qemu:dirty-bitmap:*` flag: the range is dirty.
pub const STATE_DIRTY: u32 = 1;

/// The largest single read or write request we send. libnbd refuses requests
/// above 64 MiB; qemu-nbd advertises 32 MiB.
const MAX_REQUEST: u64 = 32 * 1024 * 1024;
/// The largest zero request: the NBD protocol carries 32-bit lengths.
const MAX_ZERO: u64 = 1 << 30;
/// The most block status pairs one call collects, all contexts together
/// (see `Connection::block_status`): what bounds the memory of an extents
/// list (and so of a reply of `GET /images/{id}/extents`).
pub(crate) const MAX_EXTENTS: usize = 1 << 20;
/// The largest block status request (32-bit length, kept 1 MiB aligned).
const MAX_BLOCK_STATUS: u64 = (1 << 32) - (1 << 20);
