//! Workloads: what a tuner child measures. A workload is registered by name;
//! the child looks it up, builds it once with the configuration under test,
//! then calls the returned run function once per run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::{Error, LayerStreamer, ModelIndex, Result, StreamerConfig};

/// One run of a prepared workload: does the work once and returns how long
/// it took (the time the tuner ranks configurations by).
pub type RunFn<'m> = Box<dyn FnMut() -> Result<Duration> + 'm>;

/// Something a tuner child can measure.
///
/// A workload named `name` is selected with `name` or `name:ARG`; the part
/// after the first `:` is passed as `arg`.
pub trait Workload: Send + Sync {
    /// Builds what the runs need (typically a [`LayerStreamer`] with `cfg`)
    /// and returns the function that does one run. An error here is reported
    /// as the configuration failing to build.
    fn prepare<'m>(
        &self,
        cfg: &StreamerConfig,
        model: &'m ModelIndex,
        arg: Option<&str>,
    ) -> Result<RunFn<'m>>;

    /// Checks the argument (and whether the workload can run at all) before
    /// any child starts.
    fn check(&self, arg: Option<&str>) -> Result<()> {
        let _ = arg;
        Ok(())
    }
}

struct FnWorkload<F>(F);

impl<F> Workload for FnWorkload<F>
where
    F: for<'m> Fn(&StreamerConfig, &'m ModelIndex, Option<&str>) -> Result<RunFn<'m>> + Send + Sync,
{
    fn prepare<'m>(
        &self,
        cfg: &StreamerConfig,
        model: &'m ModelIndex,
        arg: Option<&str>,
    ) -> Result<RunFn<'m>> {
        (self.0)(cfg, model, arg)
    }
}

/// Workloads by name.
#[derive(Default)]
pub struct Workloads {
    by_name: BTreeMap<String, Box<dyn Workload>>,
}

impl Workloads {
    /// No workloads.
    pub fn new() -> Workloads {
        Workloads::default()
    }

    /// The built-in workloads:
    /// - `pass`: one [`LayerStreamer::run_pass`] with a layer function that
    ///   does nothing; measures the streaming alone.
    /// - `pass-delay:MS`: a pass whose layer function waits `MS` milliseconds
    ///   per layer, standing in for compute. The wait is a host sleep on the
    ///   calling thread on every backend, CUDA included (no kernel is
    ///   launched), so it models compute that overlaps the streaming.
    /// - `prefill:N`: one forward pass over an `N`-token prompt (default 512)
    ///   with the built-in Qwen2/Llama model code.
    /// - `decode:B`: one forward pass decoding one token for each of `B`
    ///   sequences (default 1); the sequences restart every 255 tokens.
    ///
    /// Both model workloads take the CUDA pass's precision after the count,
    /// `prefill:N:exact` or `decode:B:fast` (default fast; see
    /// [`Precision`](crate::llm::Precision)).
    pub fn builtin() -> Workloads {
        let mut w = Workloads::new();
        w.register_workload("pass", PassWorkload { delay: false });
        w.register_workload("pass-delay", PassWorkload { delay: true });
        w.register_workload("prefill", Generation(GenKind::Prefill));
        w.register_workload("decode", Generation(GenKind::Decode));
        w
    }

    /// Registers (or replaces) a workload given as a function or closure:
    /// `f(config, model, arg)` builds once and returns the run function.
    ///
    /// ```
    /// use std::time::Instant;
    /// use layer_streamer::tuner::Workloads;
    /// use layer_streamer::LayerStreamer;
    /// let mut w = Workloads::builtin();
    /// w.register("two-passes", |cfg, model, _arg| {
    ///     let mut s = LayerStreamer::builder(model).config(cfg.clone()).build()?;
    ///     Ok(Box::new(move || {
    ///         let t = Instant::now();
    ///         for _ in 0..2 {
    ///             s.run_pass((), |(), _w, _layer, _stream| Ok(()))?;
    ///         }
    ///         Ok(t.elapsed())
    ///     }))
    /// });
    /// assert!(w.names().any(|n| n == "two-passes"));
    /// ```
    pub fn register<F>(&mut self, name: impl Into<String>, f: F) -> &mut Self
    where
        F: for<'m> Fn(&StreamerConfig, &'m ModelIndex, Option<&str>) -> Result<RunFn<'m>>
            + Send
            + Sync
            + 'static,
    {
        self.register_workload(name, FnWorkload(f))
    }

    /// Registers (or replaces) a workload given as a [`Workload`].
    pub fn register_workload(
        &mut self,
        name: impl Into<String>,
        w: impl Workload + 'static,
    ) -> &mut Self {
        self.by_name.insert(name.into(), Box::new(w));
        self
    }

    /// The registered names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// The workload a spec (`name` or `name:ARG`) selects, and its argument.
    pub fn get<'a>(&self, spec: &'a str) -> Result<(&dyn Workload, Option<&'a str>)> {
        let (name, arg) = match spec.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (spec, None),
        };
        let w = self.by_name.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.names().collect();
            Error::Input(format!(
                "unknown workload {name:?}: registered are {}",
                known.join(", ")
            ))
        })?;
        Ok((w.as_ref(), arg))
    }

    /// Checks that `spec` names a registered workload that accepts its argument.
    pub fn check(&self, spec: &str) -> Result<()> {
        let (w, arg) = self.get(spec)?;
        w.check(arg)
    }
}

/// `pass` and `pass-delay:MS`.
struct PassWorkload {
    delay: bool,
}

impl PassWorkload {
    fn delay(&self, arg: Option<&str>) -> Result<Duration> {
        match (self.delay, arg) {
            (false, None) => Ok(Duration::ZERO),
            (false, Some(a)) => Err(Error::Input(format!(
                "workload pass takes no argument, got {a:?} (did you mean pass-delay:{a}?)"
            ))),
            (true, None) => Err(Error::Input(
                "workload pass-delay needs the delay per layer in milliseconds: pass-delay:MS"
                    .into(),
            )),
            (true, Some(a)) => a
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|ms| ms.is_finite() && *ms >= 0.0)
                .map(|ms| Duration::from_secs_f64(ms / 1e3))
                .ok_or_else(|| {
                    Error::Input(format!(
                        "pass-delay:{a}: the delay must be a number of milliseconds"
                    ))
                }),
        }
    }
}

impl Workload for PassWorkload {
    fn prepare<'m>(
        &self,
        cfg: &StreamerConfig,
        model: &'m ModelIndex,
        arg: Option<&str>,
    ) -> Result<RunFn<'m>> {
        let delay = self.delay(arg)?;
        let mut s = LayerStreamer::builder(model).config(cfg.clone()).build()?;
        Ok(Box::new(move || {
            let t = Instant::now();
            s.run_pass((), |(), _w, _layer, _stream| {
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                Ok(())
            })?;
            Ok(t.elapsed())
        }))
    }

    fn check(&self, arg: Option<&str>) -> Result<()> {
        self.delay(arg).map(drop)
    }
}

/// `prefill:N[:PRECISION]` (one pass over an `N`-token prompt) and
/// `decode[:B[:PRECISION]]` (one pass that decodes one token for each of `B`
/// sequences, default 1), with the built-in Qwen2/Llama model code.
struct Generation(GenKind);

#[derive(Clone, Copy, PartialEq)]
enum GenKind {
    Prefill,
    Decode,
}

impl Generation {
    /// The count and the precision of `arg` (`N` or `N:PRECISION`).
    fn parse(&self, arg: Option<&str>) -> Result<(usize, crate::llm::Precision)> {
        let Some((n, p)) = arg.and_then(|a| a.split_once(':')) else {
            return Ok((self.count(arg)?, crate::llm::Precision::default()));
        };
        let name = if self.0 == GenKind::Prefill {
            "prefill"
        } else {
            "decode"
        };
        let precision = p
            .parse()
            .map_err(|e| Error::Input(format!("workload {name}:{n}:{p}: {e}")))?;
        Ok((self.count(Some(n))?, precision))
    }

    fn count(&self, arg: Option<&str>) -> Result<usize> {
        let (name, default) = match self.0 {
            GenKind::Prefill => ("prefill", 512),
            GenKind::Decode => ("decode", 1),
        };
        match arg {
            None => Ok(default),
            Some(a) => a.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
                Error::Input(format!(
                    "workload {name}:{a}: expected a positive number of {}",
                    if self.0 == GenKind::Prefill {
                        "tokens"
                    } else {
                        "sequences"
                    }
                ))
            }),
        }
    }
}

impl Workload for Generation {
    fn prepare<'m>(
        &self,
        cfg: &StreamerConfig,
        model: &'m ModelIndex,
        arg: Option<&str>,
    ) -> Result<RunFn<'m>> {
        use crate::llm::{LlamaModel, ModelOptions};
        let (n, precision) = self.parse(arg)?;
        let cfg = LlamaModel::streamer_config(model, cfg.clone());
        let mut s = LayerStreamer::builder(model).config(cfg).build()?;
        // Decode keeps a short history per sequence, reset before the cache fills.
        const DECODE_LEN: usize = 256;
        const DECODE_WARM_PASSES: usize = 4;
        let (batch, max_len) = match self.0 {
            GenKind::Prefill => (1, n),
            GenKind::Decode => (n, DECODE_LEN),
        };
        let opts = ModelOptions {
            max_batch: batch,
            max_len,
            max_tokens: max_len.max(batch),
            precision,
            ..ModelOptions::default()
        };
        let mut m = LlamaModel::load(&s, opts)?;
        let vocab = m.config().vocab.max(1);
        let token = move |i: usize| ((i * 7919 + 13) % vocab) as u32;
        let kind = self.0;
        // One token for each of a decode's sequences.
        let steps: Vec<[u32; 1]> = (0..n).map(|i| [token(i)]).collect();
        if kind == GenKind::Decode {
            // A split's first decode passes run slower than the rest (its
            // CPU side's buffers and threads warming up): a few here, so
            // that the tuner's single warm-up run and early kill compare
            // settled passes.
            let inputs: Vec<&[u32]> = steps.iter().map(|t| &t[..]).collect();
            for _ in 0..DECODE_WARM_PASSES {
                m.forward(&mut s, &inputs)?;
            }
        }
        Ok(Box::new(move || {
            let t = match kind {
                GenKind::Prefill => {
                    let prompt: Vec<u32> = (0..n).map(token).collect();
                    m.reset();
                    let t = Instant::now();
                    m.forward(&mut s, &[&prompt])?;
                    t.elapsed()
                }
                GenKind::Decode => {
                    if m.lengths().iter().any(|&l| l + 1 >= DECODE_LEN) {
                        m.reset();
                    }
                    let inputs: Vec<&[u32]> = steps.iter().map(|t| &t[..]).collect();
                    let t = Instant::now();
                    m.forward(&mut s, &inputs)?;
                    t.elapsed()
                }
            };
            Ok(t)
        }))
    }

    fn check(&self, arg: Option<&str>) -> Result<()> {
        self.parse(arg).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_resolve_and_check_their_arguments() {
        let w = Workloads::builtin();
        w.check("pass").unwrap();
        w.check("pass-delay:2.5").unwrap();
        assert!(w.check("pass-delay").is_err());
        assert!(w.check("pass-delay:soon").is_err());
        assert!(w.check("pass:3").is_err());
        w.check("prefill:128").unwrap();
        w.check("decode").unwrap();
        w.check("decode:8").unwrap();
        let e = w.check("prefill:lots").unwrap_err().to_string();
        assert!(e.contains("positive number of tokens"), "{e}");
        let e = w.check("decode:0").unwrap_err().to_string();
        assert!(e.contains("positive number of sequences"), "{e}");
        for p in crate::llm::Precision::ALL {
            let g = Generation(GenKind::Decode);
            assert_eq!(g.parse(Some(&format!("8:{p}"))).unwrap(), (8, p));
            w.check(&format!("prefill:64:{p}")).unwrap();
        }
        let g = Generation(GenKind::Prefill);
        assert_eq!(g.parse(Some("64")).unwrap().1, crate::llm::Precision::Fast);
        let e = w.check("prefill:64:double").unwrap_err().to_string();
        assert!(
            e.contains("prefill:64:double") && e.contains("fast or exact"),
            "{e}"
        );
        let e = w.check("decode:0:exact").unwrap_err().to_string();
        assert!(e.contains("positive number of sequences"), "{e}");
        let e = w.check("train").unwrap_err().to_string();
        assert!(
            e.contains("unknown workload") && e.contains("pass-delay"),
            "{e}"
        );
    }
}
