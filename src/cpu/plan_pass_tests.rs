use rand::rngs::StdRng;
use rand::Rng;

use super::*;
use crate::cpu::plan::{layer_share, LayerCost};

fn random_inputs(rng: &mut StdRng) -> (SplitInputs, Option<f64>) {
    let n = rng.gen_range(1..30);
    let layers: Vec<LayerCost> = (0..n)
        .map(|_| {
            let bytes = rng.gen_range(1u64 << 20..1 << 29);
            LayerCost {
                bytes,
                whole_bytes: if rng.gen_bool(0.5) {
                    0
                } else {
                    rng.gen_range(0..bytes / 2)
                },
                cpu_s: bytes as f64 / rng.gen_range(5e9..150e9),
                gpu_s: rng.gen_range(0.0..2e-3),
            }
        })
        .collect();
    let total: u64 = layers.iter().map(|l| l.bytes + l.whole_bytes).sum();
    let inp = SplitInputs {
        layers,
        pcie_bps: rng.gen_range(5e9..64e9),
        join_s: if rng.gen_bool(0.5) {
            0.0
        } else {
            rng.gen_range(0.0..3e-4)
        },
        vram_budget: rng.gen_range(0..total + (1 << 30)),
        slots: rng.gen_range(1..4),
    };
    let read = rng.gen_bool(0.5).then(|| rng.gen_range(20e9..200e9));
    (inp, read)
}

/// The pass at share `s` with layers `0..r` resident, straight from the
/// module docs.
fn model_time(inp: &SplitInputs, read: Option<f64>, r: usize, s: f64) -> f64 {
    let flags: Vec<bool> = (0..inp.layers.len()).map(|i| i < r).collect();
    model_time_of(inp, read, &flags, s)
}

/// [`model_time`] with the resident layers named one by one.
fn model_time_of(inp: &SplitInputs, read: Option<f64>, resident: &[bool], s: f64) -> f64 {
    reference(inp, (read, true), resident, s)
}

/// The pass's time, `memory` the host's read rate and whether the CPU
/// gets only what the copies leave of it (else: each side its own rate).
fn reference(inp: &SplitInputs, memory: (Option<f64>, bool), resident: &[bool], s: f64) -> f64 {
    let (read, leave) = memory;
    let streamed: Vec<&LayerCost> = (inp.layers.iter().zip(resident))
        .filter(|(_, r)| !**r)
        .map(|(l, _)| l)
        .collect();
    let copy: f64 = streamed
        .iter()
        .map(|l| ((1.0 - s) * l.bytes as f64 + l.whole_bytes as f64) / inp.pcie_bps)
        .sum();
    let cpu_bps = read
        .filter(|_| leave)
        .map(|h| (h - inp.pcie_bps).max(0.1 * h));
    let kept: f64 = (inp.layers.iter().zip(resident))
        .filter(|(_, r)| **r)
        .map(|(l, _)| l.gpu_s)
        .sum();
    let serial: f64 = kept
        + streamed
            .iter()
            .map(|l| {
                let cpu = cpu_bps.map_or(l.cpu_s, |c| l.cpu_s.max(l.bytes as f64 / c));
                let d = l.bytes as f64 / (l.bytes + l.whole_bytes) as f64;
                let dev = (1.0 - s * d) * l.gpu_s;
                if s > 0.0 {
                    dev.max(s * cpu + inp.join_s)
                } else {
                    dev
                }
            })
            .sum::<f64>();
    let memory = read.map_or(0.0, |h| {
        (streamed.iter())
            .map(|l| (l.bytes + l.whole_bytes) as f64)
            .sum::<f64>()
            / h
    });
    copy.max(serial).max(memory)
}

fn fits(inp: &SplitInputs, r: usize, s: f64) -> bool {
    let slot = inp.layers[r..]
        .iter()
        .map(|l| ((1.0 - s) * l.bytes as f64 + l.whole_bytes as f64).ceil() as u64)
        .max()
        .unwrap_or(0);
    let kept: u64 = inp.layers[..r]
        .iter()
        .map(|l| l.bytes + l.whole_bytes)
        .sum();
    kept + slot * inp.slots as u64 <= inp.vram_budget
}

#[test]
fn the_plan_beats_every_share_and_resident_count_that_fits() {
    let mut rng = crate::test_rng::rng();
    for _ in 0..300 {
        let (inp, read) = random_inputs(&mut rng);
        let plan = plan_pass(&inp, read).unwrap();
        let n = inp.layers.len();
        let s = plan.shares.last().copied().unwrap_or(0.0);
        assert!(plan.shares[..plan.resident].iter().all(|&x| x == 0.0));
        assert!(plan.shares[plan.resident..].iter().all(|&x| x == s));
        let own = model_time(&inp, read, plan.resident, s);
        assert!(
            (own - plan.pass_s).abs() <= 1e-12 * own,
            "{own} vs {}",
            plan.pass_s
        );
        let fitting = (0..=n).any(|r| fits(&inp, r, s));
        assert!(fits(&inp, plan.resident, s) || !fitting);
        for k in 0..=SHARE_STEPS {
            let other = k as f64 / SHARE_STEPS as f64;
            for r in (0..=n).filter(|&r| fits(&inp, r, other)) {
                let t = model_time(&inp, read, r, other);
                assert!(
                    plan.pass_s <= t * (1.0 + 1e-12),
                    "share {s} with {} resident ({}) loses to {other} with {r} ({t})",
                    plan.resident,
                    plan.pass_s
                );
            }
        }
        assert!(plan.pass_s <= plan.gpu_only_pass_s * (1.0 + 1e-12));
    }
}

#[test]
fn resident_compute_lowers_the_share_below_the_per_layer_balance() {
    // Copies run on while resident layers compute: the more device time the
    // resident layers take, the less the CPU need take of the streamed ones.
    let mut rng = crate::test_rng::rng();
    for _ in 0..200 {
        let bytes = rng.gen_range(50u64 << 20..500 << 20);
        let n = rng.gen_range(16..40);
        // At least 8 streamed layers: putting them all on the CPU to fit one
        // more resident layer in the slot's room never pays (their CPU time
        // is more than 5 copies' worth, the most a copy can be here).
        let resident = rng.gen_range(1..n - 8);
        // One slot, whose room holds at most one more layer (at share 1).
        let slots = 1;
        let base = LayerCost {
            bytes,
            whole_bytes: 0,
            cpu_s: bytes as f64 / rng.gen_range(30e9..100e9),
            gpu_s: 0.0,
        };
        let pcie = rng.gen_range(20e9..60e9);
        let budget = (resident + slots) as u64 * bytes;
        let plan_with = |gpu_s: f64| {
            let l = LayerCost { gpu_s, ..base };
            let inp = SplitInputs {
                layers: vec![l; n],
                pcie_bps: pcie,
                join_s: 0.0,
                vram_budget: budget,
                slots,
            };
            plan_pass(&inp, None).unwrap()
        };
        let step = 1.0 / SHARE_STEPS as f64 + 1e-9;
        let share_of = |p: &SplitPlan| p.shares.last().copied().unwrap_or(0.0);
        let idle = plan_with(0.0);
        let (per_layer, _) = layer_share(&base, false, pcie, 0.0);
        // With the device's time free, the pass balances like each layer.
        assert_eq!(idle.resident, resident);
        assert!(
            (share_of(&idle) - per_layer).abs() <= step,
            "{idle:?}, {per_layer}"
        );
        let busy = plan_with(bytes as f64 / pcie * rng.gen_range(0.05..0.5));
        assert!(
            share_of(&busy) <= share_of(&idle) + step,
            "{busy:?} vs {idle:?}"
        );
        assert!(busy.pass_s >= idle.pass_s * (1.0 - 1e-12));
    }
}

#[test]
fn the_hosts_memory_bounds_the_pass_and_slows_the_cpu() {
    let mut rng = crate::test_rng::rng();
    for _ in 0..200 {
        let (inp, _) = random_inputs(&mut rng);
        let read = rng.gen_range(20e9..120e9);
        let free = plan_pass(&inp, None).unwrap();
        let shared = plan_pass(&inp, Some(read)).unwrap();
        let streamed: f64 = inp.layers[shared.resident..]
            .iter()
            .map(|l| l.bytes as f64)
            .sum();
        assert!(shared.pass_s >= streamed / read * (1.0 - 1e-12));
        assert!(shared.pass_s >= free.pass_s * (1.0 - 1e-12));
    }
    let (inp, _) = random_inputs(&mut rng);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = plan_pass(&inp, Some(bad)).unwrap_err().to_string();
        assert!(e.contains("read rate"), "{e}");
    }
}

#[test]
fn the_share_for_a_placed_cache_is_the_middle_of_the_near_best() {
    let mut rng = crate::test_rng::rng();
    for _ in 0..300 {
        let (inp, shared) = random_inputs(&mut rng);
        let flags: Vec<bool> = (0..inp.layers.len()).map(|_| rng.gen_bool(0.4)).collect();
        let (share, pass_s) = share_for(&inp, shared, &flags).unwrap();
        let at = |k: usize| reference(&inp, (shared, false), &flags, k as f64 / SHARE_STEPS as f64);
        let times: Vec<f64> = (0..=SHARE_STEPS).map(at).collect();
        let k = (share * SHARE_STEPS as f64).round() as usize;
        assert!(
            (times[k] - pass_s).abs() <= 1e-12 * pass_s,
            "{} vs {pass_s}",
            times[k]
        );
        let least = times.iter().copied().fold(f64::INFINITY, f64::min);
        assert!(
            pass_s <= least * (1.0 + NEAR_BEST) * (1.0 + 1e-12),
            "{pass_s} vs {least}"
        );
        // Every share between k and the first least is near the best, and
        // the near-best shares reach as far on either side of k.
        let first = times.iter().position(|&t| t == least).unwrap();
        let near = |i: usize| times[i] <= least * (1.0 + NEAR_BEST);
        assert!((k.min(first)..=k.max(first)).all(near), "share {share}");
        let below = (0..=k).rev().take_while(|&i| near(i)).count();
        let above = (k..=SHARE_STEPS).take_while(|&i| near(i)).count();
        assert!(
            below.abs_diff(above) <= 1,
            "{below} below, {above} above {share}"
        );
    }
}

#[test]
fn a_pass_bound_by_the_host_memory_takes_the_middle_share() {
    // No device compute: the copies at p, the CPU at c alone, both together
    // at m < c + p. The pass reads B in B/m at every share between
    // 1 - p/m (the copies at full rate) and c/m (the CPU at full rate).
    let mut rng = crate::test_rng::rng();
    for _ in 0..100 {
        let (c, p): (f64, f64) = (rng.gen_range(30e9..80e9), rng.gen_range(20e9..60e9));
        let m = rng.gen_range(c.max(p) * 1.05..(c + p) * 0.97);
        let bytes = rng.gen_range(100u64 << 20..500 << 20);
        let l = LayerCost {
            bytes,
            whole_bytes: 0,
            cpu_s: bytes as f64 / c,
            gpu_s: 0.0,
        };
        let n = rng.gen_range(4..30);
        let inp = SplitInputs {
            layers: vec![l; n],
            pcie_bps: p,
            join_s: 0.0,
            vram_budget: u64::MAX,
            slots: 1,
        };
        let (share, pass_s) = share_for(&inp, Some(m), &vec![false; n]).unwrap();
        let want = (1.0 - p / m + c / m) / 2.0;
        assert!(
            (share - want).abs() <= 0.03,
            "share {share}, plateau middle {want}"
        );
        let bound = n as f64 * bytes as f64 / m;
        assert!(
            (pass_s - bound).abs() <= 1e-9 * bound,
            "{pass_s} vs {bound}"
        );
    }
}

#[test]
fn the_share_for_a_placed_cache_wants_a_flag_per_layer() {
    let mut rng = crate::test_rng::rng();
    let (inp, read) = random_inputs(&mut rng);
    let n = inp.layers.len();
    let e = share_for(&inp, read, &vec![false; n + 1]).unwrap_err();
    assert!(matches!(e, Error::Input(_)), "{e}");
    assert!(e.to_string().contains(&format!("for {n} layers")), "{e}");
    let e = share_for(&inp, Some(f64::NAN), &vec![false; n]).unwrap_err();
    assert!(e.to_string().contains("read rate"), "{e}");
}
