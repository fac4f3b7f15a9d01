//! `layer-streamer inspect`.
//!
//! With `--json`, one JSON document:
//!
//! ```text
//! {
//!   "dir": string,
//!   "files": [{ "path": string, "size": u64, "header_bytes": u64, "data_offset": u64 }],
//!   "dtypes": [string],                      // e.g. ["bf16"]
//!   "layer_prefix": string,                  // e.g. "model.layers"
//!   "num_layers": usize,
//!   "total_layer_bytes": u64,                // bytes streamed per pass
//!   "total_static_bytes": u64,
//!   "max_slot_bytes": u64,                   // the slot size every layer fits in
//!   "layers": [{
//!     "index": usize, "data_bytes": u64, "slot_bytes": u64,
//!     "tensors": [{ "key": string, "name": string, "dtype": string, "shape": [usize],
//!                   "file": usize, "file_offset": u64, "len": u64, "slot_offset": u64 }],
//!     "reads": [{ "file": usize, "file_offset": u64, "len": u64, "slot_offset": u64,
//!                 "required_end": u64 }]
//!   }],
//!   "statics": [{ "name": string, "dtype": string, "shape": [usize], "file": usize,
//!                 "file_offset": u64, "len": u64 }],
//!   "config": object | null,                 // config.json as found
//!   "cuda_statics": {                        // the embedding and output on CUDA
//!     "embedding_device": u64, "embedding_host": u64,  // (one output row); null
//!     "output_device": u64, "output_scratch": u64,     // without a config
//!     "weight_scratch": u64             // quantized layers dequantized at use
//!   } | null
//! }
//! ```
//! `file` fields index `files`; offsets are absolute byte offsets in the file.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use layer_streamer::checkpoint::{Layer, ModelIndex, TensorInfo};
use layer_streamer::llm::StaticsMemory;
use layer_streamer::Result;
use serde_json::{json, Value};

/// Arguments of `inspect`.
#[derive(clap::Args)]
#[command(
    after_help = "--json prints one document: {dir, files[{path,size,header_bytes,data_offset}], \
dtypes, layer_prefix, num_layers, total_layer_bytes, total_static_bytes, max_slot_bytes, \
layers[{index,data_bytes,slot_bytes,tensors[{key,name,dtype,shape,file,file_offset,len,slot_offset}],\
reads[{file,file_offset,len,slot_offset,required_end}]}], statics[{name,dtype,shape,file,file_offset,len}], config, \
cuda_statics{embedding_device,embedding_host,output_device,output_scratch,weight_scratch}}. \
`file` indexes `files`; offsets are absolute byte offsets."
)]
pub struct Args {
    /// The model directory.
    dir: PathBuf,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs `inspect`.
pub fn run(a: Args) -> Result<()> {
    let index = ModelIndex::open(&a.dir)?;
    let mut doc = if a.json {
        serde_json::to_string_pretty(&to_json(&index)).unwrap_or_default()
    } else {
        text(&index)
    };
    if !doc.ends_with('\n') {
        doc.push('\n');
    }
    // A closed pipe (`| head`) is not an error worth reporting.
    match std::io::stdout().lock().write_all(doc.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(layer_streamer::Error::io("writing to", "stdout", None, e))
        }
        _ => Ok(()),
    }
}

fn static_json(t: &TensorInfo) -> Value {
    json!({ "name": t.name, "dtype": t.stored_type(), "shape": t.shape, "file": t.file,
            "file_offset": t.file_offset, "len": t.len })
}

fn to_json(index: &ModelIndex) -> Value {
    let layers: Vec<Value> = index
        .layers()
        .iter()
        .map(|l| {
            let tensors: Vec<Value> = l
                .tensors
                .iter()
                .map(|t| {
                    json!({ "key": t.key, "name": t.info.name, "dtype": t.info.stored_type(),
                            "shape": t.info.shape, "file": t.info.file, "file_offset": t.info.file_offset,
                            "len": t.info.len, "slot_offset": t.slot_offset })
                })
                .collect();
            let reads: Vec<Value> = l
                .reads
                .iter()
                .map(|r| {
                    json!({ "file": r.file, "file_offset": r.file_offset, "len": r.len,
                            "slot_offset": r.slot_offset, "required_end": r.required_end })
                })
                .collect();
            json!({ "index": l.index, "data_bytes": l.data_bytes, "slot_bytes": l.slot_bytes,
                    "tensors": tensors, "reads": reads })
        })
        .collect();
    json!({
        "dir": index.dir().display().to_string(),
        "files": index.files().iter().map(|f| json!({
            "path": f.path.display().to_string(), "size": f.len,
            "header_bytes": f.data_offset - 8, "data_offset": f.data_offset })).collect::<Vec<_>>(),
        "dtypes": index.dtypes().iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        "layer_prefix": index.layer_prefix(),
        "num_layers": index.num_layers(),
        "total_layer_bytes": index.total_layer_bytes(),
        "total_static_bytes": index.total_static_bytes(),
        "max_slot_bytes": index.max_slot_bytes(),
        "layers": layers,
        "statics": index.statics().iter().map(static_json).collect::<Vec<_>>(),
        "config": index.config(),
        "cuda_statics": StaticsMemory::for_model(index, true).ok().map(|m| json!({
            "embedding_device": m.embedding_device, "embedding_host": m.embedding_host,
            "output_device": m.output_device, "output_scratch": m.output_scratch,
            "weight_scratch": m.weight_scratch })),
    })
}

/// Bytes in a readable unit.
fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// What makes two layers look the same: their keys, dtypes and shapes.
fn signature(l: &Layer) -> Vec<(String, String, Vec<usize>)> {
    let mut s: Vec<_> = l
        .tensors
        .iter()
        .map(|t| (t.key.clone(), t.info.stored_type(), t.info.shape.clone()))
        .collect();
    s.sort();
    s
}

fn text(index: &ModelIndex) -> String {
    let mut out = String::new();
    files_text(&mut out, index);
    layers_text(&mut out, index);
    statics_text(&mut out, index);
    extents_text(&mut out, index);
    out
}

/// The directory, its files and the dtypes.
fn files_text(out: &mut String, index: &ModelIndex) {
    _ = writeln!(out, "model directory {}", index.dir().display());
    _ = writeln!(out, "files:");
    for (i, f) in index.files().iter().enumerate() {
        let name = f.path.file_name().map_or_else(
            || f.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        _ = writeln!(
            out,
            "  [{i}] {name}  {} ({} bytes), header {} bytes",
            human(f.len),
            f.len,
            f.data_offset - 8
        );
    }
    let dtypes: Vec<String> = index.dtypes().iter().map(|d| d.to_string()).collect();
    _ = writeln!(out, "dtypes: {}", dtypes.join(", "));
}

/// The layers, runs of layers with the same tensors shown once.
fn layers_text(out: &mut String, index: &ModelIndex) {
    _ = writeln!(
        out,
        "layers: {} x {}.<i>",
        index.num_layers(),
        index.layer_prefix()
    );
    let layers = index.layers();
    let mut start = 0;
    while start < layers.len() {
        let sig = signature(&layers[start]);
        let mut end = start + 1;
        while end < layers.len() && signature(&layers[end]) == sig {
            end += 1;
        }
        let l = &layers[start];
        let range = if end - start == 1 {
            format!("layer {start}")
        } else {
            format!("layers {start}-{}", end - 1)
        };
        _ = writeln!(
            out,
            "  {range}: {} tensors, {} each",
            l.tensors.len(),
            human(l.data_bytes)
        );
        let mut ts: Vec<_> = l.tensors.iter().collect();
        ts.sort_by(|a, b| a.key.cmp(&b.key));
        for t in ts {
            _ = writeln!(
                out,
                "    {:<40} {:<5} {:<16} {}",
                t.key,
                t.info.stored_type(),
                format!("{:?}", t.info.shape),
                human(t.info.len)
            );
        }
        start = end;
    }
}

/// The static tensors and the sizes a pass streams.
fn statics_text(out: &mut String, index: &ModelIndex) {
    _ = writeln!(
        out,
        "static tensors: {} ({})",
        index.statics().len(),
        human(index.total_static_bytes())
    );
    for t in index.statics() {
        _ = writeln!(
            out,
            "  {:<44} {:<5} {:<16} {}",
            t.name,
            t.stored_type(),
            format!("{:?}", t.shape),
            human(t.len)
        );
    }
    if let Ok(m) = StaticsMemory::for_model(index, true) {
        _ = writeln!(
            out,
            "on CUDA, embedding, output and scratches: {} on the device ({} embedding, {} \
             output, {} output scratch, {} weight scratch), {} embedding in host memory",
            human(m.device_bytes()),
            human(m.embedding_device),
            human(m.output_device),
            human(m.output_scratch),
            human(m.weight_scratch),
            human(m.embedding_host)
        );
    }
    _ = writeln!(
        out,
        "bytes streamed per pass: {} ({} bytes)",
        human(index.total_layer_bytes()),
        index.total_layer_bytes()
    );
    _ = writeln!(
        out,
        "largest slot: {} ({} bytes)",
        human(index.max_slot_bytes()),
        index.max_slot_bytes()
    );
}

/// Each layer's coalesced reads.
fn extents_text(out: &mut String, index: &ModelIndex) {
    _ = writeln!(out, "extents (file:offset+len -> slot offset):");
    for l in index.layers() {
        let reads: Vec<String> = l
            .reads
            .iter()
            .map(|r| {
                format!(
                    "[{}]:{}+{} -> {}",
                    r.file, r.file_offset, r.len, r.slot_offset
                )
            })
            .collect();
        _ = writeln!(
            out,
            "  layer {:>3}: {} read{}  {}",
            l.index,
            l.reads.len(),
            if l.reads.len() == 1 { " " } else { "s" },
            reads.join("  ")
        );
    }
}
