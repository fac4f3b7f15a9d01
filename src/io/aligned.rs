//! Page-aligned host memory owned by an anonymous mapping.

use memmap2::MmapMut;

use super::PAGE;
use crate::{Error, Result};

/// Page-aligned memory owned by the buffer (an anonymous private mapping),
/// zero-initialised, its length a multiple of [`PAGE`].
///
/// The mapping gives page alignment without a custom allocator layout, and the
/// kernel hands out zeroed pages lazily, so a large buffer costs nothing until
/// it is written. `Send + Sync` like any owned byte buffer.
pub struct AlignedBuf {
    /// `None` for a zero-length buffer (an empty mapping is not allowed).
    map: Option<MmapMut>,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes rounded up to a multiple of [`PAGE`].
    pub fn new(len: usize) -> Result<AlignedBuf> {
        if len == 0 {
            return Ok(AlignedBuf { map: None });
        }
        let rounded = len
            .checked_add(PAGE - 1)
            .map(|x| x & !(PAGE - 1))
            .ok_or_else(|| limit_error(len as u64, "the length overflows"))?;
        let map = MmapMut::map_anon(rounded)
            .map_err(|e| limit_error(rounded as u64, &format!("mmap failed: {e}")))?;
        debug_assert_eq!(map.as_ptr() as usize % PAGE, 0);
        Ok(AlignedBuf { map: Some(map) })
    }

    /// Length in bytes (a multiple of [`PAGE`]).
    pub fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.len())
    }

    /// Whether the buffer has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Start of the buffer (page-aligned; dangling but aligned when empty).
    pub fn as_ptr(&self) -> *const u8 {
        match &self.map {
            Some(m) => m.as_ptr(),
            None => std::ptr::NonNull::<PageAligned>::dangling().as_ptr().cast(),
        }
    }

    /// Mutable start of the buffer (page-aligned; dangling but aligned when empty).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        match &mut self.map {
            Some(m) => m.as_mut_ptr(),
            None => std::ptr::NonNull::<PageAligned>::dangling().as_ptr().cast(),
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().unwrap_or(&mut [])
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("ptr", &self.as_ptr())
            .field("len", &self.len())
            .finish()
    }
}

/// A zero-sized type with page alignment: its dangling pointer is page-aligned.
#[repr(align(4096))]
struct PageAligned;

fn limit_error(asked: u64, why: &str) -> Error {
    Error::Limit {
        what: "host memory (anonymous mapping)".into(),
        asked,
        available: crate::host_memory::mem_available().unwrap_or(0),
        hint: why.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_aligns_and_zeroes() {
        let mut b = AlignedBuf::new(5000).unwrap();
        assert_eq!(b.len(), 2 * PAGE);
        assert_eq!(b.as_ptr() as usize % PAGE, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[4999] = 7;
        assert_eq!(b.as_slice()[4999], 7);
        let e = AlignedBuf::new(0).unwrap();
        assert!(e.is_empty() && e.as_slice().is_empty());
        assert_eq!(e.as_ptr() as usize % PAGE, 0);
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<AlignedBuf>();
    }
}
