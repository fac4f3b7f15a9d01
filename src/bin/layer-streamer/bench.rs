//! `layer-streamer bench`: the streamer's speed next to the ceilings measured
//! in the same run.
//!
//! In order: the disk's best sequential read of the model's files (O_DIRECT
//! and buffered, over reader threads × request sizes, page cache dropped
//! before each point when permitted), the host-to-device bandwidth from
//! pinned and pageable memory, cold passes (nothing cached, page cache
//! dropped), warm passes (weights in the pinned cache), and passes whose layer
//! function keeps the compute stream busy for a set time per layer, which
//! show whether transfer and compute overlap.

use std::time::Duration;

use layer_streamer::bench::{self as lsb, DiskResult};
use layer_streamer::io::OpenMode;
use layer_streamer::pipeline::{gbps_of, parse_size};
use layer_streamer::{cuda, Budget, Device, LayerStreamer, ModelIndex, PassStats, Result};
use serde_json::json;

use crate::opts::StreamerOpts;

/// Arguments of `bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (Hugging Face layout).
    #[arg(long)]
    model: std::path::PathBuf,
    #[command(flatten)]
    opts: StreamerOpts,
    /// Warm passes (weights in the pinned cache).
    #[arg(long, default_value_t = 3)]
    passes: usize,
    /// Cold passes (nothing cached, page cache dropped before each).
    #[arg(long, default_value_t = 1)]
    cold_passes: usize,
    /// Per-layer compute time of the overlap passes, in ms; default: the
    /// per-layer transfer time at the measured ceiling; 0 skips them.
    #[arg(long)]
    compute_ms: Option<f64>,
    /// Bytes read per point of the disk sweep.
    #[arg(long, default_value = "1GiB")]
    disk_sample: String,
    /// Reader threads of the disk sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    disk_threads: Vec<usize>,
    /// Request sizes of the disk sweep.
    #[arg(long, value_delimiter = ',', default_value = "4MiB,16MiB,64MiB")]
    disk_chunks: Vec<String>,
    /// Skip the disk sweep.
    #[arg(long)]
    skip_disk: bool,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

macro_rules! say {
    ($json:expr, $($t:tt)*) => { if !$json { println!($($t)*); } };
}

/// Everything one `bench` run measured, for the JSON document.
struct Measured {
    disk: Vec<DiskResult>,
    cache_note: String,
    best_disk: Option<DiskResult>,
    h2d: Option<lsb::H2dResult>,
    cold: Vec<PassStats>,
    fill: PassStats,
    warm: Vec<PassStats>,
    /// The per-layer compute time of the overlap passes.
    per_layer: Duration,
    /// The overlap passes, each with its ratio to max(transfer, compute).
    overlap: Vec<(PassStats, f64)>,
    memory: layer_streamer::streamer::MemoryUse,
}

/// Runs `bench`.
pub fn run(a: Args) -> Result<()> {
    let model = ModelIndex::open(&a.model)?;
    let cfg = a.opts.config()?;
    let files = lsb::model_files(&model);
    say!(
        a.json,
        "model {}: {} layers, {:.3} GB per pass, largest layer {:.1} MB, {} files",
        a.model.display(),
        model.num_layers(),
        model.total_layer_bytes() as f64 / 1e9,
        model.max_slot_bytes() as f64 / 1e6,
        files.len()
    );
    let ctx = open_device(cfg.device, a.json)?;
    let (disk, cache_note) = disk_sweep(&a, &model, &files)?;
    let best_disk = disk
        .iter()
        .copied()
        .max_by(|x, y| x.gbps().total_cmp(&y.gbps()));
    if let Some(b) = best_disk {
        say!(
            a.json,
            "  best: {:.2} GB/s ({:?}, {} threads x {} MiB)",
            b.gbps(),
            b.mode,
            b.threads,
            b.chunk >> 20
        );
    }
    let h2d = match &ctx {
        Some(ctx) => Some(h2d_bandwidth(ctx, &model, a.json)?),
        None => None,
    };
    let cold = cold_passes(&a, &model, &cfg, &files, best_disk)?;
    let mut s = warm_streamer(&model, &cfg, a.json)?;
    let (fill, warm) = warm_passes(&mut s, a.passes, h2d, a.json)?;
    let transfer = warm.iter().map(|p| p.wall).min().unwrap_or(fill.wall);
    let per_layer = match a.compute_ms {
        Some(ms) => Duration::from_secs_f64(ms / 1e3),
        None => transfer / model.num_layers().max(1) as u32,
    };
    let overlap = overlap_passes(&mut s, ctx.as_ref(), per_layer, transfer, a.passes, a.json)?;
    if a.json {
        let m = Measured {
            disk,
            cache_note,
            best_disk,
            h2d,
            cold,
            fill,
            warm,
            per_layer,
            overlap,
            memory: s.memory().clone(),
        };
        let doc = json_doc(&a, &model, &cfg, ctx.as_ref(), &m);
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    }
    Ok(())
}

/// A context on the CUDA device; `None` on the host backend.
fn open_device(device: Device, json: bool) -> Result<Option<cuda::Context>> {
    match device {
        Device::Cuda(n) => {
            let ctx = cuda::Context::new(n)?;
            let (major, minor) = cuda::driver_version()?;
            say!(
                json,
                "device cuda:{n}: {} (driver CUDA {major}.{minor})",
                ctx.name()?
            );
            Ok(Some(ctx))
        }
        Device::Host => {
            say!(json, "device: host backend (no GPU)");
            Ok(None)
        }
    }
}

/// The disk (1): every mode × reader threads × request size, page cache
/// dropped before each point where permitted. Returns the points and what
/// happened to the page cache.
fn disk_sweep(
    a: &Args,
    model: &ModelIndex,
    files: &[std::path::PathBuf],
) -> Result<(Vec<DiskResult>, String)> {
    let mut disk = Vec::new();
    let mut cache_note = String::new();
    if a.skip_disk {
        return Ok((disk, cache_note));
    }
    let sample = parse_size(&a.disk_sample)?.min(model.files().iter().map(|f| f.len).sum());
    say!(
        a.json,
        "\ndisk: sequential read of {:.2} GB of the model's files per point",
        sample as f64 / 1e9
    );
    for mode in [OpenMode::Direct, OpenMode::Buffered] {
        for &t in &a.disk_threads {
            for c in &a.disk_chunks {
                let chunk = parse_size(c)?;
                cache_note = lsb::drop_page_cache(files).describe().to_string();
                let r = lsb::disk_read(files, mode, t, chunk, sample)?;
                say!(
                    a.json,
                    "  {:<8} {:>2} threads x {:>3} MiB: {:>6.2} GB/s",
                    format!("{:?}", r.mode).to_lowercase(),
                    t,
                    chunk >> 20,
                    r.gbps()
                );
                disk.push(r);
            }
        }
    }
    say!(a.json, "  ({cache_note})");
    Ok((disk, cache_note))
}

/// Host to device (2), pinned and pageable.
fn h2d_bandwidth(ctx: &cuda::Context, model: &ModelIndex, json: bool) -> Result<lsb::H2dResult> {
    let n = (model.max_slot_bytes() as usize).clamp(64 << 20, 1 << 30);
    let r = lsb::h2d_bandwidth(ctx, n, 5)?;
    say!(
        json,
        "\nh2d ({} MiB copies): pinned {:.1} GB/s, pageable {:.1} GB/s",
        n >> 20,
        r.pinned_gbps,
        r.pageable_gbps
    );
    Ok(r)
}

/// Cold passes (3): no cache, page cache dropped before each.
fn cold_passes(
    a: &Args,
    model: &ModelIndex,
    cfg: &layer_streamer::StreamerConfig,
    files: &[std::path::PathBuf],
    best_disk: Option<DiskResult>,
) -> Result<Vec<PassStats>> {
    let mut cold = Vec::new();
    if a.cold_passes == 0 {
        return Ok(cold);
    }
    let mut s = LayerStreamer::builder(model)
        .config(cfg.clone())
        .pinned_cache(Budget::None)
        .gpu_cache(Budget::None)
        .build()?;
    say!(
        a.json,
        "\ncold passes (no cache; {}):",
        lsb::drop_page_cache(files).describe()
    );
    for _ in 0..a.cold_passes {
        lsb::drop_page_cache(files);
        s.run_pass((), |(), _, _, _| Ok(()))?;
        let st = s.last_pass_stats().clone();
        print_pass(a.json, &st, best_disk.map(|b| ("best disk read", b.gbps())));
        cold.push(st);
    }
    Ok(cold)
}

/// The streamer of the warm and overlap passes: the configuration's, with a
/// pinned cache (`auto` where it has none).
fn warm_streamer(
    model: &ModelIndex,
    cfg: &layer_streamer::StreamerConfig,
    json: bool,
) -> Result<LayerStreamer> {
    let pinned = match cfg.pinned_cache {
        Budget::None => Budget::Auto,
        b => b,
    };
    let s = LayerStreamer::builder(model)
        .config(cfg.clone())
        .pinned_cache(pinned)
        .build()?;
    let mem = s.memory();
    say!(
        json,
        "\nwarm passes: {} of {} layers in the pinned cache ({:.2} GB), {} device slots of {:.1} MB ({:.2} GB of device memory)",
        mem.pinned_cache_layers,
        model.num_layers(),
        mem.pinned_cache_bytes as f64 / 1e9,
        mem.gpu_slots,
        mem.gpu_slot_size as f64 / 1e6,
        mem.device_bytes() as f64 / 1e9
    );
    Ok(s)
}

/// Warm passes (4): a pass that fills the pinned cache, then `passes` from it.
fn warm_passes(
    s: &mut LayerStreamer,
    passes: usize,
    h2d: Option<lsb::H2dResult>,
    json: bool,
) -> Result<(PassStats, Vec<PassStats>)> {
    s.run_pass((), |(), _, _, _| Ok(()))?;
    let fill = s.last_pass_stats().clone();
    say!(
        json,
        "  fill pass: {:.3} s, {:.2} GB/s",
        fill.wall.as_secs_f64(),
        fill.gbps()
    );
    let ceiling = h2d.map(|h| ("pinned h2d", h.pinned_gbps));
    let mut warm = Vec::new();
    for _ in 0..passes {
        s.run_pass((), |(), _, _, _| Ok(()))?;
        let st = s.last_pass_stats().clone();
        print_pass(json, &st, ceiling);
        warm.push(st);
    }
    Ok((fill, warm))
}

/// Overlap (5): passes whose layer function keeps the compute stream busy
/// for `per_layer`; each with its ratio to max(transfer, compute).
fn overlap_passes(
    s: &mut LayerStreamer,
    ctx: Option<&cuda::Context>,
    per_layer: Duration,
    transfer: Duration,
    passes: usize,
    json: bool,
) -> Result<Vec<(PassStats, f64)>> {
    let mut overlap = Vec::new();
    if per_layer.is_zero() || passes == 0 {
        return Ok(overlap);
    }
    let spinner = ctx.map(lsb::Spinner::load).transpose()?;
    let compute = per_layer * s.model().num_layers() as u32;
    say!(
        json,
        "\noverlap passes: {:.3} ms of compute per layer ({:.3} s per pass) against {:.3} s of transfer:",
        per_layer.as_secs_f64() * 1e3,
        compute.as_secs_f64(),
        transfer.as_secs_f64()
    );
    for _ in 0..passes {
        s.run_pass((), |(), _, _, stream| {
            match (&spinner, stream.cuda()) {
                (Some(sp), Some(cs)) => sp.spin(cs, per_layer)?,
                _ => std::thread::sleep(per_layer),
            }
            Ok(())
        })?;
        let st = s.last_pass_stats().clone();
        let ratio = st.wall.as_secs_f64() / transfer.max(compute).as_secs_f64();
        say!(
            json,
            "  pass {}: {:.3} s = {:.3} x max(transfer, compute) [target <= 1.05]",
            st.pass,
            st.wall.as_secs_f64(),
            ratio
        );
        overlap.push((st, ratio));
    }
    Ok(overlap)
}

fn pass_json(p: &PassStats, ceiling: Option<f64>) -> serde_json::Value {
    json!({
        "pass": p.pass, "seconds": p.wall.as_secs_f64(), "gbps": p.gbps(),
        "ratio_to_ceiling": ceiling.map(|c| p.gbps() / c),
        "bound_by": p.bound_by().name(),
        "read": stage_json(&p.read), "pin": stage_json(&p.pin),
        "h2d": stage_json(&p.h2d), "compute": stage_json(&p.compute),
        "pinned_cache_hits": p.pinned_cache_hits, "gpu_cache_hits": p.gpu_cache_hits,
        "convert_seconds": p.convert.as_secs_f64(),
    })
}

/// The `--json` document.
fn json_doc(
    a: &Args,
    model: &ModelIndex,
    cfg: &layer_streamer::StreamerConfig,
    ctx: Option<&cuda::Context>,
    m: &Measured,
) -> serde_json::Value {
    let mem = &m.memory;
    let best_disk_gbps = m.best_disk.map(|b| b.gbps());
    json!({
        "model": a.model.display().to_string(),
        "layers": model.num_layers(),
        "bytes_per_pass": model.total_layer_bytes(),
        "device": cfg.device.to_string(),
        "device_name": ctx.and_then(|c| c.name().ok()),
        "config": format!("{cfg:?}"),
        "disk": m.disk.iter().map(|d| json!({
            "mode": format!("{:?}", d.mode).to_lowercase(), "threads": d.threads,
            "chunk": d.chunk, "gbps": d.gbps(),
        })).collect::<Vec<_>>(),
        "disk_cache": m.cache_note,
        "best_disk_gbps": best_disk_gbps,
        "h2d": m.h2d.map(|h| json!({"bytes": h.bytes, "pinned_gbps": h.pinned_gbps, "pageable_gbps": h.pageable_gbps})),
        "memory": {
            "device_bytes": mem.device_bytes(), "pinned_bytes": mem.pinned_bytes(),
            "gpu_slots": mem.gpu_slots, "gpu_slot_size": mem.gpu_slot_size,
            "pinned_cache_layers": mem.pinned_cache_layers,
        },
        "cold": m.cold.iter().map(|p| pass_json(p, best_disk_gbps)).collect::<Vec<_>>(),
        "fill": pass_json(&m.fill, None),
        "warm": m.warm.iter().map(|p| pass_json(p, m.h2d.map(|h| h.pinned_gbps))).collect::<Vec<_>>(),
        "overlap": m.overlap.iter().map(|(p, r)| {
            let mut j = pass_json(p, None);
            j["compute_ms_per_layer"] = json!(m.per_layer.as_secs_f64() * 1e3);
            j["ratio_to_max_transfer_compute"] = json!(r);
            j
        }).collect::<Vec<_>>(),
    })
}

fn stage_json(s: &layer_streamer::pipeline::StageStats) -> serde_json::Value {
    json!({
        "bytes": s.bytes, "busy_s": s.busy.as_secs_f64(),
        "stalled_s": s.stalled.as_secs_f64(), "items": s.items,
    })
}

fn print_pass(json: bool, st: &PassStats, ceiling: Option<(&str, f64)>) {
    if json {
        return;
    }
    let vs = match ceiling {
        Some((name, c)) if c > 0.0 => {
            format!(" = {:.1}% of {name} ({c:.2} GB/s)", 100.0 * st.gbps() / c)
        }
        _ => String::new(),
    };
    println!(
        "  pass {}: {:.3} s, {:.2} GB/s{vs}; bound by {}",
        st.pass,
        st.wall.as_secs_f64(),
        st.gbps(),
        st.bound_by().name()
    );
    for stage in layer_streamer::pipeline::Stage::ALL {
        let x = st.stage(stage);
        println!(
            "    {:<8} {:>8.3} GB  busy {:>7.3} s ({:>6.2} GB/s)  stalled {:>7.3} s",
            stage.name(),
            x.bytes as f64 / 1e9,
            x.busy.as_secs_f64(),
            gbps_of(x.bytes, x.busy),
            x.stalled.as_secs_f64()
        );
    }
}
