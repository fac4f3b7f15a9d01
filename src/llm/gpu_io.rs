//! The host side of a CUDA pass's inputs and outputs: one page-locked
//! staging buffer for the token ids, sequences, positions and output rows,
//! copied to the device on the compute stream (no synchronous copies), and
//! one for the logits, copied back on the same stream and split into rows
//! with one copy each. Both are allocated once, at load.

use crate::cuda::{memcpy_dtoh_async, memcpy_htod_async, Context, HostRegistration, Stream};
use crate::io::AlignedBuf;
use crate::llm::llama::PassBatch;
use crate::{Error, Result};

/// Page-aligned host memory, page-locked when the driver and
/// `RLIMIT_MEMLOCK` allow (else the copies from and to it are synchronous,
/// which is slower but as correct).
pub(crate) struct StagingBuf {
    /// Declared before `buf` so that it is dropped (unregistered) first.
    _reg: Option<HostRegistration>,
    pub(crate) buf: AlignedBuf,
}

impl StagingBuf {
    pub(crate) fn new(ctx: &Context, bytes: usize) -> Result<StagingBuf> {
        let mut buf = AlignedBuf::new(bytes.max(1))?;
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        // SAFETY: `buf` is a live page-aligned mapping of `len` bytes that this
        // struct owns and drops after the registration; no other registration
        // covers it (it was just mapped).
        let reg = unsafe { HostRegistration::register(ctx, ptr, len) }.ok();
        Ok(StagingBuf { _reg: reg, buf })
    }

    /// As [`new`](Self::new), also mapped into the device's address space
    /// when the driver allows ([`device_ptr`](Self::device_ptr)), so that
    /// kernels read it over the bus; else as `new`.
    pub(crate) fn new_mapped(ctx: &Context, bytes: usize) -> Result<StagingBuf> {
        let mut buf = AlignedBuf::new(bytes.max(1))?;
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        // SAFETY: as in `new`; the registration is dropped before `buf`,
        // and the users of the device address keep the buffer (and so the
        // registration) alive while queued work reads it.
        let mapped = unsafe { HostRegistration::register_mapped(ctx, ptr, len) };
        let reg = match mapped {
            Ok(r) => Some(r),
            // SAFETY: as in `new`: the refused mapping registered nothing.
            Err(_) => unsafe { HostRegistration::register(ctx, ptr, len) }.ok(),
        };
        Ok(StagingBuf { _reg: reg, buf })
    }

    /// The device address of the buffer when it is mapped.
    pub(crate) fn device_ptr(&self) -> Option<u64> {
        self._reg.as_ref().and_then(HostRegistration::device_ptr)
    }
}

/// Where a pass's inputs sit in the input staging buffer, in u32s: token
/// ids, sequences and positions (`tokens` each), then the output rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InputLayout {
    pub(crate) tokens: usize,
    pub(crate) rows: usize,
}

impl InputLayout {
    /// Offsets (in u32s) of ids, seq, pos and rows, and the total.
    pub(crate) fn offsets(&self) -> ([usize; 4], usize) {
        let t = self.tokens;
        ([0, t, 2 * t, 3 * t], 3 * t + self.rows)
    }
}

/// Packs `b`'s ids, sequences, positions and output rows into `out`.
pub(crate) fn pack_inputs(b: &PassBatch, out: &mut [u32]) -> Result<InputLayout> {
    let layout = InputLayout {
        tokens: b.tokens.len(),
        rows: b.out_rows.len(),
    };
    let (off, total) = layout.offsets();
    if b.seq.len() != layout.tokens || b.pos.len() != layout.tokens || total > out.len() {
        return Err(Error::Pipeline(format!(
            "pass inputs of {} tokens ({} seq, {} pos) and {} output rows do not fit the \
             {}-entry staging buffer",
            layout.tokens,
            b.seq.len(),
            b.pos.len(),
            layout.rows,
            out.len()
        )));
    }
    for (src, &at) in [&b.tokens, &b.seq, &b.pos, &b.out_rows].iter().zip(&off) {
        out[at..at + src.len()].copy_from_slice(src);
    }
    Ok(layout)
}

/// Splits `n_rows × vocab` little-endian f32 logits into one vector per row.
pub(crate) fn logit_rows(bytes: &[u8], n_rows: usize, vocab: usize) -> Result<Vec<Vec<f32>>> {
    let need = n_rows * vocab * 4;
    let floats: &[f32] = bytes
        .get(..need)
        .and_then(|b| bytemuck::try_cast_slice(b).ok())
        .ok_or_else(|| {
            Error::Pipeline(format!(
                "{n_rows} rows of {vocab} logits do not fit the {}-byte staging buffer",
                bytes.len()
            ))
        })?;
    Ok(floats
        .chunks_exact(vocab.max(1))
        .map(<[f32]>::to_vec)
        .collect())
}

/// The staging buffers of one model.
pub(crate) struct PassIo {
    input: StagingBuf,
    logits: StagingBuf,
    /// Whether copies from `input` or into `logits` may still be queued
    /// (a pass that failed before its final synchronize).
    pending: bool,
}

impl PassIo {
    /// Buffers for passes of up to `max_tokens` tokens and `max_batch`
    /// output rows of `vocab` logits.
    pub(crate) fn new(
        ctx: &Context,
        max_tokens: usize,
        max_batch: usize,
        vocab: usize,
    ) -> Result<PassIo> {
        Ok(PassIo {
            input: StagingBuf::new(ctx, (3 * max_tokens + max_batch) * 4)?,
            logits: StagingBuf::new(ctx, max_batch * vocab * 4)?,
            pending: false,
        })
    }

    /// Queues the copies of `b`'s inputs to `dst` (ids, seq, pos, rows: device
    /// buffers of `max_tokens`, `max_tokens`, `max_tokens` and `max_batch`
    /// u32s) on `s`.
    pub(crate) fn upload(&mut self, s: &Stream, b: &PassBatch, dst: [u64; 4]) -> Result<()> {
        if self.pending {
            // An earlier pass failed with copies queued: let them finish
            // before the host buffers are written again.
            s.synchronize()?;
        }
        let words: &mut [u32] = bytemuck::try_cast_slice_mut(self.input.buf.as_mut_slice())
            .map_err(|e| Error::Pipeline(format!("input staging buffer: {e}")))?;
        let layout = pack_inputs(b, words)?;
        let (off, _) = layout.offsets();
        let lens = [layout.tokens, layout.tokens, layout.tokens, layout.rows];
        self.pending = true;
        let base = self.input.buf.as_ptr();
        for ((&d, &at), &n) in dst.iter().zip(&off).zip(&lens) {
            // SAFETY: the source range is inside the staging buffer (checked
            // by pack_inputs), which is not written again until the stream
            // has passed this copy (`pending`); `d` holds at least `n` u32s
            // (the caller's buffers are sized for max_tokens and max_batch,
            // which the forward pass checks the batch against).
            unsafe { memcpy_htod_async(d, base.add(at * 4), n * 4, s)? };
        }
        Ok(())
    }

    /// Queues the copy of `n_rows × vocab` f32 logits from device `src`,
    /// waits for the stream, and returns the rows.
    pub(crate) fn download(
        &mut self,
        s: &Stream,
        src: u64,
        n_rows: usize,
        vocab: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let bytes = n_rows * vocab * 4;
        if bytes > self.logits.buf.len() {
            return Err(Error::Pipeline(format!(
                "{n_rows} rows of {vocab} logits exceed the {}-byte staging buffer",
                self.logits.buf.len()
            )));
        }
        self.pending = true;
        // SAFETY: the destination is the first `bytes` of the staging buffer,
        // which the host does not touch until the synchronize below; `src`
        // holds n_rows * vocab f32 logits on the stream's device.
        unsafe { memcpy_dtoh_async(self.logits.buf.as_mut_ptr(), src, bytes, s)? };
        s.synchronize()?;
        self.pending = false;
        logit_rows(self.logits.buf.as_slice(), n_rows, vocab)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    use crate::test_rng::rng;

    #[test]
    fn inputs_pack_back_to_back_and_too_many_are_an_error() {
        let mut rng = rng();
        for _ in 0..50 {
            let t = rng.gen_range(0..40usize);
            let mut b = PassBatch::default();
            for _ in 0..t {
                b.tokens.push(rng.gen());
                b.seq.push(rng.gen());
                b.pos.push(rng.gen());
            }
            b.out_rows = (0..rng.gen_range(0..8)).map(|_| rng.gen()).collect();
            let room = 3 * t + b.out_rows.len();
            let mut out = vec![u32::MAX; room + rng.gen_range(0..5)];
            let layout = pack_inputs(&b, &mut out).unwrap();
            let (off, total) = layout.offsets();
            assert_eq!(total, room);
            assert_eq!(&out[off[0]..off[0] + t], &b.tokens[..]);
            assert_eq!(&out[off[1]..off[1] + t], &b.seq[..]);
            assert_eq!(&out[off[2]..off[2] + t], &b.pos[..]);
            assert_eq!(&out[off[3]..total], &b.out_rows[..]);
            assert!(out[total..].iter().all(|&x| x == u32::MAX));
            if room > 0 {
                let e = pack_inputs(&b, &mut vec![0; room - 1]).unwrap_err();
                assert!(e.to_string().contains("staging buffer"), "{e}");
            }
        }
    }

    #[test]
    fn logits_split_into_rows_and_short_buffers_are_an_error() {
        let mut rng = rng();
        let (rows, vocab) = (rng.gen_range(1..6usize), rng.gen_range(1..50usize));
        // Up to a row's worth of slack after the logits, never a whole row.
        let slack = rng.gen_range(0..vocab);
        let vals: Vec<f32> = (0..rows * vocab + slack).map(|_| rng.gen()).collect();
        let bytes: &[u8] = bytemuck::cast_slice(&vals);
        let got = logit_rows(bytes, rows, vocab).unwrap();
        assert_eq!(got.len(), rows);
        for (r, row) in got.iter().enumerate() {
            assert_eq!(&row[..], &vals[r * vocab..(r + 1) * vocab]);
        }
        assert!(logit_rows(bytes, rows + 1, vocab).is_err());
    }
}
