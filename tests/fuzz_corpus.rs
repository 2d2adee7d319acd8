//! Replays the committed fuzz corpus (`tests/fuzz/corpus/<target>/`: inputs kept by
//! `cargo fuzz cmin`, and a `regression-*` file for every defect the fuzzers found)
//! through the fuzz targets' own checks, so the suite runs them on stable without a
//! fuzzer. See `tests/fuzz/targets.rs` for what each target checks.
//!
//! `SLUICE_FUZZ_CORPUS=<dir>` replays `<dir>/<target>/` instead: a fuzzer's whole working
//! corpus, say, through this debug build, whose overflow checks the fuzz build lacks.

#[path = "fuzz/targets.rs"]
mod targets;

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::PathBuf;

/// Runs `target` on every file of its corpus directory; a failure names the file.
fn replay(target: &str, run: fn(&[u8])) {
    let root = std::env::var_os("SLUICE_FUZZ_CORPUS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus"),
        PathBuf::from,
    );
    let dir = root.join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "{} holds only {} inputs",
        dir.display(),
        files.len()
    );
    for file in &files {
        let data =
            std::fs::read(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(&data))) {
            eprintln!("fuzz target {target} fails on {}", file.display());
            resume_unwind(panic);
        }
    }
}

#[test]
fn wal_corpus_recovers_or_refuses_without_panicking() {
    replay("wal", targets::wal);
}

#[test]
fn lease_id_corpus_parses_consistently() {
    replay("lease_id", targets::lease_id);
}

#[test]
fn names_corpus_matches_the_reference_matcher() {
    replay("names", targets::names);
}

#[test]
fn requests_corpus_refusals_change_nothing() {
    replay("requests", targets::requests);
}
