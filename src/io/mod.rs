//! Direct I/O: page-aligned buffers and files read with `O_DIRECT`.
//!
//! A read of `[offset, offset + len)` is widened to the file's logical block
//! size and lands in page-aligned memory ([`AlignedBuf`], or a pinned slot of
//! the pipeline); the bytes asked for are a sub-slice of it. Where the
//! filesystem refuses `O_DIRECT` (tmpfs, some network filesystems) a
//! [`DirectFile`] opened with [`OpenMode::Auto`] falls back to buffered reads
//! and says so once per process.

mod aligned;
mod direct;

pub use aligned::AlignedBuf;
pub use direct::DirectFile;

/// The page size every [`AlignedBuf`] is aligned to and rounded up to.
pub const PAGE: usize = 4096;

/// How [`DirectFile::open`] should open a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpenMode {
    /// `O_DIRECT`, falling back to buffered reads where the filesystem refuses it.
    #[default]
    Auto,
    /// `O_DIRECT` only: refusal is an error.
    Direct,
    /// Buffered reads through the page cache.
    Buffered,
}

impl OpenMode {
    /// Parses `auto`, `direct` or `buffered`.
    pub fn parse(s: &str) -> crate::Result<OpenMode> {
        match s {
            "auto" => Ok(OpenMode::Auto),
            "direct" => Ok(OpenMode::Direct),
            "buffered" => Ok(OpenMode::Buffered),
            _ => Err(crate::Error::Input(format!(
                "unknown I/O mode {s:?}: auto, direct or buffered"
            ))),
        }
    }
}

/// How an open [`DirectFile`] actually reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// `O_DIRECT`: reads bypass the page cache; offsets, lengths and memory must be block-aligned.
    Direct,
    /// Buffered reads through the page cache.
    Buffered,
}

impl std::fmt::Display for ReadMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReadMode::Direct => "direct",
            ReadMode::Buffered => "buffered",
        })
    }
}

/// Rounds `x` down to a multiple of `align` (a power of two).
pub(crate) const fn align_down(x: u64, align: u64) -> u64 {
    x & !(align - 1)
}

/// Rounds `x` up to a multiple of `align` (a power of two); `None` on overflow.
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}
