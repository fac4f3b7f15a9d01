//! Corrupt, truncated and hostile GGUF files: each is an error naming the file
//! and the field or tensor at fault, never a panic or a huge allocation. Split
//! sets: discovery, missing parts, inconsistent parts.

use std::path::{Path, PathBuf};

use layer_streamer::gguf::{
    gguf_parts, split_name, GgufFile, GgufModel, GgufWriter, MetaArray, MetaValue, ValueType,
    LIMITS,
};
use layer_streamer::quant::{self, QuantType};
use rand::Rng;

mod common;

const NAME: &str = "model.gguf";

/// A valid file: two metadata keys, an F32 tensor `a` [8 x 2] and a Q8_0
/// tensor `b` [32 x 1], data zero.
fn valid() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", MetaValue::String("llama".into()))
        .unwrap();
    w.metadata(
        "test.list",
        MetaValue::Array(MetaArray {
            elem: ValueType::I32,
            items: vec![MetaValue::I32(1), MetaValue::I32(2)],
        }),
    )
    .unwrap();
    w.tensor("a", QuantType::F32, &[8, 2]).unwrap();
    w.tensor("b", QuantType::Q8_0, &[32, 1]).unwrap();
    let mut bytes = w.header_bytes();
    bytes.resize(bytes.len() + 64 + 64, 0); // a: 64 bytes, b: 34 padded to 64
    bytes
}

fn parse(bytes: &[u8]) -> String {
    let e = GgufFile::parse(NAME, bytes).expect_err("the file must be refused");
    let msg = e.to_string();
    assert!(msg.starts_with(NAME), "the error must name the file: {msg}");
    msg
}

fn find(bytes: &[u8], needle: &[u8]) -> usize {
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("field present")
}

/// Offset of tensor `name`'s dimension count in the header.
fn tensor_info(bytes: &[u8], name: &str) -> usize {
    let mut pat = (name.len() as u64).to_le_bytes().to_vec();
    pat.extend(name.as_bytes());
    find(bytes, &pat) + pat.len()
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn the_valid_file_parses() {
    let f = GgufFile::parse(NAME, &valid()).unwrap();
    assert_eq!(f.tensors.len(), 2);
    assert_eq!(f.tensor("b").unwrap().len, 34);
    assert_eq!(f.architecture(), Some("llama"));
}

#[test]
fn every_truncation_is_an_error() {
    let b = valid();
    let f = GgufFile::parse(NAME, &b).unwrap();
    // Any prefix that cuts the header or tensor b's data is refused; tensor b
    // ends 34 bytes into its padded 64.
    let end_of_b = (f.tensor("b").unwrap().file_offset + 34) as usize;
    for len in 0..end_of_b {
        let msg = parse(&b[..len]);
        assert!(
            msg.contains("truncated") || msg.contains("do not fit"),
            "cut at {len}: {msg}"
        );
    }
    let msg = parse(&b[..end_of_b - 1]);
    assert!(msg.contains("tensor b: data"), "{msg}");
    assert!(GgufFile::parse(NAME, &b[..end_of_b]).is_ok());
}

#[test]
fn bad_magic_and_versions_are_refused() {
    let mut b = valid();
    put_u32(&mut b, 4, 2);
    assert_eq!(GgufFile::parse(NAME, &b).unwrap().version, 2);
    let mut b = valid();
    b[0] = b'X';
    assert!(parse(&b).contains("header: magic"));
    for v in [0u32, 1, 4, 0x0300_0000] {
        let mut b = valid();
        put_u32(&mut b, 4, v);
        let msg = parse(&b);
        assert!(
            msg.contains(&format!(
                "header: version (at offset 4): version {v} is not supported"
            )),
            "{msg}"
        );
    }
}

#[test]
fn huge_counts_and_lengths_are_refused_before_allocating() {
    for (at, field) in [(8, "header: tensor count"), (16, "header: metadata count")] {
        for n in [u64::MAX, 1 << 40, 1 << 19] {
            let mut b = valid();
            put_u64(&mut b, at, n);
            let msg = parse(&b);
            assert!(
                msg.contains(field)
                    && (msg.contains("over the limit") || msg.contains("do not fit")),
                "{n}: {msg}"
            );
        }
    }
    // The first key's length, and the array's count.
    let mut b = valid();
    put_u64(&mut b, 24, LIMITS.string_bytes + 1);
    assert!(parse(&b).contains("metadata key #0 (at offset 32): string length"));
    let mut b = valid();
    put_u64(&mut b, 24, 1 << 20);
    assert!(parse(&b).contains("needs 1048576 bytes but the file ends"));
    let b = valid();
    let count_at = find(&b, b"test.list") + 9 + 4 + 4;
    for (n, why) in [(1u64 << 30, "over the limit"), (1 << 20, "do not fit")] {
        let mut b = b.clone();
        put_u64(&mut b, count_at, n);
        let msg = parse(&b);
        assert!(
            msg.contains("metadata test.list") && msg.contains(why),
            "{msg}"
        );
    }
}

#[test]
fn unknown_types_and_bad_values_are_refused() {
    for id in [10u32, 16, 39, u32::MAX] {
        let mut b = valid();
        let at = tensor_info(&b, "a") + 4 + 16;
        put_u32(&mut b, at, id);
        let msg = parse(&b);
        assert!(
            msg.contains(&format!(
                "tensor a: type (at offset {at}): unknown or unsupported tensor type id {id}"
            )),
            "{msg}"
        );
    }
    let mut b = valid();
    let at = find(&b, b"test.list") + 9;
    put_u32(&mut b, at, 13);
    assert!(parse(&b).contains("metadata test.list (at offset"));
    let mut b = valid();
    let arch = find(&b, b"llama");
    b[arch] = 0xff;
    assert!(parse(&b).contains("metadata general.architecture (at offset"));
    assert!(parse(&b).contains("not UTF-8"));
}

#[test]
fn a_row_that_is_not_whole_blocks_is_refused() {
    let mut w = GgufWriter::new();
    w.tensor("blk.3.attn_q.weight", QuantType::F32, &[4097, 1])
        .unwrap();
    let mut b = w.header_bytes();
    b.resize(b.len() + 4097 * 4, 0);
    let at = tensor_info(&b, "blk.3.attn_q.weight") + 4 + 16;
    put_u32(&mut b, at, QuantType::Q4_K.ggml_type_id());
    assert_eq!(
        parse(&b),
        "model.gguf: tensor blk.3.attn_q.weight: 4097 elements per row is not a multiple of Q4_K's block of 256"
    );
}

#[test]
fn extents_past_the_end_misaligned_or_overlapping_are_refused() {
    let b = valid();
    let at = tensor_info(&b, "b") + 4 + 16 + 4;
    let mut past = b.clone();
    put_u64(&mut past, at, 1 << 20);
    let msg = parse(&past);
    assert!(
        msg.contains("tensor b: data") && msg.contains("runs past the end"),
        "{msg}"
    );
    let mut wrap = b.clone();
    put_u64(&mut wrap, at, u64::MAX - 31);
    assert!(parse(&wrap).contains("runs past the end"));
    let mut misaligned = b.clone();
    put_u64(&mut misaligned, at, 8);
    assert!(parse(&misaligned)
        .contains("tensor b: data offset 8 is not a multiple of the alignment 32"));
    let mut overlap = b.clone();
    put_u64(&mut overlap, at, 32);
    let msg = parse(&overlap);
    assert!(
        msg.contains("tensor a: data at offset 0 (+64 bytes) overlaps tensor b"),
        "{msg}"
    );
}

#[test]
fn too_many_dimensions_and_duplicates_are_refused() {
    let mut b = valid();
    let at = tensor_info(&b, "a");
    put_u32(&mut b, at, 5);
    assert!(parse(&b).contains("tensor a: dimension count"));
    let mut b = valid();
    let at = tensor_info(&b, "b") - 1;
    b[at] = b'a';
    assert!(parse(&b).contains("tensor a: the name appears twice"));
}

fn write_part(dir: &Path, name: &str, no: Option<u16>, count: u16, tensor: &str) -> PathBuf {
    let mut w = GgufWriter::new();
    if let Some(no) = no {
        w.metadata("split.no", MetaValue::U16(no)).unwrap();
        w.metadata("split.count", MetaValue::U16(count)).unwrap();
    }
    w.tensor(tensor, QuantType::F32, &[4]).unwrap();
    let path = dir.join(name);
    let mut out = w.create(&path).unwrap();
    out.write_tensor(&[0u8; 16]).unwrap();
    out.finish().unwrap();
    path
}

#[test]
fn split_sets_are_found_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let parts: Vec<PathBuf> = (1..=3)
        .map(|no| {
            write_part(
                d,
                &split_name("m", no, 3),
                Some(no as u16 - 1),
                3,
                &format!("t{no}"),
            )
        })
        .collect();
    assert_eq!(gguf_parts(d).unwrap(), parts);
    assert_eq!(gguf_parts(&parts[1]).unwrap(), parts);
    let m = GgufModel::open(&parts[2]).unwrap();
    assert_eq!(m.tensor("t2").unwrap().0, 1);
    assert_eq!(m.tensors().count(), 3);

    // A part whose split.no disagrees with its name.
    write_part(d, &split_name("m", 2, 3), Some(0), 3, "t2");
    let e = GgufModel::open(d).unwrap_err().to_string();
    assert!(
        e.contains("m-00002-of-00003.gguf: metadata split.no"),
        "{e}"
    );
    // The same tensor in two parts.
    write_part(d, &split_name("m", 2, 3), Some(1), 3, "t1");
    let e = GgufModel::open(d).unwrap_err().to_string();
    assert!(e.contains("tensor t1: also in"), "{e}");
    // A missing part.
    std::fs::remove_file(&parts[1]).unwrap();
    let e = gguf_parts(&parts[0]).unwrap_err().to_string();
    assert!(
        e.contains("m-00002-of-00003.gguf: part of the split model"),
        "{e}"
    );
    // Unrelated files in a directory.
    write_part(d, "other.gguf", None, 1, "x");
    let e = gguf_parts(d).unwrap_err().to_string();
    assert!(e.contains("not one split set"), "{e}");
}

#[test]
fn bad_bools_alignments_and_deep_arrays_are_refused() {
    let mut w = GgufWriter::new();
    w.metadata("general.alignment", MetaValue::U32(64)).unwrap();
    w.metadata("test.flag", MetaValue::Bool(true)).unwrap();
    let good = w.header_bytes();
    assert_eq!(GgufFile::parse(NAME, &good).unwrap().alignment, 64);
    let mut b = good.clone();
    let at = find(&b, b"test.flag") + 9 + 4;
    b[at] = 2;
    let msg = parse(&b);
    assert!(
        msg.contains(&format!("metadata test.flag (at offset {at}): bool byte 2")),
        "{msg}"
    );
    let mut b = good.clone();
    let at = find(&b, b"general.alignment") + 17 + 4;
    put_u32(&mut b, at, 48);
    assert!(parse(&b).contains("metadata general.alignment: U32(48) is not a u32 power of two"));

    // Arrays nested one level deeper than the limit: the writer refuses them.
    let mut v = MetaValue::U8(0);
    for _ in 0..=LIMITS.array_depth {
        let elem = v.value_type();
        v = MetaValue::Array(MetaArray {
            elem,
            items: vec![v],
        });
    }
    let e = GgufWriter::new()
        .tensor("n".repeat(64), QuantType::F32, &[1])
        .unwrap_err();
    assert!(e.to_string().contains("refused by llama.cpp"), "{e}");
    let e = GgufWriter::new().metadata("test.deep", v).unwrap_err();
    assert!(
        e.to_string()
            .contains("test.deep: arrays nested deeper than"),
        "{e}"
    );
}

/// What the fuzz target (fuzz/fuzz_targets/gguf.rs) does, over random
/// mutations of a valid file: whatever parses has its data inside the file
/// without overlaps and decodes; nothing panics.
#[test]
fn random_corruptions_never_panic() {
    let mut rng = common::rng("random_corruptions_never_panic");
    let mut w = GgufWriter::new();
    w.metadata("a.str", MetaValue::strings(["x", "yz"]))
        .unwrap();
    w.metadata("b.f", MetaValue::F32(1.5)).unwrap();
    for ty in QuantType::ALL {
        w.tensor(ty.name(), ty, &[ty.block_elems(), 2]).unwrap();
    }
    let mut base = w.header_bytes();
    let data_len: u64 = QuantType::ALL
        .iter()
        .map(|t| (2 * t.block_bytes()).next_multiple_of(32))
        .sum();
    base.extend((0..data_len).map(|_| rng.gen::<u8>()));
    for _ in 0..3000 {
        let mut b = base.clone();
        for _ in 0..rng.gen_range(1..4) {
            let at = rng.gen_range(0..b.len());
            match rng.gen_range(0..4) {
                0 => b[at] = rng.gen(),
                1 => b[at] ^= 1 << rng.gen_range(0..8),
                2 => b.truncate(at),
                _ => b[at] = [0, 0xff, 0x7f, 0x80][rng.gen_range(0..4)],
            }
            if b.is_empty() {
                break;
            }
        }
        let Ok(f) = GgufFile::parse(NAME, &b) else {
            continue;
        };
        let mut extents = Vec::new();
        for t in &f.tensors {
            assert!(t.file_offset + t.len <= b.len() as u64, "{}", t.name);
            let data = &b[t.file_offset as usize..(t.file_offset + t.len) as usize];
            let mut out = vec![0f32; t.elems as usize];
            quant::dequantize_f32(t.ty, data, &mut out).unwrap();
            extents.push((t.offset, t.len));
        }
        extents.sort();
        assert!(extents.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
    }
}

/// A well-formed file of an architecture this crate does not run: opening
/// it as a model, or quantizing from it, names the file and the key.
#[test]
fn an_unsupported_architecture_is_refused_by_name() {
    let mut rng = common::rng("an_unsupported_architecture_is_refused_by_name");
    let dir = common::tempdir();
    let arch = ["gemma3", "phi3", "mamba", "bert"][rng.gen_range(0..4)];
    let path = dir.path().join("other.gguf");
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", MetaValue::String(arch.into()))
        .unwrap();
    w.metadata(format!("{arch}.block_count"), MetaValue::U32(1))
        .unwrap();
    w.tensor("token_embd.weight", QuantType::Q8_0, &[32, 4])
        .unwrap();
    w.tensor("blk.0.attn_norm.weight", QuantType::F32, &[32])
        .unwrap();
    let embd = quant::quantize(QuantType::Q8_0, &[0.5; 128]).unwrap();
    let mut out = w.create(&path).unwrap();
    out.write_tensor(&embd).unwrap();
    out.write_tensor(&[0u8; 128]).unwrap();
    out.finish().unwrap();
    let want = format!("general.architecture \"{arch}\" is not supported");
    let e = layer_streamer::ModelIndex::open(&path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("other.gguf") && e.contains(&want), "{e}");
    let opts = layer_streamer::gguf::convert::QuantizeOptions {
        ty: QuantType::Q4_K,
        threads: 1,
    };
    let dst = dir.path().join("out.gguf");
    let e = layer_streamer::gguf::convert::quantize_to_gguf(&path, &dst, &opts, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("other.gguf") && e.contains(&want), "{e}");
    assert!(!dst.exists());
}

/// A tensor written in parts: parts that add up write the same file as one
/// write; a part past the tensor's size, or a tensor left short, is an error
/// naming the tensor.
#[test]
fn tensor_parts_must_add_up() {
    let mut rng = common::rng("tensor_parts_must_add_up");
    let dir = common::tempdir();
    let rows = rng.gen_range(2..20u64);
    let data = common::bytes(&mut rng, (rows * 34) as usize);
    let header = || {
        let mut w = GgufWriter::new();
        w.tensor("t", QuantType::Q8_0, &[32, rows]).unwrap();
        w
    };
    let (one, parts) = (dir.path().join("one.gguf"), dir.path().join("parts.gguf"));
    let mut out = header().create(&one).unwrap();
    out.write_tensor(&data).unwrap();
    out.finish().unwrap();
    let mut out = header().create(&parts).unwrap();
    let cut = rng.gen_range(1..data.len());
    out.write_tensor_part(&data[..cut]).unwrap();
    let e = out.write_tensor(&data).unwrap_err().to_string();
    assert!(
        e.contains("tensor t") && e.contains("written in parts"),
        "{e}"
    );
    out.write_tensor_part(&data[cut..]).unwrap();
    out.finish().unwrap();
    assert_eq!(std::fs::read(&one).unwrap(), std::fs::read(&parts).unwrap());

    let mut out = header().create(&parts).unwrap();
    out.write_tensor_part(&data[..cut]).unwrap();
    let e = out.write_tensor_part(&data).unwrap_err().to_string();
    assert!(e.contains("tensor t") && e.contains("left to write"), "{e}");
    let e = out.finish().unwrap_err().to_string();
    assert!(e.contains("tensor t was declared but not written"), "{e}");
}
