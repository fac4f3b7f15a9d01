//! The text form of option values: the parsers the command line, the tuner's
//! grids and the tuner's child requests use, and [`OptionText`], their
//! inverse.

use crate::io::OpenMode;
use crate::{DType, Error, Result};

use super::{Budget, CpuShare, Device};

/// Parses a byte size: a number with an optional unit. Binary units are
/// powers of 1024 and may be spelled with or without `iB` (`K`, `KiB`, `M`,
/// `MiB`, `G`, `GiB`, `T`, `TiB`: `2G` is 2 GiB); decimal units are powers
/// of 1000 and always end in `B` (`KB`, `MB`, `GB`, `TB`: `2GB` is 2·10⁹).
/// Units are case-insensitive, a space may separate them from the number,
/// and a fraction is rounded to whole bytes (`1.5M` is 1 572 864).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let bad = |why: &str| Error::Input(format!("invalid size {s:?}: {why}"));
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        u => {
            return Err(bad(&format!(
                "unknown unit {u:?}: use K/KiB, M/MiB, G/GiB, T/TiB (binary) or KB, MB, GB, TB (decimal)"
            )))
        }
    };
    let expected = "expected a number with an optional unit, e.g. 4GB, 512MiB or 1048576";
    let too_big = || bad("more than 2^64 - 1 bytes");
    if !num.contains('.') {
        // Whole numbers stay exact, however large.
        let n: u64 = num
            .parse()
            .map_err(|e: std::num::ParseIntError| match e.kind() {
                std::num::IntErrorKind::PosOverflow => too_big(),
                _ => bad(expected),
            })?;
        return n.checked_mul(mult).ok_or_else(too_big);
    }
    let n: f64 = num.parse().map_err(|_| bad(expected))?;
    let bytes = (n * mult as f64).round();
    // 2^64 is exactly representable; anything at or above it does not fit.
    if bytes >= 18_446_744_073_709_551_616.0 {
        return Err(too_big());
    }
    Ok(bytes as u64)
}

/// A byte count the way [`parse_size`] reads it back: `16MiB`, `8GB`, `12345`.
pub fn format_bytes(b: u64) -> String {
    const UNITS: [(u64, &str); 7] = [
        (1 << 40, "TiB"),
        (1_000_000_000_000, "TB"),
        (1 << 30, "GiB"),
        (1_000_000_000, "GB"),
        (1 << 20, "MiB"),
        (1_000_000, "MB"),
        (1 << 10, "KiB"),
    ];
    UNITS
        .iter()
        .find(|&&(unit, _)| b >= unit && b.is_multiple_of(unit))
        .map_or_else(
            || b.to_string(),
            |&(unit, name)| format!("{}{name}", b / unit),
        )
}

/// Parses a count: a non-negative integer, or `off` for 0.
pub fn parse_count(s: &str) -> Result<usize> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    s.parse::<usize>()
        .map_err(|_| Error::Input(format!("invalid count {s:?}: expected a number or off")))
}

/// Parses a compute dtype: `bf16`, `f16`, `f32`, or `file` (keep each
/// tensor's file dtype).
pub fn parse_compute_dtype(s: &str) -> Result<Option<DType>> {
    match s.trim() {
        "file" | "none" => Ok(None),
        s => DType::parse(s)
            .map(Some)
            .ok_or_else(|| Error::Input(format!("unknown dtype {s:?}: bf16, f16, f32 or file"))),
    }
}

/// Parses a list of CPU numbers, `2,3,4,5`; `none` is no list.
pub fn parse_cpu_list(s: &str) -> Result<Option<Vec<usize>>> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    s.split(',')
        .map(|c| {
            c.trim()
                .parse::<usize>()
                .map_err(|_| Error::Input(format!("invalid CPU number {c:?} in {s:?}")))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Parses a switch's value: `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`.
pub fn parse_switch(s: &str) -> Result<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(Error::Input(format!(
            "invalid switch value {s:?}: expected true or false"
        ))),
    }
}

/// The text of an option value, as its parser reads it back.
pub trait OptionText {
    /// The value as text.
    fn text(&self) -> String;
    /// Whether the option is a switch (a flag without a value on the command line).
    const SWITCH: bool = false;
}

impl OptionText for usize {
    fn text(&self) -> String {
        self.to_string()
    }
}

impl OptionText for u64 {
    fn text(&self) -> String {
        format_bytes(*self)
    }
}

impl OptionText for bool {
    fn text(&self) -> String {
        self.to_string()
    }
    const SWITCH: bool = true;
}

impl OptionText for Budget {
    fn text(&self) -> String {
        match *self {
            Budget::None => "none".into(),
            Budget::Auto => "auto".into(),
            Budget::Bytes(b) => format_bytes(b),
        }
    }
}

impl OptionText for CpuShare {
    fn text(&self) -> String {
        match *self {
            CpuShare::Auto => "auto".into(),
            CpuShare::Off => "off".into(),
            // `Display` of an f64 reads back to the same value.
            CpuShare::Fixed(f) => f.to_string(),
        }
    }
}

impl OptionText for Dequant {
    fn text(&self) -> String {
        self.name().into()
    }
}

impl OptionText for Device {
    fn text(&self) -> String {
        self.to_string()
    }
}

impl OptionText for Option<DType> {
    fn text(&self) -> String {
        self.map_or_else(|| "file".into(), |d| d.to_string())
    }
}

impl OptionText for OpenMode {
    fn text(&self) -> String {
        match self {
            OpenMode::Auto => "auto",
            OpenMode::Direct => "direct",
            OpenMode::Buffered => "buffered",
        }
        .into()
    }
}

impl OptionText for Option<Vec<usize>> {
    fn text(&self) -> String {
        match self {
            None => "none".into(),
            Some(cpus) => cpus
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// In JSON a budget is `"none"`, `"auto"` or a number of bytes.
impl serde::Serialize for Budget {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match *self {
            Budget::Bytes(n) => s.serialize_u64(n),
            other => s.serialize_str(&other.text()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Budget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Budget, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Bytes(u64),
            Word(String),
        }
        match Repr::deserialize(d)? {
            Repr::Bytes(n) => Ok(Budget::Bytes(n)),
            Repr::Word(w) => Budget::parse(&w).map_err(serde::de::Error::custom),
        }
    }
}

/// In JSON a CPU share is `"auto"`, `"off"` or a fraction.
impl serde::Serialize for CpuShare {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match *self {
            CpuShare::Fixed(f) => s.serialize_f64(f),
            other => s.serialize_str(&other.text()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for CpuShare {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<CpuShare, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Fraction(f64),
            Word(String),
        }
        match Repr::deserialize(d)? {
            Repr::Fraction(f) => CpuShare::fraction(f).map_err(serde::de::Error::custom),
            Repr::Word(w) => CpuShare::parse(&w).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn a_bare_letter_is_binary_and_a_b_suffix_decimal() {
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("2 GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("2gb").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("512K").unwrap(), 512 << 10);
        assert_eq!(parse_size("512KB").unwrap(), 512_000);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("1.5MB").unwrap(), 1_500_000);
        assert_eq!(parse_size("3T").unwrap(), 3 << 40);
        assert_eq!(parse_size("3TB").unwrap(), 3_000_000_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("0").unwrap(), 0);
    }

    #[test]
    fn bad_sizes_are_errors_that_quote_the_input() {
        for bad in [
            "12 parsecs",
            "",
            "G",
            "-1G",
            "1e3",
            "17179869184T",
            "1.2.3M",
            "18446744073709551616",
            "1.5e3",
            "20000000000000000.5T",
        ] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
        assert_eq!(parse_size("16777215T").unwrap(), 16_777_215 << 40);
    }

    #[test]
    fn formatted_sizes_parse_back() {
        let mut rng = rand::thread_rng();
        let seed: u64 = rng.gen();
        eprintln!("seed {seed}");
        for _ in 0..1000 {
            let unit =
                [1u64, 1000, 1024, 1 << 20, 1_000_000, 1 << 30, 1 << 40][rng.gen_range(0..7)];
            let b = rng.gen_range(0..1u64 << 20) * unit;
            assert_eq!(
                parse_size(&format_bytes(b)).unwrap(),
                b,
                "{}",
                format_bytes(b)
            );
        }
        assert_eq!(format_bytes(16 << 20), "16MiB");
        assert_eq!(format_bytes(8_000_000_000), "8GB");
        assert_eq!(format_bytes(1000), "1000");
        assert_eq!(format_bytes(64 << 10), "64KiB");
    }

    #[test]
    fn counts_lists_and_switches_parse() {
        assert_eq!(parse_count("off").unwrap(), 0);
        assert_eq!(parse_count(" 7 ").unwrap(), 7);
        assert!(parse_count("-1").is_err());
        assert_eq!(parse_cpu_list("2, 3").unwrap(), Some(vec![2, 3]));
        assert_eq!(parse_cpu_list("none").unwrap(), None);
        assert!(parse_cpu_list("2,x").is_err());
        assert!(parse_switch("yes").unwrap());
        assert!(!parse_switch("0").unwrap());
        assert_eq!(parse_compute_dtype("file").unwrap(), None);
        assert_eq!(parse_compute_dtype("f16").unwrap(), Some(DType::F16));
        assert!(parse_compute_dtype("f17").is_err());
    }
}

/// Where quantized layer weights (ggml blocks, FP8) become the compute dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dequant {
    /// `slot` for a layer function of one's own; `use` for the crate's
    /// model ([`LlamaModel::streamer_config`](crate::llm::LlamaModel::streamer_config),
    /// the model commands).
    #[default]
    Auto,
    /// Dequantized into each device slot (next to the stored bytes) before
    /// the layer function runs, on the transfer side of the pipeline.
    Slot,
    /// Handed to the layer function as stored ([`TensorView::quant`](crate::TensorView::quant),
    /// [`TensorView::fp8_scale`](crate::TensorView::fp8_scale)), which
    /// dequantizes at use: slots and the GPU cache hold only the stored bytes.
    Use,
}

impl Dequant {
    /// Every value, as the parser reads them.
    pub const ALL: [Dequant; 3] = [Dequant::Auto, Dequant::Slot, Dequant::Use];

    /// Parses `auto`, `slot` or `use`.
    pub fn parse(s: &str) -> Result<Dequant> {
        let t = s.trim();
        Dequant::ALL
            .into_iter()
            .find(|d| t.eq_ignore_ascii_case(d.name()))
            .ok_or_else(|| {
                Error::Input(format!(
                    "invalid dequantization place {s:?}: expected auto, slot or use"
                ))
            })
    }

    /// The name the parser reads.
    pub fn name(self) -> &'static str {
        match self {
            Dequant::Auto => "auto",
            Dequant::Slot => "slot",
            Dequant::Use => "use",
        }
    }

    /// Whether quantized tensors stay as stored: `Use` ([`Auto`](Self::Auto)
    /// is `Slot` to the streamer).
    pub fn keeps_blocks(self) -> bool {
        self == Dequant::Use
    }
}
