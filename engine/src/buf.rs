//! An owned, heap-allocated buffer aligned to [`crate::BLOCK_SIZE`].
//!
//! Block data travels in these from the socket to the disk and back. Ownership moves with the
//! request, so a buffer lent to the kernel (io_uring, O_DIRECT) can never be freed or reused by
//! a cancelled future while the kernel still writes into it.

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

const ALIGN_BYTES: usize = crate::BLOCK_SIZE as usize;
/// Single-block buffers kept for reuse per thread (256 KiB). 4 KiB is the common request size,
/// and an aligned allocation is slow in the system allocator (it bypasses the thread cache,
/// and a freed block often returns its page to the kernel, so the next one page-faults).
const POOL_BLOCKS_MAX: usize = 64;

/// Freed single-block allocations of this thread, each valid for `ALIGN_BYTES` initialised
/// bytes with `AlignedBuf::layout(ALIGN_BYTES)`.
struct Pool(Vec<NonNull<u8>>);

impl Drop for Pool {
    fn drop(&mut self) {
        for ptr in self.0.drain(..) {
            // SAFETY: every pooled pointer came from an AlignedBuf of exactly one block, whose
            // ownership passed to the pool; it is freed once, here.
            unsafe { alloc::dealloc(ptr.as_ptr(), AlignedBuf::layout(ALIGN_BYTES)) }
        }
    }
}

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool(Vec::new())) };
}

/// A pooled single-block allocation (initialised, contents stale), if this thread has one.
fn pool_take() -> Option<NonNull<u8>> {
    POOL.try_with(|pool| pool.try_borrow_mut().ok()?.0.pop())
        .ok()
        .flatten()
}

/// Keeps a single-block allocation for reuse; false (the caller frees it) when the pool is
/// full or the thread is exiting.
fn pool_give(ptr: NonNull<u8>) -> bool {
    POOL.try_with(|pool| {
        let Ok(mut pool) = pool.try_borrow_mut() else {
            return false;
        };
        if pool.0.len() >= POOL_BLOCKS_MAX {
            return false;
        }
        pool.0.push(ptr);
        true
    })
    .unwrap_or(false)
}

/// A zero-initialised byte buffer whose start is 4096-aligned and whose capacity is a whole
/// number of 4096-byte blocks. `len` may be anything up to the capacity (reads of any alignment
/// return exactly the bytes asked for).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>; moving it between threads
// moves that ownership, and shared references only give out &[u8].
unsafe impl Send for AlignedBuf {}
// SAFETY: &AlignedBuf only exposes &[u8]; there is no interior mutability.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes, its capacity rounded up to whole blocks.
    pub fn zeroed(len: usize) -> Self {
        let (buf, zeroed) = Self::allocate(len);
        if !zeroed {
            // SAFETY: a pooled allocation is valid for `capacity` (one block) bytes, and we own it.
            unsafe { std::ptr::write_bytes(buf.ptr.as_ptr(), 0, buf.capacity) };
        }
        buf
    }

    /// A buffer of `len` bytes for a read to fill completely: its contents are initialised but
    /// unspecified (zeroes, or bytes an earlier buffer of this thread held), which saves
    /// zeroing a pooled block on the read path. Callers never hand its contents out unless
    /// the read succeeded in full (a short read is an error, never success).
    pub(crate) fn for_overwrite(len: usize) -> Self {
        Self::allocate(len).0
    }

    /// A buffer of `len` bytes whose contents are initialised but unspecified: zeroes (`true`)
    /// or what a previous buffer of this thread held (`false`).
    fn allocate(len: usize) -> (Self, bool) {
        let capacity = len.div_ceil(ALIGN_BYTES).max(1) * ALIGN_BYTES;
        if capacity == ALIGN_BYTES {
            if let Some(ptr) = pool_take() {
                return (AlignedBuf { ptr, len, capacity }, false);
            }
        }
        let layout = Self::layout(capacity);
        // SAFETY: layout has a non-zero size (capacity >= ALIGN_BYTES) and a power-of-two align.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        (AlignedBuf { ptr, len, capacity }, true)
    }

    /// A buffer holding a copy of `data` (the rest of its capacity zeroed).
    pub fn from_slice(data: &[u8]) -> Self {
        let (mut buf, _) = Self::allocate(data.len());
        buf.copy_from_slice(data);
        let tail = buf.capacity - data.len();
        // SAFETY: `[len, capacity)` lies inside the allocation, which we own.
        unsafe { std::ptr::write_bytes(buf.ptr.as_ptr().add(data.len()), 0, tail) };
        buf
    }

    fn layout(capacity: usize) -> Layout {
        // The only failure is a size that overflows isize when rounded, which no request reaches
        // because REQUEST_BYTES_MAX bounds every allocation made from network input.
        Layout::from_size_align(capacity, ALIGN_BYTES).expect("buffer size overflows isize")
    }

    /// Bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no bytes are in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated bytes (a multiple of 4096).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes the length within the capacity; new bytes keep whatever the buffer held.
    ///
    /// # Panics
    /// If `len` exceeds the capacity (a programming error, never input-driven).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "set_len {len} beyond capacity {}",
            self.capacity
        );
        self.len = len;
    }

    /// Raw pointer for handing to the kernel; valid for `capacity()` bytes while `self` lives.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Raw mutable pointer for handing to the kernel; valid for `capacity()` bytes.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for capacity >= len initialised (zeroed at allocation, written
        // only through this type since) bytes, and
        // we hold it exclusively for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees no other reference to the bytes exists.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.capacity == ALIGN_BYTES && pool_give(self.ptr) {
            return;
        }
        // SAFETY: ptr was allocated by alloc_zeroed with exactly this layout and is freed once
        // (a pooled one is freed by the pool instead).
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}
impl Eq for AlignedBuf {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_rounded() {
        let b = AlignedBuf::zeroed(5000);
        assert_eq!(b.as_ptr() as usize % ALIGN_BYTES, 0);
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.len(), 5000);
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn empty_buffer_still_aligned() {
        let b = AlignedBuf::zeroed(0);
        assert!(b.is_empty());
        assert_eq!(b.capacity(), ALIGN_BYTES);
    }

    /// A reused single-block allocation comes back zeroed from `zeroed` and with a zeroed tail
    /// from `from_slice`, never with a previous buffer's bytes.
    #[test]
    fn pooled_buffers_never_leak_old_contents() {
        let mut a = AlignedBuf::zeroed(4096);
        a.fill(0xAB);
        drop(a);
        let b = AlignedBuf::zeroed(4096);
        assert!(b.iter().all(|&x| x == 0));
        let mut c = b;
        c.fill(0xCD);
        drop(c);
        let mut d = AlignedBuf::from_slice(b"xy");
        assert_eq!(&d[..], b"xy");
        d.set_len(4096);
        assert!(d[2..].iter().all(|&x| x == 0));
    }

    #[test]
    fn from_slice_round_trips() {
        let b = AlignedBuf::from_slice(b"stretch");
        assert_eq!(&b[..], b"stretch");
        assert_eq!(b.clone(), b);
    }
}
