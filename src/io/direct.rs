//! Files read with `O_DIRECT` at block-aligned offsets, or buffered where the
//! filesystem refuses direct I/O.

use std::collections::HashSet;
use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{align_down, align_up, AlignedBuf, OpenMode, ReadMode, PAGE};
use crate::{Error, Result};

/// The largest logical block size direct reads support: every planned read is
/// aligned to [`crate::checkpoint::READ_ALIGN`], which is this.
const MAX_BLOCK: usize = PAGE;

/// A file opened for positioned reads (`pread`), with `O_DIRECT` where the
/// filesystem allows it. No shared cursor: `Send + Sync`, usable from several
/// reader threads at once.
#[derive(Debug)]
pub struct DirectFile {
    file: File,
    path: PathBuf,
    len: u64,
    mode: ReadMode,
    block_size: usize,
}

impl DirectFile {
    /// Opens `path` for reading in `mode`.
    ///
    /// With [`OpenMode::Auto`] a refusal of `O_DIRECT` (`EINVAL` from `open`,
    /// as on tmpfs, or a filesystem that reports no direct-I/O alignment, or a
    /// logical block size above 4096) falls back to buffered reads and says so
    /// once per process on stderr; [`OpenMode::Direct`] makes it an error.
    pub fn open(path: &Path, mode: OpenMode) -> Result<DirectFile> {
        let requested = mode;
        let open_err = |e| Error::io("opening", path, None, e);
        let buffered = || -> Result<File> { File::open(path).map_err(open_err) };
        let (file, mode) = match mode {
            OpenMode::Buffered => (buffered()?, ReadMode::Buffered),
            OpenMode::Direct | OpenMode::Auto => {
                let opened = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path);
                match opened {
                    Ok(f) => (f, ReadMode::Direct),
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        if mode == OpenMode::Direct {
                            return Err(Error::io("opening with O_DIRECT", path, None, e));
                        }
                        say_once(path, "the filesystem refuses O_DIRECT");
                        (buffered()?, ReadMode::Buffered)
                    }
                    Err(e) => return Err(open_err(e)),
                }
            }
        };
        let meta = file
            .metadata()
            .map_err(|e| Error::io("reading the metadata of", path, None, e))?;
        if !meta.is_file() {
            return Err(Error::io(
                "opening",
                path,
                None,
                std::io::Error::new(ErrorKind::InvalidInput, "not a regular file"),
            ));
        }
        let mut this = DirectFile {
            file,
            path: path.to_path_buf(),
            len: meta.len(),
            mode,
            block_size: MAX_BLOCK,
        };
        if mode == ReadMode::Direct {
            let block = match dio_offset_align(&this.file) {
                Some(0) => Err("the filesystem reports no direct-I/O alignment".to_string()),
                Some(b) => Ok(b),
                None => Ok(sysfs_logical_block_size(meta.dev()).unwrap_or(MAX_BLOCK)),
            };
            let block = block.and_then(|b| {
                if b > MAX_BLOCK || !b.is_power_of_two() {
                    Err(format!(
                        "its logical block size {b} is not a power of two up to {MAX_BLOCK}"
                    ))
                } else {
                    Ok(b)
                }
            });
            match block {
                Ok(b) => this.block_size = b,
                Err(why) if requested == OpenMode::Auto => {
                    // Reopen buffered: O_DIRECT cannot serve the planned reads here.
                    this.file = buffered()?;
                    this.mode = ReadMode::Buffered;
                    say_once(path, &why);
                }
                Err(why) => {
                    return Err(Error::io(
                        "opening with O_DIRECT",
                        path,
                        None,
                        std::io::Error::new(ErrorKind::Unsupported, why),
                    ))
                }
            }
        }
        Ok(this)
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length when it was opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file was empty when it was opened.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How the file is read.
    pub fn mode(&self) -> ReadMode {
        self.mode
    }

    /// Logical block size that direct reads are aligned to (`statx`
    /// `dio_offset_align`, else the block device's logical block size from
    /// sysfs, else 4096). Never more than 4096.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Reads file bytes `[offset, offset + dst.len())` into `dst`.
    ///
    /// In [`ReadMode::Direct`], `offset` and `dst.len()` must be multiples of
    /// [`block_size`](Self::block_size) and `dst` must start at a
    /// block-aligned address (page-aligned memory always is); otherwise
    /// [`Error::Input`]. End of file is allowed at or after `required_end` (an
    /// absolute file offset). `dst` bytes past the end of the file are
    /// unspecified: a direct read may overwrite them (some devices zero the
    /// whole request past end of file), a buffered one leaves them. End of
    /// file before it is an [`Error::Io`] naming the file, offset and lengths.
    /// Short reads and `EINTR` are retried.
    pub fn read_aligned(&self, offset: u64, dst: &mut [u8], required_end: u64) -> Result<()> {
        if self.mode == ReadMode::Direct {
            let b = self.block_size;
            if !offset.is_multiple_of(b as u64)
                || !dst.len().is_multiple_of(b)
                || !(dst.as_ptr() as usize).is_multiple_of(b)
            {
                return Err(Error::Input(format!(
                    "direct read of {} bytes at offset {offset} of {} into memory at {:p}: \
                     offset, length and address must be multiples of the block size {b}",
                    dst.len(),
                    self.path.display(),
                    dst.as_ptr()
                )));
            }
        }
        let mut done = 0usize;
        while done < dst.len() {
            let pos = offset + done as u64;
            match self.file.read_at(&mut dst[done..], pos) {
                Ok(0) => return self.check_eof(offset, dst.len(), pos, required_end),
                Ok(n) => {
                    done += n;
                    // A direct read ends short, and unaligned, only at end of
                    // file; a further pread at that offset would fail with EINVAL.
                    if self.mode == ReadMode::Direct && done < dst.len() && n % self.block_size != 0
                    {
                        return self.check_eof(
                            offset,
                            dst.len(),
                            offset + done as u64,
                            required_end,
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("reading {} bytes from", dst.len() - done),
                        &self.path,
                        Some(pos),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    fn check_eof(&self, offset: u64, len: usize, eof: u64, required_end: u64) -> Result<()> {
        if eof >= required_end {
            return Ok(());
        }
        Err(Error::io(
            format!("reading {len} bytes from"),
            &self.path,
            Some(offset),
            std::io::Error::new(
                ErrorKind::UnexpectedEof,
                format!(
                    "unexpected end of file at offset {eof} (file is {} bytes; data needed up to {required_end})",
                    self.len
                ),
            ),
        ))
    }

    /// Reads any byte range: widens it to the block size inside `scratch`
    /// (replaced by a larger buffer if too small) and returns the bytes asked for.
    pub fn read_range<'a>(
        &self,
        offset: u64,
        len: usize,
        scratch: &'a mut AlignedBuf,
    ) -> Result<&'a [u8]> {
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| Error::Input(format!("range {offset}+{len} overflows")))?;
        let b = self.block_size as u64;
        let start = align_down(offset, b);
        let wide_end = align_up(end, b)
            .ok_or_else(|| Error::Input(format!("range {offset}+{len} overflows")))?;
        let wide = usize::try_from(wide_end - start)
            .map_err(|_| Error::Input(format!("range of {len} bytes is too large")))?;
        if scratch.len() < wide {
            *scratch = AlignedBuf::new(wide)?;
        }
        self.read_aligned(start, &mut scratch.as_mut_slice()[..wide], end)?;
        let skip = (offset - start) as usize;
        Ok(&scratch.as_slice()[skip..skip + len])
    }

    /// The raw descriptor, for `posix_fadvise` and the like.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

/// `statx(STATX_DIOALIGN)`'s offset alignment: `Some(0)` when the file
/// supports no direct I/O, `None` when the kernel does not say.
fn dio_offset_align(file: &File) -> Option<usize> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the duration of the call, the path is
    // a NUL-terminated empty string (AT_EMPTY_PATH: stat the descriptor
    // itself), and `stx` is a valid, writable statx buffer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some(stx.stx_dio_offset_align as usize)
}

/// The logical block size of the block device holding a file, from sysfs
/// (what `BLKSSZGET` returns, without opening the device node).
fn sysfs_logical_block_size(dev: u64) -> Option<usize> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let base = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    // A partition has no queue/ of its own; its parent disk does.
    [base.join("queue"), base.join("../queue")]
        .iter()
        .find_map(|q| {
            std::fs::read_to_string(q.join("logical_block_size"))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
}

/// Says once per process and reason that files fall back to buffered reads.
fn say_once(path: &Path, why: &str) {
    static SAID: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
    if said
        .get_or_insert_with(HashSet::new)
        .insert(why.to_string())
    {
        eprintln!(
            "layer-streamer: {why} ({}); reading with buffered I/O instead",
            path.display()
        );
    }
}
