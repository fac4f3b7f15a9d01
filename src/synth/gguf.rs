//! Random quantized GGUF models for benchmarks: the shapes, metadata and
//! tokenizer of a synthetic model, with weight matrices as random blocks of
//! a ggml type (finite, small scales, so every weight is finite) written
//! straight into the file, without a source model or a quantizer.
//!
//! Tensor types follow [`tensor_type`]: norms F32 (`1 + 0.1·N(0,1)`), the
//! embedding and output Q6_K (Q8_0 in a Q8_0 file), rows that are not whole
//! blocks in the fallback type (F16 weights `N(0, 1/in_features)`).

use std::path::Path;
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use super::tokenizer::{tokenizer_files, SpecialIds};
use super::{
    config_json, fill_normal, tensor_key, tensor_specs, Arch, Shape, SynthReport, SynthSpec,
};
use crate::checkpoint::gguf_hf::gguf_tensor_name;
use crate::gguf::convert::{
    arch_metadata, file_type, tensor_type, tokenizer_metadata_of, TokenizerJson,
};
use crate::gguf::{GgufWriter, MetaValue};
use crate::quant::QuantType;
use crate::{DType, Error, Result};

/// Bytes generated and written at once.
const CHUNK_BYTES: u64 = 8 << 20;

/// What [`write_gguf`] writes.
#[derive(Debug, Clone)]
pub struct SynthGgufSpec {
    /// Architecture.
    pub arch: Arch,
    /// Sizes.
    pub shape: Shape,
    /// Block type of the weight matrices (a quantized type).
    pub ty: QuantType,
    /// Tie `output` to the embedding (no `output.weight`).
    pub tie: bool,
    /// Seed of the random blocks.
    pub seed: u64,
}

/// Writes a random GGUF model to `path`; `progress(done, total)` is called
/// with tensor bytes as they are written.
pub fn write_gguf(
    path: &Path,
    spec: &SynthGgufSpec,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SynthReport> {
    if !spec.ty.is_quantized() {
        return Err(Error::Input(format!(
            "synth --format gguf --type {}: expected a block type (q8_0, q4_k, ...)",
            spec.ty
        )));
    }
    let s = &spec.shape;
    super::check_shape(s)?;
    let hf = SynthSpec {
        arch: spec.arch,
        shape: *s,
        dtype: DType::BF16,
        tie: spec.tie,
        shard_size: u64::MAX,
        seed: spec.seed,
        threads: 1,
    };
    let mut w = GgufWriter::new();
    for (k, v) in metadata(path, &hf, spec.ty)? {
        w.metadata(k, v)?;
    }
    let mut tensors = Vec::new();
    for (id, (name, shape)) in tensor_specs(spec.arch, s, spec.tie).into_iter().enumerate() {
        let gguf = gguf_tensor_name(&name).unwrap_or(name);
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let (ty, _) = tensor_type(spec.ty, &gguf, &dims);
        w.tensor(&gguf, ty, &dims)?;
        let (_, len) = ty
            .tensor_size(&dims)
            .map_err(|e| Error::Input(format!("{}: tensor {gguf}: {e}", path.display())))?;
        tensors.push((tensor_key(spec.seed, id as u64), ty, dims, len));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating directory", dir, None, e))?;
    }
    let total: u64 = tensors.iter().map(|t| t.3).sum();
    let start = Instant::now();
    let mut out = w.create(path)?;
    let mut buf = Vec::new();
    let mut written = 0;
    for &(key, ty, ref dims, len) in &tensors {
        let mut rng = SmallRng::seed_from_u64(key);
        let chunk = CHUNK_BYTES.next_multiple_of(ty.block_bytes());
        let mut done = 0;
        while done < len {
            let n = chunk.min(len - done);
            buf.resize(n as usize, 0);
            fill(&mut buf, ty, dims, key, done, &mut rng);
            out.write_tensor_part(&buf)?;
            done += n;
            written += n;
            progress(written, total);
        }
    }
    out.finish()?;
    let bytes = std::fs::metadata(path)
        .map_err(|e| Error::io("reading the size of", path, None, e))?
        .len();
    Ok(SynthReport {
        files: vec![path.to_path_buf()],
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The file's metadata: architecture, shapes, tokenizer and chat template,
/// as `quantize` writes them for a synthetic source of the same spec.
fn metadata(path: &Path, hf: &SynthSpec, ty: QuantType) -> Result<Vec<(String, MetaValue)>> {
    let tok = tokenizer_files(hf.arch, hf.shape.vocab)?;
    let ids = SpecialIds {
        bos: tok.bos,
        eos: tok.eos,
        stop: tok.stop.clone(),
        files: Vec::new(),
    };
    let config = config_json(hf, &ids);
    let arch = hf.arch.model_type();
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            MetaValue::String(arch.into()),
        ),
        (
            "general.name".into(),
            MetaValue::String(format!("synthetic {arch}")),
        ),
        ("general.file_type".into(), MetaValue::U32(file_type(ty))),
        ("general.quantization_version".into(), MetaValue::U32(2)),
    ];
    let empty = serde_json::Map::new();
    meta.extend(arch_metadata(
        path,
        arch,
        config.as_object().unwrap_or(&empty),
    )?);
    let files = TokenizerJson {
        path,
        tokenizer: &tok.tokenizer,
        tokenizer_config: &tok.config,
        config: &config,
    };
    let template = tok.config["chat_template"].as_str().map(str::to_string);
    meta.extend(tokenizer_metadata_of(&files, template, hf.shape.vocab)?);
    Ok(meta)
}

/// Fills `buf` with the tensor's bytes from byte `at`: normal values for
/// plain floats, random blocks with small scales for block types.
fn fill(buf: &mut [u8], ty: QuantType, dims: &[u64], key: u64, at: u64, rng: &mut SmallRng) {
    let esize = ty.block_bytes();
    match ty {
        QuantType::F32 | QuantType::F16 | QuantType::BF16 => {
            let dtype = ty.dtype().unwrap_or(DType::F32);
            let (mean, std) = if dims.len() == 1 {
                (1.0, 0.1)
            } else {
                (0.0, 1.0 / (dims[0] as f32).sqrt())
            };
            fill_normal(buf, dtype, key, at / esize, mean, std);
        }
        _ => {
            rng.fill_bytes(buf);
            for block in buf.chunks_exact_mut(esize as usize) {
                small_scales(block, ty, rng);
            }
        }
    }
}

/// Overwrites a random block's scales with small positive f16 values (and
/// Q6_K's sub-block scales with small integers), as real weights have.
fn small_scales(block: &mut [u8], ty: QuantType, rng: &mut SmallRng) {
    let mut f16_at = |at: usize, rng: &mut SmallRng| {
        let d = half::f16::from_f32(rng.gen::<f32>() * 1e-3 + 1e-4);
        block[at..at + 2].copy_from_slice(&d.to_le_bytes());
    };
    match ty {
        QuantType::Q4_0 | QuantType::Q5_0 | QuantType::Q8_0 => f16_at(0, rng),
        QuantType::Q4_1 | QuantType::Q5_1 | QuantType::Q4_K | QuantType::Q5_K => {
            f16_at(0, rng);
            f16_at(2, rng);
        }
        QuantType::Q6_K => {
            f16_at(208, rng);
            for s in &mut block[192..208] {
                *s = rng.gen_range(-8i8..8) as u8;
            }
        }
        QuantType::F32 | QuantType::F16 | QuantType::BF16 => {}
    }
}
