//! Result codes, the per-thread last error message, and the panic boundary
//! every `extern "C"` body runs inside.

use std::cell::RefCell;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::Error;

/// What a call returned. The values are stable: new codes are only added.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ls_result {
    /// Success.
    LS_OK = 0,
    /// A pointer argument that must not be NULL was NULL.
    LS_NULL_ARGUMENT = 1,
    /// An argument is invalid: a string that is not UTF-8, an index out of
    /// range, an unknown enum value, a handle that is busy.
    LS_INVALID_ARGUMENT = 2,
    /// No usable CUDA driver (`libcuda` missing or `cuInit` failed).
    LS_CUDA_UNAVAILABLE = 3,
    /// A CUDA driver call failed; the message names the call and the error.
    LS_CUDA = 4,
    /// Reading a file failed; the message names the file and offset.
    LS_IO = 5,
    /// The model directory or a safetensors header is invalid.
    LS_MODEL = 6,
    /// The configuration is invalid or does not fit the model.
    LS_CONFIG = 7,
    /// A memory limit (pinned memory, RAM, device memory) would be exceeded.
    LS_LIMIT = 8,
    /// No tensor by that name.
    LS_UNKNOWN_TENSOR = 9,
    /// The layer callback returned non-zero; the message says what it
    /// returned and at which layer, e.g. "layer function failed at layer 3:
    /// callback returned 7".
    LS_CALLBACK = 10,
    /// A pipeline stage stopped unexpectedly.
    LS_PIPELINE = 11,
    /// A panic inside the library (a bug); the message has the panic's text.
    LS_PANIC = 12,
}

impl ls_result {
    const ALL: [ls_result; 13] = [
        ls_result::LS_OK,
        ls_result::LS_NULL_ARGUMENT,
        ls_result::LS_INVALID_ARGUMENT,
        ls_result::LS_CUDA_UNAVAILABLE,
        ls_result::LS_CUDA,
        ls_result::LS_IO,
        ls_result::LS_MODEL,
        ls_result::LS_CONFIG,
        ls_result::LS_LIMIT,
        ls_result::LS_UNKNOWN_TENSOR,
        ls_result::LS_CALLBACK,
        ls_result::LS_PIPELINE,
        ls_result::LS_PANIC,
    ];

    /// The code of a crate error.
    pub(crate) fn of(e: &Error) -> ls_result {
        match e {
            Error::CudaUnavailable(_) => ls_result::LS_CUDA_UNAVAILABLE,
            Error::Cuda { .. } => ls_result::LS_CUDA,
            Error::Io { .. } => ls_result::LS_IO,
            Error::Model { .. } => ls_result::LS_MODEL,
            Error::Config(_) => ls_result::LS_CONFIG,
            Error::Limit { .. } => ls_result::LS_LIMIT,
            Error::UnknownTensor(_) => ls_result::LS_UNKNOWN_TENSOR,
            Error::LayerFn { .. } => ls_result::LS_CALLBACK,
            Error::Pipeline(_) => ls_result::LS_PIPELINE,
            Error::Input(_) => ls_result::LS_INVALID_ARGUMENT,
        }
    }

    fn name(self) -> &'static CStr {
        match self {
            ls_result::LS_OK => c"LS_OK",
            ls_result::LS_NULL_ARGUMENT => c"LS_NULL_ARGUMENT",
            ls_result::LS_INVALID_ARGUMENT => c"LS_INVALID_ARGUMENT",
            ls_result::LS_CUDA_UNAVAILABLE => c"LS_CUDA_UNAVAILABLE",
            ls_result::LS_CUDA => c"LS_CUDA",
            ls_result::LS_IO => c"LS_IO",
            ls_result::LS_MODEL => c"LS_MODEL",
            ls_result::LS_CONFIG => c"LS_CONFIG",
            ls_result::LS_LIMIT => c"LS_LIMIT",
            ls_result::LS_UNKNOWN_TENSOR => c"LS_UNKNOWN_TENSOR",
            ls_result::LS_CALLBACK => c"LS_CALLBACK",
            ls_result::LS_PIPELINE => c"LS_PIPELINE",
            ls_result::LS_PANIC => c"LS_PANIC",
        }
    }
}

/// Why a call failed: its code and its full message.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: ls_result,
    pub(crate) message: String,
}

impl Failure {
    /// `LS_NULL_ARGUMENT` naming the argument.
    pub(crate) fn null(arg: &str) -> Failure {
        Failure {
            code: ls_result::LS_NULL_ARGUMENT,
            message: format!("argument {arg} is NULL"),
        }
    }

    /// `LS_INVALID_ARGUMENT` with a message.
    pub(crate) fn invalid(message: impl Into<String>) -> Failure {
        Failure {
            code: ls_result::LS_INVALID_ARGUMENT,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure {
            code: ls_result::of(&e),
            message: e.to_string(),
        }
    }
}

thread_local! {
    /// The message of the last call on this thread that failed.
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_last_error(message: String) {
    // `try_with`: during thread teardown the slot may be gone; the code is
    // still returned.
    let _ = LAST_ERROR.try_with(|m| *m.borrow_mut() = message);
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!("panic in layer-streamer: {text}")
}

/// Runs the body of a fallible `extern "C"` function: clears the thread's
/// last error, catches panics, and turns a failure into its code while
/// recording its message.
pub(crate) fn boundary(f: impl FnOnce() -> Result<(), Failure>) -> ls_result {
    set_last_error(String::new());
    let failure = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return ls_result::LS_OK,
        Ok(Err(failure)) => failure,
        Err(payload) => Failure {
            code: ls_result::LS_PANIC,
            message: panic_message(payload.as_ref()),
        },
    };
    set_last_error(failure.message);
    failure.code
}

/// Runs the body of an infallible accessor: a panic yields `fallback`.
pub(crate) fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

/// Copies `text` into `buf` (`len` bytes) NUL-terminated, truncating at a
/// character boundary; stores the full length (without the NUL) in `out_len`.
///
/// # Safety
/// `buf` is NULL with `len == 0`, or valid for writes of `len` bytes;
/// `out_len` is NULL or valid for a write.
pub(crate) unsafe fn write_c_string(
    text: &str,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> Result<(), Failure> {
    if buf.is_null() && len > 0 {
        return Err(Failure::null("buf"));
    }
    if !out_len.is_null() {
        // SAFETY: the caller guarantees a non-NULL `out_len` is writable.
        unsafe { *out_len = text.len() };
    }
    if len == 0 {
        return Ok(());
    }
    let mut n = text.len().min(len - 1);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: `buf` is valid for `len` bytes and `n + 1 <= len`; `text` is a
    // separate Rust allocation, so the ranges do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), n);
        *buf.add(n) = 0;
    }
    Ok(())
}

/// Copies `bytes` into `buf` (`len` bytes) NUL-terminated, whole or not at
/// all: with `len == 0` it only stores the length (a size query); a buffer
/// too small for `bytes` and the NUL is `LS_INVALID_ARGUMENT` naming `what`,
/// with `buf` set to the empty string. `out_len`, when not NULL, receives
/// the length without the NUL either way.
///
/// # Safety
/// `buf` is NULL with `len == 0`, or valid for writes of `len` bytes;
/// `out_len` is NULL or valid for a write.
pub(crate) unsafe fn write_c_bytes_whole(
    bytes: &[u8],
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
    what: &str,
) -> Result<(), Failure> {
    if buf.is_null() && len > 0 {
        return Err(Failure::null("buf"));
    }
    if !out_len.is_null() {
        // SAFETY: the caller guarantees a non-NULL `out_len` is writable.
        unsafe { *out_len = bytes.len() };
    }
    if len == 0 {
        return Ok(());
    }
    if bytes.len() >= len {
        // SAFETY: `buf` is valid for `len >= 1` bytes.
        unsafe { *buf = 0 };
        return Err(Failure::invalid(format!(
            "a buffer of {len} bytes is too small for {what} ({} bytes and the NUL)",
            bytes.len()
        )));
    }
    // SAFETY: `buf` is valid for `len` bytes and `bytes.len() + 1 <= len`;
    // `bytes` is a separate Rust allocation, so the ranges do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len());
        *buf.add(bytes.len()) = 0;
    }
    Ok(())
}

/// Copies the message of the last failed call on this thread into `buf`.
///
/// Writes at most `len - 1` bytes and a terminating NUL (nothing when `len`
/// is 0), truncating a longer message. When `out_len` is not NULL it
/// receives the message's full length without the NUL, so a caller can
/// retry with a buffer of `*out_len + 1` bytes. The message is empty when
/// the last fallible call on this thread succeeded. Calling this does not
/// clear it.
///
/// Returns `LS_OK`, or `LS_NULL_ARGUMENT` when `buf` is NULL and `len > 0`.
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes (or NULL with `len == 0`);
/// `out_len` must be NULL or valid for a write. The caller owns both.
#[no_mangle]
pub unsafe extern "C" fn ls_last_error_message(
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> ls_result {
    let result = catch_unwind(AssertUnwindSafe(|| {
        let text = LAST_ERROR
            .try_with(|m| m.borrow().clone())
            .unwrap_or_default();
        // SAFETY: forwarded from this function's contract.
        unsafe { write_c_string(&text, buf, len, out_len) }
    }));
    match result {
        Ok(Ok(())) => ls_result::LS_OK,
        Ok(Err(f)) => f.code,
        Err(_) => ls_result::LS_PANIC,
    }
}

/// The name of a result code, e.g. `"LS_IO"`, as a static NUL-terminated
/// string the caller must not free; `"LS_UNKNOWN_RESULT"` for a value that
/// is not a code. Takes a plain integer so that any value is safe to pass.
#[no_mangle]
pub extern "C" fn ls_result_name(result: u32) -> *const c_char {
    ls_result::ALL
        .into_iter()
        .find(|r| *r as u32 == result)
        .map_or(c"LS_UNKNOWN_RESULT", ls_result::name)
        .as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_named() {
        for (i, r) in ls_result::ALL.into_iter().enumerate() {
            assert_eq!(r as u32, i as u32);
            // SAFETY: ls_result_name returns a static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(ls_result_name(i as u32)) };
            assert_eq!(name, r.name());
        }
        // SAFETY: as above.
        let unknown = unsafe { CStr::from_ptr(ls_result_name(999)) };
        assert_eq!(unknown, c"LS_UNKNOWN_RESULT");
    }

    #[test]
    fn failures_leave_their_message_and_successes_clear_it() {
        let code = boundary(|| Err(Error::config("read_chunk must be ...").into()));
        assert_eq!(code, ls_result::LS_CONFIG);
        let mut buf = [0 as c_char; 64];
        let mut n = 0usize;
        // SAFETY: buf has 64 writable bytes; n is a local.
        let r = unsafe { ls_last_error_message(buf.as_mut_ptr(), buf.len(), &mut n) };
        assert_eq!(r, ls_result::LS_OK);
        // SAFETY: ls_last_error_message NUL-terminated buf.
        let text = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
        assert_eq!(text, "invalid configuration: read_chunk must be ...");
        assert_eq!(n, text.len());

        // Truncation keeps the NUL and reports the full length.
        let mut small = [0 as c_char; 8];
        // SAFETY: small has 8 writable bytes.
        unsafe { ls_last_error_message(small.as_mut_ptr(), small.len(), &mut n) };
        // SAFETY: NUL-terminated by the call.
        assert_eq!(unsafe { CStr::from_ptr(small.as_ptr()) }, c"invalid");
        assert_eq!(n, text.len());

        assert_eq!(boundary(|| Ok(())), ls_result::LS_OK);
        // SAFETY: a NULL buffer with len 0 is allowed.
        unsafe { ls_last_error_message(std::ptr::null_mut(), 0, &mut n) };
        assert_eq!(n, 0);
    }

    #[test]
    fn panics_become_a_code() {
        let code = boundary(|| panic!("boom"));
        assert_eq!(code, ls_result::LS_PANIC);
        let mut buf = [0 as c_char; 64];
        // SAFETY: buf has 64 writable bytes.
        unsafe { ls_last_error_message(buf.as_mut_ptr(), buf.len(), std::ptr::null_mut()) };
        // SAFETY: NUL-terminated by the call.
        let text = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
        assert!(text.contains("boom"), "{text}");
    }
}
