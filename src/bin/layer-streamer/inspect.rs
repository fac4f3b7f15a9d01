//! `layer-streamer inspect`.

use layer_streamer::Result;

/// Arguments of `inspect`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `inspect`.
pub fn run(_args: Args) -> Result<()> {
    Err(layer_streamer::Error::Input(
        "inspect: not built yet".into(),
    ))
}
