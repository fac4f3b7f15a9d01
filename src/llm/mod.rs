//! Qwen2 and Llama generation over the layer streamer: configuration, the
//! forward pass (on the host in f32, or on CUDA with cuBLAS and the crate's
//! kernels), KV cache, sampling, tokenizer and chat template.
//!
//! ```no_run
//! use layer_streamer::llm::{generate, GenerateParams, LlamaModel, ModelOptions, Tokenizer};
//! use layer_streamer::{Device, LayerStreamer, ModelIndex};
//! # fn main() -> layer_streamer::Result<()> {
//! let index = ModelIndex::open("./Qwen2-7B-Instruct")?;
//! let mut streamer = LayerStreamer::builder(&index).device(Device::Cuda(0)).build()?;
//! let mut model = LlamaModel::load(&streamer, ModelOptions::default())?;
//! let tok = Tokenizer::from_dir(index.dir())?;
//! let prompt = tok.encode("The capital of France is", true)?;
//! let params = GenerateParams {
//!     max_new_tokens: 16,
//!     sampling: Default::default(),
//!     seed: 0,
//!     stop_ids: model.config().eos_token_ids.clone(),
//! };
//! let out = generate(&mut model, &mut streamer, &[prompt], &params, |_, _| Ok(()))?;
//! println!("{}", tok.decode(&out.tokens[0])?);
//! # Ok(()) }
//! ```

pub mod attention;
pub mod chat;
pub mod config;
pub mod generate;
mod gpu;
mod gpu_blocks;
mod gpu_embed;
mod gpu_gemm;
mod gpu_io;
mod gpu_kernels;
mod gpu_output;
mod gpu_phases;
mod gpu_sampling;
mod gpu_split_pass;
mod gpu_weights;
mod gpu_workspace;
mod host;
mod kv_cache;
pub mod layout;
pub mod llama;
pub mod ops;
pub mod reference;
pub mod rope;
pub mod sampling;
mod split;
pub mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use config::ModelConfig;
pub use generate::{generate, GenerateParams, Generation};
pub use gpu_blocks::BLOCKS_SCRATCH_BYTES;
pub use gpu_embed::{EmbeddingLookup, HOST_GATHER_ENV};
pub use gpu_output::{StaticsMemory, OUTPUT_CHUNK_BYTES};
pub use gpu_phases::LayerPhases;
pub use gpu_sampling::sample_on_device;
pub use gpu_split_pass::SplitUpload;
pub use kv_cache::KvTransfer;
pub use llama::{LlamaModel, ModelOptions, Precision};
pub use sampling::{sample_draw, Sampler, SamplingParams, TokenDraw};
pub use tokenizer::{TextStream, Tokenizer};
