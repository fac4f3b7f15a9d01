//! The CPU/GPU row split of every layer: of each 2-D layer weight, the first
//! rows stream to the device as before and the last rows stay in host
//! memory for the CPU to compute from.
//!
//! The device side is planned as a model of its own: the same tensors at the
//! same file offsets with fewer rows (a row-major tensor's first `g` rows
//! are one contiguous byte range from its start), so the readers, caches,
//! slots and casts work unchanged and every slot shrinks with the share. A
//! tensor whose rows all go to the CPU keeps a view of zero rows.
//!
//! The host side is a read-only memory map of the files: the CPU reads its
//! rows from the kernel's page cache (the first pass faults them in from
//! disk). The pipeline's pinned memory is for the device's DMA and the CPU
//! gains nothing from it.
//!
//! Rows are split in multiples of [`ROW_MULTIPLE`] so that both parts keep
//! the alignment of whole row tiles; block types split between block rows,
//! which are whole blocks. Only tensors the CPU kernels read are split
//! (bf16, f16, f32 and the ggml block types); 1-D tensors (norms, biases),
//! FP8 weights and their scales travel whole.

use std::collections::HashSet;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::backend::{Backend, PinnedBuf};
use super::resources::SlotPtr;
use crate::checkpoint::{plan_reads, Layer, LayerTensor, ModelIndex, ShardFile};
use crate::cpu::plan::{cpu_rows, divided_tensors};
use crate::cpu::HostMatrix;
use crate::quant::QuantType;
use crate::{Error, Result};

/// Rows of a split tensor come in multiples of this many (the last part
/// takes the remainder): a tile of the GEMMs and of the CPU kernels.
pub const ROW_MULTIPLE: usize = 16;

/// Where the CPU rows of one tensor are in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostRowsPlan {
    pub(crate) key: String,
    pub(crate) ty: QuantType,
    pub(crate) first_row: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) file: usize,
    /// Absolute offset of the first CPU row in the file.
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

/// The CPU's rows of one weight, in host memory, in their stored type:
/// rows `first_row .. first_row + rows` of the tensor, back to back.
#[derive(Debug, Clone, Copy)]
pub struct HostRows<'a> {
    ty: QuantType,
    first_row: usize,
    rows: usize,
    cols: usize,
    bytes: &'a [u8],
    pinned: bool,
}

impl<'a> HostRows<'a> {
    /// Whether the rows are in page-locked memory, where a device copy
    /// reads them at the PCIe rate (else they are file pages).
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// The last `rows() - n` of these rows (`n` at most `rows()`): a part
    /// the CPU computes while the first `n` go to the device.
    pub fn skip(&self, n: usize) -> Result<HostRows<'a>> {
        let n = n.min(self.rows);
        let row = (self.ty.row_bytes(self.cols as u64))
            .map_err(|e| Error::Pipeline(format!("host rows: {e}")))?;
        let at = usize::try_from(row * n as u64)
            .map_err(|_| Error::Pipeline("host rows beyond the address space".into()))?;
        Ok(HostRows {
            first_row: self.first_row + n,
            rows: self.rows - n,
            bytes: &self.bytes[at.min(self.bytes.len())..],
            ..*self
        })
    }

    /// The stored type (bf16, f16, f32 or a ggml block type).
    pub fn ty(&self) -> QuantType {
        self.ty
    }

    /// The tensor's row at which these rows start: the device view holds
    /// rows `0 .. first_row`.
    pub fn first_row(&self) -> usize {
        self.first_row
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Elements per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The stored bytes of the rows.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The rows as a matrix for [`CpuPool::matmul`](crate::cpu::CpuPool::matmul).
    pub fn matrix(&self) -> Result<HostMatrix<'a>> {
        HostMatrix::new(self.ty, self.bytes, self.rows, self.cols)
    }
}

/// A streamer's row split: the whole model, its CPU rows per layer, and the
/// memory maps they are read from.
pub(crate) struct RowSplit {
    /// The largest CPU share of a layer (layers the GPU cache keeps are
    /// whole: share 0).
    pub(crate) share: f64,
    /// The model as it is on disk (the pipeline streams a copy with fewer rows).
    pub(crate) full: ModelIndex,
    maps: Vec<Option<memmap2::Mmap>>,
    layers: Vec<Vec<HostRowsPlan>>,
    /// The CPU rows copied into page-locked memory, back to back in plan
    /// order ([`pin`](Self::pin)), with each plan's offset there; the maps
    /// are dropped then.
    pinned: Option<(PinnedBuf, Vec<Vec<usize>>)>,
    /// Why [`pin`](Self::pin) left the rows in the maps, if it did.
    pub(crate) pin_error: Option<String>,
    /// Nanoseconds the CPU side worked and waited in the pass under way, as
    /// the layer function reports them.
    busy_ns: AtomicU64,
    stalled_ns: AtomicU64,
}

impl RowSplit {
    /// Splits layer `i` of `model` at CPU share `shares[i]` (in `[0, 1]`;
    /// 0 leaves the layer whole, as for the layers the GPU cache keeps):
    /// the split, and the model of the device's rows for the pipeline.
    /// With `only`, tensors whose key ends with none of its suffixes stay
    /// whole.
    pub(crate) fn new(
        model: &ModelIndex,
        shares: &[f64],
        only: Option<&[String]>,
    ) -> Result<(RowSplit, ModelIndex)> {
        if shares.len() != model.num_layers() {
            return Err(Error::Pipeline(format!(
                "{} CPU shares for {} layers",
                shares.len(),
                model.num_layers()
            )));
        }
        let mut device_layers = Vec::with_capacity(model.num_layers());
        let mut host = Vec::with_capacity(model.num_layers());
        for (layer, &share) in model.layers().iter().zip(shares) {
            let (d, h) = split_layer(model.files(), layer, share, only)?;
            device_layers.push(d);
            host.push(h);
        }
        let used: HashSet<usize> = host.iter().flatten().map(|h| h.file).collect();
        let maps = model
            .files()
            .iter()
            .enumerate()
            .map(|(i, f)| used.contains(&i).then(|| map_file(&f.path)).transpose())
            .collect::<Result<Vec<_>>>()?;
        advise_will_need(&maps, &host);
        let split = RowSplit {
            share: shares.iter().copied().fold(0.0, f64::max),
            full: model.clone(),
            maps,
            layers: host,
            pinned: None,
            pin_error: None,
            busy_ns: AtomicU64::new(0),
            stalled_ns: AtomicU64::new(0),
        };
        Ok((split, model.with_layers(device_layers)))
    }

    /// Copies every CPU row into page-locked host memory of `backend` (one
    /// buffer, filled by a few threads from the maps, which are dropped):
    /// the CPU reads them from there, and a pass that gives the device all
    /// the rows copies them from there at the PCIe rate. Where page-locked
    /// memory can't be had (a memlock limit), the rows stay in the maps:
    /// `Ok(false)`.
    pub(crate) fn pin(&mut self, backend: &Backend) -> Result<bool> {
        let mut at = Vec::with_capacity(self.layers.len());
        let mut total = 0usize;
        for layer in &self.layers {
            let mut offs = Vec::with_capacity(layer.len());
            for p in layer {
                offs.push(total);
                // 64-byte starts: whole cache lines for the vector loads.
                total += usize::try_from(p.len).map_err(|_| too_big(p))?.div_ceil(64) * 64;
            }
            at.push(offs);
        }
        let buf = match backend.pinned(total) {
            Ok(buf) => buf,
            Err(e) => {
                self.pin_error = Some(e.to_string());
                return Ok(false);
            }
        };
        let base = SlotPtr(buf.ptr() as *mut u8);
        let jobs: Vec<(&HostRowsPlan, usize)> = self
            .layers
            .iter()
            .flatten()
            .zip(at.iter().flatten().copied())
            .collect();
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get().min(8));
        std::thread::scope(|sc| {
            for part in jobs.chunks(jobs.len().div_ceil(threads).max(1)) {
                let maps = &self.maps;
                sc.spawn(move || {
                    let dst = base;
                    for (p, off) in part {
                        let Some(src) = map_range(maps, p) else {
                            continue;
                        };
                        // SAFETY: `off .. off + len` lies inside `buf` (sized
                        // above from the same lengths) and the jobs' ranges do
                        // not overlap; `buf` outlives the scope.
                        unsafe {
                            std::ptr::copy_nonoverlapping(src.as_ptr(), dst.0.add(*off), src.len())
                        };
                    }
                });
            }
        });
        let missing = self
            .layers
            .iter()
            .flatten()
            .find(|p| map_range(&self.maps, p).is_none());
        if let Some(p) = missing {
            return Err(too_big(p));
        }
        self.pinned = Some((buf, at));
        self.maps.clear();
        Ok(true)
    }

    /// The CPU rows of tensor `key` of `layer`; `None` when the tensor is
    /// not split (or there is no such tensor).
    pub(crate) fn rows(&self, layer: usize, key: &str) -> Option<HostRows<'_>> {
        let plans = self.layers.get(layer)?;
        let j = plans.iter().position(|p| p.key == key)?;
        let p = &plans[j];
        let bytes = match &self.pinned {
            Some((buf, at)) => {
                let start = *at.get(layer)?.get(j)?;
                // SAFETY: `pin` sized the buffer to hold `len` bytes at
                // `start` and wrote them; nothing writes it afterwards.
                unsafe { std::slice::from_raw_parts(buf.ptr().add(start), p.len as usize) }
            }
            None => map_range(&self.maps, p)?,
        };
        Some(HostRows {
            ty: p.ty,
            first_row: p.first_row,
            rows: p.rows,
            cols: p.cols,
            bytes,
            pinned: self.pinned.is_some(),
        })
    }

    /// Keys of the split tensors of `layer`, in file order.
    pub(crate) fn keys(&self, layer: usize) -> impl Iterator<Item = &str> {
        self.layers
            .get(layer)
            .into_iter()
            .flatten()
            .map(|p| p.key.as_str())
    }

    /// Adds to the CPU side's time in the pass under way.
    pub(crate) fn note(&self, busy: Duration, stalled: Duration) {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // Relaxed: plain counters, read after the pass has joined its
        // threads (or on the thread that wrote them).
        self.busy_ns.fetch_add(ns(busy), Ordering::Relaxed);
        self.stalled_ns.fetch_add(ns(stalled), Ordering::Relaxed);
    }

    /// The CPU side's busy and stalled time since the last call, which
    /// starts the count again.
    pub(crate) fn take_times(&self) -> (Duration, Duration) {
        (
            Duration::from_nanos(self.busy_ns.swap(0, Ordering::Relaxed)),
            Duration::from_nanos(self.stalled_ns.swap(0, Ordering::Relaxed)),
        )
    }

    /// Bytes the CPU reads for one pass over every layer.
    pub(crate) fn pass_bytes(&self) -> u64 {
        self.layers.iter().flatten().map(|p| p.len).sum()
    }
}

/// The bytes of `p`'s rows in its file's map.
fn map_range<'m>(maps: &'m [Option<memmap2::Mmap>], p: &HostRowsPlan) -> Option<&'m [u8]> {
    let map = maps.get(p.file)?.as_ref()?;
    let start = usize::try_from(p.offset).ok()?;
    let end = start.checked_add(usize::try_from(p.len).ok()?)?;
    map.get(start..end)
}

fn too_big(p: &HostRowsPlan) -> Error {
    Error::Pipeline(format!(
        "tensor {}: its CPU rows ({} bytes at {}) are not inside its file",
        p.key, p.len, p.offset
    ))
}

/// Asks the kernel to start reading the CPU's rows into the page cache, so
/// that the first pass does not fault them in page by page. Advice only:
/// a refusal changes nothing but speed.
fn advise_will_need(maps: &[Option<memmap2::Mmap>], layers: &[Vec<HostRowsPlan>]) {
    for p in layers.iter().flatten() {
        if let (Some(Some(map)), Ok(off), Ok(len)) = (
            maps.get(p.file),
            usize::try_from(p.offset),
            usize::try_from(p.len),
        ) {
            if off.checked_add(len).is_some_and(|end| end <= map.len()) {
                let _ = map.advise_range(memmap2::Advice::WillNeed, off, len);
            }
        }
    }
}

/// Maps a model file read-only.
fn map_file(path: &std::path::Path) -> Result<memmap2::Mmap> {
    let file = File::open(path).map_err(|e| Error::io("opening", path, None, e))?;
    // SAFETY: the mapping is read-only; model files are not modified while a
    // streamer reads them (a file truncated by another process would fault,
    // as it would for any reader of a memory-mapped checkpoint).
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io("memory-mapping", path, None, e))
}

/// One layer's device part (the pipeline's layer) and its CPU rows.
fn split_layer(
    files: &[ShardFile],
    layer: &Layer,
    share: f64,
    only: Option<&[String]>,
) -> Result<(Layer, Vec<HostRowsPlan>)> {
    let mut device = Vec::with_capacity(layer.tensors.len());
    let mut host = Vec::new();
    for (t, divided) in layer.tensors.iter().zip(divided_tensors(layer, only)) {
        let mut info = t.info.clone();
        if let Some(ty) = divided {
            let (rows, cols) = (info.shape[0], info.shape[1]);
            let row_bytes = ty.row_bytes(cols as u64).map_err(|e| {
                let file = files.get(info.file).map(|f| f.path.as_path());
                let file = file.unwrap_or(std::path::Path::new("the model"));
                Error::model(file, format!("tensor {}: {e}", info.name))
            })?;
            let cpu = cpu_rows(rows, share, ROW_MULTIPLE);
            let gpu = rows - cpu;
            if cpu > 0 {
                let gpu_bytes = gpu as u64 * row_bytes;
                host.push(HostRowsPlan {
                    key: t.key.clone(),
                    ty,
                    first_row: gpu,
                    rows: cpu,
                    cols,
                    file: info.file,
                    offset: info.file_offset + gpu_bytes,
                    len: cpu as u64 * row_bytes,
                });
                info.shape[0] = gpu;
                info.len = gpu_bytes;
            }
        }
        device.push(LayerTensor {
            key: t.key.clone(),
            info,
            slot_offset: 0,
        });
    }
    // Tensors left with no rows take no read and sit at offset 0, empty.
    let streamed: Vec<usize> = (0..device.len())
        .filter(|&i| device[i].info.len > 0)
        .collect();
    let extents: Vec<(usize, u64, u64)> = streamed
        .iter()
        .map(|&i| {
            let info = &device[i].info;
            (info.file, info.file_offset, info.len)
        })
        .collect();
    let (reads, offsets) = plan_reads(&extents);
    for (&i, off) in streamed.iter().zip(offsets) {
        device[i].slot_offset = off;
    }
    let layer = Layer {
        index: layer.index,
        data_bytes: device.iter().map(|t| t.info.len).sum(),
        slot_bytes: reads.iter().map(|r| r.len).sum(),
        tensors: device,
        reads,
    };
    Ok((layer, host))
}

#[cfg(test)]
#[path = "split_tests.rs"]
mod tests;
