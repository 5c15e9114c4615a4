//! cloudstack-image-server: an imageio-style HTTP server that moves KVM disk
//! images over NBD (through the system libnbd) or from plain files.
//!
//! The public surface is only what is used from outside the library: by the
//! server binary (`src/main.rs`: `server::run` and its `Settings`, with the
//! parts it hands on as they are, `http::Settings` and `transfers::Settings`;
//! `control::DEFAULT_SOCKET`, `http::limits`' queue bounds,
//! `backend::nbd::DEFAULT_COMMAND_TIMEOUT_SECS`), by the integration tests
//! and fuzz targets (`nbd`, `config`, `extents::merge_dirty`,
//! `http::patch_op`, `http::range`) and by `bench/floor.rs` (`nbd`,
//! `backend::nbd`'s request sizes, `tls::server_config`). Everything else is
//! `pub(crate)`, so that the compiler reports dead code; `unreachable_pub`
//! refuses a `pub` item that the crate does not export. Add to the surface
//! only for such a user.
//!
//! `unsafe` is refused everywhere but in `nbd` (the libnbd wrapper) and `sys`
//! (audited system calls), and there every block needs its `SAFETY:` comment.

#![deny(unsafe_code)]
#![deny(unreachable_pub)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backend;
mod checksum;
pub mod config;
pub mod control;
mod direct_body;
pub mod extents;
mod head_timeout;
pub mod http;
#[allow(unsafe_code)]
pub mod nbd;
mod ops;
mod request_gate;
pub mod server;
mod stats;
#[allow(unsafe_code)]
mod sys;
pub mod tls;
pub mod transfers;
mod unix_socket;
mod validate;
mod zeroes;
