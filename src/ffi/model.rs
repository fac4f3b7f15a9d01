//! `ls_model`: a model directory opened and validated, and what C can ask of it.

use std::ffi::{c_char, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use super::config::ls_dtype;
use super::error::{boundary, guard, ls_result, write_c_bytes_whole, Failure};
use crate::checkpoint::TensorInfo;
use crate::ModelIndex;

/// The NUL-terminated strings and 64-bit shape of one tensor, kept for as
/// long as a handle hands out pointers to them.
#[derive(Debug)]
pub(crate) struct TensorMeta {
    pub(crate) key: CString,
    pub(crate) name: CString,
    pub(crate) shape: Box<[u64]>,
}

impl TensorMeta {
    pub(crate) fn new(key: &str, name: &str, shape: &[usize]) -> Result<TensorMeta, Failure> {
        Ok(TensorMeta {
            key: c_string(key)?,
            name: c_string(name)?,
            shape: shape.iter().map(|&d| d as u64).collect(),
        })
    }
}

/// C strings of every tensor of a model, shared by the model handle and the
/// streamers built from it.
#[derive(Debug)]
pub(crate) struct ModelMeta {
    pub(crate) layers: Vec<Vec<TensorMeta>>,
    pub(crate) statics: Vec<TensorMeta>,
    dir: CString,
}

impl ModelMeta {
    pub(crate) fn new(index: &ModelIndex) -> Result<ModelMeta, Failure> {
        let layers = index
            .layers()
            .iter()
            .map(|l| {
                l.tensors
                    .iter()
                    .map(|t| TensorMeta::new(&t.key, &t.info.name, &t.info.shape))
                    .collect()
            })
            .collect::<Result<_, _>>()?;
        let statics = index
            .statics()
            .iter()
            .map(|t| TensorMeta::new(&t.name, &t.name, &t.shape))
            .collect::<Result<_, _>>()?;
        let dir = CString::new(index.dir().as_os_str().as_bytes())
            .map_err(|_| Failure::invalid("the model path contains a NUL byte"))?;
        Ok(ModelMeta {
            layers,
            statics,
            dir,
        })
    }
}

fn c_string(s: &str) -> Result<CString, Failure> {
    CString::new(s).map_err(|_| Failure::invalid(format!("tensor name {s:?} contains a NUL byte")))
}

/// An open model: its files, layers and tensors, validated against the disk.
/// Opaque; created by [`ls_model_open`], freed by [`ls_model_free`].
pub struct ls_model {
    pub(crate) index: ModelIndex,
    pub(crate) meta: Arc<ModelMeta>,
}

/// A tensor of the model as stored on disk. Every pointer in it is owned by
/// the `ls_model` it came from and valid until that model is freed.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ls_tensor_info {
    /// Name inside the layer (e.g. `mlp.up_proj.weight`); the full name for
    /// a static tensor.
    pub key: *const c_char,
    /// Full name, e.g. `model.layers.3.mlp.up_proj.weight`.
    pub name: *const c_char,
    /// Element type as stored.
    pub dtype: ls_dtype,
    /// Number of dimensions: the length of `shape`.
    pub ndim: u32,
    /// Shape, outermost first.
    pub shape: *const u64,
    /// Bytes on disk.
    pub bytes: u64,
    /// Index of the file holding it, below [`ls_model_num_files`].
    pub file: u32,
    /// Absolute offset of its first byte in that file.
    pub file_offset: u64,
}

impl ls_tensor_info {
    fn new(meta: &TensorMeta, info: &TensorInfo) -> ls_tensor_info {
        ls_tensor_info {
            key: meta.key.as_ptr(),
            name: meta.name.as_ptr(),
            dtype: info.dtype as u32,
            ndim: meta.shape.len() as u32,
            shape: meta.shape.as_ptr(),
            bytes: info.len,
            file: info.file as u32,
            file_offset: info.file_offset,
        }
    }
}

/// A C string argument as a path.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string valid for reads.
pub(crate) unsafe fn path_arg<'a>(p: *const c_char, arg: &str) -> Result<&'a Path, Failure> {
    if p.is_null() {
        return Err(Failure::null(arg));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    Ok(Path::new(std::ffi::OsStr::from_bytes(bytes)))
}

/// A C string argument as UTF-8.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string valid for reads.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, arg: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(Failure::null(arg));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|e| Failure::invalid(format!("argument {arg} is not UTF-8: {e}")))
}

/// Stores `value` through an out-pointer argument.
///
/// # Safety
/// `out` is NULL or valid for a write of a `T`.
pub(crate) unsafe fn write_out<T>(out: *mut T, value: T, arg: &str) -> Result<(), Failure> {
    if out.is_null() {
        return Err(Failure::null(arg));
    }
    // SAFETY: non-NULL and writable by the caller's contract; `write` does
    // not read or drop the old (possibly uninitialized) value.
    unsafe { out.write(value) };
    Ok(())
}

/// Opens a Hugging Face model directory (`model.safetensors.index.json`
/// with its shards, `model.safetensors`, or `*.safetensors`) and validates
/// every header against its file.
///
/// On success `*out` receives a new model the caller owns and frees with
/// [`ls_model_free`]. On failure `*out` is set to NULL and the code says why
/// (`LS_IO`, `LS_MODEL`, ...), with the path in the message.
///
/// # Safety
/// `path` must be a NUL-terminated string; `out` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ls_model_open(path: *const c_char, out: *mut *mut ls_model) -> ls_result {
    boundary(|| {
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        // SAFETY: `out` is non-NULL and writable by this function's contract.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: `path` is NULL or NUL-terminated by this function's contract.
        let path = unsafe { path_arg(path, "path") }?;
        let index = ModelIndex::open(path)?;
        let meta = Arc::new(ModelMeta::new(&index)?);
        let model = Box::into_raw(Box::new(ls_model { index, meta }));
        // SAFETY: as above.
        unsafe { out.write(model) };
        Ok(())
    })
}

/// Frees a model from [`ls_model_open`]; NULL is a no-op. Streamers built
/// from it stay valid: each keeps what it needs.
///
/// # Safety
/// `model` must be NULL or a pointer from `ls_model_open` not yet freed; no
/// pointer obtained from it (names, shapes) may be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ls_model_free(model: *mut ls_model) {
    guard((), || {
        if !model.is_null() {
            // SAFETY: `model` came from Box::into_raw in ls_model_open and is
            // freed once, by this function's contract.
            drop(unsafe { Box::from_raw(model) });
        }
    })
}

/// Borrows a model handle.
///
/// # Safety
/// `m` is NULL or a live pointer from `ls_model_open`.
unsafe fn model_ref<'a>(m: *const ls_model) -> Option<&'a ls_model> {
    // SAFETY: NULL or live, by the caller's contract.
    unsafe { m.as_ref() }
}

/// Number of layers (repeated blocks); 0 for NULL.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ls_model_num_layers(model: *const ls_model) -> u32 {
    guard(0, || {
        // SAFETY: forwarded from this function's contract.
        unsafe { model_ref(model) }.map_or(0, |m| m.index.num_layers() as u32)
    })
}

/// Number of safetensors files; 0 for NULL.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ls_model_num_files(model: *const ls_model) -> u32 {
    guard(0, || {
        // SAFETY: forwarded from this function's contract.
        unsafe { model_ref(model) }.map_or(0, |m| m.index.files().len() as u32)
    })
}

/// Number of static tensors (outside the layers: embedding, final norm,
/// `lm_head`, ...); 0 for NULL.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ls_model_num_statics(model: *const ls_model) -> u32 {
    guard(0, || {
        // SAFETY: forwarded from this function's contract.
        unsafe { model_ref(model) }.map_or(0, |m| m.index.statics().len() as u32)
    })
}

/// Number of tensors in `layer`; 0 for NULL or a layer out of range.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ls_model_layer_num_tensors(model: *const ls_model, layer: u32) -> u32 {
    guard(0, || {
        // SAFETY: forwarded from this function's contract.
        let m = unsafe { model_ref(model) };
        m.and_then(|m| m.index.layers().get(layer as usize))
            .map_or(0, |l| l.tensors.len() as u32)
    })
}

/// Bytes of the tensors of `layer` on disk; 0 for NULL or a layer out of range.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ls_model_layer_bytes(model: *const ls_model, layer: u32) -> u64 {
    guard(0, || {
        // SAFETY: forwarded from this function's contract.
        let m = unsafe { model_ref(model) };
        m.and_then(|m| m.index.layers().get(layer as usize))
            .map_or(0, |l| l.data_bytes)
    })
}

/// Bytes of all layers: what one pass streams; 0 for NULL.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ls_model_total_layer_bytes(model: *const ls_model) -> u64 {
    guard(0, || {
        // SAFETY: forwarded from this function's contract.
        unsafe { model_ref(model) }.map_or(0, |m| m.index.total_layer_bytes())
    })
}

/// The model directory as a NUL-terminated string owned by the model; NULL
/// for NULL.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ls_model_dir(model: *const ls_model) -> *const c_char {
    guard(std::ptr::null(), || {
        // SAFETY: forwarded from this function's contract.
        unsafe { model_ref(model) }.map_or(std::ptr::null(), |m| m.meta.dir.as_ptr())
    })
}

/// Copies the path of file `file` of the model, the file that
/// [`ls_tensor_info::file`] names, into `buf` as a NUL-terminated string:
/// the directory given to [`ls_model_open`] joined with the file's name
/// (relative where that directory was).
///
/// The caller owns `buf` (`len` bytes). With `len` 0 (and `buf` NULL) only
/// the length is stored: a size query. When `out_len` is not NULL it
/// receives the path's length without the NUL; a buffer of at least
/// `*out_len + 1` bytes holds it. A path is never truncated.
///
/// Returns `LS_OK`; `LS_INVALID_ARGUMENT` when `file` is not below
/// [`ls_model_num_files`] or `buf` is too small (then `buf` holds the empty
/// string); `LS_NULL_ARGUMENT` when `model` is NULL, or `buf` is NULL with
/// `len` above 0.
///
/// # Safety
/// `model` must be NULL or a live model; `buf` must be NULL with `len` 0 or
/// valid for writes of `len` bytes; `out_len` must be NULL or valid for a
/// write.
#[no_mangle]
pub unsafe extern "C" fn ls_model_file_path(
    model: *const ls_model,
    file: u32,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> ls_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let m = unsafe { model_ref(model) }.ok_or_else(|| Failure::null("model"))?;
        let f = m.index.files().get(file as usize).ok_or_else(|| {
            Failure::invalid(format!(
                "file {file} is out of range: the model has {} files",
                m.index.files().len()
            ))
        })?;
        let what = format!("the path of file {file}, {}", f.path.display());
        // SAFETY: forwarded from this function's contract.
        unsafe { write_c_bytes_whole(f.path.as_os_str().as_bytes(), buf, len, out_len, &what) }
    })
}

/// Describes tensor `index` of `layer` (in file order) into `*out`. The
/// strings and shape it points to belong to the model.
///
/// Returns `LS_INVALID_ARGUMENT` when `layer` or `index` is out of range.
///
/// # Safety
/// `model` must be NULL or a live model; `out` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ls_model_layer_tensor(
    model: *const ls_model,
    layer: u32,
    index: u32,
    out: *mut ls_tensor_info,
) -> ls_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let m = unsafe { model_ref(model) }.ok_or_else(|| Failure::null("model"))?;
        let l = m.index.layers().get(layer as usize).ok_or_else(|| {
            Failure::invalid(format!(
                "layer {layer} is out of range: the model has {} layers",
                m.index.num_layers()
            ))
        })?;
        let t = l.tensors.get(index as usize).ok_or_else(|| {
            Failure::invalid(format!(
                "tensor {index} is out of range: layer {layer} has {} tensors",
                l.tensors.len()
            ))
        })?;
        let info = ls_tensor_info::new(&m.meta.layers[layer as usize][index as usize], &t.info);
        // SAFETY: forwarded from this function's contract.
        unsafe { write_out(out, info, "out") }
    })
}

/// Describes static tensor `index` (in file order) into `*out`. The
/// strings and shape it points to belong to the model.
///
/// Returns `LS_INVALID_ARGUMENT` when `index` is out of range.
///
/// # Safety
/// `model` must be NULL or a live model; `out` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ls_model_static_tensor(
    model: *const ls_model,
    index: u32,
    out: *mut ls_tensor_info,
) -> ls_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let m = unsafe { model_ref(model) }.ok_or_else(|| Failure::null("model"))?;
        let t = m.index.statics().get(index as usize).ok_or_else(|| {
            Failure::invalid(format!(
                "static tensor {index} is out of range: the model has {}",
                m.index.statics().len()
            ))
        })?;
        let info = ls_tensor_info::new(&m.meta.statics[index as usize], t);
        // SAFETY: forwarded from this function's contract.
        unsafe { write_out(out, info, "out") }
    })
}
