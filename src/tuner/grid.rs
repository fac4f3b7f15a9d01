//! The search space: the streamer parameters a search varies
//! ([`Param`]), one point in it ([`Candidate`]), and the lists of values to
//! try for each ([`Grid`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::pipeline::{parse_size, Budget, StreamerConfig};
use crate::{Error, Result};

/// A parameter of [`StreamerConfig`] that a search varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Param {
    /// [`StreamerConfig::n_gpu`].
    NGpu,
    /// [`StreamerConfig::n_cpu_pinned`].
    NCpuPinned,
    /// [`StreamerConfig::n_cpu`].
    NCpu,
    /// [`StreamerConfig::batch_gpu`].
    BatchGpu,
    /// [`StreamerConfig::batch_cpu_pinned`].
    BatchCpuPinned,
    /// [`StreamerConfig::batch_cpu`].
    BatchCpu,
    /// [`StreamerConfig::reader_threads`].
    ReaderThreads,
    /// [`StreamerConfig::read_chunk`].
    ReadChunk,
    /// [`StreamerConfig::pinned_cache`].
    PinnedCache,
    /// [`StreamerConfig::gpu_cache`].
    GpuCache,
}

impl Param {
    /// Every parameter, in the order searches vary them.
    pub const ALL: [Param; 10] = [
        Param::NGpu,
        Param::NCpuPinned,
        Param::NCpu,
        Param::BatchGpu,
        Param::BatchCpuPinned,
        Param::BatchCpu,
        Param::ReaderThreads,
        Param::ReadChunk,
        Param::PinnedCache,
        Param::GpuCache,
    ];

    /// The field's name, e.g. `n_cpu_pinned`.
    pub fn name(self) -> &'static str {
        match self {
            Param::NGpu => "n_gpu",
            Param::NCpuPinned => "n_cpu_pinned",
            Param::NCpu => "n_cpu",
            Param::BatchGpu => "batch_gpu",
            Param::BatchCpuPinned => "batch_cpu_pinned",
            Param::BatchCpu => "batch_cpu",
            Param::ReaderThreads => "reader_threads",
            Param::ReadChunk => "read_chunk",
            Param::PinnedCache => "pinned_cache",
            Param::GpuCache => "gpu_cache",
        }
    }

    /// A parameter by its field name (`n_cpu_pinned`) or option name (`n-cpu-pinned`).
    pub fn from_name(s: &str) -> Option<Param> {
        let s = s.trim().trim_start_matches("--").replace('-', "_");
        Param::ALL.into_iter().find(|p| p.name() == s)
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Parses one value of this parameter: a count (`off` is 0), a size for
    /// `read_chunk` (`4MiB`), a budget for the caches (`none`, `auto`, `8GB`).
    pub fn parse_value(self, s: &str) -> Result<Value> {
        let s = s.trim();
        let bad =
            |why: String| Error::Input(format!("{}: invalid value {s:?}: {why}", self.name()));
        match self {
            Param::ReadChunk => parse_size(s)
                .map(Value::Bytes)
                .map_err(|e| bad(e.to_string())),
            Param::PinnedCache | Param::GpuCache => Budget::parse(s)
                .map(Value::Budget)
                .map_err(|e| bad(e.to_string())),
            _ if s.eq_ignore_ascii_case("off") => Ok(Value::Count(0)),
            _ => s
                .parse::<usize>()
                .map(Value::Count)
                .map_err(|_| bad("expected a count or off".into())),
        }
    }
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One value of a [`Param`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    /// A slot count, batch size or thread count.
    Count(usize),
    /// A size in bytes (`read_chunk`).
    Bytes(u64),
    /// A cache budget.
    Budget(Budget),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Value::Count(n) => write!(f, "{n}"),
            Value::Bytes(b) => f.write_str(&format_bytes(b)),
            Value::Budget(Budget::None) => f.write_str("none"),
            Value::Budget(Budget::Auto) => f.write_str("auto"),
            Value::Budget(Budget::Bytes(b)) => f.write_str(&format_bytes(b)),
        }
    }
}

/// A byte count the way a user would type it: `16MiB`, `8GB`, `12345`.
pub fn format_bytes(b: u64) -> String {
    const UNITS: [(u64, &str); 6] = [
        (1 << 40, "TiB"),
        (1_000_000_000_000, "TB"),
        (1 << 30, "GiB"),
        (1_000_000_000, "GB"),
        (1 << 20, "MiB"),
        (1_000_000, "MB"),
    ];
    for (unit, name) in UNITS {
        if b >= unit && b % unit == 0 {
            return format!("{}{name}", b / unit);
        }
    }
    if b >= 1024 && b % 1024 == 0 {
        return format!("{}KiB", b / 1024);
    }
    b.to_string()
}

/// One point of the search space: the values of every [`Param`]. The rest of
/// a [`StreamerConfig`] (device, dtype, I/O mode) comes from the tuner's base
/// configuration.
///
/// In JSON, counts and `read_chunk` are numbers; a budget is `"none"`,
/// `"auto"` or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// GPU prefetch depth.
    pub n_gpu: usize,
    /// Pinned host slots.
    pub n_cpu_pinned: usize,
    /// Unpinned CPU slots.
    pub n_cpu: usize,
    /// Transfer batch.
    pub batch_gpu: usize,
    /// Pinned ring batch.
    pub batch_cpu_pinned: usize,
    /// CPU ring batch.
    pub batch_cpu: usize,
    /// Reader threads.
    pub reader_threads: usize,
    /// Bytes per read request.
    pub read_chunk: u64,
    /// Pinned cache budget.
    #[serde(with = "budget_json")]
    pub pinned_cache: Budget,
    /// Device cache budget.
    #[serde(with = "budget_json")]
    pub gpu_cache: Budget,
}

impl Candidate {
    /// The searched parameters of `cfg`.
    pub fn from_config(cfg: &StreamerConfig) -> Candidate {
        Candidate {
            n_gpu: cfg.n_gpu,
            n_cpu_pinned: cfg.n_cpu_pinned,
            n_cpu: cfg.n_cpu,
            batch_gpu: cfg.batch_gpu,
            batch_cpu_pinned: cfg.batch_cpu_pinned,
            batch_cpu: cfg.batch_cpu,
            reader_threads: cfg.reader_threads,
            read_chunk: cfg.read_chunk,
            pinned_cache: cfg.pinned_cache,
            gpu_cache: cfg.gpu_cache,
        }
    }

    /// `base` with this candidate's parameters.
    pub fn apply(&self, base: &StreamerConfig) -> StreamerConfig {
        StreamerConfig {
            n_gpu: self.n_gpu,
            n_cpu_pinned: self.n_cpu_pinned,
            n_cpu: self.n_cpu,
            batch_gpu: self.batch_gpu,
            batch_cpu_pinned: self.batch_cpu_pinned,
            batch_cpu: self.batch_cpu,
            reader_threads: self.reader_threads,
            read_chunk: self.read_chunk,
            pinned_cache: self.pinned_cache,
            gpu_cache: self.gpu_cache,
            ..base.clone()
        }
    }

    /// The value of one parameter.
    pub fn get(&self, p: Param) -> Value {
        match p {
            Param::NGpu => Value::Count(self.n_gpu),
            Param::NCpuPinned => Value::Count(self.n_cpu_pinned),
            Param::NCpu => Value::Count(self.n_cpu),
            Param::BatchGpu => Value::Count(self.batch_gpu),
            Param::BatchCpuPinned => Value::Count(self.batch_cpu_pinned),
            Param::BatchCpu => Value::Count(self.batch_cpu),
            Param::ReaderThreads => Value::Count(self.reader_threads),
            Param::ReadChunk => Value::Bytes(self.read_chunk),
            Param::PinnedCache => Value::Budget(self.pinned_cache),
            Param::GpuCache => Value::Budget(self.gpu_cache),
        }
    }

    /// Sets one parameter; a value of the wrong kind for it is an error.
    pub fn set(&mut self, p: Param, v: Value) -> Result<()> {
        match (p, v) {
            (Param::NGpu, Value::Count(n)) => self.n_gpu = n,
            (Param::NCpuPinned, Value::Count(n)) => self.n_cpu_pinned = n,
            (Param::NCpu, Value::Count(n)) => self.n_cpu = n,
            (Param::BatchGpu, Value::Count(n)) => self.batch_gpu = n,
            (Param::BatchCpuPinned, Value::Count(n)) => self.batch_cpu_pinned = n,
            (Param::BatchCpu, Value::Count(n)) => self.batch_cpu = n,
            (Param::ReaderThreads, Value::Count(n)) => self.reader_threads = n,
            (Param::ReadChunk, Value::Bytes(b)) => self.read_chunk = b,
            (Param::PinnedCache, Value::Budget(b)) => self.pinned_cache = b,
            (Param::GpuCache, Value::Budget(b)) => self.gpu_cache = b,
            (p, v) => {
                return Err(Error::Input(format!(
                    "{v:?} is not a value of {}",
                    p.name()
                )))
            }
        }
        Ok(())
    }

    /// This candidate with one parameter changed.
    pub fn with(mut self, p: Param, v: Value) -> Result<Candidate> {
        self.set(p, v)?;
        Ok(self)
    }
}

impl Default for Candidate {
    fn default() -> Self {
        Candidate::from_config(&StreamerConfig::default())
    }
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in Param::ALL.into_iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}={}", p.name(), self.get(p))?;
        }
        Ok(())
    }
}

/// Budgets in JSON: `"none"`, `"auto"` or a number of bytes.
mod budget_json {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::pipeline::Budget;

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Bytes(u64),
        Word(String),
    }

    pub fn serialize<S: Serializer>(b: &Budget, s: S) -> Result<S::Ok, S::Error> {
        match *b {
            Budget::None => Repr::Word("none".into()),
            Budget::Auto => Repr::Word("auto".into()),
            Budget::Bytes(n) => Repr::Bytes(n),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Budget, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Bytes(n) => Ok(Budget::Bytes(n)),
            Repr::Word(w) => Budget::parse(&w).map_err(serde::de::Error::custom),
        }
    }
}

/// The values to try for each [`Param`]. A parameter with no values keeps
/// the base configuration's value.
///
/// ```
/// use layer_streamer::tuner::{Grid, Param};
/// use layer_streamer::Budget;
/// let grid = Grid::builder()
///     .n_gpu([1, 2, 4])
///     .pinned_cache([Budget::None, Budget::Auto])
///     .parse(Param::NCpu, "off,2")?
///     .build();
/// assert_eq!(grid.len(), 12);
/// # Ok::<(), layer_streamer::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Grid {
    axes: [Vec<Value>; 10],
}

impl Grid {
    /// An empty grid: every parameter keeps the base value.
    pub fn builder() -> GridBuilder {
        GridBuilder::default()
    }

    /// The values given for `p` (empty: the base value).
    pub fn values(&self, p: Param) -> &[Value] {
        &self.axes[p.index()]
    }

    /// The values `p` takes in a search from `base`: the grid's, or the base's alone.
    pub fn axis(&self, p: Param, base: &Candidate) -> Vec<Value> {
        match self.values(p) {
            [] => vec![base.get(p)],
            v => v.to_vec(),
        }
    }

    /// The number of points in the grid.
    pub fn len(&self) -> usize {
        self.axes.iter().map(|a| a.len().max(1)).product()
    }

    /// Whether no parameter has values (the grid is the base configuration alone).
    pub fn is_empty(&self) -> bool {
        self.axes.iter().all(|a| a.is_empty())
    }

    /// Every point of the grid, the last parameter varying fastest.
    pub fn candidates(&self, base: &Candidate) -> Vec<Candidate> {
        let mut out = vec![*base];
        for p in Param::ALL {
            let axis = self.axis(p, base);
            out = out
                .iter()
                .flat_map(|c| axis.iter().filter_map(move |&v| c.with(p, v).ok()))
                .collect();
        }
        out
    }

    /// Parses a comma-separated list of values of `p`, as given on the
    /// command line: `1,2,4`, `off,2`, `none,auto,8GB`, `4MiB,16MiB`.
    pub fn parse_list(p: Param, list: &str) -> Result<Vec<Value>> {
        let items: Vec<&str> = list.split(',').map(str::trim).collect();
        if items.iter().any(|s| s.is_empty()) {
            return Err(Error::Input(format!(
                "{}: empty item in the list {list:?}",
                p.name()
            )));
        }
        items.into_iter().map(|s| p.parse_value(s)).collect()
    }
}

impl fmt::Display for Grid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for p in Param::ALL {
            let v = self.values(p);
            if v.is_empty() {
                continue;
            }
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            let list: Vec<String> = v.iter().map(Value::to_string).collect();
            write!(f, "{}={}", p.name(), list.join(","))?;
        }
        if first {
            f.write_str("(base configuration only)")?;
        }
        Ok(())
    }
}

/// Builds a [`Grid`]. Each setter replaces the parameter's list; repeated
/// values are dropped, the first occurrence kept.
#[derive(Debug, Clone, Default)]
pub struct GridBuilder {
    grid: Grid,
}

macro_rules! count_setters {
    ($($(#[$doc:meta])* $name:ident => $param:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name(self, values: impl IntoIterator<Item = usize>) -> Self {
            self.values(Param::$param, values.into_iter().map(Value::Count))
        }
    )*};
}

impl GridBuilder {
    count_setters! {
        /// Values of `n_gpu`.
        n_gpu => NGpu;
        /// Values of `n_cpu_pinned` (0: off).
        n_cpu_pinned => NCpuPinned;
        /// Values of `n_cpu` (0: off).
        n_cpu => NCpu;
        /// Values of `batch_gpu`.
        batch_gpu => BatchGpu;
        /// Values of `batch_cpu_pinned`.
        batch_cpu_pinned => BatchCpuPinned;
        /// Values of `batch_cpu`.
        batch_cpu => BatchCpu;
        /// Values of `reader_threads`.
        reader_threads => ReaderThreads;
    }

    /// Values of `read_chunk`, in bytes.
    pub fn read_chunk(self, values: impl IntoIterator<Item = u64>) -> Self {
        self.values(Param::ReadChunk, values.into_iter().map(Value::Bytes))
    }

    /// Values of `pinned_cache`.
    pub fn pinned_cache(self, values: impl IntoIterator<Item = Budget>) -> Self {
        self.values(Param::PinnedCache, values.into_iter().map(Value::Budget))
    }

    /// Values of `gpu_cache`.
    pub fn gpu_cache(self, values: impl IntoIterator<Item = Budget>) -> Self {
        self.values(Param::GpuCache, values.into_iter().map(Value::Budget))
    }

    /// Sets `p`'s values from a command-line list (see [`Grid::parse_list`]).
    pub fn parse(self, p: Param, list: &str) -> Result<Self> {
        let values = Grid::parse_list(p, list)?;
        Ok(self.values(p, values))
    }

    fn values(mut self, p: Param, values: impl IntoIterator<Item = Value>) -> Self {
        let axis = &mut self.grid.axes[p.index()];
        axis.clear();
        for v in values {
            if !axis.contains(&v) {
                axis.push(v);
            }
        }
        self
    }

    /// The grid.
    pub fn build(self) -> Grid {
        self.grid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_with_off_sizes_and_budgets() {
        assert_eq!(
            Grid::parse_list(Param::NCpu, "off, 2").unwrap(),
            vec![Value::Count(0), Value::Count(2)]
        );
        assert_eq!(
            Grid::parse_list(Param::ReadChunk, "4MiB,8192").unwrap(),
            vec![Value::Bytes(4 << 20), Value::Bytes(8192)]
        );
        assert_eq!(
            Grid::parse_list(Param::PinnedCache, "none,auto,8GB").unwrap(),
            vec![
                Value::Budget(Budget::None),
                Value::Budget(Budget::Auto),
                Value::Budget(Budget::Bytes(8_000_000_000))
            ]
        );
        let e = Grid::parse_list(Param::NGpu, "1,two").unwrap_err();
        assert!(e.to_string().contains("n_gpu"), "{e}");
        assert!(Grid::parse_list(Param::NGpu, "1,,2").is_err());
        assert_eq!(Param::from_name("--n-cpu-pinned"), Some(Param::NCpuPinned));
        assert_eq!(Param::from_name("gpu_cache"), Some(Param::GpuCache));
        assert_eq!(Param::from_name("n_tpu"), None);
    }

    #[test]
    fn candidates_cover_the_product_and_keep_base_values() {
        let base = Candidate::default();
        let grid = Grid::builder()
            .n_gpu([1, 2, 2])
            .parse(Param::PinnedCache, "none,auto")
            .unwrap()
            .build();
        assert_eq!(grid.values(Param::NGpu).len(), 2, "duplicates dropped");
        let all = grid.candidates(&base);
        assert_eq!(all.len(), 4);
        assert_eq!(grid.len(), 4);
        assert!(all.iter().all(|c| c.reader_threads == base.reader_threads));
        assert_eq!(all[0].n_gpu, 1);
        assert_eq!(all[1].pinned_cache, Budget::Auto);
        assert_eq!(all[2].n_gpu, 2);
        assert!(Grid::default().is_empty());
        assert_eq!(Grid::default().candidates(&base), vec![base]);
    }

    #[test]
    fn candidate_json_round_trips() {
        let c = Candidate {
            pinned_cache: Budget::Auto,
            gpu_cache: Budget::Bytes(1 << 30),
            ..Candidate::default()
        };
        let j = serde_json::to_value(c).unwrap();
        assert_eq!(j["pinned_cache"], "auto");
        assert_eq!(j["gpu_cache"], 1u64 << 30);
        assert_eq!(j["n_gpu"], 2);
        let back: Candidate = serde_json::from_value(j).unwrap();
        assert_eq!(back, c);
        assert!(c.to_string().contains("gpu_cache=1GiB"), "{c}");
        assert_eq!(format_bytes(16 << 20), "16MiB");
        assert_eq!(format_bytes(8_000_000_000), "8GB");
        assert_eq!(format_bytes(1000), "1000");
    }
}
