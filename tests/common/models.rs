//! Synthetic and hand-made model files for tests, and the bytes each tensor
//! must show.

use std::path::{Path, PathBuf};

use layer_streamer::synth::{write_model, Arch, Shape, SynthSpec};
use layer_streamer::{DType, ModelIndex};
use rand::Rng;

/// Writes a synthetic model of a named preset (`tiny`, `small`, ...).
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
        shape: Shape::preset(preset).unwrap_or_else(|| panic!("no synth preset {preset:?}")),
        dtype,
        tie,
        shard_size,
        seed,
        threads: 2,
    };
    write_model(dir, &spec)
        .unwrap_or_else(|e| panic!("writing a {preset} model to {}: {e}", dir.display()));
}

/// Writes a tiny bf16 model of a random architecture (Qwen2 or Llama), tied
/// or not, with random weights.
pub fn random_tiny(dir: &Path, rng: &mut impl Rng) {
    let arch = if rng.gen_bool(0.5) {
        Arch::Qwen2
    } else {
        Arch::Llama
    };
    let tie = rng.gen_bool(0.5);
    synth(
        dir,
        arch,
        "tiny",
        DType::BF16,
        tie,
        4_000_000_000,
        rng.gen(),
    );
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
    write_model(dir, &spec).expect("write a synthetic model");
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

/// Writes a safetensors file: the 8-byte header length, `header`, then `data`.
pub fn raw_safetensors(path: &Path, header: &str, data: &[u8]) {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// The `.safetensors` files of a directory, sorted.
pub fn shards(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    v
}

/// Writes a random GGUF model to `dir/<ty>.gguf` and opens it: layer
/// matrices of block type `ty`, `layers` layers of hidden size 256 and
/// `intermediate`, 4 heads over 2 KV heads, a vocabulary of `vocab`, a
/// random architecture (Llama or Qwen2), tied or not.
pub fn small_gguf(
    dir: &Path,
    ty: layer_streamer::quant::QuantType,
    (layers, intermediate, vocab): (usize, usize, usize),
    rng: &mut impl Rng,
) -> ModelIndex {
    use layer_streamer::synth::{write_gguf, SynthGgufSpec};
    let spec = SynthGgufSpec {
        arch: [Arch::Llama, Arch::Qwen2][rng.gen_range(0..2)],
        shape: Shape {
            hidden: 256,
            intermediate,
            layers,
            heads: 4,
            kv_heads: 2,
            vocab,
        },
        ty,
        tie: rng.gen_bool(0.5),
        seed: rng.gen(),
    };
    let path = dir.join(format!("{ty}.gguf"));
    write_gguf(&path, &spec, &mut |_, _| {}).expect("write a synthetic GGUF model");
    ModelIndex::open(&path).expect("open the synthetic GGUF model")
}

/// Writes a small random bf16 model into `dir/bf16` and its FP8 copy
/// (128×128 block scales, `synth::quantize_fp8`) into `dir/fp8`, and opens
/// the copy.
pub fn small_fp8(dir: &Path, rng: &mut impl Rng, layers: usize) -> ModelIndex {
    let (src, dst) = (dir.join("bf16"), dir.join("fp8"));
    std::fs::create_dir_all(&src).expect("create the source directory");
    small_model(&src, rng, layers, DType::BF16);
    layer_streamer::synth::quantize_fp8(&src, &dst, &mut |_, _| {}).expect("quantize to FP8");
    ModelIndex::open(&dst).expect("open the FP8 model")
}

/// `n` distinct ggml block types (at most all of them), drawn at random.
pub fn block_types(rng: &mut impl Rng, n: usize) -> Vec<layer_streamer::quant::QuantType> {
    use layer_streamer::quant::QuantType;
    let mut all: Vec<QuantType> = QuantType::ALL
        .into_iter()
        .filter(|t| t.is_quantized())
        .collect();
    let n = n.min(all.len());
    (0..n)
        .map(|_| all.swap_remove(rng.gen_range(0..all.len())))
        .collect()
}
