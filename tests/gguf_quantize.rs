//! `quantize`: a synthetic safetensors model converted to GGUF in each block
//! type runs on the host backend with logits close to the source's; the file
//! reads in the `gguf` Python package (an independent reader) with the
//! tensor types and metadata llama.cpp expects; its tokenizer encodes like
//! the source's; a GGUF source converts too; bad sources are explained.

mod common;
#[path = "common/gguf_tools.rs"]
mod gguf_tools;

use std::path::Path;
use std::process::Command;

use gguf_tools::{describe, expected_type, logits, random_text, read_json};
use layer_streamer::gguf::convert::{
    quantize_to_gguf, QuantizeOptions, QuantizeReport, TARGET_TYPES,
};
use layer_streamer::gguf::GgufFile;
use layer_streamer::llm::reference::rel_l2;
use layer_streamer::llm::Tokenizer;
use layer_streamer::quant::QuantType;
use layer_streamer::synth::{write_model, Arch, Shape, SynthSpec};
use layer_streamer::{DType, ModelIndex};
use rand::Rng;

/// A small model whose widths are whole Q4_K blocks, except (at random) the
/// MLP's, which are whole 32-blocks only: that tensor must fall back.
fn source(dir: &Path, arch: Arch, rng: &mut impl Rng) -> Shape {
    let shape = Shape {
        hidden: 256,
        intermediate: if rng.gen_bool(0.5) { 512 } else { 544 },
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 384,
    };
    let spec = SynthSpec {
        arch,
        shape,
        dtype: DType::BF16,
        tie: rng.gen_bool(0.5),
        shard_size: 1 << 30,
        seed: rng.gen(),
        threads: 1,
    };
    write_model(dir, &spec).expect("writing the source model");
    shape
}

fn quantize(src: &Path, dst: &Path, ty: QuantType) -> QuantizeReport {
    let opts = QuantizeOptions { ty, threads: 2 };
    let mut last = (0, 0);
    let report = quantize_to_gguf(src, dst, &opts, &mut |done, total| last = (done, total))
        .unwrap_or_else(|e| panic!("quantizing {} to {ty}: {e}", src.display()));
    assert!(
        last.1 > 0 && last.0 == last.1,
        "progress ends at the total: {last:?}"
    );
    report
}

/// Largest rel-L2 of the quantized model's last logits against the
/// source's (bf16) that each type may show on these random models: about
/// 1.5 times the worst seen over many seeds. The error grows as the bits
/// shrink, and the synthetic llama models amplify it about twice as much as
/// the qwen2 ones; q/k rows interleaved the wrong way, or a tensor swapped,
/// give about 1.
fn tolerance(arch: Arch, ty: QuantType) -> f64 {
    let qwen2 = match ty {
        QuantType::Q8_0 => 0.02,
        QuantType::Q6_K => 0.06,
        QuantType::Q4_K | QuantType::Q4_1 | QuantType::Q4_0 => 0.25,
        _ => unreachable!("not a quantize target"),
    };
    match arch {
        Arch::Qwen2 => qwen2,
        Arch::Llama => 2.0 * qwen2,
    }
}

#[test]
fn quantized_models_run_close_to_their_source() {
    let mut rng = common::rng("quantized_models_run_close_to_their_source");
    for arch in [Arch::Llama, Arch::Qwen2] {
        let dir = common::tempdir();
        let src = dir.path().join("src");
        let shape = source(&src, arch, &mut rng);
        let prompts: Vec<Vec<u32>> = (0..2)
            .map(|_| {
                (0..12)
                    .map(|_| rng.gen_range(0..shape.vocab as u32))
                    .collect()
            })
            .collect();
        let want = logits(&src, &prompts);
        for ty in [
            QuantType::Q8_0,
            QuantType::Q6_K,
            QuantType::Q4_K,
            QuantType::Q4_1,
            QuantType::Q4_0,
        ] {
            let dst = dir.path().join(format!("{ty}.gguf"));
            let report = quantize(&src, &dst, ty);
            let got = logits(&dst, &prompts);
            for (g, w) in got.iter().zip(&want) {
                let err = rel_l2(g, w);
                println!("{arch:?} {ty}: rel-L2 {err:.4}");
                assert!(
                    err < tolerance(arch, ty),
                    "{arch:?} {ty}: rel-L2 {err} of the logits"
                );
            }
            let index = ModelIndex::open(&dst).unwrap();
            assert_eq!(index.rope_interleaved(), arch == Arch::Llama);
            assert_eq!(report.arch, arch.model_type());
        }
    }
}

#[test]
fn the_gguf_package_reads_the_types_and_metadata_llama_cpp_expects() {
    let mut rng = common::rng("the_gguf_package_reads_the_types_and_metadata");
    for arch in [Arch::Llama, Arch::Qwen2] {
        let dir = common::tempdir();
        let src = dir.path().join("src");
        let shape = source(&src, arch, &mut rng);
        let ty = TARGET_TYPES[rng.gen_range(0..TARGET_TYPES.len())];
        let dst = dir.path().join("out.gguf");
        let report = quantize(&src, &dst, ty);
        let py = describe(&dst);
        let a = arch.model_type();
        let f = &py["fields"];
        let val = |k: &str| f[k]["value"].clone();
        let cfg = read_json(&src.join("config.json"));
        let tok_cfg = read_json(&src.join("tokenizer_config.json"));
        assert_eq!(py["version"], 3);
        assert_eq!(val("general.architecture"), a);
        for (key, want) in [
            ("block_count", shape.layers),
            ("embedding_length", shape.hidden),
            ("feed_forward_length", shape.intermediate),
            ("attention.head_count", shape.heads),
            ("attention.head_count_kv", shape.kv_heads),
            ("rope.dimension_count", shape.head_dim()),
            ("context_length", 4096),
        ] {
            assert_eq!(val(&format!("{a}.{key}")), want, "{a}.{key}");
        }
        assert_eq!(val(&format!("{a}.rope.freq_base")), cfg["rope_theta"]);
        assert_eq!(val("tokenizer.ggml.model"), "gpt2");
        assert_eq!(
            val("tokenizer.ggml.tokens").as_array().unwrap().len(),
            shape.vocab
        );
        assert_eq!(
            val("tokenizer.ggml.token_type").as_array().unwrap().len(),
            shape.vocab
        );
        assert!(!val("tokenizer.ggml.merges").as_array().unwrap().is_empty());
        let bos = &val("tokenizer.ggml.bos_token_id");
        assert_eq!(bos, &cfg["bos_token_id"], "{a}: bos");
        assert_eq!(
            val("tokenizer.ggml.eos_token_id"),
            cfg["eos_token_id"],
            "{a}: eos"
        );
        assert_eq!(val("tokenizer.ggml.add_bos_token"), arch == Arch::Llama);
        let eos_text =
            &val("tokenizer.ggml.tokens")[cfg["eos_token_id"].as_u64().unwrap() as usize];
        assert_eq!(eos_text, &tok_cfg["eos_token"]);
        assert_eq!(val("tokenizer.chat_template"), tok_cfg["chat_template"]);
        // Every tensor of the model, under llama.cpp's name, in the rule's type.
        let tensors = py["tensors"].as_array().unwrap();
        let per_layer = if arch == Arch::Qwen2 { 12 } else { 9 };
        let tied = ModelIndex::open(&src)
            .unwrap()
            .tensor("lm_head.weight")
            .is_none();
        assert_eq!(
            tensors.len(),
            shape.layers * per_layer + 3 - usize::from(tied)
        );
        for t in tensors {
            let name = t["name"].as_str().unwrap();
            let dims: Vec<u64> = serde_json::from_value(t["dims"].clone()).unwrap();
            let want = expected_type(ty, name, &dims);
            assert_eq!(t["type"], want.ggml_type_id(), "{ty}: {name} {dims:?}");
            let mine = report.tensors.iter().find(|w| w.name == name).unwrap();
            assert_eq!((mine.ty, &mine.dims), (want, &dims), "{name}");
        }
        for name in [
            "token_embd.weight",
            "output_norm.weight",
            "blk.1.attn_q.weight",
            "blk.0.ffn_down.weight",
        ] {
            assert!(
                tensors.iter().any(|t| t["name"] == name),
                "{name} is missing"
            );
        }
        let fallbacks = usize::from(shape.intermediate % 256 != 0 && ty.block_elems() == 256);
        assert_eq!(
            report.notes.len(),
            fallbacks * shape.layers,
            "{:?}",
            report.notes
        );
    }
}

#[test]
fn the_tokenizer_in_the_file_encodes_like_the_source() {
    let mut rng = common::rng("the_tokenizer_in_the_file_encodes_like_the_source");
    for arch in [Arch::Llama, Arch::Qwen2] {
        let dir = common::tempdir();
        let src = dir.path().join("src");
        source(&src, arch, &mut rng);
        let dst = dir.path().join("out.gguf");
        quantize(&src, &dst, QuantType::Q8_0);
        let want = Tokenizer::from_dir(&src).unwrap();
        let got = Tokenizer::for_model(&ModelIndex::open(&dst).unwrap()).unwrap();
        let specials: &[&str] = match arch {
            Arch::Llama => &["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>"],
            Arch::Qwen2 => &["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        };
        for _ in 0..200 {
            let text = random_text(&mut rng, specials);
            for add_special in [false, true] {
                let ids = want.encode(&text, add_special).unwrap();
                assert_eq!(
                    got.encode(&text, add_special).unwrap(),
                    ids,
                    "{arch:?} {text:?}"
                );
                assert_eq!(
                    got.decode(&ids).unwrap(),
                    want.decode(&ids).unwrap(),
                    "{text:?}"
                );
            }
        }
    }
}

#[test]
fn a_gguf_source_requantizes_with_its_metadata() {
    let mut rng = common::rng("a_gguf_source_requantizes_with_its_metadata");
    let arch = if rng.gen_bool(0.5) {
        Arch::Llama
    } else {
        Arch::Qwen2
    };
    let dir = common::tempdir();
    let src = dir.path().join("src");
    let shape = source(&src, arch, &mut rng);
    let q8 = dir.path().join("q8_0.gguf");
    let q4 = dir.path().join("q4_k.gguf");
    quantize(&src, &q8, QuantType::Q8_0);
    let report = quantize(&q8, &q4, QuantType::Q4_K);
    let (a, b) = (GgufFile::open(&q8).unwrap(), GgufFile::open(&q4).unwrap());
    for (k, v) in &a.metadata {
        if k != "general.file_type" {
            assert_eq!(b.get(k), Some(v), "{k} carried over");
        }
    }
    assert_eq!(
        b.get("general.file_type").and_then(|v| v.as_u64()),
        Some(15)
    );
    assert_eq!(b.tensors.len(), a.tensors.len());
    for t in &b.tensors {
        assert_eq!(
            t.ty,
            expected_type(QuantType::Q4_K, &t.name, &t.dims),
            "{}",
            t.name
        );
    }
    assert_eq!(report.tensors.len(), b.tensors.len());
    // The rows are already in llama.cpp's order: not interleaved twice.
    let prompt: Vec<u32> = (0..12)
        .map(|_| rng.gen_range(0..shape.vocab as u32))
        .collect();
    let want = logits(&src, std::slice::from_ref(&prompt));
    let got = logits(&q4, &[prompt]);
    let err = rel_l2(&got[0], &want[0]);
    assert!(
        err < tolerance(arch, QuantType::Q4_K),
        "{arch:?}: rel-L2 {err}"
    );
}

#[test]
fn bad_sources_and_types_are_explained() {
    let mut rng = common::rng("bad_sources_and_types_are_explained");
    let dir = common::tempdir();
    let src = dir.path().join("src");
    source(&src, Arch::Qwen2, &mut rng);
    let dst = dir.path().join("out.gguf");
    let run = |ty| {
        let opts = QuantizeOptions { ty, threads: 1 };
        quantize_to_gguf(&src, &dst, &opts, &mut |_, _| {}).map(|_| ())
    };
    let e = run(QuantType::Q5_K).unwrap_err().to_string();
    assert!(e.contains("--type q5_k") && e.contains("q4_k"), "{e}");

    let cfg_path = src.join("config.json");
    let mut cfg = read_json(&cfg_path);
    cfg["model_type"] = "gemma2".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = run(QuantType::Q8_0).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("gemma2"), "{e}");
    cfg["model_type"] = "qwen2".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();

    let tok = src.join("tokenizer.json");
    let mut t = read_json(&tok);
    t["model"]["type"] = "Unigram".into();
    std::fs::write(&tok, t.to_string()).unwrap();
    let e = run(QuantType::Q8_0).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("byte-level BPE"),
        "{e}"
    );
    std::fs::remove_file(&tok).unwrap();
    let e = run(QuantType::Q8_0).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");
    assert!(!dst.exists() && !dir.path().join("out.gguf.part").exists());
}

#[test]
fn the_command_line_quantizes_and_refuses_unknown_types() {
    let Some(bin) = common::cli_binary() else {
        panic!("the layer-streamer binary is not built");
    };
    let mut rng = common::rng("the_command_line_quantizes");
    let dir = common::tempdir();
    let src = dir.path().join("src");
    source(&src, Arch::Llama, &mut rng);
    let dst = dir.path().join("cli.gguf");
    let out = Command::new(&bin)
        .args([
            "quantize",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
            "--type",
            "q4_k",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("wrote") && stdout.contains("Q4_K"),
        "{stdout}"
    );
    assert_eq!(GgufFile::open(&dst).unwrap().architecture(), Some("llama"));
    let out = Command::new(&bin)
        .args([
            "quantize",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
            "--type",
            "q3_k",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--type \"q3_k\"") && stderr.contains("q8_0"),
        "{stderr}"
    );
}
