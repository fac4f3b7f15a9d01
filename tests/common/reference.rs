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

/// Asserts that every logit of `b` is within `tol` times its row's largest
/// magnitude in `a` of the same logit of `a` (rows of equal lengths), and
/// prints how many are bit-identical: two ways of computing the same
/// products, `sides` naming them, `what` the case.
pub fn assert_rows_close(
    a: &[Vec<f32>],
    b: &[Vec<f32>],
    tol: f32,
    what: &str,
    sides: (&str, &str),
) {
    assert_eq!(a.len(), b.len(), "{what}: rows");
    for (r, (a, b)) in a.iter().zip(b).enumerate() {
        assert_eq!(a.len(), b.len());
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        let same = a.iter().zip(b).filter(|(x, y)| x.to_bits() == y.to_bits());
        eprintln!(
            "{what} row {r}: {} of {} logits bit-identical",
            same.count(),
            a.len()
        );
        for (c, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * scale,
                "{what} row {r} column {c}: {x} {}, {y} {}",
                sides.0,
                sides.1
            );
        }
    }
}
