//! The Llama-family forward pass (Llama 2/3, Qwen2) over
//! [`LayerStreamer::run_pass`]: one pass streams every layer once and runs
//! it for every token of every sequence in the batch.

use crate::llm::config::ModelConfig;
use crate::llm::host::HostModel;
use crate::llm::kv_cache::KvTransfer;
use crate::llm::sampling::{sample_draw, TokenDraw};
use crate::{Error, LayerStreamer, Result};

/// Sizes the model's buffers and caches are allocated for, once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelOptions {
    /// Sequences decoded together (KV cache slots).
    pub max_batch: usize,
    /// Longest sequence, prompt and generated tokens together.
    pub max_len: usize,
    /// Most tokens one pass processes (all sequences together); longer
    /// prefills are split over several passes.
    pub max_tokens: usize,
    /// How the GEMM inputs and the KV cache are rounded (see [`Precision`]).
    pub precision: Precision,
    /// On CUDA, keep each layer's KV cache in page-locked host RAM and copy
    /// the positions in use through a ring of device slots with its layer
    /// (for batches whose cache exceeds the GPU's memory); the device holds
    /// only the slots. The host backend keeps its cache in RAM either way.
    pub kv_offload: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            max_batch: 1,
            max_len: 2048,
            max_tokens: 2048,
            precision: Precision::Fast,
            kv_offload: false,
        }
    }
}

/// The arithmetic of the CUDA forward pass. The host backend ignores it: it
/// computes in f32 either way.
///
/// Parsed from and printed as `fast` / `exact` (the `--precision` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// bf16 (or f16) activations into the GEMMs with f32 accumulation, an f32
    /// residual stream and a 16-bit KV cache, as serving engines run.
    #[default]
    Fast,
    /// Each GEMM input split into two 16-bit halves (about 16 mantissa bits)
    /// and an f32 KV cache: closer to an f32 reference, twice the GEMM work.
    Exact,
}

impl Precision {
    /// Every precision, fastest first.
    pub const ALL: [Precision; 2] = [Precision::Fast, Precision::Exact];

    /// The name `--precision` takes.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fast => "fast",
            Precision::Exact => "exact",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Precision> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fast" => Ok(Precision::Fast),
            "exact" => Ok(Precision::Exact),
            _ => Err(Error::Input(format!(
                "invalid precision {s:?}: expected fast or exact"
            ))),
        }
    }
}

/// The tokens of one pass, packed: every participating sequence's new
/// tokens in turn.
#[derive(Debug, Default, Clone)]
pub(crate) struct PassBatch {
    /// Token ids.
    pub(crate) tokens: Vec<u32>,
    /// The sequence (KV cache slot) of each token.
    pub(crate) seq: Vec<u32>,
    /// The position of each token in its sequence.
    pub(crate) pos: Vec<u32>,
    /// Rows (indices into `tokens`) whose logits are wanted: the last new
    /// token of each sequence that finishes its input in this pass.
    pub(crate) out_rows: Vec<u32>,
    /// The sequence of each row of `out_rows`.
    pub(crate) out_seqs: Vec<usize>,
}

/// How the math runs.
enum Exec {
    Host(HostModel),
    Cuda(Box<crate::llm::gpu::CudaModel>),
}

/// A Qwen2/Llama model whose layers stream through a [`LayerStreamer`], with
/// a KV cache for `max_batch` sequences.
pub struct LlamaModel {
    cfg: ModelConfig,
    opts: ModelOptions,
    lens: Vec<usize>,
    exec: Exec,
}

impl LlamaModel {
    /// Loads the embedding, final norm and lm_head through `streamer` and
    /// allocates the caches and workspaces, on the streamer's device.
    ///
    /// Fails, before allocating anything, when config.json asks for math the
    /// forward pass does not implement (naming the key), when a tensor's
    /// shape disagrees with config.json (naming the tensor, both shapes and
    /// the keys), or when a bias or `lm_head.weight` the config calls for is
    /// missing (or a bias it does not call for is present). On CUDA, fails
    /// with [`Error::Limit`] (naming the cache's sizes and the free memory)
    /// when the KV cache does not fit next to the streamer's slots; with
    /// [`ModelOptions::kv_offload`], when its two device slots do not, or
    /// when the host cache exceeds the available RAM or `RLIMIT_MEMLOCK`.
    pub fn load(streamer: &LayerStreamer, opts: ModelOptions) -> Result<LlamaModel> {
        let cfg = ModelConfig::from_model(streamer.model())?;
        if cfg.layers != streamer.model().num_layers() {
            return Err(Error::model(
                streamer.model().dir(),
                format!(
                    "config.json says {} layers but the checkpoint has {}",
                    cfg.layers,
                    streamer.model().num_layers()
                ),
            ));
        }
        if opts.max_batch == 0 || opts.max_len == 0 || opts.max_tokens == 0 {
            return Err(Error::config(format!(
                "max_batch, max_len and max_tokens must be positive: {opts:?}"
            )));
        }
        let config_path = streamer.model().dir().join("config.json");
        cfg.check_max_len(opts.max_len)
            .map_err(|m| Error::model(&config_path, m))?;
        crate::llm::layout::check(streamer.model(), &cfg)?;
        let exec = if streamer.is_host() {
            Exec::Host(HostModel::load(streamer, &cfg, &opts)?)
        } else {
            Exec::Cuda(Box::new(crate::llm::gpu::CudaModel::load(
                streamer, &cfg, &opts,
            )?))
        };
        Ok(LlamaModel {
            lens: vec![0; opts.max_batch],
            cfg,
            opts,
            exec,
        })
    }

    /// The compute dtype to build a CUDA streamer with for this model: f16
    /// when its layer weights are quantized (ggml blocks or FP8: they
    /// dequantize on the device into f16, whose 10 mantissa bits hold a
    /// 4-bit code times its f16 scale far better than bf16's 7, as llama.cpp
    /// does) or when every float tensor is f16 (kept as is: f16 GEMMs lose
    /// less than a cast to bf16); else bf16 (f16 and f32 tensors cast on the
    /// device).
    pub fn cuda_dtype(index: &crate::ModelIndex) -> crate::DType {
        use crate::DType;
        let quantized = index.has_quantized_layers();
        if quantized {
            return DType::F16;
        }
        let floats: Vec<DType> = index
            .dtypes()
            .into_iter()
            .filter(|d| matches!(d, DType::BF16 | DType::F16 | DType::F32 | DType::F64))
            .collect();
        if !floats.is_empty() && floats.iter().all(|d| *d == DType::F16) {
            DType::F16
        } else {
            DType::BF16
        }
    }

    /// The weights a CPU/GPU row split divides for this forward pass
    /// ([`LayerStreamerBuilder::split_only`](crate::LayerStreamerBuilder::split_only)):
    /// the MLP's, 87 % of a 7B layer's bytes. The CPU then meets the device
    /// twice per layer (gate/up, down) instead of four times; attention's
    /// projections stream whole.
    pub const SPLIT_WEIGHTS: [&'static str; 3] = [
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ];

    /// `cfg` made ready for this model, as the model commands build their
    /// streamers: on CUDA the compute dtype is [`cuda_dtype`](Self::cuda_dtype)
    /// and [`Dequant::Auto`](crate::Dequant::Auto) becomes
    /// [`Dequant::Use`](crate::Dequant::Use) (quantized weights stay stored in
    /// the slots and the GPU cache, and each GEMM dequantizes its weight into
    /// one shared scratch, or the fused GEMV reads them); on the host the
    /// file dtypes.
    pub fn streamer_config(
        index: &crate::ModelIndex,
        mut cfg: crate::StreamerConfig,
    ) -> crate::StreamerConfig {
        match cfg.device {
            crate::Device::Host => cfg.dtype = None,
            crate::Device::Cuda(_) => {
                cfg.dtype = Some(Self::cuda_dtype(index));
                if cfg.dequant == crate::Dequant::Auto {
                    cfg.dequant = crate::Dequant::Use;
                }
            }
        }
        cfg
    }

    /// Which of the CPU's rows of a CPU/GPU row split each CUDA pass copies
    /// to the device instead ([`SplitUpload`](crate::llm::SplitUpload); the
    /// default is `LS_SPLIT_UPLOAD`, else `auto`). Nothing changes without a
    /// split or on the host backend, where the CPU computes its rows.
    pub fn set_split_upload(&mut self, mode: crate::llm::SplitUpload) {
        if let Exec::Cuda(m) = &mut self.exec {
            m.set_split_upload(mode);
        }
    }

    /// How the CUDA passes share a CPU/GPU row split's CPU rows out, in a
    /// line (see [`set_split_upload`](Self::set_split_upload)); `None`
    /// without a split or on the host backend.
    pub fn split_note(&self) -> Option<String> {
        match &self.exec {
            Exec::Cuda(m) => m.split_note(),
            Exec::Host(_) => None,
        }
    }

    /// Bounds the 16-bit scratch that layer weights stored as ggml blocks
    /// are dequantized into on CUDA for passes of more than
    /// [`GEMV_MAX_TOKENS`](crate::quant::device::GEMV_MAX_TOKENS) tokens, a
    /// chunk of rows at a time, to `bytes` (at least one row of the widest
    /// weight, and the largest weight of a model with FP8 weights, which are
    /// dequantized whole; the default is
    /// [`BLOCKS_SCRATCH_BYTES`](crate::llm::BLOCKS_SCRATCH_BYTES)). The
    /// logits do not depend on it. Nothing changes on the host backend or
    /// when the weights are dequantized in the slots.
    pub fn set_weight_chunk_bytes(&mut self, bytes: usize) -> Result<()> {
        match &mut self.exec {
            Exec::Cuda(m) => m.set_weight_chunk_bytes(bytes),
            Exec::Host(_) => Ok(()),
        }
    }

    /// Bounds the 16-bit scratch that a quantized output matrix (lm_head)
    /// is dequantized into on CUDA, a chunk of rows at a time, to `bytes`
    /// (at least one row; the default is
    /// [`OUTPUT_CHUNK_BYTES`](crate::llm::OUTPUT_CHUNK_BYTES)). The logits
    /// do not depend on it. Nothing changes on the host backend or for an
    /// output matrix kept in 16 bits.
    pub fn set_output_chunk_bytes(&mut self, bytes: usize) -> Result<()> {
        match &mut self.exec {
            Exec::Cuda(m) => m.set_output_chunk_bytes(bytes),
            Exec::Host(_) => Ok(()),
        }
    }

    /// How the CUDA forward pass looks up the embedding rows of a pass's
    /// tokens, as chosen at load; `None` on the host backend.
    pub fn embedding_lookup(&self) -> Option<crate::llm::EmbeddingLookup> {
        match &self.exec {
            Exec::Cuda(m) => Some(m.embedding_lookup()),
            Exec::Host(_) => None,
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The sizes it was loaded for.
    pub fn options(&self) -> &ModelOptions {
        &self.opts
    }

    /// Tokens cached so far for each sequence.
    pub fn lengths(&self) -> &[usize] {
        &self.lens
    }

    /// Forgets every cached token (the next call starts new sequences).
    pub fn reset(&mut self) {
        self.lens.iter_mut().for_each(|l| *l = 0);
    }

    /// Forgets the cached tokens of sequence `seq` alone, so that its KV slot
    /// can start a new sequence while the others go on.
    pub fn reset_sequence(&mut self, seq: usize) -> Result<()> {
        let n = self.lens.len();
        let len = self.lens.get_mut(seq).ok_or_else(|| {
            Error::Input(format!(
                "sequence {seq} does not exist: the model was loaded for {n} sequences"
            ))
        })?;
        *len = 0;
        Ok(())
    }

    /// Appends `inputs[i]` to sequence `i` and returns, for each sequence
    /// with new tokens, the logits (`vocab` f32) after its last new token;
    /// an empty vector for a sequence without new tokens. Runs one pass, or
    /// more when the tokens exceed `max_tokens`.
    ///
    /// A sequence's length advances only when a pass that holds its tokens
    /// succeeds. On an error, each sequence keeps the tokens of the passes
    /// that completed before it ([`lengths`](Self::lengths) says how many;
    /// with one pass, none of `inputs` is kept) and the KV cache agrees with
    /// those lengths, so the caller can resume by feeding the rest again.
    pub fn forward(
        &mut self,
        streamer: &mut LayerStreamer,
        inputs: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>> {
        self.check_inputs(inputs)?;
        let mut out = vec![Vec::new(); inputs.len()];
        let vocab = self.cfg.vocab;
        self.run_passes(streamer, inputs, None, |exec, streamer, cfg, b| {
            let rows: Vec<Vec<f32>> = match exec {
                Exec::Host(h) => {
                    let flat = h.pass(streamer, cfg, b)?;
                    flat.chunks_exact(vocab.max(1))
                        .map(<[f32]>::to_vec)
                        .collect()
                }
                // Rows straight from the pinned logits, one copy each.
                Exec::Cuda(c) => c.pass(streamer, cfg, b)?,
            };
            for (row, &s) in rows.into_iter().zip(&b.out_seqs) {
                out[s] = row;
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Appends `inputs[i]` to sequence `i`, like [`forward`](Self::forward),
    /// and returns for each sequence with new tokens and a draw the token
    /// `draws[i]` picks after its last new token (`None` for the others,
    /// whose logits are not computed). On CUDA the token is chosen on the
    /// device and only the ids come back; on the host by
    /// [`sample_draw`](crate::llm::sampling::sample_draw). Errors as for
    /// `forward`, and when `draws` and `inputs` differ in length.
    pub fn forward_sample(
        &mut self,
        streamer: &mut LayerStreamer,
        inputs: &[&[u32]],
        draws: &[Option<TokenDraw>],
    ) -> Result<Vec<Option<u32>>> {
        if draws.len() != inputs.len() {
            return Err(Error::Input(format!(
                "{} draws given for {} sequences (one per sequence, None for no token)",
                draws.len(),
                inputs.len()
            )));
        }
        self.check_inputs(inputs)?;
        let want: Vec<bool> = draws.iter().map(Option::is_some).collect();
        let mut out = vec![None; inputs.len()];
        let vocab = self.cfg.vocab;
        self.run_passes(streamer, inputs, Some(&want), |exec, streamer, cfg, b| {
            let rows: Vec<TokenDraw> = b.out_seqs.iter().filter_map(|&s| draws[s]).collect();
            let ids = match exec {
                Exec::Host(h) => {
                    let logits = h.pass(streamer, cfg, b)?;
                    let rows = logits.chunks_exact(vocab).zip(&rows);
                    rows.map(|(l, d)| sample_draw(l, d)).collect()
                }
                Exec::Cuda(c) => c.pass_sample(streamer, cfg, b, &rows)?,
            };
            for (&s, id) in b.out_seqs.iter().zip(ids) {
                out[s] = Some(id);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Runs as many passes as `inputs` need, calling `each` to run one;
    /// after each success, the lengths advance by the tokens it took. A
    /// sequence whose input ends in a pass gets an output row there when
    /// `want` is `None` or says so.
    fn run_passes(
        &mut self,
        streamer: &mut LayerStreamer,
        inputs: &[&[u32]],
        want: Option<&[bool]>,
        mut each: impl FnMut(&mut Exec, &mut LayerStreamer, &ModelConfig, &PassBatch) -> Result<()>,
    ) -> Result<()> {
        let mut done = vec![0usize; inputs.len()];
        while done.iter().zip(inputs).any(|(d, i)| *d < i.len()) {
            let (b, taken) = self.plan_pass(inputs, &done, want);
            each(&mut self.exec, streamer, &self.cfg, &b)?;
            // The pass succeeded: its tokens are in the KV cache.
            for (i, n) in taken.into_iter().enumerate() {
                done[i] += n;
                self.lens[i] += n;
            }
        }
        Ok(())
    }

    /// Checks the batch size, the lengths and every token id of `inputs`.
    fn check_inputs(&self, inputs: &[&[u32]]) -> Result<()> {
        if inputs.len() > self.opts.max_batch {
            return Err(Error::Input(format!(
                "{} sequences given but the model was loaded for at most {}",
                inputs.len(),
                self.opts.max_batch
            )));
        }
        for (i, inp) in inputs.iter().enumerate() {
            let total = self.lens[i] + inp.len();
            if total > self.opts.max_len {
                return Err(Error::Input(format!(
                    "sequence {i} would hold {total} tokens ({} cached + {} new), more than the \
                     maximum length {} (raise --max-len)",
                    self.lens[i],
                    inp.len(),
                    self.opts.max_len
                )));
            }
            if let Some(&bad) = inp.iter().find(|&&t| t as usize >= self.cfg.vocab) {
                return Err(Error::Input(format!(
                    "token id {bad} is outside the vocabulary of {} ids",
                    self.cfg.vocab
                )));
            }
        }
        Ok(())
    }

    /// The next pass: up to `max_tokens` of the tokens not yet `done`, and
    /// how many of each sequence's it takes; output rows for the sequences
    /// that finish and are wanted.
    fn plan_pass(
        &self,
        inputs: &[&[u32]],
        done: &[usize],
        want: Option<&[bool]>,
    ) -> (PassBatch, Vec<usize>) {
        let mut b = PassBatch::default();
        let mut taken = vec![0usize; inputs.len()];
        let mut budget = self.opts.max_tokens;
        for (i, inp) in inputs.iter().enumerate() {
            let take = (inp.len() - done[i]).min(budget);
            if take == 0 {
                continue;
            }
            for j in 0..take {
                b.tokens.push(inp[done[i] + j]);
                b.seq.push(i as u32);
                b.pos.push((self.lens[i] + j) as u32);
            }
            taken[i] = take;
            budget -= take;
            if done[i] + take == inp.len() && want.is_none_or(|w| w[i]) {
                b.out_rows.push((b.tokens.len() - 1) as u32);
                b.out_seqs.push(i);
            }
        }
        (b, taken)
    }

    /// The KV bytes the latest pass copied between host and device, with
    /// [`ModelOptions::kv_offload`] on CUDA; `None` otherwise.
    pub fn last_kv_transfer(&self) -> Option<KvTransfer> {
        match &self.exec {
            Exec::Cuda(c) => c.last_kv_transfer(),
            Exec::Host(_) => None,
        }
    }

    /// Compute throughput of the CUDA pass with the most tokens so far: the
    /// layer's GEMM FLOPs over the time of layer 0's work, in TFLOP/s.
    pub fn last_gemm_tflops(&self) -> Option<f64> {
        match &self.exec {
            Exec::Cuda(c) => c.last_gemm_tflops(),
            Exec::Host(_) => None,
        }
    }

    /// Where layer 0's time went in the CUDA pass with the most tokens so
    /// far: its GEMMs, attention and the rest, timed by events between the
    /// phases. `None` on the host and for layers split with the CPU.
    pub fn last_layer_phases(&self) -> Option<crate::llm::LayerPhases> {
        match &self.exec {
            Exec::Cuda(c) => c.last_layer_phases(),
            Exec::Host(_) => None,
        }
    }

    /// As [`last_layer_phases`](Self::last_layer_phases), for the last CUDA
    /// pass of one token (decoding one sequence).
    pub fn decode_layer_phases(&self) -> Option<crate::llm::LayerPhases> {
        match &self.exec {
            Exec::Cuda(c) => c.decode_layer_phases(),
            Exec::Host(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_parses_its_names_and_refuses_others_naming_them() {
        for p in [Precision::Fast, Precision::Exact] {
            assert_eq!(p.to_string().parse::<Precision>().unwrap(), p);
            assert_eq!(p.name().to_uppercase().parse::<Precision>().unwrap(), p);
        }
        assert_eq!(ModelOptions::default().precision, Precision::Fast);
        for bad in ["", "bf16", "fastest"] {
            let e = bad.parse::<Precision>().unwrap_err();
            assert!(matches!(e, Error::Input(_)), "{e:?}");
            let m = e.to_string();
            assert!(
                m.contains(&format!("{bad:?}")) && m.contains("fast or exact"),
                "{m}"
            );
        }
    }
}
