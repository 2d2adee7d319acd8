//! Fuzz target `names`: see `sluice_fuzz::names` in `tests/fuzz/targets.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::names(data));
