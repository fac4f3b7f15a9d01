//! The streamer's C functions called from Rust: a free from inside the
//! streamer's own callback, and the release of a slot to another stream.

use std::ffi::{c_int, c_void, CString};
use std::sync::Arc;

use super::*;
use crate::ffi::config::ls_config_default;
use crate::ffi::model::{ls_model_free, ls_model_open};
use crate::synth::{write_model, Arch, Shape, SynthSpec};

/// A tiny model on disk, opened through the C API.
fn open_model(dir: &std::path::Path) -> *mut ls_model {
    let spec = SynthSpec {
        arch: Arch::Qwen2,
        shape: Shape::preset("tiny").expect("the tiny preset"),
        dtype: crate::DType::BF16,
        tie: false,
        shard_size: 4_000_000_000,
        seed: rand::random(),
        threads: 0,
    };
    write_model(dir, &spec).expect("writing a tiny model");
    let path = CString::new(dir.to_str().expect("a UTF-8 path")).unwrap();
    let mut model = std::ptr::null_mut();
    // SAFETY: `path` is NUL-terminated, `model` writable.
    let r = unsafe { ls_model_open(path.as_ptr(), &mut model) };
    assert_eq!(r, ls_result::LS_OK);
    model
}

fn host_streamer(model: *const ls_model) -> *mut ls_streamer {
    let mut cfg = ls_config_default();
    cfg.device = -1;
    let mut s = std::ptr::null_mut();
    // SAFETY: `model` is live, `cfg` and `s` are locals.
    let r = unsafe { ls_streamer_new(model, &cfg, &mut s) };
    assert_eq!(r, ls_result::LS_OK);
    s
}

/// What the callbacks below are given as `user`.
struct User {
    streamer: *mut ls_streamer,
    calls: u32,
    release: Vec<ls_result>,
}

unsafe extern "C" fn free_at_layer_1(
    user: *mut c_void,
    layer: u32,
    _weights: *const ls_layer_weights,
    _stream: ls_cuda_stream,
) -> c_int {
    // SAFETY: `user` is the `User` the test passed, alive during the pass.
    let u = unsafe { &mut *user.cast::<User>() };
    u.calls += 1;
    if layer == 1 {
        // SAFETY: the streamer is live; the free is deferred to the pass's end.
        unsafe { ls_streamer_free(u.streamer) };
    }
    0
}

#[test]
fn free_from_the_streamers_own_callback_frees_it_when_the_pass_returns() {
    let dir = tempfile::tempdir().unwrap();
    let model = open_model(dir.path());
    let s = host_streamer(model);
    // SAFETY: `model` is live until the ls_model_free below.
    let meta = Arc::clone(unsafe { &(*model).meta });
    // The test, the model and the streamer hold the model's metadata.
    assert_eq!(Arc::strong_count(&meta), 3);
    let mut user = User {
        streamer: s,
        calls: 0,
        release: Vec::new(),
    };
    let user_ptr: *mut User = &mut user;
    // SAFETY: the streamer is live; `user` outlives the pass.
    let r = unsafe { ls_streamer_run_pass(s, Some(free_at_layer_1), user_ptr.cast()) };
    assert_eq!(r, ls_result::LS_OK);
    // The pass ran to its end, then the streamer was freed (not leaked).
    // SAFETY: `model` is live.
    assert_eq!(user.calls, unsafe { (*model).index.num_layers() } as u32);
    assert_eq!(Arc::strong_count(&meta), 2);
    // SAFETY: from ls_model_open, freed once.
    unsafe { ls_model_free(model) };
}

unsafe extern "C" fn release_after(
    user: *mut c_void,
    _layer: u32,
    weights: *const ls_layer_weights,
    _stream: ls_cuda_stream,
) -> c_int {
    // SAFETY: as in `free_at_layer_1`.
    let u = unsafe { &mut *user.cast::<User>() };
    // SAFETY: `weights` is this callback's; NULL is the host backend's stream.
    u.release
        .push(unsafe { ls_layer_release_after(weights, std::ptr::null_mut()) });
    // A stream that is not NULL does not exist on the host backend.
    // SAFETY: as above; the pointer is never used as a stream on the host.
    u.release.push(unsafe {
        ls_layer_release_after(weights, std::ptr::NonNull::<c_void>::dangling().as_ptr())
    });
    0
}

#[test]
fn release_after_is_valid_only_inside_the_callback() {
    let dir = tempfile::tempdir().unwrap();
    let model = open_model(dir.path());
    let s = host_streamer(model);
    let mut user = User {
        streamer: s,
        calls: 0,
        release: Vec::new(),
    };
    let user_ptr: *mut User = &mut user;
    // SAFETY: the streamer is live; `user` outlives the pass.
    let r = unsafe { ls_streamer_run_pass(s, Some(release_after), user_ptr.cast()) };
    assert_eq!(r, ls_result::LS_OK);
    assert!(!user.release.is_empty());
    for pair in user.release.chunks(2) {
        assert_eq!(pair, [ls_result::LS_OK, ls_result::LS_CONFIG]);
    }
    let fake = ls_layer_weights {
        layer: 0,
        num_tensors: 0,
        tensors: std::ptr::null(),
    };
    // SAFETY: outside a callback the call only checks its arguments.
    let r = unsafe { ls_layer_release_after(&fake, std::ptr::null_mut()) };
    assert_eq!(r, ls_result::LS_INVALID_ARGUMENT);
    // SAFETY: NULL weights are an argument error.
    let r = unsafe { ls_layer_release_after(std::ptr::null(), std::ptr::null_mut()) };
    assert_eq!(r, ls_result::LS_NULL_ARGUMENT);
    // SAFETY: live handles from above, freed once.
    unsafe {
        ls_streamer_free(s);
        ls_model_free(model);
    }
}
