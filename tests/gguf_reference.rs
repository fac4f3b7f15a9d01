//! GGUF reading, writing and dequantization checked against the `gguf` Python
//! package (llama.cpp's gguf-py, pinned in scripts/test-requirements.txt), an
//! independent implementation, through scripts/gguf_reference.py.

mod common;
#[path = "common/quant_blocks.rs"]
mod quant_blocks;

use std::path::{Path, PathBuf};
use std::process::Command;

use half::bf16;
use layer_streamer::gguf::{GgufFile, GgufModel, GgufWriter, MetaArray, MetaValue, ValueType};
use layer_streamer::quant::{self, QuantType};
use rand::Rng;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What `scripts/test-env WHAT` prints (a cached asset's path).
fn test_env(what: &str) -> PathBuf {
    common::assets::test_env(what)
}

/// Runs scripts/gguf_reference.py with `args`; returns its stdout.
fn reference(args: &[&str]) -> Vec<u8> {
    let out = Command::new(test_env("python"))
        .arg(root().join("scripts/gguf_reference.py"))
        .args(args)
        .output()
        .expect("running gguf_reference.py");
    assert!(
        out.status.success(),
        "gguf_reference.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn describe(path: &Path, values: bool) -> Value {
    let mut args = vec!["describe", path.to_str().unwrap()];
    if values {
        args.push("--values");
    }
    serde_json::from_slice(&reference(&args)).expect("describe prints JSON")
}

#[test]
fn host_dequantization_is_bit_exact_against_gguf_python() {
    let mut rng = common::rng("host_dequantization_is_bit_exact_against_gguf_python");
    let dir = tempfile::tempdir().unwrap();
    for ty in QuantType::ALL {
        let n_blocks = (4096 / ty.block_elems() as usize).max(64);
        let blocks = quant_blocks::random_blocks(ty, n_blocks, &mut rng);
        let n = n_blocks * ty.block_elems() as usize;
        let (src, dst) = (dir.path().join("blocks"), dir.path().join("f32"));
        std::fs::write(&src, &blocks).unwrap();
        reference(&[
            "dequant",
            ty.name(),
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
        ]);
        let want: Vec<f32> = std::fs::read(&dst)
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(want.len(), n, "{ty}: python wrote {} values", want.len());
        let mut got = vec![0f32; n];
        quant::dequantize_f32(ty, &blocks, &mut got).unwrap();
        let mut got16 = vec![bf16::ZERO; n];
        quant::dequantize_bf16(ty, &blocks, &mut got16).unwrap();
        for i in 0..n {
            assert_eq!(
                got[i].to_bits(),
                want[i].to_bits(),
                "{ty}: element {i} (block {}): ours {} python {}",
                i / ty.block_elems() as usize,
                got[i],
                want[i]
            );
            assert_eq!(got16[i], bf16::from_f32(want[i]), "{ty}: bf16 element {i}");
        }
    }
}

/// The quantizers that gguf-py implements (all but the K types) write the
/// same bytes as ours, on random rows with zero, tiny and large blocks. Zero
/// blocks are +0.0 only: numpy's min and max of mixed signed zeros are
/// unspecified.
#[test]
fn host_quantization_is_bit_exact_against_gguf_python() {
    let mut rng = common::rng("host_quantization_is_bit_exact_against_gguf_python");
    let dir = tempfile::tempdir().unwrap();
    let mut x = Vec::new();
    for _ in 0..512 {
        let scale = [0.0f32, 1e-6, 1e-3, 1.0, 30.0, 1000.0][rng.gen_range(0..6)];
        x.extend((0..32).map(|_| {
            if scale == 0.0 {
                0.0
            } else {
                rng.gen_range(-1.0f32..1.0) * scale
            }
        }));
    }
    let (src, dst) = (dir.path().join("f32"), dir.path().join("blocks"));
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&src, bytes).unwrap();
    for ty in QuantType::ALL.into_iter().filter(|t| t.block_elems() <= 32) {
        reference(&[
            "quantize",
            ty.name(),
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
        ]);
        let want = std::fs::read(&dst).unwrap();
        let got = quant::quantize(ty, &x).unwrap();
        assert_eq!(got.len(), want.len(), "{ty}: length");
        let bb = ty.block_bytes() as usize;
        for (i, (g, w)) in got.chunks(bb).zip(want.chunks(bb)).enumerate() {
            assert_eq!(
                g,
                w,
                "{ty}: block {i} of {:?}",
                &x[i * ty.block_elems() as usize..][..4]
            );
        }
    }
}

/// Whether gguf-py's JSON value `p` is our metadata value `v`. Floats go
/// through serde_json's parser, which may be one f64 ulp off: an f32 is
/// compared after rounding back to f32 (exact), an f64 to within 2 ulps.
fn same_value(p: &Value, v: &MetaValue) -> bool {
    match v {
        MetaValue::F32(x) => p
            .as_f64()
            .is_some_and(|y| (y as f32).to_bits() == x.to_bits()),
        MetaValue::F64(x) => p
            .as_f64()
            .is_some_and(|y| (y.to_bits() as i64 - x.to_bits() as i64).abs() <= 2),
        MetaValue::Bool(b) => p.as_bool() == Some(*b),
        MetaValue::String(s) => p.as_str() == Some(s.as_str()),
        // gguf-py flattens arrays of arrays.
        MetaValue::Array(a) if a.elem == ValueType::Array => {
            let leaves: Vec<MetaValue> = a.items.iter().flat_map(leaves).collect();
            p.as_array().is_some_and(|items| {
                items.len() == leaves.len()
                    && items.iter().zip(&leaves).all(|(p, v)| same_value(p, v))
            })
        }
        MetaValue::Array(a) => p.as_array().is_some_and(|items| {
            items.len() == a.items.len()
                && items.iter().zip(&a.items).all(|(p, v)| same_value(p, v))
        }),
        other => match other.as_i64() {
            Some(i) => p.as_i64() == Some(i),
            None => p.as_u64() == other.as_u64(),
        },
    }
}

/// The non-array values inside `v`, depth first.
fn leaves(v: &MetaValue) -> Vec<MetaValue> {
    match v {
        MetaValue::Array(a) => a.items.iter().flat_map(leaves).collect(),
        other => vec![other.clone()],
    }
}

/// gguf-py's list of type tags: the value's, then each nested array's element type
/// (none for an empty array).
fn type_tags(v: &MetaValue) -> Vec<u64> {
    let mut tags = vec![v.value_type() as u64];
    if let MetaValue::Array(a) = v {
        match a.items.first() {
            Some(first @ MetaValue::Array(_)) => tags.extend(type_tags(first)),
            Some(_) => tags.push(a.elem as u64),
            // gguf-py reads an empty array's element type but lists none.
            None => {}
        }
    }
    tags
}

/// Every field and tensor of `f` is what gguf-py read from the same file.
fn assert_same_as_reference(f: &GgufFile, py: &Value) {
    assert_eq!(py["version"], f.version, "{}: version", f.path.display());
    assert_eq!(py["alignment"], f.alignment, "alignment");
    let fields = py["fields"].as_object().unwrap();
    assert_eq!(fields.len(), f.metadata.len(), "number of metadata keys");
    for (key, value) in &f.metadata {
        let p = &fields[key.as_str()];
        assert_eq!(p["types"], Value::from(type_tags(value)), "{key}: types");
        if !p["value"].is_null() {
            assert!(
                same_value(&p["value"], value),
                "{key}: python {} ours {value:?}",
                p["value"]
            );
        }
    }
    let tensors = py["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), f.tensors.len(), "number of tensors");
    for (t, p) in f.tensors.iter().zip(tensors) {
        assert_eq!(p["name"], t.name.as_str());
        assert_eq!(p["type"], t.ty.ggml_type_id(), "{}: type", t.name);
        assert_eq!(p["dims"], Value::from(t.dims.clone()), "{}: dims", t.name);
        assert_eq!(p["offset"], t.file_offset, "{}: file offset", t.name);
        assert_eq!(p["n_bytes"], t.len, "{}: bytes", t.name);
        assert_eq!(p["n_elements"], t.elems, "{}: elements", t.name);
    }
}

#[test]
fn smollm2_gguf_reads_as_gguf_python_reads_it() {
    let path = test_env("smollm2");
    let model = GgufModel::open(&path).unwrap();
    assert_eq!(model.parts.len(), 1);
    let f = model.first();
    assert_same_as_reference(f, &describe(&path, false));
    // The keys the model and tokenizer need are read, with their types.
    assert_eq!(model.architecture().unwrap(), "llama");
    for key in [
        "llama.block_count",
        "llama.embedding_length",
        "llama.attention.head_count",
    ] {
        assert!(model.metadata_u64(key).unwrap() > 0, "{key}");
    }
    model
        .metadata_f64("llama.attention.layer_norm_rms_epsilon")
        .unwrap();
    let tokens = model.metadata_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.elem, ValueType::String);
    assert_eq!(
        tokens.items.len() as u64,
        model.tensor("token_embd.weight").unwrap().1.dims[1]
    );
    // Every tensor decodes to finite bf16 on the host, fast enough for CI.
    let bytes = std::fs::read(&path).unwrap();
    let start = std::time::Instant::now();
    let mut elems = 0;
    for t in &f.tensors {
        let data = &bytes[t.file_offset as usize..(t.file_offset + t.len) as usize];
        let mut out = vec![bf16::ZERO; t.elems as usize];
        quant::dequantize_bf16(t.ty, data, &mut out).unwrap();
        assert!(out.iter().all(|x| x.is_finite()), "{}: not finite", t.name);
        elems += t.elems;
    }
    eprintln!(
        "dequantized {elems} elements to bf16 in {:?}",
        start.elapsed()
    );
    let e = model.metadata_u64("tokenizer.ggml.model").unwrap_err();
    assert!(
        e.to_string()
            .contains("tokenizer.ggml.model: expected a non-negative integer, found a string"),
        "{e}"
    );
}

/// Metadata of every scalar type, an integer array, a string array and a
/// nested array, with random values.
fn add_every_metadata_type(w: &mut GgufWriter, rng: &mut impl Rng) {
    let scalars = [
        MetaValue::U8(rng.gen()),
        MetaValue::I8(rng.gen()),
        MetaValue::U16(rng.gen()),
        MetaValue::I16(rng.gen()),
        MetaValue::U32(rng.gen()),
        MetaValue::I32(rng.gen()),
        MetaValue::F32(rng.gen()),
        MetaValue::Bool(rng.gen()),
        MetaValue::String("naïve ✓".into()),
        MetaValue::U64(rng.gen()),
        MetaValue::I64(rng.gen()),
        MetaValue::F64(rng.gen()),
    ];
    for (i, v) in scalars.iter().enumerate() {
        w.metadata(format!("test.scalar.{i}"), v.clone()).unwrap();
    }
    let ints: Vec<MetaValue> = (0..rng.gen_range(0..50))
        .map(|_| MetaValue::I32(rng.gen()))
        .collect();
    w.metadata(
        "test.ints",
        MetaValue::Array(MetaArray {
            elem: ValueType::I32,
            items: ints,
        }),
    )
    .unwrap();
    w.metadata(
        "test.strings",
        MetaValue::strings(["a", "", "<0x0A>", "Ġthe"]),
    )
    .unwrap();
    let inner = MetaValue::Array(MetaArray {
        elem: ValueType::U8,
        items: vec![MetaValue::U8(1)],
    });
    w.metadata(
        "test.nested",
        MetaValue::Array(MetaArray {
            elem: ValueType::Array,
            items: vec![inner],
        }),
    )
    .unwrap();
}

/// A file with every metadata type and a tensor of every type: what our
/// writer writes, gguf-py reads back the same, values included.
#[test]
fn written_gguf_reads_back_in_gguf_python() {
    let mut rng = common::rng("written_gguf_reads_back_in_gguf_python");
    let dir = tempfile::tempdir().unwrap();
    for alignment in [32u32, 64] {
        let mut w = GgufWriter::new();
        if alignment != 32 {
            w.metadata("general.alignment", MetaValue::U32(alignment))
                .unwrap();
        }
        add_every_metadata_type(&mut w, &mut rng);
        let mut data = Vec::new();
        for ty in QuantType::ALL {
            let dims = [ty.block_elems() * rng.gen_range(1..3), rng.gen_range(1..4)];
            let n = (dims[0] * dims[1]) as usize / ty.block_elems() as usize;
            w.tensor(format!("t.{}", ty.name()), ty, &dims).unwrap();
            data.push(quant_blocks::random_blocks(ty, n, &mut rng));
        }
        let path = dir.path().join(format!("written-{alignment}.gguf"));
        let mut out = w.create(&path).unwrap();
        for d in &data {
            out.write_tensor(d).unwrap();
        }
        out.finish().unwrap();

        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.alignment, alignment as u64);
        let py = describe(&path, true);
        assert_same_as_reference(&f, &py);
        for ((t, d), p) in f
            .tensors
            .iter()
            .zip(&data)
            .zip(py["tensors"].as_array().unwrap())
        {
            let mut ours = vec![0f32; t.elems as usize];
            quant::dequantize_f32(t.ty, d, &mut ours).unwrap();
            let theirs: Vec<f32> = p["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(
                ours.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                theirs.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{}: values",
                t.name
            );
        }
    }
}
