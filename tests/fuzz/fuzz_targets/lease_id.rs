//! Fuzz target `lease_id`: see `sluice_fuzz::lease_id` in `tests/fuzz/targets.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::lease_id(data));
