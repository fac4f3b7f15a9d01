use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn rng(test: &str) -> StdRng {
    let seed: u64 = std::env::var("LS_SEED")
        .map(|s| s.parse().expect("LS_SEED must be a u64"))
        .unwrap_or_else(|_| rand::random());
    eprintln!("{test}: random seed {seed} (replay with LS_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

/// Layer time at share `s`, straight from the model in the module docs.
fn time_at(l: &LayerCost, resident: bool, pcie: f64, join: f64, s: f64) -> f64 {
    let xfer = if resident { 0.0 } else { l.bytes as f64 / pcie };
    let gpu = (1.0 - s) * xfer.max(l.gpu_s);
    if s > 0.0 {
        (s * l.cpu_s + join).max(gpu)
    } else {
        gpu
    }
}

fn random_layer(rng: &mut StdRng) -> LayerCost {
    let bytes = rng.gen_range(1u64 << 20..1 << 30);
    LayerCost {
        bytes,
        whole_bytes: 0,
        cpu_s: bytes as f64 / rng.gen_range(5e9..150e9),
        gpu_s: rng.gen_range(0.0..0.02),
    }
}

#[test]
fn the_share_beats_every_other_share() {
    let mut rng = rng("the_share_beats_every_other_share");
    for _ in 0..2000 {
        let l = random_layer(&mut rng);
        let resident = rng.gen_bool(0.3);
        let pcie = rng.gen_range(5e9..64e9);
        let join = if rng.gen_bool(0.5) {
            0.0
        } else {
            rng.gen_range(0.0..2e-3)
        };
        let (s, t) = layer_share(&l, resident, pcie, join);
        assert!((0.0..=1.0).contains(&s));
        let at_s = time_at(&l, resident, pcie, join, s);
        assert!((t - at_s).abs() <= 1e-12 * at_s, "{t} vs {at_s}");
        for i in 0..=200 {
            let other = time_at(&l, resident, pcie, join, i as f64 / 200.0);
            assert!(
                t <= other * (1.0 + 1e-12),
                "{l:?} share {s} ({t}s) loses to {i}/200 ({other}s)"
            );
        }
        if s > 0.0 && s < 1.0 {
            // Balanced: both sides finish together.
            let cpu = s * l.cpu_s + join;
            assert!((cpu - t).abs() <= 1e-9 * t, "cpu {cpu} vs layer {t}");
        }
    }
}

#[test]
fn a_streamed_decode_layer_runs_at_the_sum_of_the_bandwidths() {
    // With negligible GPU compute and no join, the bytes split so that CPU
    // and PCIe each carry their part in the same time: B / (c + p).
    let mut rng = rng("a_streamed_decode_layer_runs_at_the_sum_of_the_bandwidths");
    for _ in 0..100 {
        let (c, p) = (rng.gen_range(10e9..120e9), rng.gen_range(10e9..64e9));
        let bytes = rng.gen_range(1u64 << 24..1 << 30);
        let l = LayerCost {
            bytes,
            whole_bytes: 0,
            cpu_s: bytes as f64 / c,
            gpu_s: 0.0,
        };
        let (s, t) = layer_share(&l, false, p, 0.0);
        let want = bytes as f64 / (c + p);
        assert!((t - want).abs() <= 1e-9 * want, "{t} vs {want}");
        assert!(
            (s - c / (c + p)).abs() <= 1e-9,
            "share {s}, CPU's part of the bandwidth {}",
            c / (c + p)
        );
    }
}

#[test]
fn weights_that_stream_whole_raise_the_share() {
    // Of a layer, `bytes` are divided and `whole` always streams: the CPU's
    // s·B/c meets the copies' ((1 - s)·B + W)/p at s = c·(B + W) / (B·(c + p)).
    let mut rng = rng("weights_that_stream_whole_raise_the_share");
    for _ in 0..100 {
        let (c, p) = (rng.gen_range(10e9..120e9), rng.gen_range(10e9..64e9));
        let bytes = rng.gen_range(1u64 << 24..1 << 30);
        let whole = (bytes as f64 * p / c * rng.gen_range(0.0..1.0)) as u64;
        let l = LayerCost {
            bytes,
            whole_bytes: whole,
            cpu_s: bytes as f64 / c,
            gpu_s: 0.0,
        };
        let (s, t) = layer_share(&l, false, p, 0.0);
        let (b, w) = (bytes as f64, whole as f64);
        let want_s = c * (b + w) / (b * (c + p));
        assert!((s - want_s).abs() <= 1e-9, "share {s} vs {want_s}");
        let want_t = (b + w) / (c + p);
        assert!((t - want_t).abs() <= 1e-9 * want_t, "{t} vs {want_t}");
        assert_eq!(l.streamed_at(s).round(), ((1.0 - s) * b + w).round());
    }
}

#[test]
fn big_batches_and_costly_joins_stay_on_the_gpu() {
    let mut rng = rng("big_batches_and_costly_joins_stay_on_the_gpu");
    for _ in 0..100 {
        let l = random_layer(&mut rng);
        let pcie = rng.gen_range(5e9..64e9);
        let gpu = (l.bytes as f64 / pcie).max(l.gpu_s);
        // A join as long as the whole GPU side cannot pay off.
        let (s, t) = layer_share(&l, false, pcie, gpu * rng.gen_range(1.0..3.0));
        assert_eq!((s, t), (0.0, gpu));
        // A prefill: the CPU is 1000x slower than the GPU side: a share of at most 1/1000.
        let slow = LayerCost {
            cpu_s: gpu * 1000.0,
            ..l
        };
        let (s, _) = layer_share(&slow, false, pcie, 0.0);
        assert!(s <= 1.0 / 1000.0, "{s}");
    }
}

#[test]
fn the_plan_fits_the_budget_and_keeps_the_most_layers() {
    let mut rng = rng("the_plan_fits_the_budget_and_keeps_the_most_layers");
    for _ in 0..200 {
        let n = rng.gen_range(1..40);
        let layer = random_layer(&mut rng);
        let inp = SplitInputs {
            layers: vec![layer; n],
            pcie_bps: rng.gen_range(5e9..64e9),
            join_s: rng.gen_range(0.0..1e-4),
            vram_budget: rng.gen_range(0..layer.bytes * n as u64 * 2),
            slots: rng.gen_range(1..5),
        };
        let p = plan_split(&inp).unwrap();
        assert_eq!((p.shares.len(), p.layer_s.len()), (n, n));
        let used = vram_used(&inp, p.resident, &p.shares);
        assert!(
            p.resident == 0 || used <= inp.vram_budget,
            "{used} > {}",
            inp.vram_budget
        );
        if p.resident < n {
            let (s, _) = with_resident(&inp, p.resident + 1, true);
            assert!(vram_used(&inp, p.resident + 1, &s) > inp.vram_budget);
        }
        let sum: f64 = p.layer_s.iter().sum();
        assert!((p.pass_s - sum).abs() <= 1e-12 * sum);
        assert!(
            p.pass_s <= p.gpu_only_pass_s * (1.0 + 1e-12),
            "{} > {}",
            p.pass_s,
            p.gpu_only_pass_s
        );
        // Smaller slots leave room for at least as many resident layers.
        let (gpu_resident, _, _) = best_fit(&inp, false);
        assert!(p.resident >= gpu_resident);
    }
}

#[test]
fn bad_rates_are_errors_that_name_them() {
    let l = LayerCost {
        bytes: 1 << 20,
        whole_bytes: 0,
        cpu_s: 1e-3,
        gpu_s: 1e-4,
    };
    let base = SplitInputs {
        layers: vec![l; 2],
        pcie_bps: 50e9,
        join_s: 0.0,
        vram_budget: 0,
        slots: 3,
    };
    let e = plan_split(&SplitInputs {
        pcie_bps: 0.0,
        ..base.clone()
    })
    .unwrap_err();
    assert!(e.to_string().contains("the PCIe rate is 0"), "{e}");
    let mut bad = base.clone();
    bad.layers[1].cpu_s = f64::NAN;
    let e = plan_split(&bad).unwrap_err();
    assert!(e.to_string().contains("layer 1's CPU time is NaN"), "{e}");
    let e = plan_split(&SplitInputs {
        join_s: -1.0,
        ..base
    })
    .unwrap_err();
    assert!(e.to_string().contains("join time is -1"), "{e}");
}

#[test]
fn cpu_rows_round_to_whole_multiples() {
    let mut rng = rng("cpu_rows_round_to_whole_multiples");
    for _ in 0..1000 {
        let rows = rng.gen_range(0..10_000);
        let m = rng.gen_range(1..200);
        let s: f64 = rng.gen_range(-0.5..1.5);
        let r = cpu_rows(rows, s, m);
        assert!(r <= rows);
        assert!(r.is_multiple_of(m) || r == rows, "{r} of {rows} by {m}");
        let want = s.clamp(0.0, 1.0) * rows as f64;
        assert!((r as f64 - want).abs() <= m as f64, "{r} for {want}");
    }
    assert_eq!(cpu_rows(100, 0.0, 7), 0);
    assert_eq!(cpu_rows(100, 1.0, 7), 100);
}
