//! `synth --format gguf`: random quantized GGUF files of every block type
//! that read the same in our parser and the `gguf` Python package and run;
//! the 70b preset.

mod common;
#[path = "common/gguf_tools.rs"]
mod gguf_tools;

use gguf_tools::{describe, expected_type, logits, random_text};
use layer_streamer::gguf::GgufFile;
use layer_streamer::llm::Tokenizer;
use layer_streamer::quant::QuantType;
use layer_streamer::synth::{write_gguf, Arch, Shape, SynthGgufSpec};
use layer_streamer::ModelIndex;
use rand::Rng;

/// `synth --format gguf`: random blocks of every block type in the file,
/// read the same by our parser and the `gguf` package, runnable (finite
/// logits), with the synthetic tokenizer in its metadata; a seed gives the
/// same bytes and another seed others.
#[test]
fn synthetic_gguf_models_of_every_block_type_read_and_run() {
    let mut rng = common::rng("synthetic_gguf_models_of_every_block_type");
    let dir = common::tempdir();
    let block_types = QuantType::ALL.into_iter().filter(|t| t.is_quantized());
    for ty in block_types {
        let arch = if rng.gen_bool(0.5) {
            Arch::Llama
        } else {
            Arch::Qwen2
        };
        let spec = SynthGgufSpec {
            arch,
            shape: Shape {
                hidden: 256,
                intermediate: if rng.gen_bool(0.5) { 512 } else { 544 },
                layers: 2,
                heads: 4,
                kv_heads: 2,
                vocab: 384,
            },
            ty,
            tie: rng.gen_bool(0.5),
            seed: rng.gen(),
        };
        let path = dir.path().join(format!("{ty}.gguf"));
        let mut last = (0, 0);
        write_gguf(&path, &spec, &mut |d, t| last = (d, t)).unwrap();
        assert!(last.0 == last.1 && last.1 > 0, "{last:?}");
        let f = GgufFile::open(&path).unwrap();
        let py = describe(&path);
        let theirs = py["tensors"].as_array().unwrap();
        assert_eq!(f.tensors.len(), theirs.len());
        for (t, p) in f.tensors.iter().zip(theirs) {
            assert_eq!(
                t.ty,
                expected_type(ty, &t.name, &t.dims),
                "{ty}: {}",
                t.name
            );
            assert_eq!(
                (p["name"].as_str(), &p["type"]),
                (Some(t.name.as_str()), &t.ty.ggml_type_id().into())
            );
        }
        assert_eq!(f.architecture(), Some(arch.model_type()));
        let prompt: Vec<u32> = (0..6).map(|_| rng.gen_range(0..384)).collect();
        let out = logits(&path, &[prompt]);
        assert!(
            out[0].iter().all(|x| x.is_finite()),
            "{ty}: logits not finite"
        );
        // The tokenizer is the synthetic one.
        let tok_dir = dir.path().join(format!("tok-{ty}"));
        std::fs::create_dir_all(&tok_dir).unwrap();
        layer_streamer::synth::write_tokenizer(&tok_dir, arch, 384).unwrap();
        let want = Tokenizer::from_dir(&tok_dir).unwrap();
        let got = Tokenizer::for_model(&ModelIndex::open(&path).unwrap()).unwrap();
        let text = random_text(&mut rng, &["<|im_end|>"]);
        assert_eq!(
            got.encode(&text, true).unwrap(),
            want.encode(&text, true).unwrap()
        );
        // Deterministic in the seed.
        let again = dir.path().join("again.gguf");
        write_gguf(&again, &spec, &mut |_, _| {}).unwrap();
        assert!(
            std::fs::read(&again).unwrap() == std::fs::read(&path).unwrap(),
            "{ty}"
        );
        let other = SynthGgufSpec {
            seed: spec.seed ^ 1,
            ..spec.clone()
        };
        write_gguf(&again, &other, &mut |_, _| {}).unwrap();
        assert!(
            std::fs::read(&again).unwrap() != std::fs::read(&path).unwrap(),
            "{ty}"
        );
    }
}

#[test]
fn the_70b_preset_has_llama_3_70b_shapes() {
    let s = Shape::preset("70b").unwrap();
    let want = (8192, 28672, 80, 64, 8, 128256);
    assert_eq!(
        (
            s.hidden,
            s.intermediate,
            s.layers,
            s.heads,
            s.kv_heads,
            s.vocab
        ),
        want
    );
    // Every matrix is whole Q4_K blocks, as in the real model's Q4_K_M files.
    for (name, shape) in layer_streamer::synth::tensor_specs(Arch::Llama, &s, false) {
        let row = *shape.last().unwrap() as u64;
        assert_eq!(row % 256, 0, "{name}");
    }
}
