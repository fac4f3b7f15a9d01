//! Property tests: read plans cover every tensor byte exactly where the slot
//! expects it; widened and aligned reads return what a plain read returns.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use layer_streamer::checkpoint::{plan_reads, READ_ALIGN};
use layer_streamer::io::{AlignedBuf, DirectFile, OpenMode};
use layer_streamer::Error;
use proptest::prelude::*;

/// Tensors laid out in file order: (file, gap before, length) each.
fn layouts() -> impl Strategy<Value = Vec<(usize, u64, u64)>> {
    prop::collection::vec(
        (
            0usize..3,
            prop_oneof![Just(0u64), 0u64..20_000],
            1u64..30_000,
        ),
        1..24,
    )
}

fn to_extents(layout: &[(usize, u64, u64)], base: u64) -> Vec<(usize, u64, u64)> {
    let mut pos = [base; 3];
    layout
        .iter()
        .map(|&(f, gap, len)| {
            let off = pos[f] + gap;
            pos[f] = off + len;
            (f, off, len)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn every_tensor_byte_lands_at_its_slot_offset(layout in layouts(), base in 0u64..100_000, shuffle in any::<u64>()) {
        let mut extents = to_extents(&layout, base);
        // Input order must not matter.
        let n = extents.len();
        extents.rotate_left((shuffle % n as u64) as usize);
        let (reads, slots) = plan_reads(&extents);
        prop_assert_eq!(slots.len(), n);
        let mut expected_slot = 0;
        for r in &reads {
            prop_assert_eq!(r.file_offset % READ_ALIGN, 0);
            prop_assert_eq!(r.len % READ_ALIGN, 0);
            prop_assert_eq!(r.slot_offset % READ_ALIGN, 0);
            prop_assert!(r.len > 0);
            // Packed one after another: no two reads share slot bytes.
            prop_assert_eq!(r.slot_offset, expected_slot);
            expected_slot += r.len;
            prop_assert!(r.required_end <= r.file_offset + r.len && r.required_end > r.file_offset);
        }
        // Reads of one file never overlap, so each file byte has at most one place.
        for (i, a) in reads.iter().enumerate() {
            for b in &reads[i + 1..] {
                prop_assert!(a.file != b.file || a.file_offset + a.len < b.file_offset || b.file_offset + b.len < a.file_offset,
                    "reads {:?} and {:?} touch or overlap", a, b);
            }
        }
        for (i, &(f, off, len)) in extents.iter().enumerate() {
            let covering: Vec<_> = reads.iter().filter(|r| r.file == f && r.file_offset <= off && off + len <= r.file_offset + r.len).collect();
            prop_assert_eq!(covering.len(), 1, "tensor {} covered by {} reads", i, covering.len());
            let r = covering[0];
            prop_assert_eq!(slots[i], r.slot_offset + (off - r.file_offset));
            prop_assert!(off + len <= r.required_end);
        }
        // A layer stored contiguously in one file is one read.
        if layout.iter().all(|&(f, gap, _)| f == layout[0].0 && gap == 0) {
            prop_assert_eq!(reads.len(), 1);
        }
    }
}

/// A file of random bytes on the build's filesystem, shared by the read tests.
fn data_file() -> &'static (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    static FILE: OnceLock<(tempfile::TempDir, std::path::PathBuf, Vec<u8>)> = OnceLock::new();
    FILE.get_or_init(|| {
        let mut rng = common::rng("read_plan_props::data_file");
        let dir = common::tempdir();
        let len = 300_000 + (rand::Rng::gen_range(&mut rng, 0..8192usize));
        let bytes = common::bytes(&mut rng, len);
        let path = dir.path().join("data.bin");
        std::fs::write(&path, &bytes).unwrap();
        (dir, path, bytes)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn read_range_matches_a_plain_read(offset_frac in 0.0f64..1.0, len in 0usize..70_000, mode in 0u8..2) {
        let (_, path, bytes) = data_file();
        let offset = ((bytes.len() as f64) * offset_frac) as usize;
        let len = len.min(bytes.len() - offset);
        let f = DirectFile::open(path, if mode == 0 { OpenMode::Auto } else { OpenMode::Buffered }).unwrap();
        let mut scratch = AlignedBuf::new(4096).unwrap();
        let got = f.read_range(offset as u64, len, &mut scratch).unwrap();
        let mut want = vec![0u8; len];
        std::fs::File::open(path).unwrap().read_exact_at(&mut want, offset as u64).unwrap();
        prop_assert_eq!(got, &want[..]);
        prop_assert_eq!(got, &bytes[offset..offset + len]);
    }

    #[test]
    fn read_aligned_handles_end_of_file(block in 0u64..80, blocks in 1usize..20, need_frac in 0.0f64..1.0) {
        let (_, path, bytes) = data_file();
        let f = DirectFile::open(path, OpenMode::Auto).unwrap();
        let file_len = bytes.len() as u64;
        let offset = (block * 4096).min((file_len / 4096) * 4096);
        let mut buf = AlignedBuf::new(blocks * 4096).unwrap();
        let end = offset + (blocks * 4096) as u64;
        let required = offset + ((end - offset) as f64 * need_frac) as u64;
        let result = f.read_aligned(offset, buf.as_mut_slice(), required.max(offset));
        let real_end = end.min(file_len);
        if required <= file_len {
            prop_assert!(result.is_ok(), "{:?}", result);
            let n = (real_end - offset) as usize;
            prop_assert_eq!(&buf.as_slice()[..n], &bytes[offset as usize..real_end as usize]);
            // Bytes of dst past the end of the file are unspecified: a direct
            // read may overwrite them (some devices zero the whole request).

        } else {
            let e = result.unwrap_err();
            let msg = e.to_string();
            prop_assert!(matches!(e, Error::Io { .. }), "{}", msg);
            prop_assert!(msg.contains("unexpected end of file") && msg.contains("data.bin") && msg.contains(&format!("file is {file_len} bytes")), "{}", msg);
        }
    }
}

#[test]
fn direct_reads_reject_misaligned_requests() {
    let (_, path, _) = data_file();
    let f = DirectFile::open(path, OpenMode::Auto).unwrap();
    eprintln!(
        "data file opened in {} mode, block size {}",
        f.mode(),
        f.block_size()
    );
    if f.mode() == layer_streamer::io::ReadMode::Direct {
        let mut buf = AlignedBuf::new(8192).unwrap();
        let e = f
            .read_aligned(100, &mut buf.as_mut_slice()[..4096], 0)
            .unwrap_err();
        assert!(matches!(e, Error::Input(_)), "{e}");
        let e = f
            .read_aligned(0, &mut buf.as_mut_slice()[1..4097], 0)
            .unwrap_err();
        assert!(e.to_string().contains("block size"), "{e}");
    }
    // A plain file read through the fd agrees too.
    let mut one = [0u8; 1];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut one, 0)
        .unwrap();
}

#[test]
fn tmpfs_falls_back_to_buffered_in_auto_mode_only() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm: skipping");
        return;
    }
    let mut rng = common::rng("tmpfs_falls_back_to_buffered_in_auto_mode_only");
    let dir = tempfile::Builder::new()
        .prefix("ls-test-")
        .tempdir_in(shm)
        .unwrap();
    let path = dir.path().join("data.bin");
    let bytes = common::bytes(&mut rng, 10_000);
    std::fs::write(&path, &bytes).unwrap();
    let f = DirectFile::open(&path, OpenMode::Auto).unwrap();
    if f.mode() == layer_streamer::io::ReadMode::Direct {
        eprintln!("/dev/shm accepts O_DIRECT here: nothing to fall back from");
        return;
    }
    let mut scratch = AlignedBuf::new(0).unwrap();
    assert_eq!(
        f.read_range(123, 9000, &mut scratch).unwrap(),
        &bytes[123..9123]
    );
    let e = DirectFile::open(&path, OpenMode::Direct)
        .unwrap_err()
        .to_string();
    assert!(e.contains("O_DIRECT") && e.contains("data.bin"), "{e}");
}
