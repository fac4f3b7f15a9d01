//! Feeds arbitrary bytes to the safetensors header parser (as a whole file),
//! to the index parser, and to layer discovery over whatever header parses.
#![no_main]

use std::path::Path;

use layer_streamer::checkpoint::{discover_layers, parse_header_bytes, parse_index_json, plan_reads};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    if let Ok(h) = parse_header_bytes(path, data) {
        for t in &h.tensors {
            assert!(t.begin <= t.end && h.data_offset + t.end <= h.file_len);
        }
        let names = h.tensors.iter().map(|t| (t.name.as_str(), t.end - t.begin));
        let _ = discover_layers(names);
        let extents: Vec<(usize, u64, u64)> = h
            .tensors
            .iter()
            .map(|t| (0, h.data_offset + t.begin, t.end - t.begin))
            .collect();
        let (reads, slots) = plan_reads(&extents);
        assert_eq!(slots.len(), extents.len());
        assert!(reads
            .iter()
            .all(|r| r.file_offset % 4096 == 0 && r.len % 4096 == 0));
    }
    let _ = parse_index_json(Path::new("model.safetensors.index.json"), data);
});
