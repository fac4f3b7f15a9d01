//! FP8 safetensors checkpoints: `config.json`'s `quantization_config` says
//! how the `F8_E4M3`/`F8_E5M2` weights are scaled, and each such weight gets
//! its companion scale tensor attached ([`TensorInfo::scale`]).
//!
//! Two conventions are read:
//! - `"quant_method": "fp8"` with `"weight_block_size": [128, 128]` (the
//!   official FP8 releases, transformers' fine-grained FP8): `X.weight_scale_inv`
//!   of shape `[ceil(rows / 128), ceil(cols / 128)]`;
//! - `"quant_method": "compressed-tensors"` (llm-compressor), format
//!   `float-quantized` or `naive-quantized`: `X.weight_scale` per tensor
//!   (`[]`, `[1]`), per channel (`[rows, 1]`, `[rows]`), or in 128×128 blocks
//!   where a config group's weights say `"strategy": "block"`.
//!
//! Every other tensor is left as it is. The scales stay tensors of their own,
//! in the same layer as their weight, so that the stored bytes are what
//! travels; the plan pairs them again (`pipeline::plan`).

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::{ShardFile, TensorInfo};
use crate::quant::fp8::{Fp8Scale, ScaleLayout};
use crate::{DType, Error, Result};

/// The only block size the fp8 method and block strategies are read with.
const BLOCK: u64 = 128;

/// The scaling convention a checkpoint declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    /// `quant_method: fp8`: `weight_scale_inv` in 128×128 blocks.
    BlockFp8,
    /// `quant_method: compressed-tensors`: `weight_scale`, its layout read
    /// from its shape; `blocks` where a group declares the block strategy.
    Compressed { blocks: bool },
}

impl Scheme {
    fn suffix(self) -> &'static str {
        match self {
            Scheme::BlockFp8 => "_scale_inv",
            Scheme::Compressed { .. } => "_scale",
        }
    }
}

/// Reads the scheme from `config` (config.json at `path`); `None` when it
/// declares no quantization.
fn scheme(path: &Path, config: Option<&Value>) -> Result<Option<Scheme>> {
    let Some(qc) = config.and_then(|c| c.get("quantization_config")) else {
        return Ok(None);
    };
    let bad = |msg: String| Error::model(path, format!("quantization_config: {msg}"));
    let method = qc.get("quant_method").and_then(Value::as_str).unwrap_or("");
    match method {
        "fp8" => {
            let block = qc.get("weight_block_size").ok_or_else(|| {
                bad(
                    "quant_method \"fp8\" without weight_block_size: per-tensor fp8 \
                     checkpoints are not supported (block scales of [128, 128] are)"
                        .into(),
                )
            })?;
            check_block(block).map_err(|m| bad(format!("weight_block_size {m}")))?;
            Ok(Some(Scheme::BlockFp8))
        }
        "compressed-tensors" => {
            let format = qc.get("format").and_then(Value::as_str).unwrap_or("");
            if !matches!(format, "float-quantized" | "naive-quantized") {
                return Err(bad(format!(
                    "compressed-tensors format {format:?} is not supported (float-quantized \
                     or naive-quantized FP8 weights are)"
                )));
            }
            let mut blocks = false;
            let groups = qc.get("config_groups").and_then(Value::as_object);
            for (name, g) in groups.into_iter().flatten() {
                let Some(w) = g.get("weights").filter(|w| !w.is_null()) else {
                    continue;
                };
                let strategy = w.get("strategy").and_then(Value::as_str).unwrap_or("");
                match strategy {
                    "tensor" | "channel" => {}
                    "block" => {
                        let b = w.get("block_structure").unwrap_or(&Value::Null);
                        check_block(b).map_err(|m| {
                            bad(format!("config_groups.{name}.weights.block_structure {m}"))
                        })?;
                        blocks = true;
                    }
                    other => {
                        return Err(bad(format!(
                            "config_groups.{name}.weights.strategy {other:?} is not supported \
                             (tensor, channel or block)"
                        )))
                    }
                }
            }
            Ok(Some(Scheme::Compressed { blocks }))
        }
        other => Err(bad(format!(
            "quant_method {other:?} is not supported (fp8 or compressed-tensors)"
        ))),
    }
}

/// Accepts `[128, 128]` only; otherwise says what was found.
fn check_block(v: &Value) -> std::result::Result<(), String> {
    let dims: Option<Vec<u64>> = v
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect());
    match dims.as_deref() {
        Some([BLOCK, BLOCK]) => Ok(()),
        _ => Err(format!(
            "is {v}: only [{BLOCK}, {BLOCK}] blocks are supported"
        )),
    }
}

/// Attaches each FP8 weight's scale tensor, checking the scale's presence,
/// dtype and shape against the convention `config` (config.json in `dir`)
/// declares. Errors name the file and the tensor.
pub(super) fn attach_scales(
    dir: &Path,
    config: Option<&Value>,
    files: &[ShardFile],
    tensors: &mut [TensorInfo],
) -> Result<()> {
    let config_path = dir.join("config.json");
    let scheme = scheme(&config_path, config)?;
    let by_name: HashMap<String, usize> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    for i in 0..tensors.len() {
        let w = &tensors[i];
        if !matches!(w.dtype, DType::F8E4M3 | DType::F8E5M2) {
            continue;
        }
        let file = files.get(w.file).map_or(dir, |f| f.path.as_path());
        let Some(scheme) = scheme else {
            return Err(Error::model(
                file,
                format!(
                    "tensor {} is {}, but {} declares no quantization_config saying how it \
                     is scaled",
                    w.name,
                    w.dtype,
                    config_path.display()
                ),
            ));
        };
        let scale_name = format!("{}{}", w.name, scheme.suffix());
        let Some(&s) = by_name.get(&scale_name) else {
            return Err(Error::model(
                file,
                format!(
                    "tensor {} is {} but its scale {scale_name} is missing from the checkpoint",
                    w.name, w.dtype
                ),
            ));
        };
        let scale = scale_of(w, &tensors[s], scheme)
            .map_err(|m| Error::model(file, format!("tensor {}: {m}", w.name)))?;
        tensors[i].scale = Some(scale);
    }
    Ok(())
}

/// The scale `s` of weight `w`, its layout read from its shape.
fn scale_of(
    w: &TensorInfo,
    s: &TensorInfo,
    scheme: Scheme,
) -> std::result::Result<Fp8Scale, String> {
    let &[rows, cols] = w.shape.as_slice() else {
        return Err(format!(
            "an FP8 weight must be a matrix, not of shape {:?}",
            w.shape
        ));
    };
    if !matches!(s.dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(format!(
            "its scale {} is {}, not f32, bf16 or f16",
            s.name, s.dtype
        ));
    }
    let (rows, cols) = (rows as u64, cols as u64);
    let shape: Vec<u64> = s.shape.iter().map(|&d| d as u64).collect();
    let blocks = [rows.div_ceil(BLOCK), cols.div_ceil(BLOCK)];
    let layout = match (scheme, shape.as_slice()) {
        (Scheme::BlockFp8, s) if s == blocks => ScaleLayout::BLOCK_128,
        (Scheme::Compressed { .. }, [] | [1] | [1, 1]) => ScaleLayout::PerTensor,
        (Scheme::Compressed { .. }, [r] | [r, 1]) if *r == rows => ScaleLayout::PerChannel,
        (Scheme::Compressed { blocks: true }, s) if s == blocks => ScaleLayout::BLOCK_128,
        _ => {
            let want = match scheme {
                Scheme::BlockFp8 => format!("{blocks:?} (128x128 blocks)"),
                Scheme::Compressed { blocks: b } => format!(
                    "[] or [1] (per tensor), [{rows}, 1] or [{rows}] (per channel){}",
                    if b {
                        format!(" or {blocks:?} (128x128 blocks)")
                    } else {
                        String::new()
                    }
                ),
            };
            return Err(format!(
                "its scale {} has shape {:?}, expected {want} for a [{rows}, {cols}] weight",
                s.name, s.shape
            ));
        }
    };
    Ok(Fp8Scale {
        tensor: s.name.clone(),
        dtype: s.dtype,
        layout,
    })
}
