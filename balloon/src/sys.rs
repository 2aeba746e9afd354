//! The OS calls the balloon makes: giving guest pages back to the host.

use std::os::fd::AsRawFd;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::BalloonError;

/// Gives `[gpa, gpa + len)` of guest RAM back to the host: punches a hole in
/// the backing file where the region is file-backed, then drops the pages
/// from the mapping with `MADV_DONTNEED`, so the next guest access faults in
/// a fresh zero page (anonymous memory) or reads the hole (files).
///
/// The caller checked that the range lies inside one region.
pub(crate) fn discard(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<(), BalloonError> {
    let range = |source| BalloonError::Discard { gpa, len, source };
    let (region, offset_in_region, host, len_usize) = host_range(mem, gpa, len).map_err(range)?;
    if let Some(fo) = region.file_offset() {
        let off = fo
            .start()
            .checked_add(offset_in_region)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| range(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        let flen = libc::off_t::try_from(len)
            .map_err(|_| range(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: fallocate only changes the file behind the region's fd,
        // which stays open for the region's lifetime; the range lies within
        // the region (checked above), so no other data is punched.
        let r = unsafe {
            libc::fallocate(
                fo.file().as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                flen,
            )
        };
        if r != 0 {
            return Err(range(std::io::Error::last_os_error()));
        }
    }
    // SAFETY: `host .. host + len` lies inside the live mapping of `region`
    // (the range was checked against the region above, and `mem` keeps the
    // mapping alive for this call). MADV_DONTNEED only drops page contents,
    // which the balloon protocol allows: the guest gave these pages up.
    let r = unsafe { libc::madvise(host.cast::<libc::c_void>(), len_usize, libc::MADV_DONTNEED) };
    if r != 0 {
        return Err(range(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Checks that `[gpa, gpa + len)` lies inside one region of `mem` and returns
/// that region, the offset in it, the host address and the length.
fn host_range(
    mem: &GuestMemoryMmap,
    gpa: u64,
    len: u64,
) -> Result<(&vm_memory::GuestRegionMmap, u64, *mut u8, usize), std::io::Error> {
    let fault = || std::io::Error::from_raw_os_error(libc::EFAULT);
    let region = mem.find_region(GuestAddress(gpa)).ok_or_else(fault)?;
    let offset_in_region = gpa - region.start_addr().0;
    if offset_in_region
        .checked_add(len)
        .is_none_or(|end| end > region.len())
    {
        return Err(fault());
    }
    let host = mem
        .get_host_address(GuestAddress(gpa))
        .map_err(|_| fault())?;
    let len = usize::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok((region, offset_in_region, host, len))
}

/// Makes `[gpa, gpa + len)` of guest RAM resident and writable now
/// (`MADV_POPULATE_WRITE`): pages already present are left as they are, so
/// this is safe on pages the guest may already be using.
pub(crate) fn populate(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<(), BalloonError> {
    let range = |source| BalloonError::Populate { gpa, len, source };
    let (_, _, host, len) = host_range(mem, gpa, len).map_err(range)?;
    // SAFETY: `host .. host + len` lies inside the live mapping of one region
    // (checked by host_range; `mem` keeps the mapping alive for this call).
    // MADV_POPULATE_WRITE only faults in missing pages (as zero pages for
    // anonymous memory, from the file otherwise) and never changes the
    // contents of a present page.
    let r = unsafe { libc::madvise(host.cast::<libc::c_void>(), len, libc::MADV_POPULATE_WRITE) };
    if r != 0 {
        return Err(range(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Which pages of `[gpa, gpa + len)` are resident in the host mapping
/// (`mincore`), one bool per 4 KiB page; `None` when the range is not inside
/// one region or the call fails. For tests and benchmarks.
pub fn resident_pages(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Option<Vec<bool>> {
    let region = mem.find_region(GuestAddress(gpa))?;
    let end = (gpa - region.start_addr().0).checked_add(len)?;
    if end > region.len() || !gpa.is_multiple_of(4096) {
        return None;
    }
    let host = mem.get_host_address(GuestAddress(gpa)).ok()?;
    let pages = usize::try_from(len.div_ceil(4096)).ok()?;
    let mut vec = vec![0u8; pages];
    // SAFETY: `host .. host + len` lies inside one live mapping (checked
    // above) and `vec` has one byte per page of that range, as mincore needs.
    let r = unsafe {
        libc::mincore(
            host.cast::<libc::c_void>(),
            usize::try_from(len).ok()?,
            vec.as_mut_ptr(),
        )
    };
    (r == 0).then(|| vec.iter().map(|b| b & 1 != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, FileOffset};

    #[test]
    fn discard_zeroes_anonymous_pages_and_punches_file_holes() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        mem.write_slice(&[7u8; 0x3000], GuestAddress(0x1000))
            .unwrap();
        discard(&mem, 0x2000, 0x1000).unwrap();
        let r = resident_pages(&mem, 0x1000, 0x3000).unwrap();
        assert_eq!(r, vec![true, false, true]);
        let v: u64 = mem.read_obj(GuestAddress(0x2000)).unwrap();
        assert_eq!(v, 0);
        let v: u8 = mem.read_obj(GuestAddress(0x1fff)).unwrap();
        assert_eq!(v, 7);

        // File-backed (shared mapping): the hole is punched in the file.
        let file = tempfile::tempfile().unwrap();
        file.set_len(0x10_0000).unwrap();
        let fo = FileOffset::new(file.try_clone().unwrap(), 0);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            0x10_0000,
            Some(fo),
        )])
        .unwrap();
        mem.write_slice(&[9u8; 0x3000], GuestAddress(0x4000))
            .unwrap();
        discard(&mem, 0x5000, 0x1000).unwrap();
        let mut buf = [0xFFu8; 0x3000];
        file.read_exact_at(&mut buf, 0x4000).unwrap();
        assert!(buf[..0x1000].iter().all(|&b| b == 9));
        assert!(buf[0x1000..0x2000].iter().all(|&b| b == 0));
        assert!(buf[0x2000..].iter().all(|&b| b == 9));

        // Ranges outside the region are refused, nothing is discarded.
        assert!(discard(&mem, 0xF_F000, 0x2000).is_err());
        assert!(discard(&mem, u64::MAX - 0xFFF, 0x1000).is_err());
    }
}
