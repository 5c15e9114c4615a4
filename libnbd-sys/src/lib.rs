//! Raw FFI bindings to libnbd, generated at build time by bindgen from the
//! system's `libnbd.h`. Nothing but the generated declarations lives here; the
//! safe wrapper is `cloudstack_image_server::nbd`.

#![allow(non_upper_case_globals)]
#![allow(non_camel_case_types)]
#![allow(non_snake_case)]
#![allow(dead_code)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
