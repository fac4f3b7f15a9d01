//! What `cpu_share auto` counts of a layer.

use super::*;
use crate::checkpoint::{LayerTensor, TensorInfo};
use crate::DType;

fn layer(keys: &[&str]) -> Layer {
    let tensors: Vec<LayerTensor> = (keys.iter())
        .map(|&key| LayerTensor {
            key: key.into(),
            info: TensorInfo {
                name: format!("model.layers.0.{key}"),
                dtype: DType::BF16,
                shape: if key.ends_with("norm.weight") {
                    vec![64]
                } else {
                    vec![32, 64]
                },
                file: 0,
                file_offset: 0,
                len: 0,
                quant: None,
                scale: None,
            },
            slot_offset: 0,
        })
        .collect();
    Layer {
        index: 0,
        data_bytes: 0,
        slot_bytes: 0,
        tensors,
        reads: Vec::new(),
    }
}

#[test]
fn a_group_of_divided_weights_meets_twice() {
    let l = layer(&[
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]);
    assert_eq!(meetings(&l, None), 4);
    let mlp: Vec<String> = ["mlp.gate_proj.weight", "mlp.down_proj.weight"]
        .map(String::from)
        .to_vec();
    assert_eq!(meetings(&l, Some(&mlp)), 2);
    assert_eq!(meetings(&l, Some(&["input_layernorm.weight".into()])), 0);
}
