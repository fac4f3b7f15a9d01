//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use layer_streamer::model::synth::{write_model, Arch, Shape, SynthSpec};
use layer_streamer::DType;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// A fresh directory on the build's filesystem (not tmpfs: misaligned
/// `O_DIRECT` reads must fail there as they would on a real disk).
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ls-test-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("creating a scratch directory under target/")
}

/// A fresh random generator; its seed is printed so a failure can be replayed
/// with `LS_TEST_SEED`.
pub fn rng(test: &str) -> (StdRng, u64) {
    let seed = std::env::var("LS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos(),
            );
            h.finish()
        });
    eprintln!("{test}: seed {seed} (set LS_TEST_SEED={seed} to replay)");
    (StdRng::seed_from_u64(seed), seed)
}

/// Random bytes.
pub fn bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// Writes a synthetic model.
pub fn synth(
    dir: &Path,
    arch: Arch,
    preset: &str,
    dtype: DType,
    tie: bool,
    shard_size: u64,
    seed: u64,
) {
    let spec = SynthSpec {
        arch,
        shape: Shape::preset(preset).unwrap(),
        dtype,
        tie,
        shard_size,
        seed,
        threads: 2,
    };
    write_model(dir, &spec).unwrap();
}

/// Writes a file of 8-byte length, the given header text, and `data_len` random bytes.
pub fn raw_safetensors(path: &Path, header: &str, data: &[u8]) {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// The `.safetensors` files of a directory, sorted.
pub fn shards(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    v
}
