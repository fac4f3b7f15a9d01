//! Tests of bench-generate: its arguments and the bound arithmetic.

use super::*;
use clap::Parser;
use layer_streamer::llm::layout::layer_tensors;
use layer_streamer::llm::Precision;
use rand::{Rng, SeedableRng};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

fn rng(test: &str) -> rand::rngs::StdRng {
    let seed = std::env::var("LS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{test}: seed {seed} (LS_SEED replays)");
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn random_config(rng: &mut impl Rng) -> ModelConfig {
    let heads = rng.gen_range(1..9usize);
    let kv_heads = [1, heads][rng.gen_range(0..2)];
    let head_dim = 2 * rng.gen_range(1..33usize);
    let v = serde_json::json!({
        "model_type": "llama",
        "hidden_size": heads * head_dim,
        "intermediate_size": rng.gen_range(1..500),
        "num_hidden_layers": rng.gen_range(1..6),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": rng.gen_range(2..3000),
    });
    ModelConfig::from_json(&v).unwrap()
}

#[test]
fn batches_and_precision_parse_and_bad_values_name_the_flag() {
    let mut rng = rng("batches_and_precision_parse_and_bad_values_name_the_flag");
    let batches: Vec<usize> = (0..rng.gen_range(1..6))
        .map(|_| rng.gen_range(1..300))
        .collect();
    let list = batches
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let cli = Cli::try_parse_from([
        "x",
        "--model",
        "m",
        "--batch",
        &list,
        "--precision",
        "exact",
    ])
    .unwrap();
    assert_eq!(parse_list(&cli.args.batch, "batch size").unwrap(), batches);
    assert_eq!(cli.args.stream.precision, Precision::Exact);
    let cli = Cli::try_parse_from(["x", "--model", "m"]).unwrap();
    assert_eq!(cli.args.stream.precision, Precision::Fast);
    let e = Cli::try_parse_from(["x", "--model", "m", "--precision", "double"])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--precision") && e.contains("double"), "{e}");
    let e = parse_list(&format!("{list},0"), "batch size").unwrap_err();
    assert!(e.to_string().contains("batch size \"0\""), "{e}");
}

#[test]
fn token_flops_count_every_weight_and_the_attention() {
    let mut rng = rng("token_flops_count_every_weight_and_the_attention");
    for _ in 0..20 {
        let cfg = random_config(&mut rng);
        // Every matrix of a layer once (two FLOPs per weight), counted
        // from the tensor list rather than the formula.
        let per_layer: usize = layer_tensors(&cfg)
            .iter()
            .filter(|t| t.shape.len() == 2)
            .map(|t| t.shape[0] * t.shape[1])
            .sum();
        let weights = 2.0 * (per_layer * cfg.layers + cfg.hidden * cfg.vocab) as f64;
        let ctx = rng.gen_range(1..5000) as f64;
        let attn = 2.0 * 2.0 * (cfg.layers * cfg.heads * cfg.head_dim) as f64 * ctx;
        let got = token_flops(&cfg, ctx);
        assert!(
            (got - weights - attn).abs() <= 1e-9 * got,
            "{got} vs {weights} + {attn}"
        );
        // Prefill: the tokens' sum over positions 1..=len, one lm_head row.
        let (b, len) = (rng.gen_range(1..10), rng.gen_range(1..300));
        let head = 2.0 * (cfg.hidden * cfg.vocab) as f64;
        let want: f64 = (1..=len)
            .map(|p| token_flops(&cfg, p as f64) - head)
            .sum::<f64>()
            + head;
        let got = prefill_flops(&cfg, b, len);
        let want = want * b as f64;
        assert!((got - want).abs() <= 1e-9 * want, "{got} vs {want}");
    }
}

#[test]
fn bounds_are_the_batch_over_each_resource_time_and_the_lower_one_limits() {
    let mut rng = rng("bounds_are_the_batch_over_each_resource_time_and_the_lower_one_limits");
    for _ in 0..100 {
        let b = rng.gen_range(1..512usize);
        let bytes = rng.gen_range(1e6..1e11);
        let rate = rng.gen_range(1e9..1e11);
        let flops = rng.gen_range(1e6..1e12);
        let peak = rng.gen_range(1e12..1e15);
        let x = Bounds::new(b, bytes, rate, flops, Some(peak));
        // Transfer: one pass of `bytes` yields b tokens.
        assert!((x.transfer * bytes / rate - b as f64).abs() < 1e-6 * b as f64);
        // Compute: b tokens of `flops` each take b·flops/peak seconds.
        let c = x.compute.unwrap();
        assert!((c * flops / peak - 1.0).abs() < 1e-9, "{c}");
        let (at, lim) = x.limit();
        assert_eq!(lim, x.transfer.min(c));
        assert_eq!(
            at,
            if c < x.transfer {
                "compute"
            } else {
                "transfer"
            }
        );
        let tok = rng.gen_range(0.0..lim);
        assert!((x.share(tok) - tok / lim).abs() < 1e-12);
        // Without a measured peak only the transfer bounds.
        let t = Bounds::new(b, bytes, rate, flops, None);
        assert_eq!((t.limit().0, t.limit().1), ("transfer", x.transfer));
    }
    // Nothing to copy: the transfer does not bound.
    let x = Bounds::new(4, 0.0, 1e9, 1e9, Some(1e12));
    assert_eq!(x.limit(), ("compute", 1e3));
}

#[test]
fn kv_offload_parses_and_defaults_off() {
    let cli = Cli::try_parse_from(["x", "--model", "m", "--kv-offload"]).unwrap();
    assert!(cli.args.stream.kv_offload);
    let cli = Cli::try_parse_from(["x", "--model", "m"]).unwrap();
    assert!(!cli.args.stream.kv_offload);
    let e = Cli::try_parse_from(["x", "--model", "m", "--kv-offload=yes"])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--kv-offload"), "{e}");
}

#[test]
fn the_kv_bound_adds_its_bytes_to_the_weights_at_the_h2d_rate() {
    let mut rng = rng("the_kv_bound_adds_its_bytes_to_the_weights_at_the_h2d_rate");
    for _ in 0..100 {
        let b = rng.gen_range(1..512usize);
        let weights = rng.gen_range(1e6..1e11);
        let rate = rng.gen_range(1e9..1e11);
        let kv = KvTransfer {
            h2d_bytes: rng.gen_range(0..1u64 << 36),
            d2h_bytes: rng.gen_range(0..1u64 << 30),
        };
        let x = KvBound::new(b, &kv, weights, rate);
        assert!((x.kv_s * rate - kv.h2d_bytes as f64).abs() <= 1e-6 * kv.h2d_bytes as f64);
        assert!((x.weights_s * rate - weights).abs() <= 1e-6 * weights);
        let want = b as f64 / ((weights + kv.h2d_bytes as f64) / rate);
        assert!((x.tokens_per_s - want).abs() <= 1e-9 * want, "{x:?}");
        // Without KV bytes it is the weights' transfer bound.
        let none = KvBound::new(b, &KvTransfer::default(), weights, rate);
        let t = Bounds::new(b, weights, rate, 1.0, None).transfer;
        assert!((none.tokens_per_s - t).abs() <= 1e-9 * t);
        assert!(x.tokens_per_s <= none.tokens_per_s);
        let row = kv_row(b, &kv, &x);
        assert!(
            row.contains(&format!("{:.2}", kv.h2d_bytes as f64 / 1e6)),
            "{row}"
        );
    }
}

#[test]
fn phases_line_gives_each_share_and_the_gemm_rate_of_one_layer() {
    let mut rng = rng("phases_line_gives_each_share_and_the_gemm_rate_of_one_layer");
    let cfg = random_config(&mut rng);
    let p = LayerPhases {
        tokens: rng.gen_range(1..20000),
        gemm_s: rng.gen_range(1e-4..1e-2),
        attention_s: rng.gen_range(1e-5..1e-3),
        other_s: rng.gen_range(1e-5..1e-3),
    };
    let line = phases_line(&p, &cfg);
    let (h, qd, kvd, inter) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate);
    let layer_flops = 2.0 * (h * (qd + 2 * kvd) + qd * h + 3 * h * inter) as f64;
    let tflops = layer_flops * p.tokens as f64 / p.gemm_s / 1e12;
    let total = p.gemm_s + p.attention_s + p.other_s;
    for want in [
        format!("{}-token pass: {:.3} ms", p.tokens, total * 1e3),
        format!(
            "GEMMs {:.3} ms ({:.1} %, {tflops:.1} TFLOP/s)",
            p.gemm_s * 1e3,
            100.0 * p.gemm_s / total
        ),
        format!(
            "attention {:.3} ms ({:.1} %)",
            p.attention_s * 1e3,
            100.0 * p.attention_s / total
        ),
        format!(
            "SwiGLU {:.3} ms ({:.1} %)",
            p.other_s * 1e3,
            100.0 * p.other_s / total
        ),
    ] {
        assert!(line.contains(&want), "{line:?} lacks {want:?}");
    }
}

#[test]
fn passes_take_the_largest_batchs_prompts_up_to_the_default_or_the_given_tokens() {
    let mut rng =
        rng("passes_take_the_largest_batchs_prompts_up_to_the_default_or_the_given_tokens");
    for _ in 0..100 {
        let (b, len) = (rng.gen_range(1..300), rng.gen_range(1..2000));
        let auto = pass_tokens(None, b, len);
        assert_eq!(auto, (b * len).min(DEFAULT_PASS_TOKENS).max(b));
        let given = rng.gen_range(1..50000);
        assert_eq!(pass_tokens(Some(given), b, len), given.max(b));
    }
    let cli = Cli::try_parse_from(["x", "--model", "m"]).unwrap();
    assert_eq!(cli.args.max_tokens, None);
    let cli = Cli::try_parse_from(["x", "--model", "m", "--max-tokens", "8192"]).unwrap();
    assert_eq!(cli.args.max_tokens, Some(8192));
}
