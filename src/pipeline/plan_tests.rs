//! Tests of the layer plans: views inside their slot, and the shift that aligns stored tensors.

use super::*;

fn empty_plan() -> LayerPlan {
    LayerPlan {
        copy_bytes: 0,
        device_bytes: 0,
        casts: Vec::new(),
        views: Vec::new(),
        home: Home::Stream,
        shift: 0,
    }
}

fn view(ptr: u64, bytes: u64) -> TensorView<'static> {
    TensorView {
        key: "k",
        name: "n",
        ptr,
        dtype: DType::U8,
        shape: &[],
        bytes,
        quant: None,
        scale: None,
    }
}

#[test]
fn host_bytes_refuses_ranges_that_overflow_or_leave_the_slot() {
    let slot = vec![0u8; 4096];
    let plan = empty_plan();
    let base = slot.as_ptr() as u64;
    let w = LayerWeights {
        layer: 0,
        base,
        plan: &plan,
        host_len: Some(slot.len()),
        release: None,
        held: AtomicBool::new(false),
        split: None,
    };
    // `off + bytes` wraps to a small number: must not become a slice.
    let huge = u64::MAX - 7;
    assert!(w.host_bytes(&view(base + 16, huge)).is_none());
    assert!(w.host_bytes(&view(base + 1, u64::MAX)).is_none());
    assert!(w.host_bytes(&view(base - 1, 1)).is_none());
    assert!(w.host_bytes(&view(base + 4000, 97)).is_none());
    let ok = w.host_bytes(&view(base + 4000, 96)).unwrap();
    assert_eq!(ok.len(), 96);
    assert_eq!(ok.as_ptr() as u64, base + 4000);
}

#[test]
fn the_largest_stored_tensor_of_every_layer_starts_aligned_in_its_slot() {
    use crate::synth::{write_model, Arch, Shape, SynthSpec};
    use crate::{LayerStreamer, ModelIndex};
    let seed = crate::test_rng::seed();
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        arch: Arch::Qwen2,
        shape: Shape::preset("tiny").unwrap(),
        dtype: DType::BF16,
        tie: false,
        shard_size: 4_000_000_000,
        seed,
        threads: 1,
    };
    write_model(dir.path(), &spec).unwrap();
    let index = ModelIndex::open(dir.path()).unwrap();
    let mut s = LayerStreamer::builder(&index)
        .device(crate::Device::Host)
        .file_dtype()
        .build()
        .unwrap();
    let mut misaligned_in_file = 0;
    s.run_pass((), |(), w, layer, _| {
        let views: Vec<_> = w.tensors().collect();
        let largest = views.iter().max_by_key(|v| v.bytes()).unwrap();
        assert_eq!(
            largest.ptr() % CAST_ALIGN,
            0,
            "layer {layer}: {}",
            largest.key()
        );
        let t = &index.layers()[layer].tensors;
        let off = t
            .iter()
            .find(|t| t.key == largest.key())
            .unwrap()
            .info
            .file_offset;
        misaligned_in_file += usize::from(off % CAST_ALIGN != 0);
        Ok(())
    })
    .unwrap();
    // The control: the file itself does not align them (a safetensors
    // header is padded to 8 bytes only).
    eprintln!("{misaligned_in_file} layers' largest tensors misaligned in the file");
    assert!(
        misaligned_in_file > 0,
        "the file aligned them: nothing was tested"
    );
}

#[test]
fn the_shift_aligns_the_most_bytes_and_ties_go_to_the_smaller() {
    let mut rng = rand::thread_rng();
    use rand::Rng;
    let a = rng.gen_range(1..CAST_ALIGN);
    let b = (a + rng.gen_range(1..CAST_ALIGN)) % CAST_ALIGN;
    let tensor = |off: u64, len: u64| LayerTensor {
        key: format!("t{off}"),
        info: TensorInfo {
            name: format!("t{off}"),
            dtype: DType::BF16,
            shape: vec![len as usize / 2],
            file: 0,
            file_offset: off,
            len,
            quant: None,
            scale: None,
        },
        slot_offset: off,
    };
    // Tensors at offsets a (3 KiB) and b (5 KiB) from alignment.
    let layer = Layer {
        index: 0,
        tensors: vec![tensor(4096 + a, 3072), tensor(8192 + b, 5120)],
        reads: Vec::new(),
        slot_bytes: 16384,
        data_bytes: 8192,
    };
    let need = |o: u64| (CAST_ALIGN - o % CAST_ALIGN) % CAST_ALIGN;
    assert_eq!(layer_shift(&layer, |_| true), need(b));
    assert_eq!(layer_shift(&layer, |t| t.info.len == 3072), need(a));
    assert_eq!(layer_shift(&layer, |_| false), 0);
}
