//! The search space: the streamer parameters a search varies
//! ([`Param`]), one point in it ([`Candidate`]), and the lists of values to
//! try for each ([`Grid`]). Parameters, their parsers and the default grid's
//! values come from the option table in `pipeline/config.rs`.

use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::pipeline::config::format_bytes;
use crate::pipeline::config::streamer_options;
use crate::pipeline::{Budget, CpuShare, StreamerConfig};
use crate::{Error, Result};

/// One value of a [`Param`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    /// A slot count, batch size or thread count.
    Count(usize),
    /// A size in bytes (`read_chunk`).
    Bytes(u64),
    /// A cache budget.
    Budget(Budget),
    /// A CPU share.
    Share(CpuShare),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::pipeline::config::OptionText;
        match self {
            Value::Count(n) => f.write_str(&n.text()),
            Value::Bytes(b) => f.write_str(&b.text()),
            Value::Budget(b) => f.write_str(&b.text()),
            Value::Share(c) => f.write_str(&c.text()),
        }
    }
}

/// The types of searched fields, and the [`Value`] each travels as.
trait AxisValue: Sized {
    fn into_value(self) -> Value;
    fn from_value(v: Value) -> Option<Self>;
}

impl AxisValue for usize {
    fn into_value(self) -> Value {
        Value::Count(self)
    }
    fn from_value(v: Value) -> Option<Self> {
        match v {
            Value::Count(n) => Some(n),
            _ => None,
        }
    }
}

impl AxisValue for u64 {
    fn into_value(self) -> Value {
        Value::Bytes(self)
    }
    fn from_value(v: Value) -> Option<Self> {
        match v {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }
}

impl AxisValue for Budget {
    fn into_value(self) -> Value {
        Value::Budget(self)
    }
    fn from_value(v: Value) -> Option<Self> {
        match v {
            Value::Budget(b) => Some(b),
            _ => None,
        }
    }
}

impl AxisValue for CpuShare {
    fn into_value(self) -> Value {
        Value::Share(self)
    }
    fn from_value(v: Value) -> Option<Self> {
        match v {
            Value::Share(c) => Some(c),
            _ => None,
        }
    }
}

/// [`Param`], [`Candidate`] and the [`GridBuilder`] setters, from the table's
/// `searched` rows.
macro_rules! define_params {
    (
        fixed { $($fixed:tt)* }
        searched { $(
            $(#[doc = $doc:literal])*
            $name:ident : $ty:ty = $default:expr, parse $parse:path, flag $flag:literal,
            axis $variant:ident $title:literal [$($tune:expr),*] $(, cli $cli:expr)?;
        )* }
        not_in_c { $($rest:tt)* }
    ) => {
        /// A parameter of [`StreamerConfig`] that a search varies.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Param {
            $(
                #[doc = concat!("[`StreamerConfig::", stringify!($name), "`].")]
                $variant,
            )*
        }

        impl Param {
            /// How many parameters there are.
            pub const COUNT: usize = [$(stringify!($name)),*].len();

            /// Every parameter, in the order searches vary them.
            pub const ALL: [Param; Param::COUNT] = [$(Param::$variant),*];

            /// The field's name, e.g. `n_cpu_pinned`.
            pub fn name(self) -> &'static str {
                match self { $(Param::$variant => stringify!($name),)* }
            }

            /// The short column title of the report's table, e.g. `n_pin`.
            pub fn title(self) -> &'static str {
                match self { $(Param::$variant => $title,)* }
            }

            /// Parses one value of this parameter with the option's parser: a
            /// count (`off` is 0), a size for `read_chunk` (`4MiB`), a budget for
            /// the caches (`none`, `auto`, `8GB`).
            pub fn parse_value(self, s: &str) -> Result<Value> {
                let parsed = match self {
                    $(Param::$variant => $parse(s.trim()).map(AxisValue::into_value),)*
                };
                parsed.map_err(|e| {
                    Error::Input(format!("{}: invalid value {:?}: {e}", self.name(), s.trim()))
                })
            }

            /// The values the default grid ([`Grid::default_search`]) tries, before
            /// the library's and the command line's defaults are added.
            fn suggested(self) -> Vec<Value> {
                match self {
                    $(Param::$variant => {
                        let values: Vec<$ty> = vec![$($tune),*];
                        values.into_iter().map(AxisValue::into_value).collect()
                    })*
                }
            }
        }

        /// One point of the search space: the values of every [`Param`]. The
        /// rest of a [`StreamerConfig`] (device, dtype, I/O mode) comes from
        /// the tuner's base configuration.
        ///
        /// In JSON, counts and `read_chunk` are numbers; a budget is `"none"`,
        /// `"auto"` or a number of bytes.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub struct Candidate {
            $(
                $(#[doc = $doc])*
                pub $name: $ty,
            )*
        }

        impl Candidate {
            /// The searched parameters of `cfg`.
            pub fn from_config(cfg: &StreamerConfig) -> Candidate {
                Candidate { $($name: cfg.$name,)* }
            }

            /// `base` with this candidate's parameters.
            pub fn apply(&self, base: &StreamerConfig) -> StreamerConfig {
                StreamerConfig { $($name: self.$name,)* ..base.clone() }
            }

            /// The value of one parameter.
            pub fn get(&self, p: Param) -> Value {
                match p { $(Param::$variant => self.$name.into_value(),)* }
            }

            /// Sets one parameter; a value of the wrong kind for it is an error.
            pub fn set(&mut self, p: Param, v: Value) -> Result<()> {
                let wrong = || Error::Input(format!("{v:?} is not a value of {}", p.name()));
                match p {
                    $(Param::$variant => {
                        self.$name = AxisValue::from_value(v).ok_or_else(wrong)?;
                    })*
                }
                Ok(())
            }
        }

        impl GridBuilder {
            $(
                #[doc = concat!("Values of `", stringify!($name), "` to try.")]
                pub fn $name(self, values: impl IntoIterator<Item = $ty>) -> Self {
                    self.values(Param::$variant, values.into_iter().map(AxisValue::into_value))
                }
            )*
        }
    };
}

streamer_options!(define_params);

impl Param {
    /// A parameter by its field name (`n_cpu_pinned`) or option name (`n-cpu-pinned`).
    pub fn from_name(s: &str) -> Option<Param> {
        let s = s.trim().trim_start_matches("--").replace('-', "_");
        Param::ALL.into_iter().find(|p| p.name() == s)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Candidate {
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
    axes: [Vec<Value>; Param::COUNT],
}

impl Grid {
    /// An empty grid: every parameter keeps the base value.
    pub fn builder() -> GridBuilder {
        GridBuilder::default()
    }

    /// The grid `layer-streamer tune` searches when no lists are given: for
    /// each parameter a few values that matter on most machines, always
    /// including the value of [`StreamerConfig::default`] and of
    /// [`StreamerConfig::cli_default`] (so the library's and the tool's
    /// defaults are among the candidates, e.g. both `none` and `auto` for the
    /// pinned cache).
    pub fn default_search() -> Grid {
        let lib = Candidate::from_config(&StreamerConfig::default());
        let cli = Candidate::from_config(&StreamerConfig::cli_default());
        let mut b = Grid::builder();
        for p in Param::ALL {
            // The tool's default first: a fast configuration early makes
            // the slower ones that follow end sooner.
            let values = [cli.get(p), lib.get(p)].into_iter().chain(p.suggested());
            b = b.values(p, values);
        }
        b.build()
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

impl GridBuilder {
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
