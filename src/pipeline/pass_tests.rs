//! Tests of the pass with faults injected inside the pipeline, and of the
//! slot lifetime across streams, on the host backend.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::pipeline::compute::ComputeStream;
use crate::pipeline::host::{CopyGuard, HostStream};
use crate::pipeline::StreamH;
use crate::synth::{write_model, Arch, Shape, SynthSpec};
use crate::{DType, Device, Error, LayerStreamer, ModelIndex};

fn tiny_model(dir: &std::path::Path) -> ModelIndex {
    let seed = std::env::var("LS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (LS_SEED replays)");
    let spec = SynthSpec {
        arch: Arch::Qwen2,
        shape: Shape::preset("tiny").expect("the tiny preset"),
        dtype: DType::BF16,
        tie: false,
        shard_size: 4_000_000_000,
        seed,
        threads: 0,
    };
    write_model(dir, &spec).expect("writing a tiny model");
    ModelIndex::open(dir).expect("opening the tiny model")
}

fn streamer(model: &ModelIndex, n_cpu: usize) -> LayerStreamer {
    LayerStreamer::builder(model)
        .device(Device::Host)
        .file_dtype()
        .n_gpu(0)
        .n_cpu(n_cpu)
        .n_cpu_pinned(2)
        .reader_threads(2)
        .build()
        .expect("building a host streamer")
}

#[test]
fn a_panic_in_the_transfer_thread_ends_the_pass_and_the_next_pass_works() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let layers = model.num_layers();
    for n_cpu in [0, 2] {
        let mut s = streamer(&model, n_cpu);
        for at in 0..layers {
            let faults = &s.pipeline.ctx.faults;
            faults.h2d_panic_at.store(at, Ordering::Relaxed);
            let err = s.run_pass(0, |n, _, _, _| Ok(n + 1)).unwrap_err();
            assert!(
                matches!(&err, Error::Pipeline(m) if m.contains("transfer thread panicked")),
                "{err}"
            );
            s.pipeline
                .ctx
                .faults
                .h2d_panic_at
                .store(usize::MAX, Ordering::Relaxed);
            let seen = s.run_pass(0, |n, _, _, _| Ok(n + 1)).unwrap();
            assert_eq!(seen, layers);
        }
    }
}

#[test]
fn the_host_backend_catches_a_slot_recycled_while_its_layer_function_runs() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let mut s = streamer(&model, 0);
    s.pipeline
        .ctx
        .faults
        .release_early
        .store(true, Ordering::Relaxed);
    let err = s
        .run_pass((), |(), _, _, _| {
            // Long enough for the next copy to land in the slot.
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        })
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("was overwritten while a layer function could still read it"),
        "{err}"
    );
}

/// Per layer: the first tensor's bytes as the layer function saw them, and
/// as work queued on another stream read them later.
fn side_stream_reads(s: &mut LayerStreamer, hold: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    let side = ComputeStream {
        inner: StreamH::Host(HostStream::spawn("side").unwrap()),
    };
    let StreamH::Host(host) = &side.inner else {
        unreachable!()
    };
    let layers = s.model().num_layers();
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(layers);
    for (i, l) in s.model().layers().iter().enumerate() {
        let n = l.tensors[0].info.len as usize;
        assert!(n > 0, "layer {i}'s first tensor is empty");
        out.push((Vec::new(), vec![0; n]));
    }
    let later: Vec<u64> = out.iter_mut().map(|(_, b)| b.as_mut_ptr() as u64).collect();
    let seen = s
        .run_pass(Vec::new(), |mut seen, w, layer, _| {
            let v = w.tensors().next().expect("a tensor");
            seen.push(w.host_bytes(&v).expect("host bytes").to_vec());
            // A slow kernel, then a read of the slot, on another stream.
            host.delay(Duration::from_millis(20));
            // SAFETY: `later[layer]` holds the tensor's bytes and outlives
            // the side stream's synchronize below; the slot stays allocated
            // until the streamer is dropped, after that synchronize.
            unsafe {
                host.copy(
                    later[layer],
                    v.ptr() as *const u8,
                    v.bytes() as usize,
                    CopyGuard::default(),
                )
            };
            if hold {
                w.release_after(&side)?;
            }
            Ok(seen)
        })
        .unwrap();
    side.synchronize().unwrap();
    for (o, s) in out.iter_mut().zip(seen) {
        o.0 = s;
    }
    out
}

#[test]
fn release_after_keeps_a_slot_until_another_streams_work_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let mut s = streamer(&model, 0);
    for _ in 0..3 {
        for (layer, (seen, later)) in side_stream_reads(&mut s, true).iter().enumerate() {
            assert!(
                seen == later,
                "layer {layer}: the slot changed under the side stream"
            );
        }
    }
    // Without the hold, the next layer's copy overwrites the slot (one device
    // slot) before the side stream reads it: what release_after prevents.
    let reads = side_stream_reads(&mut s, false);
    assert!(
        reads.iter().any(|(seen, later)| seen != later),
        "every side-stream read matched without release_after"
    );
}
