//! The CPU's rows of a split layer weight, for a callback of a streamer
//! built with a `cpu_share` above 0.

use super::error::{boundary, ls_result, Failure};
use super::model::write_out;
use super::streamer::{current, ls_layer_weights};

/// The CPU's rows of one weight of the layer being processed, in host
/// memory in their stored type: rows `first_row .. first_row + rows` of the
/// tensor, back to back. The tensor's device view holds rows
/// `0 .. first_row`. `data` is owned by the streamer and valid until it is
/// freed.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ls_host_rows {
    /// The stored type as a ggml type id: 0 f32, 1 f16, 30 bf16, 2 q4_0,
    /// 3 q4_1, 6 q5_0, 7 q5_1, 8 q8_0, 12 q4_k, 13 q5_k, 14 q6_k.
    pub ggml_type: u32,
    /// The first of these rows in the tensor.
    pub first_row: u64,
    /// Number of rows; 0 when the tensor is not split (then `data` is NULL
    /// and the device view holds every row).
    pub rows: u64,
    /// Elements per row.
    pub cols: u64,
    /// Bytes at `data`.
    pub bytes: u64,
    /// The stored bytes of the rows.
    pub data: *const u8,
}

/// Writes into `*out` the CPU's rows of tensor `index` of the layer being
/// processed (the order of `weights->tensors`). A tensor that is not split
/// (1-D tensors, FP8 weights, or a streamer without a CPU share) gets
/// `rows` 0 and `data` NULL, with `first_row` its device rows.
///
/// Only valid inside the callback that received `weights` (else
/// `LS_INVALID_ARGUMENT`, as for an `index` out of range).
///
/// # Safety
/// `weights` must be the pointer the running callback received; `out`
/// valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ls_layer_host_rows(
    weights: *const ls_layer_weights,
    index: u32,
    out: *mut ls_host_rows,
) -> ls_result {
    boundary(|| {
        if weights.is_null() {
            return Err(Failure::null("weights"));
        }
        let current = current(weights, "ls_layer_host_rows")?;
        // SAFETY: set by the running callback's `Enter`, which outlives the
        // callback; the `LayerWeights` it points to lives on the pass's stack
        // for the whole callback.
        let layer = unsafe { &*current.layer };
        let view = layer.tensors().nth(index as usize).ok_or_else(|| {
            Failure::invalid(format!(
                "tensor {index} is out of range: layer {} has {} tensors",
                layer.layer(),
                layer.len()
            ))
        })?;
        let rows = match layer.host_rows(view.key()) {
            Some(h) => ls_host_rows {
                ggml_type: h.ty().ggml_type_id(),
                first_row: h.first_row() as u64,
                rows: h.rows() as u64,
                cols: h.cols() as u64,
                bytes: h.bytes().len() as u64,
                data: h.bytes().as_ptr(),
            },
            None => ls_host_rows {
                ggml_type: 0,
                first_row: view.shape().first().map_or(0, |&r| r as u64),
                rows: 0,
                cols: view.shape().get(1).map_or(0, |&c| c as u64),
                bytes: 0,
                data: std::ptr::null(),
            },
        };
        // SAFETY: forwarded from this function's contract.
        unsafe { write_out(out, rows, "out") }
    })
}
