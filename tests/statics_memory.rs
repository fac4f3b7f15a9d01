//! What the CUDA forward pass holds for the embedding and the output matrix
//! (`llm::StaticsMemory`, printed by `inspect` and `bench-generate`): an
//! untied quantized model keeps its embedding in host memory as stored and
//! its output as stored blocks plus a bounded scratch on the device; a tied
//! one keeps the blocks on the device once, for both. Quantized layers add
//! the scratch their weights are dequantized into at use.

mod common;

use layer_streamer::llm::{StaticsMemory, OUTPUT_CHUNK_BYTES};
use layer_streamer::quant::QuantType;
use layer_streamer::synth::{write_gguf, Arch, Shape, SynthGgufSpec};
use layer_streamer::ModelIndex;
use rand::Rng;

#[test]
fn quantized_statics_are_counted_as_stored_and_tied_ones_once() {
    let mut rng = common::rng("quantized_statics_are_counted_as_stored_and_tied_ones_once");
    let dir = common::tempdir();
    for tie in [false, true] {
        let (hidden, vocab) = (256, 384 + 32 * rng.gen_range(0..8));
        let spec = SynthGgufSpec {
            arch: Arch::Llama,
            shape: Shape {
                hidden,
                intermediate: 512,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                vocab,
            },
            ty: QuantType::Q4_K,
            tie,
            seed: rng.gen(),
        };
        let path = dir.path().join(format!("m-{tie}.gguf"));
        write_gguf(&path, &spec, &mut |_, _| {}).unwrap();
        let index = ModelIndex::open(&path).unwrap();
        let m = StaticsMemory::for_model(&index, true).unwrap();
        let len = |n: &str| index.tensor(n).unwrap().len;
        let q6k = (vocab * hidden / 256 * 210) as u64;
        // Quantized layers are dequantized at use into one scratch, a chunk
        // of rows at a time: no larger than the largest weight (the gate
        // projection here), which fits one chunk.
        assert!(512 * hidden * 2 <= layer_streamer::llm::BLOCKS_SCRATCH_BYTES);
        let weight_scratch = (512 * hidden * 2) as u64;
        if tie {
            // The output's blocks are the embedding: one copy, as stored.
            assert_eq!(len("model.embed_tokens.weight"), q6k);
            let want = StaticsMemory {
                output_device: q6k,
                output_scratch: (vocab * hidden * 2) as u64,
                weight_scratch,
                ..StaticsMemory::default()
            };
            assert_eq!(m, want);
            continue;
        }
        assert_eq!(
            (len("model.embed_tokens.weight"), len("lm_head.weight")),
            (q6k, q6k)
        );
        // The whole output fits the default scratch: one chunk.
        assert!(vocab * hidden * 2 <= OUTPUT_CHUNK_BYTES);
        let want = StaticsMemory {
            embedding_device: 0,
            embedding_host: q6k,
            output_device: q6k,
            output_scratch: (vocab * hidden * 2) as u64,
            weight_scratch,
        };
        assert_eq!(m, want);
        let scratches = (vocab * hidden * 2) as u64 + weight_scratch;
        assert_eq!(m.device_bytes(), q6k + scratches);
        // Several chunks of `rows` rows: the scratch of one chunk alone
        // (each chunk's GEMM writes its columns of the logits).
        let rows = rng.gen_range(1..vocab);
        let out = Some("lm_head.weight");
        let embed = "model.embed_tokens.weight";
        let m = StaticsMemory::of(&index, embed, out, vocab, rows * hidden * 2).unwrap();
        assert_eq!(m.output_scratch, (rows * hidden * 2) as u64);
    }
}

#[test]
fn a_tied_16_bit_embedding_is_one_device_matrix() {
    use layer_streamer::synth::Arch;
    use layer_streamer::DType;
    let mut rng = common::rng("a_tied_16_bit_embedding_is_one_device_matrix");
    let dir = common::tempdir();
    let tie = rng.gen_bool(0.5);
    common::models::synth(
        dir.path(),
        Arch::Qwen2,
        "tiny",
        DType::BF16,
        tie,
        1 << 40,
        rng.gen(),
    );
    let index = ModelIndex::open(dir.path()).unwrap();
    let m = StaticsMemory::for_model(&index, true).unwrap();
    let embed = index.tensor("model.embed_tokens.weight").unwrap();
    let matrix = 2 * embed.shape.iter().product::<usize>() as u64;
    let want = if tie {
        StaticsMemory {
            embedding_device: matrix,
            ..StaticsMemory::default()
        }
    } else {
        StaticsMemory {
            embedding_host: embed.len,
            output_device: matrix,
            ..StaticsMemory::default()
        }
    };
    assert_eq!(m, want, "tie={tie}");
}
