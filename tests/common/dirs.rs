//! Scratch directories and the paths of built programs. Paths are relative:
//! test binaries also run from the repository root of machines where this
//! build's absolute paths do not exist.

use std::path::PathBuf;

/// Where scratch directories are made: on the build's filesystem, not tmpfs,
/// so that misaligned `O_DIRECT` reads fail as they would on a real disk.
const SCRATCH: &str = "target/test-fixtures";

/// A fresh directory under `target/test-fixtures`, removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    std::fs::create_dir_all(SCRATCH).unwrap_or_else(|e| panic!("creating {SCRATCH}: {e}"));
    tempfile::Builder::new()
        .prefix("ls-test-")
        .tempdir_in(SCRATCH)
        .unwrap_or_else(|e| panic!("creating a directory in {SCRATCH}: {e}"))
}

/// The CLI binary: cargo's build of it, or the staged copy that test
/// binaries find when they run from the repository root of another machine.
pub fn cli_binary() -> Option<PathBuf> {
    [
        PathBuf::from(env!("CARGO_BIN_EXE_layer-streamer")),
        PathBuf::from(".gpu/bin/layer-streamer"),
    ]
    .into_iter()
    .find(|p| p.exists())
}
