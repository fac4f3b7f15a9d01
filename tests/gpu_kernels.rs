//! The cast and SwiGLU kernels against host references, on a GPU.
//!
//! Casts must be bit-exact with the `half` crate (NaN compared as "is NaN");
//! SwiGLU must be within one bf16 ulp of an f64 reference. Skips without a
//! driver unless `LS_REQUIRE_GPU=1`.

mod common;

use half::{bf16, f16};
use layer_streamer::cuda::{Context, DeviceBuffer, Stream};
use layer_streamer::kernels::Kernels;
use layer_streamer::{DType, Error};
use rand::Rng;

/// Byte written around every output so stray writes show.
const SENTINEL: u8 = 0xAB;
/// Spare bytes after every range in a device buffer.
const SLACK: usize = 64;

struct Gpu {
    ctx: Context,
    stream: Stream,
    kernels: Kernels,
}

fn gpu(test: &str) -> Option<Gpu> {
    let ctx = common::gpu(test)?;
    let stream = Stream::new(&ctx).unwrap();
    let kernels = Kernels::load(&ctx).unwrap();
    Some(Gpu {
        ctx,
        stream,
        kernels,
    })
}

impl Gpu {
    /// A device buffer holding `bytes` at byte `offset`, sentinel elsewhere.
    fn upload(&self, bytes: &[u8], offset: usize) -> DeviceBuffer {
        let mut host = vec![SENTINEL; offset + bytes.len() + SLACK];
        host[offset..offset + bytes.len()].copy_from_slice(bytes);
        let buf = DeviceBuffer::alloc(&self.ctx, host.len()).unwrap();
        buf.copy_from_host(0, &host).unwrap();
        buf
    }

    /// A sentinel-filled device buffer for `len` output bytes at `offset`.
    fn output(&self, len: usize, offset: usize) -> DeviceBuffer {
        self.upload(&vec![SENTINEL; len], offset)
    }

    /// Waits for the stream, reads `len` bytes at `offset` and checks that every
    /// byte around them is still the sentinel.
    fn download(&self, buf: &DeviceBuffer, offset: usize, len: usize) -> Vec<u8> {
        self.stream.synchronize().unwrap();
        let mut host = vec![0u8; buf.len()];
        buf.copy_to_host(0, &mut host).unwrap();
        let outside = host[..offset].iter().chain(&host[offset + len..]);
        assert!(
            outside.into_iter().all(|&b| b == SENTINEL),
            "a kernel wrote outside its output range"
        );
        host[offset..offset + len].to_vec()
    }
}

fn u16s(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

fn bytes_of_u16(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_of_u32(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn want_from_f16(bits: u16) -> u16 {
    // f16 -> f32 is exact, so this is the correctly rounded f16 -> bf16.
    bf16::from_f32(f16::from_bits(bits).to_f32()).to_bits()
}

fn want_from_f32(bits: u32) -> u16 {
    bf16::from_f32(f32::from_bits(bits)).to_bits()
}

fn assert_same_bf16(what: &str, i: usize, input: String, got: u16, want: u16) {
    let ok = if bf16::from_bits(want).is_nan() {
        bf16::from_bits(got).is_nan()
    } else {
        got == want
    };
    assert!(
        ok,
        "{what}: element {i} (input {input}): got {got:#06x}, want {want:#06x}"
    );
}

/// f16 bit patterns worth checking by name: zeros, subnormals, the normal
/// boundary, Inf, NaNs, and rounding ties (f16 keeps 3 more mantissa bits than bf16).
const SPECIAL_F16: &[u16] = &[
    0x0000, 0x8000, 0x0001, 0x8001, 0x0007, 0x03ff, 0x83ff, 0x0400, 0x3c00, 0xbc00, 0x3c04, 0x3c0c,
    0x3c05, 0x3c03, 0x3c0b, 0x7bff, 0xfbff, 0x7c00, 0xfc00, 0x7e00, 0xfe00, 0x7c01, 0x7fff, 0xffff,
];

/// f32 bit patterns worth checking by name: zeros, subnormals that round up,
/// down and to even, ties in the normal range, overflow into Inf, Inf, NaNs.
const SPECIAL_F32: &[u32] = &[
    0x0000_0000,
    0x8000_0000,
    0x0000_0001,
    0x0000_8000,
    0x0000_8001,
    0x0001_8000,
    0x0000_ffff,
    0x007f_ffff,
    0x0080_0000,
    0x3f80_0000,
    0x3f80_8000,
    0x3f81_8000,
    0x3f80_8001,
    0x3f80_7fff,
    0xbf81_8000,
    0x7f7f_7fff,
    0x7f7f_8000,
    0x7f7f_ffff,
    0xff7f_ffff,
    0x7f80_0000,
    0xff80_0000,
    0x7fc0_0000,
    0xffc0_0000,
    0x7f80_0001,
    0x7fbf_ffff,
    0xffff_ffff,
];

#[test]
fn half_crate_reference_rounds_to_nearest_even_and_keeps_nan() {
    // The reference itself, on the host: ties go to the even neighbour.
    assert_eq!(want_from_f32(0x3f80_8000), 0x3f80);
    assert_eq!(want_from_f32(0x3f81_8000), 0x3f82);
    assert_eq!(want_from_f32(0x3f80_8001), 0x3f81);
    assert_eq!(want_from_f32(0x3f80_7fff), 0x3f80);
    assert_eq!(want_from_f32(0x0000_8000), 0x0000);
    assert_eq!(want_from_f32(0x0001_8000), 0x0002);
    assert_eq!(want_from_f32(0x7f7f_ffff), 0x7f80);
    assert_eq!(want_from_f32(0xff80_0000), 0xff80);
    assert!(bf16::from_bits(want_from_f32(0x7f80_0001)).is_nan());
    assert!(bf16::from_bits(want_from_f32(0xffc0_0000)).is_nan());
    assert_eq!(want_from_f16(0x3c04), 0x3f80);
    assert_eq!(want_from_f16(0x3c0c), 0x3f82);
    assert_eq!(want_from_f16(0x0001), 0x3380); // 2^-24 is a normal bf16
    assert_eq!(want_from_f16(0x7c00), 0x7f80);
    assert!(bf16::from_bits(want_from_f16(0x7e00)).is_nan());
}

/// Runs the f16 cast of `input` with the source at `src_off` and the destination
/// at `dst_off` bytes into their buffers; checks every element.
fn check_cast_f16(g: &Gpu, input: &[u16], src_off: usize, dst_off: usize) {
    let n = input.len();
    let src = g.upload(&bytes_of_u16(input), src_off);
    let dst = g.output(2 * n, dst_off);
    let (s, d) = (src.ptr() + src_off as u64, dst.ptr() + dst_off as u64);
    // SAFETY: src and dst were allocated with `n` elements past their offsets
    // and live until after the download, which synchronizes the stream.
    unsafe { g.kernels.cast_f16_to_bf16(s, d, n, &g.stream) }.unwrap();
    let got = u16s(&g.download(&dst, dst_off, 2 * n));
    let what = format!("cast_f16_to_bf16 n={n} src+{src_off} dst+{dst_off}");
    for (i, (&x, &y)) in input.iter().zip(&got).enumerate() {
        assert_same_bf16(&what, i, format!("{x:#06x}"), y, want_from_f16(x));
    }
}

fn check_cast_f32(g: &Gpu, input: &[u32], src_off: usize, dst_off: usize) {
    let n = input.len();
    let src = g.upload(&bytes_of_u32(input), src_off);
    let dst = g.output(2 * n, dst_off);
    let (s, d) = (src.ptr() + src_off as u64, dst.ptr() + dst_off as u64);
    // SAFETY: as in check_cast_f16.
    unsafe { g.kernels.cast_f32_to_bf16(s, d, n, &g.stream) }.unwrap();
    let got = u16s(&g.download(&dst, dst_off, 2 * n));
    let what = format!("cast_f32_to_bf16 n={n} src+{src_off} dst+{dst_off}");
    for (i, (&x, &y)) in input.iter().zip(&got).enumerate() {
        assert_same_bf16(&what, i, format!("{x:#010x}"), y, want_from_f32(x));
    }
}

const LENGTHS: &[usize] = &[1, 7, 255, 1_000_003];

#[test]
fn cast_f16_to_bf16_is_bit_exact() {
    let Some(g) = gpu("cast_f16_to_bf16_is_bit_exact") else {
        return;
    };
    let mut rng = common::rng("cast_f16_to_bf16_is_bit_exact");
    // Offsets of 2 bytes break 16-byte alignment of one or both pointers; equal
    // offsets exercise the peeled head, unequal ones the scalar fallback.
    let offsets = [(0, 0), (2, 2), (2, 0), (0, 6), (14, 2), (6, 6)];
    for &(so, d) in &offsets {
        check_cast_f16(&g, SPECIAL_F16, so, d);
    }
    for &n in LENGTHS {
        let input: Vec<u16> = (0..n).map(|_| rng.gen()).collect();
        for &(so, d) in &offsets {
            check_cast_f16(&g, &input, so, d);
        }
    }
}

#[test]
fn cast_f32_to_bf16_is_bit_exact() {
    let Some(g) = gpu("cast_f32_to_bf16_is_bit_exact") else {
        return;
    };
    let mut rng = common::rng("cast_f32_to_bf16_is_bit_exact");
    let offsets = [(0, 0), (4, 2), (4, 0), (0, 2), (12, 6), (8, 4)];
    for &(so, d) in &offsets {
        check_cast_f32(&g, SPECIAL_F32, so, d);
    }
    for &n in LENGTHS {
        // Half arbitrary bit patterns (every class of value), half ordinary
        // magnitudes where rounding matters most.
        let input: Vec<u32> = (0..n)
            .map(|i| {
                if i % 2 == 0 {
                    rng.gen()
                } else {
                    (rng.gen_range(-1.0e4f32..1.0e4) * rng.gen_range(1e-6f32..1.0)).to_bits()
                }
            })
            .collect();
        for &(so, d) in &offsets {
            check_cast_f32(&g, &input, so, d);
        }
    }
}

#[test]
fn cast_to_bf16_dispatches_on_dtype() {
    let Some(g) = gpu("cast_to_bf16_dispatches_on_dtype") else {
        return;
    };
    let mut rng = common::rng("cast_to_bf16_dispatches_on_dtype");
    let n = 1001;
    let bf: Vec<u16> = (0..n).map(|_| rng.gen()).collect();
    let src = g.upload(&bytes_of_u16(&bf), 0);
    let dst = g.output(2 * n, 0);
    // SAFETY: src holds n bf16 and dst room for n; both live past the
    // download, which synchronizes the stream (likewise below).
    unsafe {
        g.kernels
            .cast_to_bf16(DType::BF16, src.ptr(), dst.ptr(), n, &g.stream)
    }
    .unwrap();
    assert_eq!(
        u16s(&g.download(&dst, 0, 2 * n)),
        bf,
        "bf16 -> bf16 is a copy"
    );

    let f: Vec<u32> = (0..n).map(|_| rng.gen::<f32>().to_bits()).collect();
    let src = g.upload(&bytes_of_u32(&f), 0);
    let dst = g.output(2 * n, 0);
    // SAFETY: src holds n f32, dst room for n bf16.
    unsafe {
        g.kernels
            .cast_to_bf16(DType::F32, src.ptr(), dst.ptr(), n, &g.stream)
    }
    .unwrap();
    let want: Vec<u16> = f.iter().map(|&x| want_from_f32(x)).collect();
    assert_eq!(u16s(&g.download(&dst, 0, 2 * n)), want);

    // SAFETY: refused before any launch (unsupported dtype).
    let e = unsafe {
        g.kernels
            .cast_to_bf16(DType::I8, src.ptr(), dst.ptr(), n, &g.stream)
    }
    .unwrap_err();
    assert!(matches!(e, Error::Input(_)), "{e}");
    // SAFETY: refused before any launch (misaligned source).
    let e = unsafe {
        g.kernels
            .cast_f32_to_bf16(src.ptr() + 2, dst.ptr(), n, &g.stream)
    }
    .unwrap_err();
    assert!(matches!(e, Error::Input(_)), "misaligned f32 source: {e}");
    // Nothing to do is not an error.
    // SAFETY: zero elements: nothing is launched.
    unsafe {
        g.kernels
            .cast_f16_to_bf16(src.ptr(), dst.ptr(), 0, &g.stream)
    }
    .unwrap();
    g.stream.synchronize().unwrap();
}

fn silu_mul(gate: f64, up: f64) -> f64 {
    gate / (1.0 + (-gate).exp()) * up
}

/// Whether `got` is within one bf16 ulp (at `want`'s magnitude) of `want`.
fn within_one_ulp(got: u16, want: f64) -> bool {
    let got = bf16::from_bits(got).to_f64();
    if want == 0.0 {
        return got == 0.0;
    }
    let exp = want.abs().log2().floor().max(-126.0);
    let ulp = (exp - 7.0).exp2();
    (got - want).abs() <= ulp
}

fn random_bf16(rng: &mut impl Rng, n: usize) -> Vec<u16> {
    (0..n)
        .map(|i| {
            if i % 97 == 0 {
                0 // silu(0) = 0 and x * 0 = 0 must come out exactly
            } else {
                bf16::from_f32(rng.gen_range(-8.0f32..8.0)).to_bits()
            }
        })
        .collect()
}

fn as_f64(bits: u16) -> f64 {
    bf16::from_bits(bits).to_f64()
}

#[test]
fn swiglu_matches_f64_reference() {
    let Some(g) = gpu("swiglu_matches_f64_reference") else {
        return;
    };
    let mut rng = common::rng("swiglu_matches_f64_reference");
    for &n in LENGTHS {
        let gate = random_bf16(&mut rng, n);
        let up = random_bf16(&mut rng, n);
        for &(go, uo, oo) in &[(0, 0, 0), (2, 2, 2), (0, 2, 0), (0, 0, 6)] {
            let gb = g.upload(&bytes_of_u16(&gate), go);
            let ub = g.upload(&bytes_of_u16(&up), uo);
            let ob = g.output(2 * n, oo);
            // SAFETY: each buffer holds n bf16 past its offset and lives past
            // the download, which synchronizes the stream.
            unsafe {
                g.kernels.swiglu(
                    gb.ptr() + go as u64,
                    ub.ptr() + uo as u64,
                    ob.ptr() + oo as u64,
                    n,
                    &g.stream,
                )
            }
            .unwrap();
            let got = u16s(&g.download(&ob, oo, 2 * n));
            for i in 0..n {
                let want = silu_mul(as_f64(gate[i]), as_f64(up[i]));
                assert!(
                    within_one_ulp(got[i], want),
                    "swiglu n={n} offsets ({go},{uo},{oo}) element {i}: gate {} up {}: got {} want {want}",
                    as_f64(gate[i]),
                    as_f64(up[i]),
                    as_f64(got[i])
                );
            }
        }
    }
}

#[test]
fn swiglu_fused_matches_f64_reference() {
    let Some(g) = gpu("swiglu_fused_matches_f64_reference") else {
        return;
    };
    let mut rng = common::rng("swiglu_fused_matches_f64_reference");
    // cols % 8 == 0 with aligned pointers takes the vector path; the rest the scalar one.
    for &(rows, cols) in &[
        (1, 1),
        (3, 7),
        (5, 8),
        (17, 64),
        (2, 4099),
        (129, 1024),
        (1000, 13),
    ] {
        let gate_up = random_bf16(&mut rng, rows * 2 * cols);
        for &(io, oo) in &[(0, 0), (2, 0), (0, 2)] {
            let ib = g.upload(&bytes_of_u16(&gate_up), io);
            let ob = g.output(2 * rows * cols, oo);
            // SAFETY: the input holds rows * 2 * cols bf16 and the output room
            // for rows * cols past their offsets; both live past the download.
            unsafe {
                g.kernels.swiglu_fused(
                    ib.ptr() + io as u64,
                    ob.ptr() + oo as u64,
                    rows,
                    cols,
                    &g.stream,
                )
            }
            .unwrap();
            let got = u16s(&g.download(&ob, oo, 2 * rows * cols));
            for r in 0..rows {
                for c in 0..cols {
                    let gate = as_f64(gate_up[r * 2 * cols + c]);
                    let up = as_f64(gate_up[r * 2 * cols + cols + c]);
                    let want = silu_mul(gate, up);
                    let got = got[r * cols + c];
                    assert!(
                        within_one_ulp(got, want),
                        "swiglu_fused {rows}x{cols} offsets ({io},{oo}) row {r} col {c}: gate {gate} up {up}: got {} want {want}",
                        as_f64(got)
                    );
                }
            }
        }
    }
}
