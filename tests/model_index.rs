//! ModelIndex over synthetic and hand-built checkpoints, checked against the
//! `safetensors` crate's own deserialisation and against the bytes on disk.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use layer_streamer::checkpoint::{ModelIndex, ModelParts, PartTensor, READ_ALIGN};
use layer_streamer::io::{AlignedBuf, DirectFile, OpenMode};
use layer_streamer::synth::{tensor_specs, write_safetensors, Arch, Shape};
use layer_streamer::DType;
use safetensors::SafeTensors;

/// Checks every tensor of the index against safetensors' view of its file,
/// and every layer's read plan by executing it and comparing the slot.
fn check_against_disk(index: &ModelIndex) {
    let files: Vec<Vec<u8>> = index
        .files()
        .iter()
        .map(|f| std::fs::read(&f.path).unwrap())
        .collect();
    let parsed: Vec<SafeTensors> = files
        .iter()
        .map(|b| SafeTensors::deserialize(b).unwrap())
        .collect();
    let mut seen = 0;
    let all = index.statics().iter().chain(
        index
            .layers()
            .iter()
            .flat_map(|l| l.tensors.iter().map(|t| &t.info)),
    );
    for t in all {
        let view = parsed[t.file].tensor(&t.name).unwrap();
        assert_eq!(view.shape(), &t.shape[..], "{}", t.name);
        assert_eq!(
            format!("{:?}", view.dtype()),
            t.dtype.safetensors_name(),
            "{}",
            t.name
        );
        let ours = &files[t.file][t.file_offset as usize..(t.file_offset + t.len) as usize];
        assert_eq!(ours, view.data(), "{}", t.name);
        assert_eq!(index.tensor(&t.name), Some(t));
        seen += 1;
    }
    assert_eq!(seen, parsed.iter().map(|p| p.len()).sum::<usize>());
    let opened: Vec<DirectFile> = index
        .files()
        .iter()
        .map(|f| DirectFile::open(&f.path, OpenMode::Auto).unwrap())
        .collect();
    let mut slot = AlignedBuf::new(index.max_slot_bytes() as usize).unwrap();
    for layer in index.layers() {
        assert!(layer.slot_bytes <= index.max_slot_bytes());
        for r in &layer.reads {
            assert_eq!(
                (
                    r.file_offset % READ_ALIGN,
                    r.len % READ_ALIGN,
                    r.slot_offset % READ_ALIGN
                ),
                (0, 0, 0)
            );
            let dst =
                &mut slot.as_mut_slice()[r.slot_offset as usize..(r.slot_offset + r.len) as usize];
            opened[r.file]
                .read_aligned(r.file_offset, dst, r.required_end)
                .unwrap();
        }
        for t in &layer.tensors {
            let got =
                &slot.as_slice()[t.slot_offset as usize..(t.slot_offset + t.info.len) as usize];
            assert_eq!(
                got,
                parsed[t.info.file].tensor(&t.info.name).unwrap().data(),
                "{}",
                t.info.name
            );
        }
    }
}

#[test]
fn sharded_qwen2_matches_safetensors() {
    let seed = common::seed("sharded_qwen2_matches_safetensors");
    let dir = common::tempdir();
    common::models::synth(
        dir.path(),
        Arch::Qwen2,
        "tiny",
        DType::BF16,
        false,
        400_000,
        seed,
    );
    let index = ModelIndex::open(dir.path()).unwrap();
    assert!(index.files().len() >= 4, "{} shards", index.files().len());
    assert_eq!(index.num_layers(), 3);
    assert_eq!(index.layer_prefix(), "model.layers");
    assert_eq!(index.dtypes(), vec![DType::BF16]);
    let shape = Shape::preset("tiny").unwrap();
    let want: BTreeMap<String, Vec<usize>> = tensor_specs(Arch::Qwen2, &shape, false)
        .into_iter()
        .filter_map(|(n, s)| {
            n.strip_prefix("model.layers.0.")
                .map(|k| (k.to_string(), s))
        })
        .collect();
    assert_eq!(want.len(), 12);
    for layer in index.layers() {
        let got: BTreeMap<String, Vec<usize>> = layer
            .tensors
            .iter()
            .map(|t| (t.key.clone(), t.info.shape.clone()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            layer.data_bytes,
            want.values()
                .map(|s| s.iter().product::<usize>() as u64 * 2)
                .sum::<u64>()
        );
    }
    let statics: Vec<&str> = index.statics().iter().map(|t| t.name.as_str()).collect();
    let mut sorted = statics.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "lm_head.weight",
            "model.embed_tokens.weight",
            "model.norm.weight"
        ]
    );
    assert_eq!(index.config().unwrap()["num_hidden_layers"], 3);
    check_against_disk(&index);
}

#[test]
fn tied_llama_f16_single_file_is_one_read_per_layer() {
    let seed = common::seed("tied_llama_f16_single_file_is_one_read_per_layer");
    let dir = common::tempdir();
    common::models::synth(
        dir.path(),
        Arch::Llama,
        "tiny",
        DType::F16,
        true,
        4_000_000_000,
        seed,
    );
    let index = ModelIndex::open(dir.path()).unwrap();
    assert_eq!(index.files().len(), 1);
    assert!(index.files()[0].path.ends_with("model.safetensors"));
    assert_eq!(index.dtypes(), vec![DType::F16]);
    assert!(index.tensor("lm_head.weight").is_none());
    assert_eq!(index.statics().len(), 2);
    for l in index.layers() {
        assert_eq!(l.tensors.len(), 9);
        assert!(l.tensors.iter().all(|t| !t.key.ends_with(".bias")));
        assert_eq!(l.reads.len(), 1, "layer {} is contiguous", l.index);
    }
    assert_eq!(index.config().unwrap()["tie_word_embeddings"], true);
    check_against_disk(&index);
}

#[test]
fn f32_and_deterministic_across_threads_and_shards() {
    let seed = common::seed("f32_and_deterministic_across_threads_and_shards");
    let (a, b) = (common::tempdir(), common::tempdir());
    common::models::synth(
        a.path(),
        Arch::Llama,
        "tiny",
        DType::F32,
        false,
        1 << 40,
        seed,
    );
    let spec = layer_streamer::synth::SynthSpec {
        arch: Arch::Llama,
        shape: Shape::preset("tiny").unwrap(),
        dtype: DType::F32,
        tie: false,
        shard_size: 1_000_000,
        seed,
        threads: 1,
    };
    layer_streamer::synth::write_model(b.path(), &spec).unwrap();
    let (ia, ib) = (
        ModelIndex::open(a.path()).unwrap(),
        ModelIndex::open(b.path()).unwrap(),
    );
    assert_eq!(ia.dtypes(), vec![DType::F32]);
    assert!(ib.files().len() > 1);
    let read = |i: &ModelIndex, name: &str| {
        let t = i.tensor(name).unwrap();
        let bytes = std::fs::read(&i.files()[t.file].path).unwrap();
        bytes[t.file_offset as usize..(t.file_offset + t.len) as usize].to_vec()
    };
    for t in ia.statics().iter().chain(
        ia.layers()
            .iter()
            .flat_map(|l| l.tensors.iter().map(|t| &t.info)),
    ) {
        assert_eq!(read(&ia, &t.name), read(&ib, &t.name), "{}", t.name);
    }
    check_against_disk(&ib);
}

/// Writes tensors with random contents; returns them by name.
fn write_random(path: &Path, rng: &mut rand::rngs::StdRng, tensors: &[(&str, Vec<usize>)]) {
    let list: Vec<_> = tensors
        .iter()
        .map(|(n, s)| {
            (
                n.to_string(),
                DType::BF16,
                s.clone(),
                common::bytes(rng, s.iter().product::<usize>() * 2),
            )
        })
        .collect();
    write_safetensors(path, &list).unwrap();
}

#[test]
fn gpt2_style_names() {
    let mut rng = common::rng("gpt2_style_names");
    let dir = common::tempdir();
    let mut ts = vec![
        ("transformer.wte.weight", vec![64, 16]),
        ("transformer.ln_f.weight", vec![16]),
    ];
    let names: Vec<String> = (0..4)
        .flat_map(|i| {
            [
                format!("transformer.h.{i}.attn.c_attn.weight"),
                format!("transformer.h.{i}.ln_1.weight"),
            ]
        })
        .collect();
    for (j, n) in names.iter().enumerate() {
        ts.push((n.as_str(), if j % 2 == 0 { vec![48, 16] } else { vec![16] }));
    }
    write_random(&dir.path().join("model.safetensors"), &mut rng, &ts);
    let index = ModelIndex::open(dir.path()).unwrap();
    assert_eq!(
        (index.layer_prefix(), index.num_layers()),
        ("transformer.h", 4)
    );
    assert_eq!(
        index.layers()[2]
            .tensors
            .iter()
            .map(|t| t.key.as_str())
            .collect::<Vec<_>>(),
        ["attn.c_attn.weight", "ln_1.weight"]
    );
    check_against_disk(&index);
}

/// A language model nested in a multimodal one, beside a smaller vision tower.
#[test]
fn nested_prefix_beside_a_vision_tower() {
    let mut rng = common::rng("nested_prefix_beside_a_vision_tower");
    let dir = common::tempdir();
    let mut names = Vec::new();
    for i in 0..3 {
        names.push((
            format!("model.language_model.layers.{i}.mlp.up_proj.weight"),
            vec![64, 32],
        ));
        names.push((
            format!("model.language_model.layers.{i}.input_layernorm.weight"),
            vec![32],
        ));
    }
    for i in 0..5 {
        names.push((
            format!("model.vision_tower.blocks.{i}.proj.weight"),
            vec![8, 8],
        ));
    }
    names.push((
        "model.language_model.embed_tokens.weight".into(),
        vec![100, 32],
    ));
    let ts: Vec<(&str, Vec<usize>)> = names.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
    write_random(
        &dir.path().join("weights-a.safetensors"),
        &mut rng,
        &ts[..4],
    );
    write_random(
        &dir.path().join("weights-b.safetensors"),
        &mut rng,
        &ts[4..],
    );
    let index = ModelIndex::open(dir.path()).unwrap();
    assert_eq!(
        (index.layer_prefix(), index.num_layers()),
        ("model.language_model.layers", 3)
    );
    assert_eq!(index.files().len(), 2);
    assert_eq!(index.statics().len(), 6);
    check_against_disk(&index);
}

/// Dense first layer, mixture-of-experts after: slots fit the largest layer.
#[test]
fn dense_first_layer_then_experts() {
    let mut rng = common::rng("dense_first_layer_then_experts");
    let dir = common::tempdir();
    let mut names = vec![(
        "model.layers.0.mlp.up_proj.weight".to_string(),
        vec![128, 32],
    )];
    for i in 1..3 {
        for e in 0..4 {
            names.push((
                format!("model.layers.{i}.mlp.experts.{e}.up_proj.weight"),
                vec![64, 32],
            ));
        }
    }
    let ts: Vec<(&str, Vec<usize>)> = names.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
    write_random(&dir.path().join("model.safetensors"), &mut rng, &ts);
    let index = ModelIndex::open(dir.path()).unwrap();
    assert_eq!(index.num_layers(), 3);
    assert_eq!(index.layers()[0].tensors.len(), 1);
    assert_eq!(index.layers()[1].tensors.len(), 4);
    assert_eq!(
        index.max_slot_bytes(),
        index.layers().iter().map(|l| l.slot_bytes).max().unwrap()
    );
    assert!(index.layers()[1].slot_bytes > index.layers()[0].slot_bytes);
    check_against_disk(&index);
}

#[test]
fn from_parts_matches_open() {
    let seed = common::seed("from_parts_matches_open");
    let dir = common::tempdir();
    common::models::synth(
        dir.path(),
        Arch::Qwen2,
        "tiny",
        DType::BF16,
        false,
        700_000,
        seed,
    );
    let opened = ModelIndex::open(dir.path()).unwrap();
    let files: Vec<_> = opened.files().iter().map(|f| f.path.clone()).collect();
    let data_offsets: Vec<u64> = opened.files().iter().map(|f| f.data_offset).collect();
    let mut tensors = BTreeMap::new();
    let all = opened.statics().iter().chain(
        opened
            .layers()
            .iter()
            .flat_map(|l| l.tensors.iter().map(|t| &t.info)),
    );
    for t in all {
        let part = PartTensor {
            file: t.file,
            offset: t.file_offset - data_offsets[t.file],
            shape: t.shape.clone(),
            dtype: t.dtype,
        };
        tensors.insert(t.name.clone(), part);
    }
    let layer_keys = opened.layers()[0]
        .tensors
        .iter()
        .map(|t| t.key.clone())
        .collect();
    let parts = ModelParts {
        files,
        data_offsets,
        tensors,
        layer_keys,
        layer_prefix: "model.layers".into(),
        num_layers: 3,
        config: None,
    };
    let built = ModelIndex::from_parts(parts.clone()).unwrap();
    assert_eq!(built.layers(), opened.layers());
    assert_eq!(built.statics(), opened.statics());
    assert_eq!(built.files(), opened.files());
    validated_like_open(parts);
}

/// Parts that [`ModelIndex::open`] would refuse: a tensor past the end of its
/// file, overlaps, a misaligned tensor, a missing layer key.
fn validated_like_open(parts: ModelParts) {
    let mut bad = parts.clone();
    bad.tensors.get_mut("model.norm.weight").unwrap().offset = u64::MAX / 2;
    let e = ModelIndex::from_parts(bad).unwrap_err().to_string();
    assert!(e.contains("model.norm.weight"), "{e}");
    let mut bad = parts.clone();
    let t = bad.tensors["model.layers.1.mlp.up_proj.weight"].clone();
    bad.tensors
        .insert("model.layers.1.mlp.extra.weight".into(), t);
    let e = ModelIndex::from_parts(bad).unwrap_err().to_string();
    assert!(
        e.contains("overlap") && e.contains("model.layers.1.mlp"),
        "{e}"
    );
    let mut bad = parts.clone();
    let t = bad
        .tensors
        .get_mut("model.layers.1.input_layernorm.weight")
        .unwrap();
    t.offset = if t.offset > 0 {
        t.offset - 1
    } else {
        t.offset + 1
    };
    let e = ModelIndex::from_parts(bad).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.1.input_layernorm.weight") && e.contains("multiple of 2"),
        "{e}"
    );
    let mut bad = parts;
    bad.layer_keys.push("mlp.missing.weight".into());
    let e = ModelIndex::from_parts(bad).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.mlp.missing.weight"), "{e}");
}
