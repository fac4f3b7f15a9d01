//! `layer-streamer synth`.

use layer_streamer::Result;

/// Arguments of `synth`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `synth`.
pub fn run(_args: Args) -> Result<()> {
    Err(layer_streamer::Error::Input("synth: not built yet".into()))
}
