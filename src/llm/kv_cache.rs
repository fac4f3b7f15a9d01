//! The KV cache of the CUDA forward pass: per layer, K and V of
//! `[max_batch][kv_heads][max_len][head_dim]` in the cache dtype (see
//! [`kv_cache_dtype`](crate::llm::attention::kv_cache_dtype)).
//!
//! Resident (the default), every layer's K and V live on the device,
//! allocated once after checking that they fit the free VRAM next to the
//! streamer's slots. With [`ModelOptions::kv_offload`] they live in
//! page-locked host RAM instead and stream through [`OFFLOAD_SLOTS`] device
//! slots of one layer each (see [`offload`]); the VRAM check then counts only
//! the slots, and the host cache is checked against the RAM available and the
//! pinning limit. Either way the attention kernels see the same layout.

mod offload;
mod schedule;

use crate::cuda::{Context, DeviceBuffer, Stream};
use crate::host_memory::{mem_available, memlock_limit};
use crate::llm::config::ModelConfig;
use crate::llm::llama::ModelOptions;
use crate::{DType, Error, Result};
use offload::KvOffload;

/// VRAM left free beyond the cache and workspaces, for cuBLAS and the
/// kernels' modules.
pub(crate) const HEADROOM: u64 = 256 << 20;

/// Device KV slots of an offloaded cache: the layer whose attention runs
/// holds one while the next layer's positions are copied into the other.
pub(crate) const OFFLOAD_SLOTS: usize = 2;

/// The KV bytes one pass copied between host and device with
/// [`ModelOptions::kv_offload`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvTransfer {
    /// Bytes copied host to device: each layer's cached positions of the
    /// pass's sequences, before its attention.
    pub h2d_bytes: u64,
    /// Bytes copied device to host: each layer's new positions, after its
    /// attention.
    pub d2h_bytes: u64,
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

/// Layers of K and V the device holds: every layer, or with
/// [`ModelOptions::kv_offload`] the slots (no more than there are layers).
pub(crate) fn device_layers(cfg: &ModelConfig, opts: &ModelOptions) -> usize {
    if opts.kv_offload {
        OFFLOAD_SLOTS.min(cfg.layers).max(1)
    } else {
        cfg.layers
    }
}

/// " × 4 sequences × 2048 positions × 8 kv_heads × 128 head_dim × 2 bytes (bf16)".
fn per_layer_terms(cfg: &ModelConfig, opts: &ModelOptions, dtype: DType) -> String {
    format!(
        " × {} sequences × {} positions × {} kv_heads × {} head_dim × {} bytes ({dtype})",
        opts.max_batch,
        opts.max_len,
        cfg.kv_heads,
        cfg.head_dim,
        dtype.size()
    )
}

/// Checks that [`device_layers`] layers of K and V (`per_layer` bytes each)
/// plus `others` bytes of workspace and [`HEADROOM`] fit in `free` bytes.
pub(crate) fn check_fits(
    cfg: &ModelConfig,
    opts: &ModelOptions,
    dtype: DType,
    per_layer: u64,
    others: u64,
    free: u64,
) -> Result<()> {
    let n = device_layers(cfg, opts);
    let cache = per_layer.saturating_mul(2 * n as u64);
    let asked = cache.saturating_add(others).saturating_add(HEADROOM);
    if asked <= free {
        return Ok(());
    }
    let (held, hint) = if opts.kv_offload {
        (
            format!("the KV slots of --kv-offload ({n} slots"),
            "lower --max-batch or --max-len, use --precision fast (a 16-bit cache), or keep \
             fewer layers on the GPU (--n-gpu, --gpu-cache)",
        )
    } else {
        (
            format!("the KV cache ({n} layers"),
            "lower --max-batch or --max-len, use --precision fast (a 16-bit cache), keep \
             fewer layers on the GPU (--n-gpu, --gpu-cache), or keep the cache in host RAM \
             (--kv-offload)",
        )
    };
    Err(Error::Limit {
        what: format!(
            "GPU memory next to the streamer's slots for {held} × K and V{} = {cache} bytes){} \
             and {HEADROOM} bytes of headroom",
            per_layer_terms(cfg, opts, dtype),
            if others > 0 {
                format!(", workspaces of {others} bytes")
            } else {
                String::new()
            }
        ),
        asked,
        available: free,
        hint: hint.into(),
    })
}

/// Checks that the host cache of [`ModelOptions::kv_offload`] (every layer's
/// K and V, `per_layer` bytes each) fits in `ram` bytes of available memory
/// and under a pinning limit of `memlock` bytes (`None`: unknown, or no
/// limit).
pub(crate) fn check_host_fits(
    cfg: &ModelConfig,
    opts: &ModelOptions,
    dtype: DType,
    per_layer: u64,
    ram: Option<u64>,
    memlock: Option<u64>,
) -> Result<()> {
    let asked = per_layer.saturating_mul(2 * cfg.layers as u64);
    let what = |limit: &str| {
        format!(
            "{limit} for the KV cache of --kv-offload ({} layers × K and V{} = {asked} bytes)",
            cfg.layers,
            per_layer_terms(cfg, opts, dtype)
        )
    };
    let shrink = "lower --max-batch or --max-len, or use --precision fast (a 16-bit cache)";
    if let Some(available) = ram.filter(|&r| asked > r) {
        return Err(Error::Limit {
            what: what("host memory (MemAvailable)"),
            asked,
            available,
            hint: shrink.into(),
        });
    }
    if let Some(available) = memlock.filter(|&l| asked > l) {
        return Err(Error::Limit {
            what: what("pinned memory (RLIMIT_MEMLOCK)"),
            asked,
            available,
            hint: format!("raise it with `ulimit -l` or in /etc/security/limits.conf, or {shrink}"),
        });
    }
    Ok(())
}

/// The per-layer K and V caches, on the device or offloaded.
pub(crate) struct KvCache {
    store: Store,
}

enum Store {
    Resident {
        k: Vec<DeviceBuffer>,
        v: Vec<DeviceBuffer>,
    },
    Offloaded(Box<KvOffload>),
}

impl KvCache {
    /// Allocates the cache after [`check_fits`] against the context's free
    /// memory (`others`: bytes the caller allocates besides) and, offloaded,
    /// [`check_host_fits`] against the host's.
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
        if opts.kv_offload {
            check_host_fits(
                cfg,
                opts,
                dtype,
                per_layer,
                mem_available(),
                memlock_limit(),
            )?;
            let geom = offload::Geometry::new(cfg, opts, dtype)?;
            let n = device_layers(cfg, opts);
            let off = KvOffload::alloc(ctx, geom, cfg.layers, n)?;
            return Ok(KvCache {
                store: Store::Offloaded(Box::new(off)),
            });
        }
        let per_layer = per_layer as usize;
        let mut k = Vec::with_capacity(cfg.layers);
        let mut v = Vec::with_capacity(cfg.layers);
        for _ in 0..cfg.layers {
            k.push(DeviceBuffer::alloc(ctx, per_layer.max(4))?);
            v.push(DeviceBuffer::alloc(ctx, per_layer.max(4))?);
        }
        Ok(KvCache {
            store: Store::Resident { k, v },
        })
    }

    /// Takes the sequences and positions of the next pass's tokens (each
    /// sequence's tokens consecutive, at consecutive positions), before any
    /// of its layers: an offloaded cache plans which positions to copy and
    /// queues layer 0's copy.
    pub(crate) fn begin_pass(&mut self, seq: &[u32], pos: &[u32], s: &Stream) -> Result<()> {
        match &mut self.store {
            Store::Resident { .. } => Ok(()),
            Store::Offloaded(off) => off.begin_pass(seq, pos, s),
        }
    }

    /// Device addresses of the K and V caches that layer `layer`'s attention
    /// uses on the compute stream `s`. Offloaded: a slot that holds the
    /// layer's cached positions by the time `s` gets here (the copy was queued
    /// ahead, with the previous layer, or is queued now), and the next layer's
    /// copy is queued into the other slot.
    pub(crate) fn attend(&mut self, layer: usize, s: &Stream) -> Result<(u64, u64)> {
        match &mut self.store {
            Store::Resident { k, v } => match (k.get(layer), v.get(layer)) {
                (Some(k), Some(v)) => Ok((k.ptr(), v.ptr())),
                _ => Err(Error::Pipeline(format!(
                    "KV layer {layer} of a cache of {} layers",
                    k.len()
                ))),
            },
            Store::Offloaded(off) => off.attend(layer, s),
        }
    }

    /// Called once layer `layer`'s cache write and attention are queued on
    /// `s`: an offloaded cache queues the copy of the new positions back to
    /// the host.
    pub(crate) fn attended(&mut self, layer: usize, s: &Stream) -> Result<()> {
        match &mut self.store {
            Store::Resident { .. } => Ok(()),
            Store::Offloaded(off) => off.attended(layer, s),
        }
    }

    /// The KV bytes the latest pass copied, when the cache is offloaded.
    pub(crate) fn last_transfer(&self) -> Option<KvTransfer> {
        match &self.store {
            Store::Resident { .. } => None,
            Store::Offloaded(off) => Some(off.transfer()),
        }
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

    use crate::test_rng::rng;

    #[test]
    fn with_offload_a_cache_bigger_than_vram_is_accepted_counting_only_the_slots() {
        use rand::Rng;
        let mut rng = rng();
        let c = cfg();
        for _ in 0..50 {
            let resident = ModelOptions {
                max_batch: rng.gen_range(1..512),
                max_len: rng.gen_range(1..131072),
                ..ModelOptions::default()
            };
            let offload = ModelOptions {
                kv_offload: true,
                ..resident
            };
            let dtype = [DType::BF16, DType::F32][rng.gen_range(0..2)];
            let per = layer_bytes(&c, &resident, dtype).unwrap();
            let others = rng.gen_range(0..1u64 << 32);
            // Free VRAM between the slots' need and the whole cache's.
            let slots = per * 2 * OFFLOAD_SLOTS as u64 + others + HEADROOM;
            let whole = per * 2 * c.layers as u64 + others + HEADROOM;
            let free = rng.gen_range(slots..whole);
            assert_eq!(device_layers(&c, &offload), OFFLOAD_SLOTS);
            check_fits(&c, &offload, dtype, per, others, free).unwrap();
            let e = check_fits(&c, &resident, dtype, per, others, free).unwrap_err();
            assert!(e.to_string().contains("--kv-offload"), "{e}");
            // Not even the slots fit: the error says so, with their sizes.
            let e = check_fits(&c, &offload, dtype, per, others, slots - 1).unwrap_err();
            match &e {
                Error::Limit {
                    asked, available, ..
                } => assert_eq!((*asked, *available), (slots, slots - 1)),
                other => panic!("{other}"),
            }
            let msg = e.to_string();
            for part in [
                format!("{OFFLOAD_SLOTS} slots"),
                format!("{} sequences", resident.max_batch),
                format!("{} positions", resident.max_len),
                format!("({dtype})"),
            ] {
                assert!(msg.contains(&part), "{part} missing: {msg}");
            }
        }
    }

    #[test]
    fn an_offloaded_cache_beyond_the_host_limits_is_an_error_naming_the_sizes() {
        use rand::Rng;
        let mut rng = rng();
        let c = cfg();
        for _ in 0..50 {
            let opts = ModelOptions {
                max_batch: rng.gen_range(1..512),
                max_len: rng.gen_range(1..131072),
                kv_offload: true,
                ..ModelOptions::default()
            };
            let dtype = [DType::BF16, DType::F32][rng.gen_range(0..2)];
            let per = layer_bytes(&c, &opts, dtype).unwrap();
            let need = per * 2 * c.layers as u64;
            let plenty = rng.gen_range(need..=need * 2);
            check_host_fits(&c, &opts, dtype, per, Some(plenty), Some(plenty)).unwrap();
            check_host_fits(&c, &opts, dtype, per, None, None).unwrap();
            let short = rng.gen_range(0..need);
            for (ram, memlock, limit) in [
                (Some(short), None, "host memory (MemAvailable)"),
                (Some(plenty), Some(short), "RLIMIT_MEMLOCK"),
            ] {
                let e = check_host_fits(&c, &opts, dtype, per, ram, memlock).unwrap_err();
                match &e {
                    Error::Limit {
                        asked, available, ..
                    } => assert_eq!((*asked, *available), (need, short)),
                    other => panic!("{other}"),
                }
                let msg = e.to_string();
                for part in [
                    limit.to_string(),
                    format!("{} layers", c.layers),
                    format!("{} sequences", opts.max_batch),
                    format!("{} positions", opts.max_len),
                    format!("= {need} bytes"),
                    "--max-len".to_string(),
                ] {
                    assert!(msg.contains(&part), "{part} missing: {msg}");
                }
            }
        }
    }
}
