//! Static tensors (embedding, final norm, lm_head): read once and kept on the device.

use crate::checkpoint::TensorInfo;
use crate::io::AlignedBuf;
use crate::pipeline::plan::{cast_target, dequant_source};
use crate::pipeline::resources::Resources;
use crate::pipeline::{DevMem, StreamH};
use crate::quant::QuantType;
use crate::{DType, Error, Result};

/// A tensor that stays on the device for the streamer's lifetime (or as long
/// as the caller keeps it).
pub struct DeviceTensor {
    pub(crate) mem: DevMem,
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    bytes: u64,
    quant: Option<QuantType>,
}

impl DeviceTensor {
    /// Device address of the first element (a host address on the host backend).
    pub fn ptr(&self) -> u64 {
        self.mem.ptr()
    }

    /// The tensor's name in the model.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Element type on the device.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Bytes on the device.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The ggml block type when the tensor is kept as stored blocks (a
    /// quantized GGUF tensor loaded in file dtypes); see
    /// [`TensorView::quant`](crate::TensorView::quant).
    pub fn quant(&self) -> Option<QuantType> {
        self.quant
    }

    /// Copies the tensor back to the host.
    pub fn to_host(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.bytes as usize];
        self.mem.read(0, &mut out)?;
        Ok(out)
    }
}

pub(crate) fn load_static(
    res: &Resources,
    stream: &StreamH,
    dtype: Option<DType>,
    name: &str,
) -> Result<DeviceTensor> {
    let info = res
        .model
        .tensor(name)
        .ok_or_else(|| Error::UnknownTensor(name.to_string()))?;
    if let (Some(scale), Some(d)) = (&info.scale, dtype) {
        return Err(Error::config(format!(
            "static tensor {name} of {} is an FP8 weight ({} scales in {}); static tensors \
             (embedding, final norm, lm_head) load in file dtypes or dequantized from ggml \
             blocks, not from FP8, into the compute dtype {d}",
            res.model.files()[info.file].path.display(),
            scale.layout,
            scale.tensor
        )));
    }
    let file = &res.files[info.file];
    let len = info.len as usize;
    let mut scratch = AlignedBuf::new(len + 2 * file.block_size())?;
    let bytes = file.read_range(info.file_offset, len, &mut scratch)?;
    let cast_to = cast_target(&res.model, info, dtype)?;
    let (mem, out_dtype, out_bytes) = match cast_to {
        None => {
            let mut mem = res.backend.alloc(len, name.to_string())?;
            mem.write(0, bytes)?;
            (mem, info.dtype, info.len)
        }
        Some(to) => {
            let (mem, out_bytes) = convert_static(res, stream, info, bytes, to)?;
            (mem, to, out_bytes)
        }
    };
    Ok(DeviceTensor {
        mem,
        name: name.to_string(),
        dtype: out_dtype,
        shape: info.shape.clone(),
        bytes: out_bytes,
        quant: if cast_to.is_some() { None } else { info.quant },
    })
}

/// Copies a static tensor's stored `bytes` to the device and casts or
/// dequantizes them there into a new allocation of `to`; returns it and its
/// size.
fn convert_static(
    res: &Resources,
    stream: &StreamH,
    info: &TensorInfo,
    bytes: &[u8],
    to: DType,
) -> Result<(DevMem, u64)> {
    let name = &info.name;
    let n: usize = info.shape.iter().product();
    let what = if info.quant.is_some() {
        "stored blocks"
    } else {
        "file dtype"
    };
    let mut raw = res.backend.alloc(bytes.len(), format!("{name} ({what})"))?;
    raw.write(0, bytes)?;
    let out_bytes = (n * to.size()) as u64;
    let mem = res.backend.alloc(out_bytes as usize, name.to_string())?;
    // SAFETY: `raw` holds the tensor's stored bytes (`n` elements of the
    // file dtype, or `q` blocks for `n` elements) and `mem` room for `n`
    // elements of `to`; both live until the synchronize below.
    unsafe {
        match dequant_source(info, to) {
            Some(q) => {
                let dq = res.backend.dequant_kernels();
                stream.dequant(dq, q, to, raw.ptr(), mem.ptr(), n)?
            }
            None => {
                let k = res.backend.kernels();
                stream.cast(k, info.dtype, to, raw.ptr(), mem.ptr(), n)?
            }
        }
    }
    stream.synchronize()?;
    Ok((mem, out_bytes))
}
