//! Memory that another domain can change at any moment.
//!
//! All access to shared pages goes through [`SharedMem`]: bounds-checked atomic loads and stores of
//! indices and flags, and copies of ring data. There are no references into shared memory anywhere
//! in the crate (the peer could change what a reference points at, which is undefined behaviour for
//! `&T`). [`Region`] implements the trait over a real mapping and is the one place that holds the
//! `unsafe` code; tests, loom and the fuzzer implement it over their own memory.
//!
//! Offsets passed to these methods are computed by this crate from validated values, never taken
//! from the peer; an out-of-range offset is a bug in this crate and panics with a clear message.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering, fence};

/// Word and byte access to a region of shared memory, as the ring protocol needs it.
///
/// Orderings: loads are `Acquire`, stores `Release`, the read-modify-write operations on notify
/// bytes `SeqCst`, and [`SharedMem::full_fence`] is a `SeqCst` fence (`xen_mb()`).
pub trait SharedMem {
    /// Length of the region in bytes.
    fn len(&self) -> usize;
    /// True if the region has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Loads the little-endian `u32` at `off` (4-aligned) with `Acquire` ordering.
    fn load_u32(&self, off: usize) -> u32;
    /// Stores `val` as a little-endian `u32` at `off` (4-aligned) with `Release` ordering.
    fn store_u32(&self, off: usize, val: u32);
    /// Loads the byte at `off` with `Acquire` ordering.
    fn load_u8(&self, off: usize) -> u8;
    /// Stores the byte at `off` with `Release` ordering.
    fn store_u8(&self, off: usize, val: u8);
    /// Atomically ORs `val` into the byte at `off`; returns the previous value.
    fn fetch_or_u8(&self, off: usize, val: u8) -> u8;
    /// Atomically ANDs `val` into the byte at `off`; returns the previous value.
    fn fetch_and_u8(&self, off: usize, val: u8) -> u8;
    /// Copies `dst.len()` bytes starting at `off` out of the region.
    fn read_bytes(&self, off: usize, dst: &mut [u8]);
    /// Copies `src` into the region starting at `off`.
    fn write_bytes(&self, off: usize, src: &[u8]);
    /// A full (`SeqCst`) memory barrier.
    fn full_fence(&self);
}

/// Something that keeps a mapping alive (and unmaps it when dropped).
pub trait MappingOwner: Send + Sync + 'static {}
impl<T: Send + Sync + 'static> MappingOwner for T {}

/// A window onto mapped shared memory: a pointer, a length and whatever keeps the mapping alive.
///
/// Cloning a region is cheap and keeps the mapping alive; [`Region::sub`] makes a narrower view.
#[derive(Clone)]
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    _owner: Arc<dyn MappingOwner>,
}

// SAFETY: a Region only performs atomic accesses and raw copies on memory that stays mapped while
// `_owner` lives; it never hands out references, so sharing it between threads is sound.
unsafe impl Send for Region {}
// SAFETY: as above; every access method takes `&self` and is race-tolerant by construction.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("ptr", &self.ptr).field("len", &self.len).finish()
    }
}

impl Region {
    /// Wraps `len` bytes of mapped memory at `ptr`, kept mapped by `owner`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be readable and writable (for the parts the caller will write) and stay
    /// mapped for as long as `owner` is alive; `ptr` must be 4-byte aligned.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize, owner: Arc<dyn MappingOwner>) -> Region {
        Region { ptr, len, _owner: owner }
    }

    /// Private, zeroed, page-aligned memory of `len` bytes (for tests and in-process use).
    pub fn anonymous(len: usize) -> Region {
        // u64 words give 8-byte alignment; the memory is only ever touched through atomics and
        // raw copies, never through the Vec after this point.
        let words = len.div_ceil(8).max(1);
        let mut backing: Box<[u64]> = vec![0u64; words].into_boxed_slice();
        let ptr = NonNull::new(backing.as_mut_ptr().cast::<u8>()).unwrap_or(NonNull::dangling());
        let owner: Arc<dyn MappingOwner> = Arc::new(HeapOwner(std::sync::Mutex::new(backing)));
        // SAFETY: `backing` is a live heap allocation of at least `len` bytes, 8-aligned, owned by
        // `owner` (a Box's heap storage does not move when the Box moves).
        unsafe { Region::from_raw(ptr, len, owner) }
    }

    /// A view of `len` bytes starting at `off` within this region.
    ///
    /// # Panics
    /// If the view does not lie inside the region or `off` is not 4-aligned (a bug in the caller).
    pub fn sub(&self, off: usize, len: usize) -> Region {
        assert!(off % 4 == 0, "Region::sub: offset {off} not 4-aligned");
        assert!(off.checked_add(len).is_some_and(|end| end <= self.len), "Region::sub out of range");
        Region {
            // SAFETY: off <= self.len, so the result stays inside (or one past) the mapping.
            ptr: unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(off)) },
            len,
            _owner: self._owner.clone(),
        }
    }

    /// The start address of the region (for diagnostics and for handing to the kernel).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    #[inline]
    fn check(&self, off: usize, n: usize) {
        assert!(
            off.checked_add(n).is_some_and(|end| end <= self.len),
            "shared-memory access {off}+{n} outside region of {} bytes",
            self.len
        );
    }

    #[inline]
    fn atomic_u32(&self, off: usize) -> &AtomicU32 {
        self.check(off, 4);
        assert!(off % 4 == 0, "unaligned u32 access at {off}");
        // SAFETY: in bounds (checked), 4-aligned (region base is 4-aligned, off checked), mapped
        // while `self` lives. AtomicU32 has the layout of u32 and tolerates concurrent access from
        // the peer, which also uses atomic (lock-free, naturally aligned) accesses.
        unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(off).cast::<u32>()) }
    }

    #[inline]
    fn atomic_u8(&self, off: usize) -> &AtomicU8 {
        self.check(off, 1);
        // SAFETY: in bounds (checked) and mapped while `self` lives; any byte is a valid AtomicU8.
        unsafe { AtomicU8::from_ptr(self.ptr.as_ptr().add(off)) }
    }
}

struct HeapOwner(#[allow(dead_code)] std::sync::Mutex<Box<[u64]>>);

impl SharedMem for Region {
    #[inline]
    fn len(&self) -> usize {
        self.len
    }
    #[inline]
    fn load_u32(&self, off: usize) -> u32 {
        u32::from_le(self.atomic_u32(off).load(Ordering::Acquire))
    }
    #[inline]
    fn store_u32(&self, off: usize, val: u32) {
        self.atomic_u32(off).store(val.to_le(), Ordering::Release)
    }
    #[inline]
    fn load_u8(&self, off: usize) -> u8 {
        self.atomic_u8(off).load(Ordering::Acquire)
    }
    #[inline]
    fn store_u8(&self, off: usize, val: u8) {
        self.atomic_u8(off).store(val, Ordering::Release)
    }
    #[inline]
    fn fetch_or_u8(&self, off: usize, val: u8) -> u8 {
        self.atomic_u8(off).fetch_or(val, Ordering::SeqCst)
    }
    #[inline]
    fn fetch_and_u8(&self, off: usize, val: u8) -> u8 {
        self.atomic_u8(off).fetch_and(val, Ordering::SeqCst)
    }
    #[inline]
    fn read_bytes(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len());
        // SAFETY: the source range is in bounds (checked) and mapped; `dst` is our own buffer and
        // cannot overlap shared memory. The peer may write these bytes concurrently: that can only
        // give us arbitrary byte values (every u8 is valid), and the ring protocol orders the copy
        // after the Acquire load of the producer index, so a well-behaved peer never races here.
        // This is the same stance as vm-memory's and libxenvchan's memcpy on guest memory.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) }
    }
    #[inline]
    fn write_bytes(&self, off: usize, src: &[u8]) {
        self.check(off, src.len());
        // SAFETY: destination in bounds (checked) and mapped writable by the owner of this Region;
        // `src` is our own buffer. Concurrent reads by the peer see old or new bytes, both valid.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len()) }
    }
    #[inline]
    fn full_fence(&self) {
        fence(Ordering::SeqCst)
    }
}

/// A live mmap; unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; it is only unmapped in Drop, and
// all access goes through `Region`, which uses atomics and raw copies.
unsafe impl Send for Mapping {}
// SAFETY: as above; `Mapping` itself exposes no access to the memory.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is a mapping this value created and nobody else unmaps; every
        // `Region` pointing into it holds an `Arc` of this owner, so none is left.
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast::<c_void>(), self.len) } {
            tracing::warn!("munmap of {} bytes failed: {e}", self.len);
        }
    }
}

impl Mapping {
    /// Takes ownership of the `len` bytes mapped at `ptr`, which are unmapped on drop (for
    /// backends that build a mapping themselves, e.g. pages placed into one reservation).
    ///
    /// # Safety
    /// `ptr..ptr + len` must be one mapping (or reservation) made with mmap that nothing else
    /// unmaps or uses as anything but shared memory.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize) -> Mapping {
        Mapping { ptr, len }
    }

    /// The first byte of the mapping.
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Wraps the whole mapping as a [`Region`] that also keeps `keep` alive (dropped after the
    /// unmap), e.g. the device the pages were mapped from.
    pub fn into_region_with<T: Send + Sync + 'static>(self, keep: T) -> Region {
        let ptr = self.ptr;
        let len = self.len;
        let owner: Arc<dyn MappingOwner> = Arc::new((self, keep));
        // SAFETY: as in `into_region`: the mapping lives as long as `owner`.
        unsafe { Region::from_raw(ptr, len, owner) }
    }

    /// Wraps the whole mapping as a [`Region`].
    pub fn into_region(self) -> Region {
        let ptr = self.ptr;
        let len = self.len;
        let owner: Arc<dyn MappingOwner> = Arc::new(self);
        // SAFETY: `ptr..ptr+len` is mapped (readable, and writable if it was mapped so) until
        // `owner` drops; mmap returns page-aligned (so 4-aligned) addresses.
        unsafe { Region::from_raw(ptr, len, owner) }
    }
}

/// Maps `len` bytes of `fd` from byte `offset`, shared; writable or read-only.
///
/// The mapping is page-aligned; [`Mapping::into_region`] turns it into a [`Region`]. Besides the
/// grant and event-channel devices, it serves any shared file: the benches map a `memfd` in two
/// processes this way for their raw shared-memory baselines.
///
/// # Errors
/// What `mmap` reports (a bad descriptor, a length of zero, a read-only descriptor mapped
/// writable, ...).
pub fn map_shared(
    fd: impl std::os::fd::AsFd,
    len: usize,
    writable: bool,
    offset: u64,
) -> std::io::Result<Mapping> {
    use rustix::mm::{MapFlags, ProtFlags};
    let prot = if writable { ProtFlags::READ | ProtFlags::WRITE } else { ProtFlags::READ };
    // SAFETY: a fresh mapping chosen by the kernel (no fixed address), so nothing is overwritten.
    let ptr = unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, offset)? };
    let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
    Ok(Mapping { ptr, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_region_roundtrips_words_and_bytes() {
        let r = Region::anonymous(64);
        r.store_u32(4, 0xdead_beef);
        assert_eq!(r.load_u32(4), 0xdead_beef);
        r.store_u8(9, 7);
        assert_eq!(r.fetch_or_u8(9, 0x10), 7);
        assert_eq!(r.fetch_and_u8(9, !0x01), 0x17);
        assert_eq!(r.load_u8(9), 0x16);
        r.write_bytes(16, b"hello");
        let mut out = [0u8; 5];
        r.sub(16, 8).read_bytes(0, &mut out);
        assert_eq!(&out, b"hello");
    }

    #[test]
    #[should_panic(expected = "outside region")]
    fn out_of_range_access_is_a_loud_bug() {
        Region::anonymous(8).load_u32(8);
    }
}
