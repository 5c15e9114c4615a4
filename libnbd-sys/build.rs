//! Generates the raw libnbd bindings from the installed `libnbd.h`.
//!
//! The header is located with pkg-config (`libnbd.pc`), which also emits the
//! link flags. Only `nbd_*` and `LIBNBD_*` items are kept so the bindings do not
//! drag in libc's declarations.

use std::env;
use std::path::PathBuf;

fn main() {
    let lib = pkg_config::Config::new()
        .atleast_version("1.14")
        .probe("libnbd")
        .unwrap_or_else(|e| {
            panic!(
                "libnbd (>= 1.14) development files not found via pkg-config: {e}\n\
                 install libnbd-dev (Debian/Ubuntu) or libnbd-devel (Fedora/RHEL), \
                 or run `make deps`"
            )
        });

    let mut builder = bindgen::Builder::default()
        .header_contents("wrapper.h", "#include <libnbd.h>\n")
        .allowlist_function("nbd_.*")
        .allowlist_type("nbd_.*")
        .allowlist_var("LIBNBD_.*")
        .derive_default(true)
        .layout_tests(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for path in &lib.include_paths {
        builder = builder.clang_arg(format!("-I{}", path.display()));
    }
    let bindings = builder
        .generate()
        .expect("bindgen could not generate libnbd bindings");

    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("could not write libnbd bindings");
}
