//! `ls_tensor`: a static tensor (embedding, final norm, `lm_head`) read once
//! and kept on the device.

use std::ffi::{c_char, c_void, CString};

use super::config::ls_dtype;
use super::error::{boundary, guard, ls_result, Failure};
use super::model::str_arg;
use super::streamer::{claim, ls_streamer};
use crate::DeviceTensor;

/// A tensor kept on the device. Opaque; created by
/// [`ls_streamer_load_static`], freed by [`ls_tensor_free`]. It holds its own
/// device memory and may outlive the streamer that loaded it.
pub struct ls_tensor {
    tensor: DeviceTensor,
    name: CString,
    shape: Box<[u64]>,
}

/// Reads the static tensor `name` and keeps it on the device, cast to the
/// compute dtype when it is a float.
///
/// On success `*out` receives a new tensor the caller owns and frees with
/// [`ls_tensor_free`]. On failure `*out` is set to NULL; an unknown name is
/// `LS_UNKNOWN_TENSOR`.
///
/// # Safety
/// `streamer` must be NULL or a live streamer; `name` a NUL-terminated
/// string; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ls_streamer_load_static(
    streamer: *const ls_streamer,
    name: *const c_char,
    out: *mut *mut ls_tensor,
) -> ls_result {
    boundary(|| {
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        // SAFETY: non-NULL and writable by this function's contract.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: forwarded from this function's contract.
        let mut claim = unsafe { claim(streamer) }?;
        // SAFETY: forwarded from this function's contract.
        let name = unsafe { str_arg(name, "name") }?;
        let tensor = claim.inner().streamer.load_static(name)?;
        let t = Box::new(ls_tensor {
            name: CString::new(tensor.name())
                .map_err(|_| Failure::invalid("tensor name contains a NUL byte"))?,
            shape: tensor.shape().iter().map(|&d| d as u64).collect(),
            tensor,
        });
        // SAFETY: as above.
        unsafe { out.write(Box::into_raw(t)) };
        Ok(())
    })
}

/// Frees a tensor and its device memory; NULL is a no-op.
///
/// # Safety
/// `tensor` must be NULL or a pointer from `ls_streamer_load_static` not yet
/// freed; the device must be done with its memory.
#[no_mangle]
pub unsafe extern "C" fn ls_tensor_free(tensor: *mut ls_tensor) {
    guard((), || {
        if !tensor.is_null() {
            // SAFETY: from Box::into_raw in ls_streamer_load_static, freed
            // once, by this function's contract.
            drop(unsafe { Box::from_raw(tensor) });
        }
    })
}

/// Borrows a tensor handle.
///
/// # Safety
/// `t` is NULL or a live tensor.
unsafe fn tensor_ref<'a>(t: *const ls_tensor) -> Option<&'a ls_tensor> {
    // SAFETY: NULL or live by the caller's contract.
    unsafe { t.as_ref() }
}

/// Device address of the first element (a host address on the host
/// backend); 0 for NULL. Valid until the tensor is freed.
///
/// # Safety
/// `tensor` must be NULL or a live tensor.
#[no_mangle]
pub unsafe extern "C" fn ls_tensor_ptr(tensor: *const ls_tensor) -> u64 {
    guard(0, || {
        // SAFETY: forwarded from this function's contract.
        unsafe { tensor_ref(tensor) }.map_or(0, |t| t.tensor.ptr())
    })
}

/// Element type on the device; `LS_DTYPE_FILE` for NULL.
///
/// # Safety
/// `tensor` must be NULL or a live tensor.
#[no_mangle]
pub unsafe extern "C" fn ls_tensor_dtype(tensor: *const ls_tensor) -> ls_dtype {
    guard(super::config::LS_DTYPE_FILE, || {
        // SAFETY: forwarded from this function's contract.
        unsafe { tensor_ref(tensor) }
            .map_or(super::config::LS_DTYPE_FILE, |t| t.tensor.dtype() as u32)
    })
}

/// Number of dimensions; 0 for NULL.
///
/// # Safety
/// `tensor` must be NULL or a live tensor.
#[no_mangle]
pub unsafe extern "C" fn ls_tensor_ndim(tensor: *const ls_tensor) -> u32 {
    guard(0, || {
        // SAFETY: forwarded from this function's contract.
        unsafe { tensor_ref(tensor) }.map_or(0, |t| t.shape.len() as u32)
    })
}

/// The shape, `ndim` values outermost first, owned by the tensor; NULL for NULL.
///
/// # Safety
/// `tensor` must be NULL or a live tensor.
#[no_mangle]
pub unsafe extern "C" fn ls_tensor_shape(tensor: *const ls_tensor) -> *const u64 {
    guard(std::ptr::null(), || {
        // SAFETY: forwarded from this function's contract.
        unsafe { tensor_ref(tensor) }.map_or(std::ptr::null(), |t| t.shape.as_ptr())
    })
}

/// Bytes on the device; 0 for NULL.
///
/// # Safety
/// `tensor` must be NULL or a live tensor.
#[no_mangle]
pub unsafe extern "C" fn ls_tensor_bytes(tensor: *const ls_tensor) -> u64 {
    guard(0, || {
        // SAFETY: forwarded from this function's contract.
        unsafe { tensor_ref(tensor) }.map_or(0, |t| t.tensor.bytes())
    })
}

/// The tensor's name in the model, owned by the tensor; NULL for NULL.
///
/// # Safety
/// `tensor` must be NULL or a live tensor.
#[no_mangle]
pub unsafe extern "C" fn ls_tensor_name(tensor: *const ls_tensor) -> *const c_char {
    guard(std::ptr::null(), || {
        // SAFETY: forwarded from this function's contract.
        unsafe { tensor_ref(tensor) }.map_or(std::ptr::null(), |t| t.name.as_ptr())
    })
}

/// Copies the tensor's bytes into host memory at `dst`, which the caller
/// owns; synchronous. Returns `LS_INVALID_ARGUMENT` when `dst_len` is
/// smaller than [`ls_tensor_bytes`].
///
/// # Safety
/// `tensor` must be NULL or a live tensor; `dst` valid for writes of
/// `dst_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn ls_tensor_copy_to_host(
    tensor: *const ls_tensor,
    dst: *mut c_void,
    dst_len: u64,
) -> ls_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let t = unsafe { tensor_ref(tensor) }.ok_or_else(|| Failure::null("tensor"))?;
        if dst.is_null() {
            return Err(Failure::null("dst"));
        }
        if dst_len < t.tensor.bytes() {
            return Err(Failure::invalid(format!(
                "dst_len is {dst_len} but {} has {} bytes",
                t.tensor.name(),
                t.tensor.bytes()
            )));
        }
        let bytes = t.tensor.to_host()?;
        // SAFETY: `dst` is valid for `dst_len >= bytes.len()` bytes and is
        // caller memory, distinct from the fresh `bytes` vector.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst.cast::<u8>(), bytes.len()) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_accept_null() {
        // SAFETY: NULL is allowed for every accessor and free function.
        unsafe {
            assert_eq!(ls_tensor_ptr(std::ptr::null()), 0);
            assert_eq!(ls_tensor_bytes(std::ptr::null()), 0);
            assert_eq!(ls_tensor_ndim(std::ptr::null()), 0);
            assert!(ls_tensor_shape(std::ptr::null()).is_null());
            assert!(ls_tensor_name(std::ptr::null()).is_null());
            ls_tensor_free(std::ptr::null_mut());
            let mut out = std::ptr::null_mut();
            assert_eq!(
                ls_streamer_load_static(std::ptr::null(), c"x".as_ptr(), &mut out),
                ls_result::LS_NULL_ARGUMENT
            );
        }
    }
}
