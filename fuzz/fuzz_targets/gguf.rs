//! Feeds arbitrary bytes to the GGUF parser (as a whole file) and checks what
//! it accepts: every tensor's data inside the file, aligned, without overlaps;
//! then decodes each small tensor's bytes with the host dequantizer.
#![no_main]

use layer_streamer::gguf::GgufFile;
use layer_streamer::quant;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::parse("fuzz.gguf", data) else {
        return;
    };
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for t in &f.tensors {
        assert_eq!(t.file_offset, f.data_offset + t.offset);
        assert!(t.file_offset + t.len <= f.file_len);
        assert_eq!(t.offset % f.alignment, 0);
        assert_eq!(t.ty.tensor_size(&t.dims), Ok((t.elems, t.len)));
        extents.push((t.offset, t.len));
        if t.len <= 1 << 16 {
            let bytes = &data[t.file_offset as usize..(t.file_offset + t.len) as usize];
            let mut out = vec![half::bf16::ZERO; t.elems as usize];
            quant::dequantize_bf16(t.ty, bytes, &mut out).expect("whole blocks decode");
        }
    }
    extents.sort();
    assert!(extents.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
});
