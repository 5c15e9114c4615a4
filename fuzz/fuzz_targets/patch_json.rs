//! Fuzz target: `props::check_patch_json` (see tests/props/mod.rs for the properties).
#![no_main]

#[path = "../../tests/props/mod.rs"]
mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::check_patch_json(data));
