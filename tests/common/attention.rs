//! Shared by the attention tests (tests/gpu_attention.rs,
//! tests/gpu_cache_write.rs): device buffers, packed passes, random caches.

use half::{bf16, f16};
use layer_streamer::cuda::{Context, DeviceBuffer, Stream};
use layer_streamer::llm::attention::AttentionShape;
use layer_streamer::DType;
use rand::Rng;

/// Byte written around every output so stray writes show.
pub const SENTINEL: u8 = 0xAB;
/// Spare bytes after every output.
pub const SLACK: usize = 64;

/// A context and a stream on device 0.
pub struct Gpu {
    pub ctx: Context,
    pub stream: Stream,
}

/// [`Gpu`], or `None` when the test skips (see `common::gpu`).
pub fn gpu(test: &str) -> Option<Gpu> {
    let ctx = super::gpu(test)?;
    let stream = Stream::new(&ctx).unwrap();
    Some(Gpu { ctx, stream })
}

impl Gpu {
    pub fn upload(&self, bytes: &[u8]) -> DeviceBuffer {
        let buf = DeviceBuffer::alloc(&self.ctx, bytes.len().max(4)).unwrap();
        buf.copy_from_host(0, bytes).unwrap();
        buf
    }

    pub fn read(&self, buf: &DeviceBuffer) -> Vec<u8> {
        self.stream.synchronize().unwrap();
        let mut host = vec![0u8; buf.len()];
        buf.copy_to_host(0, &mut host).unwrap();
        host
    }
}

pub fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One pass: tokens at `(seq[t], pos[t])` over a cache of `shape`.
pub struct Case {
    pub name: String,
    pub shape: AttentionShape,
    pub seq: Vec<u32>,
    pub pos: Vec<u32>,
}

impl Case {
    pub fn new(
        name: impl Into<String>,
        shape: AttentionShape,
        runs: &[(u32, usize, usize)],
    ) -> Case {
        let (mut seq, mut pos) = (Vec::new(), Vec::new());
        for &(s, p0, n) in runs {
            seq.extend(std::iter::repeat_n(s, n));
            pos.extend((p0..p0 + n).map(|p| p as u32));
        }
        Case {
            name: name.into(),
            shape,
            seq,
            pos,
        }
    }

    /// Length of the run of one sequence's tokens that token `t` is in.
    pub fn run_len(&self, t: usize) -> usize {
        let s = self.seq[t];
        let before = self.seq[..t].iter().rev().take_while(|&&x| x == s).count();
        let after = self.seq[t..].iter().take_while(|&&x| x == s).count();
        before + after
    }
}

pub fn shape(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    seqs: usize,
    len: usize,
) -> AttentionShape {
    AttentionShape {
        heads,
        kv_heads,
        head_dim,
        max_seqs: seqs,
        max_len: len,
    }
}

/// Random values in [-1, 1] rounded to `dtype`: (values, stored bytes).
pub fn random_cache(rng: &mut impl Rng, n: usize, dtype: DType) -> (Vec<f32>, Vec<u8>) {
    let mut vals = Vec::with_capacity(n);
    let mut bytes = Vec::with_capacity(n * dtype.size());
    for _ in 0..n {
        let x: f32 = rng.gen_range(-1.0..1.0);
        match dtype {
            DType::BF16 => {
                let h = bf16::from_f32(x);
                vals.push(h.to_f32());
                bytes.extend(h.to_bits().to_le_bytes());
            }
            DType::F16 => {
                let h = f16::from_f32(x);
                vals.push(h.to_f32());
                bytes.extend(h.to_bits().to_le_bytes());
            }
            _ => {
                vals.push(x);
                bytes.extend(x.to_le_bytes());
            }
        }
    }
    (vals, bytes)
}

pub fn half_to_f64(bits: u16, dtype: DType) -> f64 {
    if dtype == DType::F16 {
        f16::from_bits(bits).to_f64()
    } else {
        bf16::from_bits(bits).to_f64()
    }
}

/// Output and cache dtypes: 16-bit caches of each weight dtype, and f32.
pub const DTYPES: &[(DType, DType)] = &[
    (DType::BF16, DType::BF16),
    (DType::F16, DType::F16),
    (DType::BF16, DType::F32),
];
