//! cloudstack-image-server: an imageio-style HTTP server that moves KVM disk
//! images over NBD (through the system libnbd) or from plain files.
//!
//! The public surface is only what is used from outside the library: by the
//! server binary (`src/main.rs`: `server::run` and its `Settings`, with the
//! parts it hands on as they are, `http::HttpSettings` and `transfers::TransferSettings`;
//! `control::DEFAULT_SOCKET`, `http::limits`' queue bounds,
//! `backend::nbd_export::DEFAULT_COMMAND_TIMEOUT_SECS`), by the integration tests
//! and fuzz targets (`nbd`, `config`, `extents::merge_dirty`,
//! `http::patch_op`, `http::range`) and by `bench/floor.rs` (`nbd`,
//! `backend::nbd_export`'s request sizes, `tls::server_config`). Everything else is
//! `pub(crate)`, so that the compiler reports dead code; `unreachable_pub`
//! refuses a `pub` item that the crate does not export. Add to the surface
//! only for such a user.
//!
//! `unsafe` is refused everywhere but in `nbd` (the libnbd wrapper) and `sys`
//! (audited system calls), and there every block needs its `SAFETY:` comment.

#![deny(unsafe_code)]
#![deny(unreachable_pub)]
#![deny(clippy::undocumented_unsafe_blocks)]

// Defined before the modules: in scope in all of them (textual macro scope).
/// `AsyncWrite` for a stream wrapper (`$wrapper<T>`, its stream in field
/// `$field`) that times or gates only reads: writes go straight through.
macro_rules! write_through {
    ($wrapper:ident, $field:ident) => {
        impl<T: ::tokio::io::AsyncWrite + Unpin> ::tokio::io::AsyncWrite for $wrapper<T> {
            fn poll_write(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &[u8],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                ::std::pin::Pin::new(&mut self.get_mut().$field).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                bufs: &[::std::io::IoSlice<'_>],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                ::std::pin::Pin::new(&mut self.get_mut().$field).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }

            fn poll_flush(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::std::pin::Pin::new(&mut self.get_mut().$field).poll_flush(cx)
            }

            fn poll_shutdown(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::std::pin::Pin::new(&mut self.get_mut().$field).poll_shutdown(cx)
            }
        }
    };
}

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
