//! Random model directories for pipeline tests, and the bytes each layer must show.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use layer_streamer::synth::{self, Arch, Shape, SynthSpec};
use layer_streamer::{DType, ModelIndex};
use rand::Rng;

/// A temporary directory on a real filesystem (not tmpfs): under `target/`.
pub fn tempdir() -> tempfile::TempDir {
    std::fs::create_dir_all("target/test-fixtures").expect("create target/test-fixtures");
    tempfile::Builder::new()
        .prefix("ls-")
        .tempdir_in("target/test-fixtures")
        .expect("create a temporary directory")
}

/// Writes a small random model (`layers` layers, several shards) and opens it.
pub fn small_model(dir: &Path, rng: &mut impl Rng, layers: usize, dtype: DType) -> ModelIndex {
    let shape = Shape {
        hidden: 64 * rng.gen_range(1..=2),
        intermediate: 96 + 32 * rng.gen_range(0..3),
        layers,
        heads: 4,
        kv_heads: 2,
        vocab: 320,
    };
    let spec = SynthSpec {
        arch: if rng.gen_bool(0.5) {
            Arch::Qwen2
        } else {
            Arch::Llama
        },
        shape,
        dtype,
        tie: rng.gen_bool(0.5),
        // Small shards, so that layers straddle files.
        shard_size: rng.gen_range(60_000..200_000),
        seed: rng.gen(),
        threads: 1,
    };
    synth::write_model(dir, &spec).expect("write a synthetic model");
    ModelIndex::open(dir).expect("open the synthetic model")
}

/// Each layer's tensors as (key, bytes read straight from the files).
pub fn expected_layers(model: &ModelIndex) -> Vec<Vec<(String, Vec<u8>)>> {
    model
        .layers()
        .iter()
        .map(|l| {
            l.tensors
                .iter()
                .map(|t| (t.key.clone(), read_tensor(model, &t.info)))
                .collect()
        })
        .collect()
}

/// A tensor's bytes, read with plain std I/O.
pub fn read_tensor(model: &ModelIndex, info: &layer_streamer::checkpoint::TensorInfo) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let path: &PathBuf = &model.files()[info.file].path;
    let f = std::fs::File::open(path).expect("open shard");
    let mut buf = vec![0u8; info.len as usize];
    f.read_exact_at(&mut buf, info.file_offset)
        .expect("read tensor");
    buf
}
