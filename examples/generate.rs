//! Generation end to end with the library API: open a model directory, build
//! a streamer, load the model, render a chat prompt and stream the answer.
//!
//! ```text
//! cargo run --release --example generate -- MODEL_DIR "Why is the sky blue?" [host|cuda:0]
//! ```
//! Without arguments it writes a tiny synthetic model to a temporary
//! directory and runs it on the host backend.

use std::io::Write;

use layer_streamer::llm::{
    generate, ChatTemplate, GenerateParams, LlamaModel, Message, ModelOptions, TextStream,
    Tokenizer,
};
use layer_streamer::synth::{write_model, Arch, Shape, SynthSpec};
use layer_streamer::{DType, Device, LayerStreamer, ModelIndex, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = match args.first() {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            let d = std::env::temp_dir().join("layer-streamer-example-tiny");
            write_model(
                &d,
                &SynthSpec {
                    arch: Arch::Qwen2,
                    shape: Shape::preset("tiny").expect("tiny is a preset"),
                    dtype: DType::BF16,
                    tie: false,
                    shard_size: 4_000_000_000,
                    seed: 0,
                    threads: 0,
                },
            )?;
            d
        }
    };
    let question = args.get(1).map_or("Hello!", String::as_str);
    let device = Device::parse(args.get(2).map_or("host", String::as_str))?;

    // The streamer: bf16 compute on a GPU, the file's dtypes on the host.
    let index = ModelIndex::open(&dir)?;
    let builder = LayerStreamer::builder(&index).device(device);
    let builder = match device {
        Device::Host => builder.file_dtype(),
        Device::Cuda(_) => builder.dtype(LlamaModel::cuda_dtype(&index)),
    };
    let mut streamer = builder.build()?;

    // The prompt, through the model's chat template.
    let tok = Tokenizer::from_dir(&dir)?;
    let messages = [Message::new("user", question)];
    let prompt = match ChatTemplate::from_dir(&dir)? {
        Some(t) => tok.encode(&t.render(&messages, true)?, false)?,
        None => tok.encode(question, true)?,
    };

    let max_new_tokens = 32;
    let mut model = LlamaModel::load(
        &streamer,
        ModelOptions {
            max_batch: 1,
            max_len: prompt.len() + max_new_tokens,
            max_tokens: prompt.len(),
            ..ModelOptions::default()
        },
    )?;
    let params = GenerateParams {
        max_new_tokens,
        sampling: Default::default(),
        seed: 0,
        stop_ids: model.config().eos_token_ids.clone(),
    };
    let mut text = TextStream::new(&tok);
    let out = generate(&mut model, &mut streamer, &[prompt], &params, |_, id| {
        print!("{}", text.push(id)?);
        let _ = std::io::stdout().flush();
        Ok(())
    })?;
    println!();
    eprintln!(
        "{} tokens; prefill {:.3} s, decode {:.2} tokens/s",
        out.new_tokens(),
        out.prefill.as_secs_f64(),
        out.decode_tokens_per_s()
    );
    Ok(())
}
