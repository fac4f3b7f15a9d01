//! FP8 safetensors checkpoints end to end on the host backend: written by
//! `quantize_fp8` from a random bf16 model (128×128 block scales) or built
//! here in the compressed-tensors layouts (per channel, per tensor), opened,
//! streamed as stored and dequantized on the transfer side. Their logits
//! track the bf16 source within the quantization error and equal, to the
//! bit, those of the bf16 model ml_dtypes dequantizes from the same files
//! (scripts/fp8_reference.py). Bad checkpoints are errors naming the file
//! and the tensor.

mod common;

use std::path::Path;
use std::process::Command;

use layer_streamer::checkpoint::TensorInfo;
use layer_streamer::llm::reference::{rel_l2, teacher_forced};
use layer_streamer::llm::{LlamaModel, ModelOptions};
use layer_streamer::quant::fp8::{self, Fp8Layout, ScaleLayout};
use layer_streamer::synth::{quantize_fp8, write_model, write_safetensors, Arch, Shape, SynthSpec};
use layer_streamer::{DType, Device, Error, LayerStreamer, ModelIndex};
use rand::Rng;
use serde_json::{json, Value};

/// Worst relative L2 error of an FP8 model's logits against its bf16 source:
/// the weights' error (below) from seven matrices in each of two random
/// layers, adding up in the residual stream (measured over seeds: 0.04 to
/// 0.12 for every scale layout; a decoding with a wrong scale or tile is off
/// by more than 1).
const FP8_TOL: f64 = 0.2;

/// Worst relative L2 error of one quantized matrix against its source: E4M3
/// rounds each value to 3 mantissa bits (at most 2⁻⁴ relative, about 3 % RMS).
const WEIGHT_TOL: f64 = 0.04;

/// Runs scripts/fp8_reference.py with `args` in the test venv.
fn reference(args: &[&str]) {
    common::assets::python_script("fp8_reference.py", args);
}

/// A random bf16 model whose matrices are not all multiples of 128.
fn bf16_model(dir: &Path, rng: &mut impl Rng) {
    let spec = SynthSpec {
        arch: if rng.gen_bool(0.5) {
            Arch::Qwen2
        } else {
            Arch::Llama
        },
        shape: Shape {
            hidden: 256,
            intermediate: 320 + 64 * rng.gen_range(0..3),
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 320,
        },
        dtype: DType::BF16,
        tie: rng.gen_bool(0.5),
        shard_size: 4_000_000_000,
        seed: rng.gen(),
        threads: 1,
    };
    write_model(dir, &spec).expect("write a synthetic bf16 model");
}

/// Teacher-forced logits of `tokens` (prompt, then the rest one by one) on
/// the host backend, in bf16 compute or file dtypes; and the bytes the last
/// pass streamed.
fn logits(dir: &Path, file_dtypes: bool, tokens: &[u32]) -> (Vec<Vec<f32>>, u64) {
    let index = ModelIndex::open(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let b = LayerStreamer::builder(&index)
        .device(Device::Host)
        .reader_threads(1);
    let b = if file_dtypes {
        b.file_dtype()
    } else {
        b.dtype(DType::BF16)
    };
    let mut s = b.build().unwrap();
    let opts = ModelOptions {
        max_batch: 1,
        max_len: 64,
        max_tokens: 64,
        ..ModelOptions::default()
    };
    let mut model = LlamaModel::load(&s, opts).unwrap();
    let (prompt, forced) = tokens.split_at(6);
    let rows = teacher_forced(&mut model, &mut s, &[prompt.to_vec()], &[forced.to_vec()]);
    (rows.unwrap().remove(0), s.last_pass_stats().layer_bytes)
}

/// Relative L2 error of an FP8 weight `w` of `q` (with its `scale`),
/// decoded, against its `source` in `bf`.
fn weight_error(
    bf: &ModelIndex,
    source: &TensorInfo,
    q: &ModelIndex,
    w: &TensorInfo,
    scale: &TensorInfo,
) -> f64 {
    let want: Vec<f32> = common::models::read_tensor(bf, source)
        .chunks_exact(2)
        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    let l = Fp8Layout::of(w.dtype, &w.shape, w.scale.as_ref().unwrap()).unwrap();
    let mut got = vec![0f32; want.len()];
    let (codes, scales) = (
        common::models::read_tensor(q, w),
        common::models::read_tensor(q, scale),
    );
    fp8::dequantize_f32(&l, &codes, &scales, &mut got).unwrap();
    rel_l2(&got, &want)
}

fn tokens(rng: &mut impl Rng) -> Vec<u32> {
    (0..10).map(|_| rng.gen_range(0..320)).collect()
}

fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| rel_l2(x, y))
        .fold(0.0, f64::max)
}

fn assert_bit_equal(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(
            same && x.len() == y.len(),
            "{what}: row {i} differs (rel_l2 {:e})",
            rel_l2(x, y)
        );
    }
}

#[test]
fn quantized_checkpoint_streams_stored_bytes_and_tracks_its_source() {
    let mut rng = common::rng("quantized_checkpoint_streams_stored_bytes_and_tracks_its_source");
    let (src, dst) = (common::tempdir(), common::tempdir());
    bf16_model(src.path(), &mut rng);
    let mut calls = Vec::new();
    let report = quantize_fp8(src.path(), dst.path(), &mut |d, t| calls.push((d, t))).unwrap();
    let last = *calls.last().unwrap();
    assert_eq!(last, (report.written_bytes, report.written_bytes));
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));

    let (bf, q) = (
        ModelIndex::open(src.path()).unwrap(),
        ModelIndex::open(dst.path()).unwrap(),
    );
    assert!(dst.path().join("tokenizer.json").is_file());
    let mut matrices = 0;
    for layer in q.layers() {
        for t in &layer.tensors {
            let Some(source) = bf.tensor(&t.info.name) else {
                assert!(t.info.name.ends_with("_scale_inv"), "{}", t.info.name);
                continue;
            };
            if source.shape.len() == 2 {
                matrices += 1;
                assert_eq!(t.info.dtype, DType::F8E4M3, "{}", t.info.name);
                let s = t.info.scale.as_ref().expect("an FP8 weight has its scale");
                assert_eq!(s.tensor, format!("{}_scale_inv", t.info.name));
                assert_eq!((s.layout, s.dtype), (ScaleLayout::BLOCK_128, DType::F32));
                let scale = q.tensor(&s.tensor).unwrap();
                let grid = [source.shape[0].div_ceil(128), source.shape[1].div_ceil(128)];
                assert_eq!(scale.shape, grid, "{}", s.tensor);
                let err = weight_error(&bf, source, &q, &t.info, scale);
                assert!(
                    err > 0.0 && err < WEIGHT_TOL,
                    "{}: rel_l2 {err}",
                    t.info.name
                );
            } else {
                assert_eq!(t.info.dtype, DType::BF16, "{}", t.info.name);
            }
        }
    }
    assert_eq!(matrices, report.quantized);
    assert!(q.statics().iter().all(|t| t.dtype == DType::BF16));
    assert!(q.total_layer_bytes() * 10 < bf.total_layer_bytes() * 6);

    let toks = tokens(&mut rng);
    let (want, _) = logits(src.path(), false, &toks);
    let (got, streamed) = logits(dst.path(), false, &toks);
    let err = worst(&got, &want);
    eprintln!("FP8 against bf16 source: worst rel_l2 {err:.4}");
    assert!(err > 0.0 && err < FP8_TOL, "rel_l2 {err}");
    // The pass moved the stored FP8 bytes and scales, not bf16.
    assert_eq!(streamed, q.total_layer_bytes());
    // With file dtypes the host math dequantizes the stored weights itself,
    // to the same bf16 values.
    let (raw, streamed_raw) = logits(dst.path(), true, &toks);
    assert_bit_equal(&raw, &got, "file dtypes against bf16 compute");
    assert_eq!(streamed_raw, q.total_layer_bytes());

    // An independent dequantization of the same files gives the same model.
    let deq = common::tempdir();
    let (d, o) = (dst.path().to_str().unwrap(), deq.path().to_str().unwrap());
    reference(&["dequant-model", d, o]);
    let (independent, _) = logits(deq.path(), false, &toks);
    assert_bit_equal(&got, &independent, "ours against ml_dtypes' dequantization");
}

/// Every tensor of the model in `dir`: (name, dtype, shape, bytes).
type Tensors = Vec<(String, DType, Vec<usize>, Vec<u8>)>;

fn read_all(dir: &Path) -> Tensors {
    let index = ModelIndex::open(dir).unwrap();
    let infos: Vec<&TensorInfo> = index
        .statics()
        .iter()
        .chain(
            index
                .layers()
                .iter()
                .flat_map(|l| l.tensors.iter().map(|t| &t.info)),
        )
        .collect();
    infos
        .into_iter()
        .map(|t| {
            let b = common::models::read_tensor(&index, t);
            (t.name.clone(), t.dtype, t.shape.clone(), b)
        })
        .collect()
}

/// Writes `tensors` as `dir`'s one safetensors file, with the tokenizer of
/// `like` and its config.json with `quantization_config` set to `qc`.
fn write_dir(dir: &Path, like: &Path, tensors: &Tensors, qc: Option<Value>) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(like.join(f), dir.join(f)).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_slice(&std::fs::read(like.join("config.json")).unwrap()).unwrap();
    match qc {
        Some(q) => cfg["quantization_config"] = q,
        None => {
            cfg.as_object_mut().unwrap().remove("quantization_config");
        }
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    write_safetensors(&dir.join("model.safetensors"), tensors).unwrap();
}

/// The bf16 model's layer matrices quantized per channel (bf16 `[rows, 1]`
/// scales) or per tensor (one f32 `[]` scale), as compressed-tensors stores them.
fn compressed(bf16: &Tensors, per_channel: bool) -> Tensors {
    let mut out = Tensors::new();
    for (name, dtype, shape, bytes) in bf16 {
        if !(name.contains(".layers.") && shape.len() == 2) {
            out.push((name.clone(), *dtype, shape.clone(), bytes.clone()));
            continue;
        }
        let values: Vec<f32> = bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        let (rows, cols) = (shape[0] as u64, shape[1] as u64);
        let layout = if per_channel {
            ScaleLayout::PerChannel
        } else {
            ScaleLayout::PerTensor
        };
        let l = Fp8Layout::new(DType::F8E4M3, rows, cols, DType::F32, layout).unwrap();
        let (codes, scales) = fp8::quantize_e4m3(&values, &l).unwrap();
        out.push((name.clone(), DType::F8E4M3, shape.clone(), codes));
        let (sdt, sshape, sbytes) = if per_channel {
            let b = scales
                .iter()
                .flat_map(|s| half::bf16::from_f32(*s).to_le_bytes());
            (DType::BF16, vec![rows as usize, 1], b.collect())
        } else {
            (DType::F32, vec![], scales[0].to_le_bytes().to_vec())
        };
        out.push((format!("{name}_scale"), sdt, sshape, sbytes));
    }
    out
}

fn compressed_config(strategy: &str) -> Value {
    json!({
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": { "group_0": {
            "targets": ["Linear"],
            "weights": { "num_bits": 8, "type": "float", "strategy": strategy, "symmetric": true },
        }},
        "ignore": ["lm_head"],
    })
}

#[test]
fn compressed_tensors_checkpoints_run_per_channel_and_per_tensor() {
    let mut rng = common::rng("compressed_tensors_checkpoints_run_per_channel_and_per_tensor");
    let src = common::tempdir();
    bf16_model(src.path(), &mut rng);
    let bf16 = read_all(src.path());
    let toks = tokens(&mut rng);
    let (want, _) = logits(src.path(), false, &toks);
    for (per_channel, strategy, layout) in [
        (true, "channel", ScaleLayout::PerChannel),
        (false, "tensor", ScaleLayout::PerTensor),
    ] {
        let dir = common::tempdir();
        write_dir(
            dir.path(),
            src.path(),
            &compressed(&bf16, per_channel),
            Some(compressed_config(strategy)),
        );
        let index = ModelIndex::open(dir.path()).unwrap();
        let up = index.tensor("model.layers.1.mlp.up_proj.weight").unwrap();
        assert_eq!(up.scale.as_ref().map(|s| s.layout), Some(layout));
        let (got, _) = logits(dir.path(), false, &toks);
        let err = worst(&got, &want);
        eprintln!("compressed-tensors {strategy}: worst rel_l2 {err:.4}");
        assert!(err > 0.0 && err < FP8_TOL, "{strategy}: rel_l2 {err}");
        let (raw, _) = logits(dir.path(), true, &toks);
        assert_bit_equal(&raw, &got, strategy);
        let deq = common::tempdir();
        let (d, o) = (dir.path().to_str().unwrap(), deq.path().to_str().unwrap());
        reference(&["dequant-model", d, o]);
        let (independent, _) = logits(deq.path(), false, &toks);
        assert_bit_equal(&got, &independent, strategy);
    }
}

/// Opening `tensors` with `qc` fails with a model error about `file` whose
/// message contains each of `needles`.
fn refused(like: &Path, tensors: &Tensors, qc: Option<Value>, file: &str, needles: &[&str]) {
    let dir = common::tempdir();
    write_dir(dir.path(), like, tensors, qc.clone());
    match ModelIndex::open(dir.path()) {
        Err(Error::Model { path, msg }) => {
            assert!(
                path.ends_with(file),
                "{qc:?}: error about {}: {msg}",
                path.display()
            );
            for n in needles {
                assert!(msg.contains(n), "{qc:?}: {msg:?} lacks {n:?}");
            }
        }
        other => panic!(
            "{qc:?} {needles:?}: expected a model error, got {:?}",
            other.map(|_| ())
        ),
    }
}

/// Unknown method, block size other than 128, a compressed-tensors format
/// that is not FP8: errors naming config.json and the field.
fn refused_configs(dir: &Path, good: &Tensors, qc: &Value) {
    let cfg = "config.json";
    let mut q = qc.clone();
    q["quant_method"] = json!("awq");
    refused(dir, good, Some(q), cfg, &["quant_method \"awq\""]);
    let mut q = qc.clone();
    q["weight_block_size"] = json!([64, 64]);
    refused(
        dir,
        good,
        Some(q),
        cfg,
        &["weight_block_size", "[64,64]", "128"],
    );
    let mut q = qc.clone();
    q.as_object_mut().unwrap().remove("weight_block_size");
    refused(dir, good, Some(q), cfg, &["weight_block_size"]);
    let mut q = compressed_config("channel");
    q["format"] = json!("pack-quantized");
    refused(dir, good, Some(q), cfg, &["pack-quantized"]);
    let mut q = compressed_config("group");
    q["format"] = json!("float-quantized");
    refused(dir, good, Some(q), cfg, &["strategy \"group\""]);
}

#[test]
fn bad_fp8_checkpoints_are_errors_naming_file_and_tensor() {
    let mut rng = common::rng("bad_fp8_checkpoints_are_errors_naming_file_and_tensor");
    let (src, dst) = (common::tempdir(), common::tempdir());
    bf16_model(src.path(), &mut rng);
    quantize_fp8(src.path(), dst.path(), &mut |_, _| {}).unwrap();
    let good = read_all(dst.path());
    let qc: Value =
        serde_json::from_slice::<Value>(&std::fs::read(dst.path().join("config.json")).unwrap())
            .unwrap()["quantization_config"]
            .clone();
    let layer = rng.gen_range(0..2);
    let key = ["self_attn.q_proj", "mlp.down_proj", "mlp.gate_proj"][rng.gen_range(0..3)];
    let weight = format!("model.layers.{layer}.{key}.weight");
    let scale = format!("{weight}_scale_inv");
    let st = "model.safetensors";

    // The scale is missing.
    let without: Tensors = good.iter().filter(|t| t.0 != scale).cloned().collect();
    refused(
        dst.path(),
        &without,
        Some(qc.clone()),
        st,
        &[&weight, &scale, "missing"],
    );
    // The scale has one block column too many.
    let mut wrong = good.clone();
    let s = wrong.iter_mut().find(|t| t.0 == scale).unwrap();
    let rows = s.2[0];
    s.2[1] += 1;
    s.3.extend(vec![0u8; 4 * rows]);
    refused(
        dst.path(),
        &wrong,
        Some(qc.clone()),
        st,
        &[&weight, &scale, "128x128 blocks"],
    );
    // A scale of an integer type.
    let mut int = good.clone();
    int.iter_mut().find(|t| t.0 == scale).unwrap().1 = DType::I32;
    refused(dst.path(), &int, Some(qc.clone()), st, &[&weight, "i32"]);
    // No quantization_config at all.
    refused(
        dst.path(),
        &good,
        None,
        st,
        &[".weight is f8_e4m3", "quantization_config"],
    );
    refused_configs(dst.path(), &good, &qc);

    // FP8 weights dequantize to bf16 or f16 only.
    let index = ModelIndex::open(dst.path()).unwrap();
    let e = LayerStreamer::builder(&index)
        .device(Device::Host)
        .dtype(DType::F32)
        .build()
        .err()
        .expect("an f32 compute dtype is refused");
    assert!(e.to_string().contains("f8_e4m3 128x128 blocks"), "{e}");
}

#[test]
fn quantize_cli_writes_an_fp8_model_that_reloads() {
    let Some(bin) = common::cli_binary() else {
        eprintln!("skipping: no layer-streamer binary");
        return;
    };
    let mut rng = common::rng("quantize_cli_writes_an_fp8_model_that_reloads");
    let (src, dst) = (common::tempdir(), common::tempdir());
    bf16_model(src.path(), &mut rng);
    let out = Command::new(&bin)
        .args([
            "quantize",
            src.path().to_str().unwrap(),
            dst.path().to_str().unwrap(),
        ])
        .args(["--type", "fp8"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("quantized to f8_e4m3"), "{stdout}");
    let index = ModelIndex::open(dst.path()).unwrap();
    let n = index
        .layers()
        .iter()
        .flat_map(|l| &l.tensors)
        .filter(|t| t.info.scale.is_some())
        .count();
    assert_eq!(n, 2 * 7, "seven matrices per layer");
    let cfg = index.config().unwrap();
    assert_eq!(
        cfg["quantization_config"]["weight_block_size"],
        json!([128, 128])
    );

    let out = Command::new(&bin)
        .args([
            "quantize",
            src.path().to_str().unwrap(),
            dst.path().to_str().unwrap(),
        ])
        .args(["--type", "q9_9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("q9_9"));
}
