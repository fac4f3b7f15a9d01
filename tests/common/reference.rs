//! The checked-in reference fixtures: logits that Hugging Face transformers
//! computed for synthetic models (`tests/fixtures/reference/`, made by
//! `scripts/make-fixtures`).

use std::path::{Path, PathBuf};

/// Where the fixtures live, relative to the repository root (where cargo runs
/// tests, and where staged test binaries run on other machines).
const ROOT: &str = "tests/fixtures/reference";

/// The directory of the fixture `name` (e.g. `qwen2-tiny-s7`).
pub fn dir(name: &str) -> PathBuf {
    let dir = Path::new(ROOT).join(name);
    assert!(
        dir.join("reference.json").is_file(),
        "no reference fixture {name}: {} has no reference.json (run from the repository root; \
         scripts/make-fixtures writes them)",
        dir.display()
    );
    dir
}
