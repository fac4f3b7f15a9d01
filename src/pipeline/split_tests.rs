//! The row split's plan: extents, rounding and which tensors are split.

use super::*;
use crate::checkpoint::{LayerTensor, ReadOp, TensorInfo};
use crate::DType;

fn tensor(key: &str, dtype: DType, shape: &[usize], offset: u64) -> LayerTensor {
    let len = (shape.iter().product::<usize>() * dtype.size()) as u64;
    LayerTensor {
        key: key.into(),
        info: TensorInfo {
            name: format!("model.layers.0.{key}"),
            dtype,
            shape: shape.to_vec(),
            file: 0,
            file_offset: offset,
            len,
            quant: None,
            scale: None,
        },
        slot_offset: 0,
    }
}

#[test]
fn cpu_rows_are_the_tail_and_one_dimensional_tensors_stay_whole() {
    let mut rng = rand::thread_rng();
    let rows = rand::Rng::gen_range(&mut rng, 17..400usize);
    let cols = 64;
    let w = tensor("w", DType::BF16, &[rows, cols], 8192);
    let b = tensor("b", DType::F32, &[rows], 8192 + w.info.len);
    let layer = Layer {
        index: 0,
        data_bytes: w.info.len + b.info.len,
        slot_bytes: 0,
        tensors: vec![w.clone(), b.clone()],
        reads: Vec::<ReadOp>::new(),
    };
    for share in [0.3, 1.0] {
        assert_eq!(
            divided_tensors(&layer, None),
            vec![Some(QuantType::BF16), None]
        );
        let (dev, host) = split_layer(&[], &layer, share, None).unwrap();
        assert_eq!(host.len(), 1);
        let h = &host[0];
        let cpu = cpu_rows(rows, share, ROW_MULTIPLE);
        assert_eq!((h.first_row, h.rows), (rows - cpu, cpu));
        assert_eq!(h.offset, 8192 + (rows - cpu) as u64 * 2 * cols as u64);
        assert_eq!(h.len, cpu as u64 * 2 * cols as u64);
        assert_eq!(dev.tensors[0].info.shape, vec![rows - cpu, cols]);
        assert_eq!(dev.tensors[1].info, b.info);
        assert_eq!(dev.data_bytes, layer.data_bytes - h.len);
        let slot_end = dev.reads.iter().map(|r| r.slot_offset + r.len).max();
        assert_eq!(slot_end, Some(dev.slot_bytes));
    }
}
