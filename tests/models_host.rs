//! The generation path on the host backend: against Hugging Face logits
//! (checked-in fixtures), batch and KV-cache invariants, tokenizer and chat
//! template, and bad input.

use std::path::Path;

use layer_streamer::llm::reference::{check, rel_l2, teacher_forced, Reference};
use layer_streamer::llm::{
    generate, ChatTemplate, GenerateParams, LlamaModel, Message, ModelOptions, TextStream,
    Tokenizer,
};
use layer_streamer::synth::{write_model, Arch, Shape, SynthSpec};
use layer_streamer::{DType, Device, Error, LayerStreamer, ModelIndex};
use rand::Rng;

mod common;

fn synth(dir: &Path, arch: Arch, tie: bool, seed: u64, dtype: DType) {
    write_model(
        dir,
        &SynthSpec {
            arch,
            shape: Shape::preset("tiny").unwrap(),
            dtype,
            tie,
            shard_size: 4_000_000_000,
            seed,
            threads: 2,
        },
    )
    .unwrap();
}

fn streamer(index: &ModelIndex) -> LayerStreamer {
    LayerStreamer::builder(index)
        .device(Device::Host)
        .file_dtype()
        .reader_threads(1)
        .build()
        .unwrap()
}

/// The tiny synthetic model of the fixture against the logits transformers
/// computed for it (scripts/make-fixtures), with a batch of three.
fn matches_hf(arch: Arch, tie: bool, name: &str) {
    let dir = common::tempdir();
    synth(dir.path(), arch, tie, 7, DType::BF16);
    let reference = Reference::load(&common::reference::dir(name)).unwrap();
    let index = ModelIndex::open(dir.path()).unwrap();
    let mut s = streamer(&index);
    let len = reference.prompt_ids.len() + reference.greedy_ids.len() + 1;
    let opts = ModelOptions {
        max_batch: 3,
        max_len: len,
        max_tokens: 3 * len,
        ..ModelOptions::default()
    };
    let mut model = LlamaModel::load(&s, opts).unwrap();
    let rep = check(&mut model, &mut s, &reference, 3).unwrap();
    eprintln!(
        "{name}: max rel_l2 {:.3e}, agreement {}, batch {:?}",
        rep.max_rel_l2(),
        rep.argmax_agreement(),
        rep.batch_rel_l2
    );
    assert_eq!(rep.rel_l2.len(), 1 + reference.greedy_ids.len());
    assert!(rep.max_rel_l2() < 1e-4, "{:?}", rep.rel_l2);
    assert_eq!(rep.argmax_agreement(), 1.0);
    assert!(rep.batch_rel_l2.unwrap() < 1e-5);
}

#[test]
fn qwen2_matches_transformers() {
    matches_hf(Arch::Qwen2, false, "qwen2-tiny-s7");
}

#[test]
fn llama_tied_matches_transformers() {
    matches_hf(Arch::Llama, true, "llama-tiny-tie-s7");
}

#[test]
fn kv_cache_decode_equals_full_prefill_and_chunking_changes_nothing() {
    let mut rng = common::rng("kv_cache_decode_equals_full_prefill");
    let dir = common::tempdir();
    synth(dir.path(), Arch::Llama, false, rng.gen(), DType::F16);
    let index = ModelIndex::open(dir.path()).unwrap();
    let mut s = streamer(&index);
    let ids: Vec<u32> = (0..10).map(|_| rng.gen_range(0..1000)).collect();
    let opts = ModelOptions {
        max_batch: 1,
        max_len: 16,
        max_tokens: 16,
        ..ModelOptions::default()
    };
    let mut model = LlamaModel::load(&s, opts).unwrap();
    let full = model.forward(&mut s, &[&ids]).unwrap().remove(0);
    // Prompt of 6, then one token at a time through the cache.
    let rows = teacher_forced(
        &mut model,
        &mut s,
        &[ids[..6].to_vec()],
        &[ids[6..].to_vec()],
    )
    .unwrap()
    .remove(0);
    let e = rel_l2(rows.last().unwrap(), &full);
    assert!(e < 1e-5, "decode vs prefill: {e}");
    // The same prefill split over passes of at most 3 tokens.
    let opts = ModelOptions {
        max_tokens: 3,
        ..opts
    };
    let mut chunked = LlamaModel::load(&s, opts).unwrap();
    let c = chunked.forward(&mut s, &[&ids]).unwrap().remove(0);
    assert!(rel_l2(&c, &full) < 1e-5);
}

#[test]
fn tokenizer_and_chat_templates_render_on_synthetic_models() {
    for arch in [Arch::Qwen2, Arch::Llama] {
        let dir = common::tempdir();
        synth(dir.path(), arch, false, 1, DType::BF16);
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        let t = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
        let msgs = [
            Message::new("system", "be brief"),
            Message::new("user", "hello there"),
        ];
        let text = t.render(&msgs, true).unwrap();
        match arch {
            Arch::Qwen2 => {
                assert!(
                    text.starts_with("<|im_start|>system\nbe brief<|im_end|>\n"),
                    "{text}"
                );
                assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
            }
            Arch::Llama => {
                assert!(
                    text.starts_with("<|begin_of_text|><|start_header_id|>system"),
                    "{text}"
                );
                assert!(text.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
            }
        }
        let ids = tok.encode(&text, false).unwrap();
        let first_special = match arch {
            Arch::Qwen2 => tok.token_id("<|im_start|>").unwrap(),
            Arch::Llama => tok.token_id("<|begin_of_text|>").unwrap(),
        };
        assert_eq!(ids[0], first_special);
        let plain = tok.encode("hello there", false).unwrap();
        assert_eq!(tok.decode(&plain).unwrap(), "hello there");
        let mut ts = TextStream::new(&tok);
        let streamed: String = plain.iter().map(|&i| ts.push(i).unwrap()).collect();
        assert_eq!(streamed, "hello there");
    }
}

#[test]
fn generation_is_deterministic_and_batches_agree() {
    let dir = common::tempdir();
    synth(dir.path(), Arch::Qwen2, false, 3, DType::BF16);
    let index = ModelIndex::open(dir.path()).unwrap();
    let mut s = streamer(&index);
    let prompts = vec![vec![5u32, 6, 7, 8, 9], vec![11, 12], vec![300, 301, 302]];
    let opts = ModelOptions {
        max_batch: 3,
        max_len: 16,
        max_tokens: 32,
        ..ModelOptions::default()
    };
    let mut model = LlamaModel::load(&s, opts).unwrap();
    let params = GenerateParams {
        max_new_tokens: 6,
        sampling: Default::default(),
        seed: 0,
        stop_ids: Vec::new(),
    };
    let mut seen = 0;
    let batch = generate(&mut model, &mut s, &prompts, &params, |_, _| {
        seen += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, 18);
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate(
            &mut model,
            &mut s,
            std::slice::from_ref(p),
            &params,
            |_, _| Ok(()),
        )
        .unwrap();
        assert_eq!(alone.tokens[0], batch.tokens[i], "sequence {i}");
    }
    // A stop id ends the sequence before it is emitted.
    let stop = batch.tokens[0][2];
    let stopped = generate(
        &mut model,
        &mut s,
        &prompts[..1],
        &GenerateParams {
            stop_ids: vec![stop],
            ..params.clone()
        },
        |_, _| Ok(()),
    )
    .unwrap();
    let cut = batch.tokens[0].iter().position(|&t| t == stop).unwrap();
    assert_eq!(stopped.tokens[0], batch.tokens[0][..cut]);
}

#[test]
fn bad_input_is_explained() {
    let dir = common::tempdir();
    synth(dir.path(), Arch::Qwen2, false, 4, DType::BF16);
    let index = ModelIndex::open(dir.path()).unwrap();
    let mut s = streamer(&index);
    let opts = ModelOptions {
        max_batch: 1,
        max_len: 8,
        max_tokens: 8,
        ..ModelOptions::default()
    };
    let mut model = LlamaModel::load(&s, opts).unwrap();
    let long: Vec<u32> = (0..9).collect();
    let e = model.forward(&mut s, &[&long]).unwrap_err().to_string();
    assert!(
        e.contains("9 tokens") && e.contains("maximum length 8"),
        "{e}"
    );
    let e = model.forward(&mut s, &[&[5000]]).unwrap_err().to_string();
    assert!(e.contains("5000"), "{e}");

    // No tokenizer: the error points to --prompt-ids.
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let e = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
    assert!(e.contains("--prompt-ids"), "{e}");

    // An architecture we do not implement.
    let cfg_path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, text.replace("\"qwen2\"", "\"gpt_neox\"")).unwrap();
    let index = ModelIndex::open(dir.path()).unwrap();
    let s = streamer(&index);
    let e = LlamaModel::load(&s, opts).err().unwrap().to_string();
    assert!(e.contains("unsupported architecture"), "{e}");
}

#[test]
fn cuda_without_a_driver_is_cuda_unavailable() {
    if layer_streamer::cuda::is_available() {
        return;
    }
    let dir = common::tempdir();
    synth(dir.path(), Arch::Qwen2, false, 4, DType::BF16);
    let index = ModelIndex::open(dir.path()).unwrap();
    let r = LayerStreamer::builder(&index)
        .device(Device::Cuda(0))
        .build();
    assert!(matches!(r, Err(Error::CudaUnavailable(_))));
}

#[test]
fn chat_template_helpers() {
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no') }}{% endif %}{{ m.content.strip() }}{{ m.get('role') }}{% if m.content.startswith(' ') %}!{% endif %}{{ m | tojson }}{% endfor %}",
        "",
        "",
    );
    assert!(t
        .render(&[Message::new("user", " x ")], false)
        .unwrap()
        .starts_with('x'));
    let e = t.render(&[Message::new("bad", "x")], false).unwrap_err();
    assert!(e.to_string().contains("no"), "{e}");
}

/// A pass that fails mid-way (a layer's bytes cut off the file after load)
/// leaves the sequence's length and KV cache as before the call: feeding the
/// same tokens again, once the file is whole, gives the logits of an
/// uninterrupted run.
#[test]
fn a_failed_pass_leaves_lengths_and_cache_consistent() {
    let mut rng = common::rng("a_failed_pass_leaves_lengths_and_cache_consistent");
    let dir = common::tempdir();
    synth(dir.path(), Arch::Llama, false, rng.gen(), DType::BF16);
    let index = ModelIndex::open(dir.path()).unwrap();
    let mut s = streamer(&index);
    let ids: Vec<u32> = (0..9).map(|_| rng.gen_range(0..1000)).collect();
    let opts = ModelOptions {
        max_batch: 1,
        max_len: 16,
        max_tokens: 16,
        ..ModelOptions::default()
    };
    let mut whole = LlamaModel::load(&s, opts).unwrap();
    let want = whole.forward(&mut s, &[&ids]).unwrap().remove(0);

    let mut model = LlamaModel::load(&s, opts).unwrap();
    model.forward(&mut s, &[&ids[..4]]).unwrap();
    assert_eq!(model.lengths(), &[4]);
    // Cut the file in the middle of the layers (statics are loaded already).
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(bytes.len() as u64 / 2).unwrap();
    let e = model.forward(&mut s, &[&ids[4..]]);
    assert!(e.is_err(), "a pass over a truncated file must fail");
    assert_eq!(
        model.lengths(),
        &[4],
        "the failed pass's tokens are not kept"
    );
    // Whole again: the same tokens resume the sequence.
    std::fs::write(&file, &bytes).unwrap();
    let got = model.forward(&mut s, &[&ids[4..]]).unwrap().remove(0);
    assert_eq!(model.lengths(), &[9]);
    let e = rel_l2(&got, &want);
    assert!(e < 1e-5, "resumed vs uninterrupted: rel_l2 {e}");
}

#[test]
fn the_host_backend_computes_the_same_logits_in_either_precision() {
    let mut rng = common::rng("the_host_backend_computes_the_same_logits_in_either_precision");
    let dir = common::tempdir();
    synth(dir.path(), Arch::Qwen2, false, rng.gen(), DType::BF16);
    let index = ModelIndex::open(dir.path()).unwrap();
    let vocab = Shape::preset("tiny").unwrap().vocab as u32;
    let prompts: Vec<Vec<u32>> = (0..2)
        .map(|_| {
            (0..rng.gen_range(2..9))
                .map(|_| rng.gen_range(0..vocab))
                .collect()
        })
        .collect();
    let forced: Vec<Vec<u32>> = (0..2)
        .map(|_| (0..3).map(|_| rng.gen_range(0..vocab)).collect())
        .collect();
    let run = |precision| {
        let mut s = streamer(&index);
        let opts = ModelOptions {
            max_batch: 2,
            max_len: 16,
            max_tokens: 32,
            precision,
            kv_offload: false,
        };
        let mut model = LlamaModel::load(&s, opts).unwrap();
        assert_eq!(model.options().precision, precision);
        teacher_forced(&mut model, &mut s, &prompts, &forced).unwrap()
    };
    let fast = run(layer_streamer::llm::Precision::Fast);
    let exact = run(layer_streamer::llm::Precision::Exact);
    assert!(!fast.is_empty() && fast.iter().flatten().all(|r| r.len() == vocab as usize));
    // Bit for bit: the host computes in f32 whatever the precision.
    assert_eq!(fast, exact);
}
