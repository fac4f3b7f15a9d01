//! Pass throughput of the streamer over a synthetic model: on the host
//! backend always, and on the CUDA backend when a GPU is present. Each
//! measurement is one pass with a no-op layer function; the reported
//! throughput is the model's layer bytes per pass.
//!
//! ```text
//! cargo bench --bench pass                   # host backend (and CUDA if present)
//! LS_BENCH_PRESET=7b cargo bench --bench pass -- cuda   # a larger model
//! ```

use std::path::Path;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use layer_streamer::synth::{write_model, Arch, Shape, SynthSpec};
use layer_streamer::{cuda, Budget, DType, Device, LayerStreamer, ModelIndex};

fn model(dir: &Path) -> ModelIndex {
    // Under `cargo test --benches` (no `--bench` argument) a tiny model keeps it quick.
    let benching = std::env::args().any(|a| a == "--bench");
    let default = if benching { "small" } else { "tiny" };
    let preset = std::env::var("LS_BENCH_PRESET").unwrap_or_else(|_| default.into());
    let shape = Shape::preset(&preset).expect("LS_BENCH_PRESET: tiny, small, 1.5b or 7b");
    let spec = SynthSpec {
        arch: Arch::Qwen2,
        shape,
        dtype: DType::BF16,
        tie: false,
        shard_size: 4_000_000_000,
        seed: 1,
        threads: 0,
    };
    write_model(dir, &spec).expect("writing the bench model");
    ModelIndex::open(dir).expect("opening the bench model")
}

fn bench(c: &mut Criterion, model: &ModelIndex) {
    let mut devices = vec![Device::Host];
    if cuda::device_count().is_ok_and(|n| n > 0) {
        devices.push(Device::Cuda(0));
    }
    let mut g = c.benchmark_group("pass");
    g.throughput(Throughput::Bytes(model.total_layer_bytes()));
    for device in devices {
        let name = match device {
            Device::Host => "host",
            Device::Cuda(_) => "cuda",
        };
        for (label, pinned) in [("cold", Budget::None), ("warm", Budget::Auto)] {
            let mut s = LayerStreamer::builder(model)
                .device(device)
                .file_dtype()
                .pinned_cache(pinned)
                .build()
                .expect("building the streamer");
            // Fill the caches before measuring the warm case.
            s.run_pass((), |(), _, _, _| Ok(())).expect("a pass");
            g.bench_function(BenchmarkId::new(name, label), |b| {
                b.iter(|| s.run_pass((), |(), _, _, _| Ok(())).expect("a pass"))
            });
        }
    }
    g.finish();
}

fn main() {
    std::fs::create_dir_all("target/bench-fixtures").expect("creating target/bench-fixtures");
    let dir = tempfile::Builder::new()
        .prefix("pass-")
        .tempdir_in("target/bench-fixtures")
        .expect("a temporary directory");
    let model = model(dir.path());
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench(&mut c, &model);
    c.final_summary();
}
