//! The userfaultfd kernel interface (`include/uapi/linux/userfaultfd.h`), the few calls lazy
//! restore needs: create, `UFFDIO_API`, `UFFDIO_REGISTER` (missing faults), `UFFDIO_COPY`,
//! `UFFDIO_ZEROPAGE`, `UFFDIO_WAKE` and reading events.
//!
//! Written against the kernel ABI directly: the `userfaultfd` crate generates its bindings with
//! bindgen at build time, which needs libclang on every build machine for five ioctls.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

/// `UFFD_API`.
const UFFD_API: u64 = 0xaa;
/// `UFFD_FEATURE_EVENT_REMOVE`: `madvise(MADV_DONTNEED)` on a registered range is an event.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFDIO_REGISTER_MODE_MISSING`.
const REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `_UFFDIO_COPY` / `_UFFDIO_ZEROPAGE` bits of the ioctls a registration allows.
const IOCTL_COPY: u64 = 1 << 0x03;
const IOCTL_ZEROPAGE: u64 = 1 << 0x04;
/// Event codes of `struct uffd_msg`.
const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub(crate) struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: an event code and 24 bytes of arguments.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    arg: [u64; 3],
}

nix::ioctl_readwrite!(uffdio_api, 0xaa, 0x3f, UffdioApi);
nix::ioctl_readwrite!(uffdio_register, 0xaa, 0x00, UffdioRegister);
nix::ioctl_read!(uffdio_wake, 0xaa, 0x02, UffdioRange);
nix::ioctl_readwrite!(uffdio_copy, 0xaa, 0x03, UffdioCopy);
nix::ioctl_readwrite!(uffdio_zeropage, 0xaa, 0x04, UffdioZeropage);

/// What the handler reads from the userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A thread touched a missing page at this host address.
    Pagefault {
        /// The faulting host address (not page aligned).
        addr: u64,
    },
    /// `madvise(MADV_DONTNEED/MADV_REMOVE)` dropped `start..end`: it reads zero from now on.
    Remove {
        /// First host address.
        start: u64,
        /// One past the last.
        end: u64,
    },
    /// `start..end` was unmapped (never expected for guest RAM while the VM lives).
    Unmap {
        /// First host address.
        start: u64,
        /// One past the last.
        end: u64,
    },
    /// An event lazy restore does not ask for (fork, remap).
    Other(u8),
}

/// A userfaultfd (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Opens a userfaultfd that also handles faults from the kernel (KVM reads guest memory
    /// through `get_user_pages`), asking for `features`.
    pub fn new(features: u64) -> Result<Self, Errno> {
        // SAFETY: a plain system call with flags; it returns a new descriptor or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(Errno::last());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: `api` is a valid `struct uffdio_api` the kernel reads and writes.
        unsafe { uffdio_api(fd.as_raw_fd(), &mut api) }?;
        Ok(Self { fd })
    }

    /// Registers `start..start + len` (page aligned, mapped) for missing-page faults; checks
    /// that copy and zero-page are allowed there.
    pub fn register(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: `reg` is a valid `struct uffdio_register`; the kernel checks the range.
        unsafe { uffdio_register(self.fd.as_raw_fd(), &mut reg) }?;
        if reg.ioctls & (IOCTL_COPY | IOCTL_ZEROPAGE) != IOCTL_COPY | IOCTL_ZEROPAGE {
            return Err(Errno::ENOTSUP);
        }
        Ok(())
    }

    /// Fills the missing pages `dst..dst + len` with a copy of `src..src + len` and wakes the
    /// threads waiting there. Returns the bytes copied; `EEXIST` means a page was present.
    ///
    /// # Safety
    ///
    /// `src..src + len` must be readable memory of this process.
    pub unsafe fn copy(&self, dst: u64, src: *const u8, len: u64) -> Result<u64, Errno> {
        let mut copy = UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode: 0,
            copy: 0,
        };
        // SAFETY: `copy` is a valid `struct uffdio_copy`; the caller guarantees the source; the
        // kernel only writes into registered, missing destination pages.
        unsafe { uffdio_copy(self.fd.as_raw_fd(), &mut copy) }?;
        Ok(copy.copy.max(0) as u64)
    }

    /// Maps the zero page at the missing pages `start..start + len` and wakes their waiters.
    pub fn zeropage(&self, start: u64, len: u64) -> Result<u64, Errno> {
        let mut zero = UffdioZeropage {
            range: UffdioRange { start, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: `zero` is a valid `struct uffdio_zeropage`; the kernel checks the range.
        unsafe { uffdio_zeropage(self.fd.as_raw_fd(), &mut zero) }?;
        Ok(zero.zeropage.max(0) as u64)
    }

    /// Wakes the threads waiting on `start..start + len` (their page is present already).
    pub fn wake(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut range = UffdioRange { start, len };
        // SAFETY: `range` is a valid `struct uffdio_range`.
        unsafe { uffdio_wake(self.fd.as_raw_fd(), &mut range) }?;
        Ok(())
    }

    /// Reads the pending events into `out` (cleared first) without blocking.
    pub fn read_events(&self, out: &mut Vec<Event>) -> Result<(), Errno> {
        const BATCH: usize = 64;
        let mut msgs = [UffdMsg::default(); BATCH];
        out.clear();
        let bytes = std::mem::size_of_val(&msgs);
        // SAFETY: `msgs` is a writable buffer of `bytes` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            let errno = Errno::last();
            return if errno == Errno::EAGAIN {
                Ok(())
            } else {
                Err(errno)
            };
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        out.extend(msgs[..count].iter().map(|msg| match msg.event {
            // pagefault: flags, address, thread id.
            EVENT_PAGEFAULT => Event::Pagefault { addr: msg.arg[1] },
            EVENT_REMOVE => Event::Remove {
                start: msg.arg[0],
                end: msg.arg[1],
            },
            EVENT_UNMAP => Event::Unmap {
                start: msg.arg[0],
                end: msg.arg[1],
            },
            other => Event::Other(other),
        }));
        Ok(())
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_structs_have_the_abi_sizes() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<UffdioZeropage>(), 32);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
    }
}
