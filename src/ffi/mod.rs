//! The C ABI: `include/layer_streamer.h`, generated from this module by
//! `scripts/gen-header` (cbindgen).
//!
//! The C API mirrors the Rust one: open a model ([`ls_model_open`]) and
//! inspect it; build a streamer from an [`ls_config`] ([`ls_config_default`],
//! [`ls_streamer_new`]); load static tensors ([`ls_streamer_load_static`]);
//! run passes that call a C function for every layer with the layer's device
//! pointers, shapes and dtypes ([`ls_streamer_run_pass`]); read the last
//! pass's statistics; free everything.
//!
//! Conventions, as in rustls-ffi:
//! - Handles (`ls_model`, `ls_streamer`, `ls_tensor`) are opaque. Each is
//!   created by one function and freed by its `*_free`, which accepts NULL.
//! - A function that can fail returns an [`ls_result`]; `LS_OK` is 0 and the
//!   other values are stable. NULL where a pointer is required is
//!   `LS_NULL_ARGUMENT`. A Rust panic never crosses the boundary: it becomes
//!   `LS_PANIC`.
//! - A failing call records its full message (file, offset, tensor, driver
//!   error) for the calling thread; [`ls_last_error_message`] copies it out.
//!   A call that succeeds clears it.
//! - Strings and arrays returned by accessors are owned by the handle they
//!   came from and stay valid until it is freed.
//! - One handle is used by one thread at a time. A streamer rejects calls
//!   made on it while it runs a pass (from its own callback, or from another
//!   thread) with `LS_INVALID_ARGUMENT` instead of corrupting its state;
//!   `ls_streamer_free` from its own callback is deferred to the pass's end.
//! - Callbacks must not unwind through the library (C++ exceptions,
//!   `longjmp`); on CUDA the streamer's context is current while they run.
#![allow(non_camel_case_types)]

mod config;
mod error;
mod model;
mod split;
mod stats;
mod streamer;
mod tensor;

pub use config::{
    ls_budget, ls_budget_kind, ls_config, ls_config_default, ls_dtype, ls_io_mode, LS_BUDGET_AUTO,
    LS_BUDGET_BYTES, LS_BUDGET_NONE, LS_CPU_SHARE_AUTO, LS_DTYPE_BF16, LS_DTYPE_BOOL, LS_DTYPE_F16,
    LS_DTYPE_F32, LS_DTYPE_F64, LS_DTYPE_F8_E4M3, LS_DTYPE_F8_E5M2, LS_DTYPE_FILE, LS_DTYPE_I16,
    LS_DTYPE_I32, LS_DTYPE_I64, LS_DTYPE_I8, LS_DTYPE_U8, LS_IO_AUTO, LS_IO_BUFFERED, LS_IO_DIRECT,
};
pub use error::{ls_last_error_message, ls_result, ls_result_name};
pub use model::{
    ls_model, ls_model_dir, ls_model_file_path, ls_model_free, ls_model_layer_bytes,
    ls_model_layer_num_tensors, ls_model_layer_tensor, ls_model_num_files, ls_model_num_layers,
    ls_model_num_statics, ls_model_open, ls_model_static_tensor, ls_model_total_layer_bytes,
    ls_tensor_info,
};
pub use split::{ls_host_rows, ls_layer_host_rows};
pub use stats::{ls_memory_use, ls_pass_stats, ls_stage_stats};
pub use streamer::{
    ls_cuda_stream, ls_layer_copy_to_host, ls_layer_fn, ls_layer_release_after, ls_layer_weights,
    ls_streamer, ls_streamer_compute_stream, ls_streamer_free, ls_streamer_last_pass_stats,
    ls_streamer_memory, ls_streamer_new, ls_streamer_run_pass, ls_tensor_view,
};
pub use tensor::{
    ls_streamer_load_static, ls_tensor, ls_tensor_bytes, ls_tensor_copy_to_host, ls_tensor_dtype,
    ls_tensor_free, ls_tensor_name, ls_tensor_ndim, ls_tensor_ptr, ls_tensor_shape,
};
