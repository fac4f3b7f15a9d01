//! Writing synthetic weights at disk speed.
//!
//! Each file is cut into 8 MiB blocks at aligned offsets; threads take blocks
//! in file order, fill each with the header bytes and tensor elements it
//! covers, and write it with one `pwrite`, through `O_DIRECT` where the
//! filesystem allows it (the page cache's writeback is often several times
//! slower than the disk). Element `e` of a tensor is a pure function of the
//! tensor's key and `e` (SplitMix64 of a counter), so any block can be
//! generated alone and the output does not depend on the thread count or the
//! shard layout.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::io::AlignedBuf;
use crate::{DType, Error, Result};

/// Bytes per write.
const BLOCK: u64 = 8 << 20;
/// Alignment of direct writes.
const WRITE_ALIGN: u64 = 4096;
/// SplitMix64's increment.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function.
pub(super) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The random key of tensor number `id` (in state-dict order) under `seed`.
pub fn tensor_key(seed: u64, id: u64) -> u64 {
    mix(mix(seed) ^ id)
}

/// Fills `out` with elements `first..` of the tensor keyed `key`, each
/// `mean + std·z` in `dtype`, z approximately N(0, 1): the sum of four 16-bit
/// uniforms, centred and scaled (Irwin–Hall, variance 1/3 for each sum).
pub fn fill_normal(out: &mut [u8], dtype: DType, key: u64, first: u64, mean: f32, std: f32) {
    let scale = std * 3.0f32.sqrt() / 65536.0;
    let mut e = first;
    let mut next = move || {
        let u = mix(key.wrapping_add(e.wrapping_mul(GOLDEN)));
        e += 1;
        let s = (u & 0xffff) + ((u >> 16) & 0xffff) + ((u >> 32) & 0xffff) + (u >> 48);
        mean + (s as f32 - 131_070.0) * scale
    };
    match dtype {
        DType::BF16 => out
            .chunks_exact_mut(2)
            .for_each(|c| c.copy_from_slice(&half::bf16::from_f32(next()).to_le_bytes())),
        DType::F16 => out
            .chunks_exact_mut(2)
            .for_each(|c| c.copy_from_slice(&half::f16::from_f32(next()).to_le_bytes())),
        _ => out
            .chunks_exact_mut(4)
            .for_each(|c| c.copy_from_slice(&next().to_le_bytes())),
    }
}

/// A tensor's place in a shard and how its elements are drawn.
pub(super) struct PlacedTensor {
    pub key: u64,
    /// Absolute file offset.
    pub offset: u64,
    pub bytes: u64,
    pub mean: f32,
    pub std: f32,
}

/// One file to write: header bytes (length prefix included), then tensors.
pub(super) struct ShardPlan {
    pub path: PathBuf,
    pub header: Vec<u8>,
    pub len: u64,
    /// Sorted by offset, contiguous after the header.
    pub tensors: Vec<PlacedTensor>,
}

struct OpenShard {
    /// Opened normally: sizing and syncing.
    file: File,
    /// Opened with `O_DIRECT` where allowed, else a second buffered handle.
    writer: File,
    direct: bool,
}

/// Creates shard `s` at its full length and opens its writer (`O_DIRECT`
/// where the filesystem allows it).
fn open_shard(s: &ShardPlan) -> Result<OpenShard> {
    let file = File::create(&s.path).map_err(|e| Error::io("creating", &s.path, None, e))?;
    file.set_len(s.len)
        .map_err(|e| Error::io("sizing", &s.path, None, e))?;
    let direct = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&s.path);
    let (writer, direct) = match direct {
        Ok(f) => (f, true),
        Err(_) => (
            file.try_clone()
                .map_err(|e| Error::io("reopening", &s.path, None, e))?,
            false,
        ),
    };
    Ok(OpenShard {
        file,
        writer,
        direct,
    })
}

/// Writes every shard; `progress` gets the bytes of each block written.
pub(super) fn write_shards(
    shards: &[ShardPlan],
    dtype: DType,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let open = shards.iter().map(open_shard).collect::<Result<Vec<_>>>()?;
    let jobs: Vec<(usize, u64)> = shards
        .iter()
        .enumerate()
        .flat_map(|(i, s)| (0..s.len.div_ceil(BLOCK)).map(move |b| (i, b * BLOCK)))
        .collect();
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, jobs.len().max(1)) {
            scope.spawn(|| {
                let mut buf = match AlignedBuf::new(BLOCK as usize) {
                    Ok(b) => b,
                    Err(e) => {
                        failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        return;
                    }
                };
                // Relaxed: the counter only hands out distinct job numbers.
                while let Some(&(i, start)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let (s, f) = (&shards[i], &open[i]);
                    let n = fill_block(s, dtype, start, buf.as_mut_slice());
                    let len = if f.direct {
                        n.div_ceil(WRITE_ALIGN as usize) * WRITE_ALIGN as usize
                    } else {
                        n
                    };
                    if let Err(e) = f.writer.write_all_at(&buf.as_slice()[..len], start) {
                        let err =
                            Error::io(format!("writing {len} bytes to"), &s.path, Some(start), e);
                        failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(err);
                        next.store(jobs.len(), Ordering::Relaxed);
                        return;
                    }
                    progress(n as u64);
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    for (s, f) in shards.iter().zip(&open) {
        // A direct write of the last block is padded to the alignment.
        f.file
            .set_len(s.len)
            .map_err(|e| Error::io("sizing", &s.path, None, e))?;
        f.file
            .sync_all()
            .map_err(|e| Error::io("syncing", &s.path, None, e))?;
    }
    Ok(())
}

/// Fills `buf` with file bytes `[start, start + BLOCK)` (clipped to the file)
/// and zero padding up to the write alignment; returns the file bytes' count.
fn fill_block(s: &ShardPlan, dtype: DType, start: u64, buf: &mut [u8]) -> usize {
    let end = (start + BLOCK).min(s.len);
    let n = (end - start) as usize;
    let padded = n.div_ceil(WRITE_ALIGN as usize) * WRITE_ALIGN as usize;
    let pad_end = padded.min(buf.len());
    buf[n..pad_end].fill(0);
    let header_len = s.header.len() as u64;
    if start < header_len {
        let h = &s.header[start as usize..header_len.min(end) as usize];
        buf[..h.len()].copy_from_slice(h);
    }
    let esize = dtype.size() as u64;
    let first = s.tensors.partition_point(|t| t.offset + t.bytes <= start);
    for t in s.tensors[first..].iter().take_while(|t| t.offset < end) {
        let (a, b) = (t.offset.max(start), (t.offset + t.bytes).min(end));
        let out = &mut buf[(a - start) as usize..(b - start) as usize];
        fill_normal(out, dtype, t.key, (a - t.offset) / esize, t.mean, t.std);
    }
    n
}
