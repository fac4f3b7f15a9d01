//! Source tensors read a few rows at a time, widened to f32, rearranged and
//! quantized over several threads.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use half::{bf16, f16};

use crate::checkpoint::TensorInfo;
use crate::quant::{self, QuantType};
use crate::{DType, Error, Result};

/// A tensor seen as `rows` rows of `cols` elements (a 1-D tensor is one row).
#[derive(Debug, Clone, Copy)]
pub(super) struct RowShape {
    pub rows: u64,
    pub cols: u64,
    /// Stored bytes of one source row.
    pub row_bytes: u64,
}

impl RowShape {
    /// The row view of `info`; its stored type must be one this converter
    /// reads (f32, f16, bf16 or a GGUF block type).
    pub fn of(path: &Path, info: &TensorInfo) -> Result<RowShape> {
        let cols = info.shape.last().copied().unwrap_or(1) as u64;
        let rows = info.shape.iter().rev().skip(1).product::<usize>() as u64;
        let row_bytes = match (info.quant, info.dtype) {
            (Some(q), _) => q.row_bytes(cols).map_err(|e| tensor_err(path, info, e))?,
            (None, DType::F32 | DType::F16 | DType::BF16) => cols * info.dtype.size() as u64,
            (None, d) => {
                return Err(tensor_err(
                    path,
                    info,
                    format!("stored as {d}; quantize reads f32, f16, bf16 and GGUF block types"),
                ))
            }
        };
        if row_bytes.checked_mul(rows) != Some(info.len) {
            return Err(tensor_err(
                path,
                info,
                format!(
                    "{rows} rows of {row_bytes} bytes do not make its {} bytes",
                    info.len
                ),
            ));
        }
        Ok(RowShape {
            rows,
            cols,
            row_bytes,
        })
    }
}

fn tensor_err(path: &Path, info: &TensorInfo, what: impl std::fmt::Display) -> Error {
    Error::model(path, format!("tensor {}: {what}", info.name))
}

/// Reads rows `first..first + n` of `info` from `file` and widens them to
/// f32 into `out`.
pub(super) fn read_rows_f32(
    file: &File,
    path: &Path,
    info: &TensorInfo,
    shape: RowShape,
    (first, n): (u64, u64),
    buf: &mut Vec<u8>,
    out: &mut Vec<f32>,
) -> Result<()> {
    let offset = info.file_offset + first * shape.row_bytes;
    buf.resize((n * shape.row_bytes) as usize, 0);
    file.read_exact_at(buf, offset).map_err(|e| {
        Error::io(
            format!("reading {} bytes of tensor {} from", buf.len(), info.name),
            path,
            Some(offset),
            e,
        )
    })?;
    out.resize((n * shape.cols) as usize, 0.0);
    match (info.quant, info.dtype) {
        (Some(q), _) => quant::dequantize_f32(q, buf, out)?,
        (None, DType::F32) => {
            widen::<4>(buf, out, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        (None, DType::F16) => widen::<2>(buf, out, |b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        (None, DType::BF16) => widen::<2>(buf, out, |b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        (None, d) => return Err(tensor_err(path, info, format!("cannot read {d} elements"))),
    }
    Ok(())
}

fn widen<const N: usize>(bytes: &[u8], out: &mut [f32], f: impl Fn(&[u8]) -> f32) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(N)) {
        *o = f(b);
    }
}

/// llama.cpp's row order of the q/k projections of a llama model (its
/// converter's `permute`): within each head of `head_dim` rows, the rows of
/// the first and second halves interleave, so that rotary pairs are
/// adjacent. `x` holds whole heads of rows of `cols` elements.
pub(super) fn interleave_heads(x: &mut [f32], head_dim: usize, cols: usize) {
    let half = head_dim / 2;
    let mut head = vec![0f32; head_dim * cols];
    for block in x.chunks_exact_mut(head_dim * cols) {
        head.copy_from_slice(block);
        for i in 0..half {
            for j in 0..2 {
                let from = (j * half + i) * cols;
                let to = (2 * i + j) * cols;
                block[to..to + cols].copy_from_slice(&head[from..from + cols]);
            }
        }
    }
}

/// Quantizes rows of `cols` elements to `ty`, the rows split over up to
/// `threads` threads; the blocks come out in row order.
pub(super) fn quantize_rows(
    ty: QuantType,
    x: &[f32],
    cols: usize,
    threads: usize,
) -> Result<Vec<u8>> {
    let rows = x.len() / cols.max(1);
    let per = rows.div_ceil(threads.max(1)).max(1) * cols;
    if threads <= 1 || rows < 2 {
        return quant::quantize(ty, x);
    }
    let parts: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = x
            .chunks(per)
            .map(|part| s.spawn(move || quant::quantize(ty, part)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Input("a quantizer thread panicked".into())))
            })
            .collect()
    });
    let mut out =
        Vec::with_capacity(x.len() / ty.block_elems() as usize * ty.block_bytes() as usize);
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    use crate::test_rng::rng;

    /// Row `h·d + j·d/2 + i` of a head moves to `h·d + 2i + j`: each half's
    /// rows interleave, whole rows move, and nothing crosses heads.
    #[test]
    fn interleaving_pairs_the_halves_of_each_head() {
        let mut rng = rng();
        let (heads, d, cols) = (
            rng.gen_range(1..5),
            2 * rng.gen_range(1..9),
            rng.gen_range(1..6),
        );
        let x: Vec<f32> = (0..heads * d * cols).map(|_| rng.gen()).collect();
        let mut y = x.clone();
        interleave_heads(&mut y, d, cols);
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..d / 2 {
                    let from = (h * d + j * d / 2 + i) * cols;
                    let to = (h * d + 2 * i + j) * cols;
                    assert_eq!(
                        y[to..to + cols],
                        x[from..from + cols],
                        "head {h} j {j} i {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn threaded_quantization_equals_one_thread() {
        let mut rng = rng();
        let rows = rng.gen_range(1..12);
        let x: Vec<f32> = (0..256 * rows).map(|_| rng.gen_range(-1.0..1.0)).collect();
        for ty in [QuantType::Q4_K, QuantType::Q8_0, QuantType::Q6_K] {
            let one = quant::quantize(ty, &x).unwrap();
            for threads in [2, 3, 8] {
                assert_eq!(quantize_rows(ty, &x, 256, threads).unwrap(), one, "{ty}");
            }
        }
    }
}
