//! Where the time of a layer goes on CUDA: events recorded between the
//! phases of layer 0's work on the compute stream (the layer every pass
//! times), read once the pass has synchronized.

use crate::cuda::{Context, Event, Stream};
use crate::Result;

/// Seconds of layer 0's phases in the pass with the most tokens so far
/// ([`LlamaModel::last_layer_phases`](crate::llm::LlamaModel::last_layer_phases)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerPhases {
    /// Tokens of that pass.
    pub tokens: usize,
    /// The projections' GEMMs (q/k/v, o_proj, gate/up, down_proj), with the
    /// dequantization of weights dequantized at use.
    pub gemm_s: f64,
    /// The bias, RoPE and KV-cache write, and attention.
    pub attention_s: f64,
    /// The two RMSNorms and SwiGLU.
    pub other_s: f64,
}

impl LayerPhases {
    /// The layer's time in all.
    pub fn total_s(&self) -> f64 {
        self.gemm_s + self.attention_s + self.other_s
    }
}

/// What ends at each mark after the first: input norm, q/k/v GEMMs,
/// attention, o_proj, post-attention norm, gate/up GEMMs, SwiGLU, down_proj.
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Gemm,
    Attention,
    Other,
}

const PHASES: [Phase; 8] = [
    Phase::Other,
    Phase::Gemm,
    Phase::Attention,
    Phase::Gemm,
    Phase::Other,
    Phase::Gemm,
    Phase::Other,
    Phase::Gemm,
];

/// The events of one layer's phases.
pub(crate) struct Phases {
    events: Vec<Event>,
    /// Marks recorded in the layer being timed.
    next: usize,
    /// Whether the layer being queued is timed.
    on: bool,
    best: Option<LayerPhases>,
    /// The last pass of one token (decoding one sequence).
    one: Option<LayerPhases>,
}

impl Phases {
    pub(crate) fn new(ctx: &Context) -> Result<Phases> {
        let events = (0..=PHASES.len())
            .map(|_| Event::new(ctx, true))
            .collect::<Result<Vec<_>>>()?;
        Ok(Phases {
            events,
            next: 0,
            on: false,
            best: None,
            one: None,
        })
    }

    /// Starts (or, with `on == false`, stops) timing the layer about to be
    /// queued.
    pub(crate) fn time_layer(&mut self, on: bool) {
        self.on = on;
        if on {
            self.next = 0;
        }
    }

    /// Records the end of the phase queued last (the first mark starts the
    /// layer); nothing when the layer is not timed.
    pub(crate) fn mark(&mut self, s: &Stream) -> Result<()> {
        if self.on && self.next < self.events.len() {
            self.events[self.next].record(s)?;
            self.next += 1;
        }
        Ok(())
    }

    /// After the pass has synchronized: keeps the phases of its timed layer
    /// when every mark was recorded (a layer split with the CPU records
    /// none) and the pass has the most tokens so far, or one token.
    pub(crate) fn finish(&mut self, tokens: usize) -> Result<()> {
        self.on = false;
        let most = !matches!(self.best, Some(b) if b.tokens > tokens);
        if self.next != self.events.len() || !(most || tokens == 1) {
            return Ok(());
        }
        let mut p = LayerPhases {
            tokens,
            gemm_s: 0.0,
            attention_s: 0.0,
            other_s: 0.0,
        };
        for (i, phase) in PHASES.iter().enumerate() {
            let s = Event::elapsed_ms(&self.events[i], &self.events[i + 1])? as f64 * 1e-3;
            match phase {
                Phase::Gemm => p.gemm_s += s,
                Phase::Attention => p.attention_s += s,
                Phase::Other => p.other_s += s,
            }
        }
        if most {
            self.best = Some(p);
        }
        if tokens == 1 {
            self.one = Some(p);
        }
        Ok(())
    }

    /// The phases of the pass with the most tokens, kept by
    /// [`finish`](Self::finish).
    pub(crate) fn best(&self) -> Option<LayerPhases> {
        self.best
    }

    /// The phases of the last pass of one token.
    pub(crate) fn one(&self) -> Option<LayerPhases> {
        self.one
    }
}
