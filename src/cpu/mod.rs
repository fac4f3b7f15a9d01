//! The CPU share of a layer: matrix products `y[t, rows] = x[t, k] · W[rows, k]ᵀ`
//! computed from weights in host memory (the pinned cache or the file pages),
//! on a thread pool pinned to cores the stage threads do not use.
//!
//! Weights stay in their stored type: bf16, f16 and f32 rows are widened to
//! f32 in registers. Rows of Q8_0, Q4_0, Q4_1, Q4_K and Q6_K blocks are
//! decoded in registers too on AVX2 and AVX-512 (each block's integers
//! widened, converted and scaled, then multiplied into every token's
//! accumulators, up to eight tokens per decode on AVX-512); other block types
//! and the portable path decode a tile (256 elements) at a time into an
//! L1-resident buffer with the crate's host dequantizer. A row is never
//! materialized in f32.
//! Activations stay f32 (no rounding of `x` to bf16 or int8) except on one
//! path: with AVX-512 VNNI, Q4_K, Q5_K and Q6_K rows multiply 16-bit integer codes
//! of the activations (one f32 step per 256 elements, at most half a step
//! off, about the f16 rounding the device's quantized products make), their
//! products summed exactly in 32-bit lanes a block at a time. The split must
//! change only where sums happen, not what is summed, to within the
//! device's own roundings. Other accumulation is in f32, in eight or more
//! independent lanes per row.
//!
//! The instruction set is chosen at run time ([`Isa::best`]): AVX-512 VNNI, AVX-512F,
//! AVX2 with FMA and F16C, or portable scalar code (the only path on other
//! architectures). [`CpuPool::with_isa`] forces one, which is how the tests
//! check every path against an f64 reference.
//!
//! ```
//! use layer_streamer::cpu::{CpuPool, CpuPoolOptions, HostMatrix};
//! use layer_streamer::quant::QuantType;
//!
//! # fn main() -> layer_streamer::Result<()> {
//! let (rows, k) = (3, 4);
//! let w: Vec<u8> = (0..rows * k).flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes()).collect();
//! let w = HostMatrix::new(QuantType::BF16, &w, rows, k)?;
//! let pool = CpuPool::new(&CpuPoolOptions { threads: Some(2), ..Default::default() })?;
//! let x = [1.0f32, 0.0, 0.0, 1.0]; // one token
//! let mut y = [0f32; 3];
//! pool.matmul(&w, &x, 1, &mut y)?;
//! assert_eq!(y, [3.0, 11.0, 19.0]);
//! # Ok(()) }
//! ```

pub mod calibrate;
mod kernels;
pub mod plan;
pub mod plan_pass;
mod pool;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_q256;
#[cfg(target_arch = "x86_64")]
mod x86_q512;
#[cfg(target_arch = "x86_64")]
mod x86_vnni;

pub use pool::{CpuPool, CpuPoolOptions};

use crate::error::{Error, Result};
use crate::quant::QuantType;

/// The instruction set a kernel runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust, eight f32 accumulators per row; every architecture.
    Scalar,
    /// x86-64 AVX2 with FMA and F16C: 8 lanes.
    Avx2,
    /// x86-64 AVX-512F: 16 lanes.
    Avx512,
    /// x86-64 AVX-512F with AVX-512BW and AVX-512 VNNI: the AVX-512 kernels,
    /// and for Q4_K, Q5_K and Q6_K rows integer products of the blocks' codes with
    /// activations rounded to 16 bits ([`Isa::activation_bits`]).
    Avx512Vnni,
}

impl Isa {
    /// Every instruction set, portable first.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni];

    /// Whether this CPU runs it (checked at run time).
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                Isa::Avx512.is_available()
                    && Isa::Avx2.is_available()
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni => false,
        }
    }

    /// The widest instruction set this CPU runs.
    pub fn best() -> Isa {
        [Isa::Avx512Vnni, Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|i| i.is_available())
            .unwrap_or(Isa::Scalar)
    }

    /// Its name: `scalar`, `avx2`, `avx512`, `avx512-vnni`.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }

    /// The bits this instruction set's kernel for rows of `ty` rounds each
    /// activation to, `None` where it multiplies them in f32. `Some(16)`:
    /// every 256 elements of a token share one step, their largest magnitude
    /// over 32767, and each moves by at most half a step (AVX-512 VNNI on
    /// Q4_K, Q5_K and Q6_K rows). A product whose activations hold a block
    /// with its largest magnitude above 0 and below 2^-80 is multiplied in
    /// f32 instead.
    pub fn activation_bits(self, ty: QuantType) -> Option<u32> {
        #[cfg(target_arch = "x86_64")]
        if self == Isa::Avx512Vnni && x86_vnni::has_kernel(ty) {
            return Some(16);
        }
        let _ = ty;
        None
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A row-major weight matrix in host memory, in its stored type: `rows` rows
/// of `cols` elements, each row `ty.row_bytes(cols)` bytes, rows back to back
/// (a contiguous range of a tensor's rows, as the streamer hands them out).
#[derive(Debug, Clone, Copy)]
pub struct HostMatrix<'a> {
    ty: QuantType,
    bytes: &'a [u8],
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

impl<'a> HostMatrix<'a> {
    /// Views `bytes` as `rows × cols` elements of `ty`: an error unless `cols`
    /// is whole blocks of `ty` and `bytes` is exactly the matrix.
    pub fn new(ty: QuantType, bytes: &'a [u8], rows: usize, cols: usize) -> Result<Self> {
        let row_bytes = ty
            .row_bytes(cols as u64)
            .map_err(|e| Error::Input(format!("a {rows}×{cols} {ty} matrix: {e}")))?;
        let want = (row_bytes as usize).checked_mul(rows);
        if want != Some(bytes.len()) {
            return Err(Error::Input(format!(
                "a {rows}×{cols} {ty} matrix takes {} bytes, {} were given",
                want.map_or_else(|| "more than 2^64".to_string(), |w| w.to_string()),
                bytes.len()
            )));
        }
        Ok(HostMatrix {
            ty,
            bytes,
            rows,
            cols,
            row_bytes: row_bytes as usize,
        })
    }

    /// The stored type.
    pub fn ty(&self) -> QuantType {
        self.ty
    }

    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Elements per row (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The stored bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The stored bytes of row `r`.
    fn row(&self, r: usize) -> &'a [u8] {
        &self.bytes[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
}
