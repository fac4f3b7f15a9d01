//! The KV cache of the CUDA forward pass: per layer, K and V of
//! `[max_batch][kv_heads][max_len][head_dim]` in the cache dtype (see
//! [`kv_cache_dtype`](crate::llm::attention::kv_cache_dtype)), allocated once
//! after checking that it fits the free VRAM next to the streamer's slots.

use crate::cuda::{Context, DeviceBuffer};
use crate::llm::config::ModelConfig;
use crate::llm::llama::ModelOptions;
use crate::{DType, Error, Result};

/// VRAM left free beyond the cache and workspaces, for cuBLAS and the
/// kernels' modules.
pub(crate) const HEADROOM: u64 = 256 << 20;

/// The per-layer K and V buffers.
pub(crate) struct KvCache {
    k: Vec<DeviceBuffer>,
    v: Vec<DeviceBuffer>,
}

/// Bytes of one layer's K (or V) cache, or an error naming the sizes when
/// the product overflows.
pub(crate) fn layer_bytes(cfg: &ModelConfig, opts: &ModelOptions, dtype: DType) -> Result<u64> {
    [opts.max_batch, opts.max_len, cfg.kv_dim(), dtype.size()]
        .iter()
        .try_fold(1u64, |acc, &x| acc.checked_mul(x as u64))
        .ok_or_else(|| {
            Error::config(format!(
                "a KV cache of {} sequences × {} positions × {} (kv_heads × head_dim) overflows",
                opts.max_batch,
                opts.max_len,
                cfg.kv_dim()
            ))
        })
}

/// Checks that `layers` layers of K and V (`per_layer` bytes each) plus
/// `others` bytes of workspace and [`HEADROOM`] fit in `free` bytes.
pub(crate) fn check_fits(
    cfg: &ModelConfig,
    opts: &ModelOptions,
    dtype: DType,
    per_layer: u64,
    others: u64,
    free: u64,
) -> Result<()> {
    let cache = per_layer.saturating_mul(2 * cfg.layers as u64);
    let asked = cache.saturating_add(others).saturating_add(HEADROOM);
    if asked <= free {
        return Ok(());
    }
    Err(Error::Limit {
        what: format!(
            "GPU memory next to the streamer's slots for the KV cache ({} layers × K and V × \
             {} sequences × {} positions × {} kv_heads × {} head_dim × {} bytes ({dtype}) = {} \
             bytes){} and {HEADROOM} bytes of headroom",
            cfg.layers,
            opts.max_batch,
            opts.max_len,
            cfg.kv_heads,
            cfg.head_dim,
            dtype.size(),
            cache,
            if others > 0 {
                format!(", workspaces of {others} bytes")
            } else {
                String::new()
            }
        ),
        asked,
        available: free,
        hint: "lower --max-batch or --max-len, use --precision fast (a 16-bit cache), or \
               keep fewer layers on the GPU (--n-gpu, --gpu-cache)"
            .into(),
    })
}

impl KvCache {
    /// Allocates the cache after [`check_fits`] against the context's free
    /// memory (`others`: bytes the caller allocates besides).
    pub(crate) fn alloc(
        ctx: &Context,
        cfg: &ModelConfig,
        opts: &ModelOptions,
        dtype: DType,
        others: u64,
    ) -> Result<KvCache> {
        let per_layer = layer_bytes(cfg, opts, dtype)?;
        let (free, _) = ctx.mem_info()?;
        check_fits(cfg, opts, dtype, per_layer, others, free)?;
        let per_layer = per_layer as usize;
        let mut k = Vec::with_capacity(cfg.layers);
        let mut v = Vec::with_capacity(cfg.layers);
        for _ in 0..cfg.layers {
            k.push(DeviceBuffer::alloc(ctx, per_layer.max(4))?);
            v.push(DeviceBuffer::alloc(ctx, per_layer.max(4))?);
        }
        Ok(KvCache { k, v })
    }

    /// Device addresses of layer `layer`'s K and V caches.
    pub(crate) fn layer(&self, layer: usize) -> (u64, u64) {
        (self.k[layer].ptr(), self.v[layer].ptr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg() -> ModelConfig {
        ModelConfig::from_json(&json!({
            "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 32000
        }))
        .unwrap()
    }

    #[test]
    fn cache_size_follows_batch_length_layers_and_dtype() {
        let c = cfg();
        let opts = ModelOptions {
            max_batch: 3,
            max_len: 5000,
            ..ModelOptions::default()
        };
        assert_eq!(
            layer_bytes(&c, &opts, DType::BF16).unwrap(),
            3 * 5000 * 8 * 128 * 2
        );
        assert_eq!(
            layer_bytes(&c, &opts, DType::F32).unwrap(),
            3 * 5000 * 8 * 128 * 4
        );
        let huge = ModelOptions {
            max_batch: usize::MAX / 2,
            ..opts
        };
        let e = layer_bytes(&c, &huge, DType::F32).unwrap_err().to_string();
        assert!(e.contains("overflows"), "{e}");
    }

    #[test]
    fn a_cache_too_big_for_free_vram_names_the_sizes() {
        let c = cfg();
        let opts = ModelOptions {
            max_batch: 64,
            max_len: 32768,
            ..ModelOptions::default()
        };
        let per = layer_bytes(&c, &opts, DType::BF16).unwrap();
        let need = per * 64 + 1000 + HEADROOM;
        check_fits(&c, &opts, DType::BF16, per, 1000, need).unwrap();
        let e = check_fits(&c, &opts, DType::BF16, per, 1000, need - 1).unwrap_err();
        match &e {
            Error::Limit {
                asked, available, ..
            } => assert_eq!((*asked, *available), (need, need - 1)),
            other => panic!("{other}"),
        }
        let msg = e.to_string();
        for part in [
            "32 layers",
            "64 sequences",
            "32768 positions",
            "8 kv_heads",
            "128 head_dim",
            "bf16",
            "--max-len",
        ] {
            assert!(msg.contains(part), "{part} missing: {msg}");
        }
    }
}
