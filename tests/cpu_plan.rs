//! The CPU share's planner and kernels on whole models: a layer's CPU time
//! from its stored types, and the kernels on the real SmolLM2 GGUF's blocks
//! (`scripts/test-env smollm2`) against the host dequantizer.

mod common;

use std::path::PathBuf;

use layer_streamer::cpu::calibrate::{calibrate, CpuRates};
use layer_streamer::cpu::plan::{layer_costs, plan_split, SplitInputs};
use layer_streamer::cpu::{CpuPool, CpuPoolOptions, HostMatrix, Isa};
use layer_streamer::quant::{self, QuantType};
use layer_streamer::{DType, ModelIndex};
use rand::Rng;

fn smollm2() -> PathBuf {
    common::assets::test_env("smollm2")
}

#[test]
fn layer_costs_count_each_matrix_at_its_types_rate() {
    let mut rng = common::rng("layer_costs_count_each_matrix_at_its_types_rate");
    let dir = common::tempdir();
    let model = common::models::small_model(dir.path(), &mut rng, 3, DType::BF16);
    let rate = rng.gen_range(1e9..100e9);
    let rates = CpuRates {
        tokens: 1,
        by_type: vec![(QuantType::BF16, rate)],
        read_bps: Some(rate),
    };
    let costs = layer_costs(&model, &rates, None, |i| i as f64 * 1e-3).unwrap();
    for (l, c) in model.layers().iter().zip(&costs) {
        let matrices: usize = l
            .tensors
            .iter()
            .filter(|t| t.info.shape.len() == 2)
            .map(|t| t.info.shape[0] * t.info.shape[1] * 2)
            .sum();
        assert!(matrices > 0 && (matrices as u64) < l.data_bytes);
        let want = matrices as f64 / rate;
        assert!(
            (c.cpu_s - want).abs() <= 1e-12 * want,
            "{} vs {want}",
            c.cpu_s
        );
        assert_eq!(c.bytes, matrices as u64);
        assert_eq!(c.total_bytes(), l.data_bytes);
        assert_eq!(c.gpu_s, l.index as f64 * 1e-3);
    }
    // A split of one weight: the others stream whole, and only its bytes
    // cost the CPU.
    let layer = &model.layers()[rng.gen_range(0..model.num_layers())];
    let matrices: Vec<_> = (layer.tensors.iter())
        .filter(|t| t.info.shape.len() == 2)
        .collect();
    let one = matrices[rng.gen_range(0..matrices.len())];
    let only = [one.key.clone()];
    let costs = layer_costs(&model, &rates, Some(&only), |_| 0.0).unwrap();
    let c = &costs[layer.index];
    assert_eq!(c.bytes, one.info.len);
    assert_eq!(c.whole_bytes, layer.data_bytes - one.info.len);
    let want = one.info.len as f64 / rate;
    assert!(
        (c.cpu_s - want).abs() <= 1e-12 * want,
        "{} vs {want}",
        c.cpu_s
    );
    let f16_only = CpuRates {
        by_type: vec![(QuantType::F16, rate)],
        ..rates
    };
    let e = layer_costs(&model, &f16_only, None, |_| 0.0).unwrap_err();
    assert!(e.to_string().contains("no CPU rate for BF16"), "{e}");
    assert!(e.to_string().contains("model.layers.0."), "{e}");
}

#[test]
fn smollm2_blocks_multiply_like_their_dequantized_values() {
    let mut rng = common::rng("smollm2_blocks_multiply_like_their_dequantized_values");
    let model = ModelIndex::open(smollm2()).expect("open SmolLM2");
    let layer = &model.layers()[rng.gen_range(0..model.num_layers())];
    let mut types = Vec::new();
    for t in layer.tensors.iter().filter(|t| t.info.shape.len() == 2) {
        let info = &t.info;
        let ty = info
            .quant
            .or_else(|| QuantType::from_dtype(info.dtype))
            .unwrap();
        types.push(ty);
        let bytes = common::models::read_tensor(&model, info);
        let (rows, k) = (info.shape[0], info.shape[1]);
        let m =
            HostMatrix::new(ty, &bytes, rows, k).unwrap_or_else(|e| panic!("{}: {e}", info.name));
        let mut vals = vec![0f32; rows * k];
        quant::dequantize_f32(ty, &bytes, &mut vals).unwrap();
        let tokens = rng.gen_range(1..4);
        let x: Vec<f32> = (0..tokens * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
            let pool = CpuPool::new(&CpuPoolOptions::default())
                .unwrap()
                .with_isa(isa)
                .unwrap();
            let mut y = vec![0f32; tokens * rows];
            pool.matmul(&m, &x, tokens, &mut y).unwrap();
            for (i, got) in y.iter().enumerate() {
                let (t, r) = (i / rows, i % rows);
                let (wr, xt) = (&vals[r * k..(r + 1) * k], &x[t * k..(t + 1) * k]);
                let exact: f64 = wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                let mag: f64 = wr
                    .iter()
                    .zip(xt)
                    .map(|(&a, &b)| (a as f64 * b as f64).abs())
                    .sum();
                let bound = (k / 8 + 40) as f64 * f32::EPSILON as f64 * mag;
                assert!(
                    (*got as f64 - exact).abs() <= bound,
                    "{} ({ty}, {isa}): y[{t},{r}] = {got}, f64 {exact}",
                    info.name
                );
            }
        }
    }
    // Every stored type of the layer has a kernel, so a plan can be made.
    let rates = CpuRates {
        tokens: 1,
        by_type: types.iter().map(|&t| (t, 50e9)).collect(),
        read_bps: Some(50e9),
    };
    let inp = SplitInputs {
        layers: layer_costs(&model, &rates, None, |_| 1e-5).unwrap(),
        pcie_bps: 25e9,
        join_s: 0.0,
        vram_budget: 0,
        slots: 3,
    };
    let plan = plan_split(&inp).unwrap();
    assert_eq!(plan.resident, 0);
    assert!(
        plan.shares.iter().all(|&s| s > 0.5 && s < 1.0),
        "{:?}",
        plan.shares
    );
    assert!(plan.pass_s < plan.gpu_only_pass_s);
}

#[test]
fn calibration_measures_each_type_it_is_asked_for() {
    let pool = CpuPool::new(&CpuPoolOptions {
        threads: Some(2),
        ..Default::default()
    })
    .unwrap();
    let types = [QuantType::BF16, QuantType::Q4_K];
    let rates = calibrate(&pool, &types, 3, 1 << 20, 1).unwrap();
    assert_eq!(rates.tokens, 3);
    assert!(rates.read_bps.is_some_and(|r| r.is_finite() && r > 0.0));
    for ty in types {
        let r = rates.rate(ty).unwrap();
        assert!(r.is_finite() && r > 0.0, "{ty}: {r}");
    }
    let s = rates
        .seconds(&[(QuantType::BF16, 1000), (QuantType::Q4_K, 500)])
        .unwrap();
    let want = 1000.0 / rates.rate(QuantType::BF16).unwrap()
        + 500.0 / rates.rate(QuantType::Q4_K).unwrap();
    assert!((s - want).abs() <= 1e-12 * want);
    let e = rates.rate(QuantType::Q8_0).unwrap_err();
    assert!(
        e.to_string()
            .contains("no CPU rate for Q8_0: calibrated [\"BF16\", \"Q4_K\"]"),
        "{e}"
    );
    let e = calibrate(&pool, &types, 0, 1 << 20, 1).unwrap_err();
    assert!(e.to_string().contains("tokens is 0"), "{e}");
}
