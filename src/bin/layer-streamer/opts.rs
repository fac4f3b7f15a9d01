//! Streamer options shared by the subcommands that build a streamer: one
//! flag per row of the option table ([`StreamerConfig::OPTIONS`]), named,
//! parsed and documented there.

use clap::{Arg, ArgAction, ArgMatches, Command, FromArgMatches};
use layer_streamer::pipeline::config::OptionSpec;
use layer_streamer::{Result, StreamerConfig};

/// How the streamer is configured from the command line: the tool's defaults
/// ([`StreamerConfig::cli_default`]) with the flags given applied.
#[derive(Debug, Clone)]
pub struct StreamerOpts {
    /// The configuration the flags describe, not yet validated.
    pub config: StreamerConfig,
}

impl StreamerOpts {
    /// The configuration these options describe, validated.
    pub fn config(&self) -> Result<StreamerConfig> {
        self.config.validate()?;
        Ok(self.config.clone())
    }
}

/// The flag of one option: a switch, or a value whose parser is the table's.
/// Values are checked when parsed, so a bad one is a usage error that names
/// the flag.
pub fn option_arg(o: &'static OptionSpec, default: &StreamerConfig, list: bool) -> Arg {
    let doc: Vec<&str> = o.doc.lines().map(str::trim).collect();
    let arg = Arg::new(o.name).long(o.flag);
    if o.switch {
        return arg.action(ArgAction::SetTrue).help(doc.join(" "));
    }
    let help = if list {
        format!(
            "{} Values to try, comma-separated; not listed: {}.",
            doc.join(" "),
            (o.get)(default)
        )
    } else {
        format!("{} [default: {}]", doc.join(" "), (o.get)(default))
    };
    let value_name = if list { "LIST" } else { "VALUE" };
    arg.value_name(value_name)
        .help(help)
        .value_parser(move |s: &str| {
            if list {
                return Ok::<String, String>(s.to_string());
            }
            let mut probe = StreamerConfig::default();
            (o.set)(&mut probe, s).map_err(|e| e.to_string())?;
            Ok(s.to_string())
        })
}

/// Applies the options given on the command line to `cfg`.
pub fn apply_options<'a>(
    cfg: &mut StreamerConfig,
    m: &ArgMatches,
    options: impl IntoIterator<Item = &'a OptionSpec>,
) -> std::result::Result<(), clap::Error> {
    for o in options {
        let text = if o.switch {
            m.get_flag(o.name).then(|| "true".to_string())
        } else {
            m.get_one::<String>(o.name).cloned()
        };
        if let Some(text) = text {
            (o.set)(cfg, &text).map_err(|e| {
                clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{e}\n"))
            })?;
        }
    }
    Ok(())
}

impl FromArgMatches for StreamerOpts {
    fn from_arg_matches(m: &ArgMatches) -> std::result::Result<Self, clap::Error> {
        let mut config = StreamerConfig::cli_default();
        apply_options(&mut config, m, StreamerConfig::OPTIONS)?;
        Ok(StreamerOpts { config })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> std::result::Result<(), clap::Error> {
        apply_options(&mut self.config, m, StreamerConfig::OPTIONS)
    }
}

impl clap::Args for StreamerOpts {
    fn augment_args(cmd: Command) -> Command {
        let default = StreamerConfig::cli_default();
        StreamerConfig::OPTIONS
            .iter()
            .fold(cmd, |cmd, o| cmd.arg(option_arg(o, &default, false)))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use layer_streamer::{Budget, Device};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: StreamerOpts,
    }

    #[test]
    fn every_option_has_its_flag_and_the_tool_defaults() {
        let none = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(none.opts.config, StreamerConfig::cli_default());
        assert_eq!(none.opts.config.pinned_cache, Budget::Auto);
        assert_eq!(none.opts.config.reader_threads, 8);
        let cli = Cli::try_parse_from([
            "x",
            "--device",
            "host",
            "--io",
            "buffered",
            "--read-chunk",
            "4M",
            "--gpu-cache",
            "2GB",
            "--cpu-affinity",
            "2,3",
            "--n-cpu",
            "3",
            "--dtype",
            "file",
            "--progress",
        ])
        .unwrap();
        let c = cli.opts.config;
        assert_eq!(c.device, Device::Host);
        assert_eq!(c.read_chunk, 4 << 20);
        assert_eq!(c.gpu_cache, Budget::Bytes(2_000_000_000));
        assert_eq!(c.cpu_affinity, Some(vec![2, 3]));
        assert_eq!((c.n_cpu, c.dtype, c.progress), (3, None, true));
        assert_eq!(c.io_mode, layer_streamer::io::OpenMode::Buffered);
        let e = Cli::try_parse_from(["x", "--read-chunk", "4 parsecs"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--read-chunk") && e.contains("parsecs"), "{e}");
    }
}
