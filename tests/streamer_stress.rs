//! Many short passes over streamers whose stage threads live across passes:
//! random configurations, errors and panics injected at random layers,
//! streamers dropped mid-life. Every pass that succeeds must hand the layer
//! function the files' bytes, and the host backend's slot checks must find
//! nothing (a slot overwritten while in use would fail a pass).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::models::{expected_layers, small_model};
use common::tempdir;
use layer_streamer::{Budget, DType, Device, Error, LayerStreamer, ModelIndex};
use rand::Rng;

/// What the layer function does at one layer of a pass.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    Error(usize),
    Panic(usize),
}

fn random_streamer(rng: &mut impl Rng, model: &ModelIndex) -> LayerStreamer {
    let budget = |rng: &mut dyn rand::RngCore| match rng.gen_range(0..3) {
        0 => Budget::None,
        1 => Budget::Bytes(model.max_slot_bytes() * 2 + 8192),
        _ => Budget::Auto,
    };
    LayerStreamer::builder(model)
        .device(Device::Host)
        .file_dtype()
        .n_gpu(rng.gen_range(0..3))
        .n_cpu(rng.gen_range(0..3))
        .n_cpu_pinned(rng.gen_range(0..3))
        .batch_gpu(rng.gen_range(1..3))
        .batch_cpu(rng.gen_range(1..3))
        .batch_cpu_pinned(rng.gen_range(1..3))
        .reader_threads(rng.gen_range(1..4))
        .read_chunk(4096 * rng.gen_range(1..4))
        .pinned_cache(budget(rng))
        .gpu_cache(if rng.gen_bool(0.2) {
            budget(rng)
        } else {
            Budget::None
        })
        .build()
        .expect("building a streamer")
}

/// Runs one pass with `fault`; checks the bytes of every layer it sees.
fn pass(
    s: &mut LayerStreamer,
    expected: &[Vec<(String, Vec<u8>)>],
    fault: Fault,
) -> std::thread::Result<layer_streamer::Result<usize>> {
    catch_unwind(AssertUnwindSafe(|| {
        s.run_pass(0usize, |n, w, layer, _| {
            match fault {
                Fault::Error(l) if l == layer => {
                    return Err(Error::Input(format!("injected at layer {layer}")))
                }
                Fault::Panic(l) if l == layer => panic!("injected at layer {layer}"),
                _ => {}
            }
            for (key, want) in &expected[layer] {
                let v = w.tensor(key)?;
                let got = w.host_bytes(&v).expect("host bytes");
                assert!(got == &want[..], "layer {layer} {key}: bytes differ");
            }
            Ok(n + 1)
        })
    }))
}

#[test]
fn short_passes_with_injected_faults_and_drops() {
    let mut rng = common::rng("short_passes_with_injected_faults_and_drops");
    let dir = tempdir();
    let layers = rng.gen_range(3..7);
    let model = small_model(dir.path(), &mut rng, layers, DType::BF16);
    let expected = expected_layers(&model);
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..12 {
        let mut s = random_streamer(&mut rng, &model);
        // Drop mid-life: after a random number of passes, sometimes right
        // after a failed one.
        for _ in 0..rng.gen_range(1..60) {
            let fault = match rng.gen_range(0..10) {
                0 => Fault::Error(rng.gen_range(0..layers)),
                1 => Fault::Panic(rng.gen_range(0..layers)),
                _ => Fault::None,
            };
            match (fault, pass(&mut s, &expected, fault)) {
                (Fault::None, Ok(Ok(n))) => {
                    assert_eq!(n, layers);
                    ok += 1;
                }
                (Fault::Error(l), Ok(Err(Error::LayerFn { layer, .. }))) => {
                    assert_eq!(layer, l);
                    failed += 1;
                }
                (Fault::Panic(_), Err(_)) => failed += 1,
                (fault, Ok(r)) => panic!("{fault:?}: the pass returned {:?}", r.map(|_| ())),
                (fault, Err(_)) => panic!("{fault:?}: the pass panicked"),
            }
        }
    }
    eprintln!("{ok} passes succeeded, {failed} failed as injected");
    assert!(ok > 0 && failed > 0);
}

/// Passes per second over a tiny model on the host backend, where a pass
/// costs little more than its set-up: `cargo test --test streamer_stress --
/// --ignored --nocapture passes_per_second`.
#[test]
#[ignore = "a measurement, not a check"]
fn passes_per_second() {
    let mut rng = common::rng("passes_per_second");
    let dir = tempdir();
    let model = small_model(dir.path(), &mut rng, 4, DType::BF16);
    for (label, n_cpu, pinned) in [
        ("defaults, pinned cache", 0, Budget::Auto),
        ("n_cpu 2, pinned cache", 2, Budget::Auto),
        ("defaults, no cache", 0, Budget::None),
    ] {
        let mut s = LayerStreamer::builder(&model)
            .device(Device::Host)
            .file_dtype()
            .n_cpu(n_cpu)
            .pinned_cache(pinned)
            .build()
            .unwrap();
        for _ in 0..50 {
            s.run_pass((), |(), _, _, _| Ok(())).unwrap();
        }
        let n = 2000;
        let t = std::time::Instant::now();
        for _ in 0..n {
            s.run_pass((), |(), _, _, _| Ok(())).unwrap();
        }
        let rate = n as f64 / t.elapsed().as_secs_f64();
        eprintln!("{label}: {rate:.0} passes/s");
    }
}
