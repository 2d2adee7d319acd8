//! Fuzz target `wal`: see `sluice_fuzz::wal` in `tests/fuzz/targets.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::wal(data));
