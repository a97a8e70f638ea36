//! Background population of a restored clone's file-backed memory.
//!
//! Right after the memory file is mapped, one thread asks the kernel
//! (`madvise(MADV_POPULATE_READ)`, Linux 5.14+) to map every kept page read-only from the page
//! cache, while the VMM sets up and the vCPUs start. The guest's first touches then find the
//! host page tables filled: only KVM's nested page tables are built on a fault, not a host
//! page fault on the file mapping as well. Nothing is copied: the pages stay shared with the
//! page cache (and with other clones) until the guest writes one (copy-on-write as before).
//!
//! Why: the suite showed a clone's first request (re-reading its 32 MiB hot set) 3-5x slower
//! than QEMU's, whose `-incoming` reads all memory in before the guest runs; the restore
//! timeline put the time in the clone's first touches, one host fault each.
//!
//! Opt-in (`vmm restore --prefault`), because measured in the nested rig (one vCPU, loaded
//! host; `bench suite --only ours [--prefault]`, the same hour) it did not pay: with no spare
//! CPU the thread competes with the VMM's set-up and the vCPUs (untrimmed: vCPUs running 407
//! vs 307 ms, first answer 1510 vs 1270 ms, first request 3079 vs 2670 ms), and the clone's
//! RSS counts every kept page it maps (511 vs 71 MiB; shared page cache, but charged to it).
//! A host with idle cores may see the opposite; measure there.

use std::thread::JoinHandle;
use std::time::Instant;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Most bytes asked for in one `madvise` call, so that the thread yields the mmap lock often
/// (vCPU faults take it too).
const STEP_BYTES: usize = 16 << 20;

/// One host range to populate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRange {
    /// Host virtual address.
    pub addr: usize,
    /// Length in bytes.
    pub len: usize,
}

/// The host ranges backing guest ranges `(gpa, len_bytes)`, adjacent ones merged; ranges
/// outside guest memory or across regions are left out (the mapping step has already refused
/// those).
pub fn host_ranges(
    mem: &GuestMemoryMmap,
    guest: impl IntoIterator<Item = (u64, u64)>,
) -> Vec<HostRange> {
    let mut out: Vec<HostRange> = Vec::new();
    for (gpa, len) in guest {
        let Some(region) = mem
            .find_region(GuestAddress(gpa))
            .filter(|r| gpa.saturating_add(len) <= r.start_addr().0 + r.len())
        else {
            continue;
        };
        let Ok(host) =
            region.get_host_address(vm_memory::MemoryRegionAddress(gpa - region.start_addr().0))
        else {
            continue;
        };
        let range = HostRange {
            addr: host as usize,
            len: len as usize,
        };
        match out.last_mut() {
            Some(last) if last.addr + last.len == range.addr => last.len += range.len,
            _ => out.push(range),
        }
    }
    out
}

/// Starts thread `name` populating `ranges`; it ends when done, at the first refusal (a kernel
/// without `MADV_POPULATE_READ`, a range unmapped meanwhile), or never touches anything if
/// `ranges` is empty. `done` gets the outcome and the time taken, ms. The thread runs under
/// the helper threads' seccomp filter.
pub fn spawn(
    ranges: Vec<HostRange>,
    name: &str,
    done: impl FnOnce(std::io::Result<()>, f64) + Send + 'static,
) -> Option<JoinHandle<()>> {
    if ranges.is_empty() {
        return None;
    }
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Helper);
            let t0 = Instant::now();
            let result = populate(&ranges);
            done(result, t0.elapsed().as_secs_f64() * 1e3);
        })
        .map_err(|e| tracing::warn!("cannot start the {name} thread: {e}"))
        .ok()
}

/// [`spawn`] for `vmm restore --prefault`: every kept page.
pub fn spawn_all(ranges: Vec<HostRange>) -> Option<JoinHandle<()>> {
    let bytes: usize = ranges.iter().map(|r| r.len).sum();
    spawn(ranges, "prefault", move |result, ms| match result {
        Ok(()) => tracing::debug!(bytes, ms, "guest memory populated from the memory file"),
        Err(e) => tracing::debug!(
            error = %e,
            "populating guest memory stopped (the guest faults pages in itself)"
        ),
    })
}

/// Populates `ranges` read-only, in steps of [`STEP_BYTES`].
pub fn populate(ranges: &[HostRange]) -> std::io::Result<()> {
    for r in ranges {
        let mut done = 0;
        while done < r.len {
            let step = STEP_BYTES.min(r.len - done);
            // SAFETY: madvise only asks the kernel to fill page tables of this process for the
            // range; it neither reads nor writes memory from Rust, and on a range that is no
            // longer mapped (the VM shut down meanwhile) it fails with ENOMEM, nothing else.
            let rc = unsafe {
                libc::madvise(
                    (r.addr + done) as *mut libc::c_void,
                    step,
                    libc::MADV_POPULATE_READ,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            done += step;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_populate_a_private_file_mapping() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(4 << 20), 1 << 20),
        ])
        .unwrap();
        let r = host_ranges(
            &mem,
            [
                (0, 4096),
                (4096, 8192),
                (64 << 10, 4096),
                (4 << 20, 4096),
                (8 << 20, 4096),
                ((1 << 20) - 4096, 8192),
            ],
        );
        assert_eq!(r.len(), 3, "{r:?}");
        assert_eq!(r[0].len, 12288);
        assert_eq!(r[1].len, 4096);

        // A real private file mapping: populated pages become resident without being written.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a fresh private read-only mapping of a 1 MiB file, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                1 << 20,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let minor_faults = || {
            // SAFETY: getrusage fills the zeroed struct it is given.
            let mut u: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: as above; RUSAGE_THREAD counts this thread's faults only.
            assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
            u.ru_minflt
        };
        populate(&[HostRange {
            addr: addr as usize,
            len: 1 << 20,
        }])
        .unwrap();
        let before = minor_faults();
        let mut sum = 0u64;
        for page in 0..256 {
            // SAFETY: reads one byte of each page of the live 1 MiB read-only mapping.
            sum +=
                u64::from(unsafe { std::ptr::read_volatile((addr as *const u8).add(page * 4096)) });
        }
        assert_eq!(sum, 7 * 256);
        assert!(
            minor_faults() - before <= 1,
            "populated pages faulted again: {}",
            minor_faults() - before
        );
        // An unmapped range is an error, not a crash.
        // SAFETY: unmaps the mapping made above; nothing refers to it any more.
        unsafe { libc::munmap(addr, 1 << 20) };
        assert!(populate(&[HostRange {
            addr: addr as usize,
            len: 1 << 20
        }])
        .is_err());
    }
}
