//! The SIGSYS handler: a refused system call names itself and the thread kind on stderr, then
//! the VMM exits with [`DENIED_EXIT_CODE`] (continuing without the call could corrupt the VM).

use std::cell::Cell;

use super::ThreadKind;

/// The VMM's exit status after a refused system call (128 + SIGSYS, as a shell reports it).
pub const DENIED_EXIT_CODE: i32 = 128 + libc::SIGSYS;

thread_local! {
    /// The calling thread's kind (index into `ThreadKind::ALL`), for the message.
    static KIND: Cell<u8> = const { Cell::new(u8::MAX) };
}

/// Records the calling thread's kind for the handler's message.
pub(super) fn set_thread_kind(kind: ThreadKind) {
    let index = ThreadKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
    KIND.with(|k| k.set(index as u8));
}

/// Installs the process-wide SIGSYS handler.
pub(super) fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid starting value; the handler only calls
    // async-signal-safe functions (write, _exit) and reads a const-initialised thread local.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handle_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Offset of `si_syscall` in x86-64's `siginfo_t` for SIGSYS (after signo, errno, code, padding
/// and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn handle_sigsys(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS; si_syscall is an int at offset 24.
    let call = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let kind = KIND
        .try_with(|k| k.get())
        .ok()
        .and_then(|i| ThreadKind::ALL.get(usize::from(i)))
        .map_or("unfiltered", |k| k.name());
    // A refused open names its path: that says at once which code path opened a file.
    let mut path = [0u8; 96];
    let path_len = match i64::from(call) {
        // SAFETY: for SIGSYS the kernel passes the interrupted thread's ucontext; the path
        // register holds the pointer that thread passed to open/openat.
        libc::SYS_open => unsafe { copy_c_string(register(ctx, libc::REG_RDI), &mut path) },
        // SAFETY: as above, openat's path is its second argument.
        libc::SYS_openat => unsafe { copy_c_string(register(ctx, libc::REG_RSI), &mut path) },
        _ => 0,
    };
    let mut message = [0u8; 280];
    let mut len = 0;
    for part in [
        b"vmm: seccomp refused system call ".as_slice(),
        format_decimal(call, &mut [0u8; 12]),
        if path_len > 0 {
            b" (path \"".as_slice()
        } else {
            b""
        },
        &path[..path_len],
        if path_len > 0 { b"\")".as_slice() } else { b"" },
        b" on a ".as_slice(),
        kind.as_bytes(),
        b" thread (--no-seccomp turns the filters off)\n".as_slice(),
    ] {
        let take = part.len().min(message.len() - len);
        message[len..len + take].copy_from_slice(&part[..take]);
        len += take;
    }
    // SAFETY: write and _exit are async-signal-safe; the buffer is valid for `len` bytes.
    unsafe {
        libc::write(2, message.as_ptr().cast(), len);
        libc::_exit(DENIED_EXIT_CODE);
    }
}

/// Register `reg` (`libc::REG_*`) of the interrupted thread.
///
/// # Safety
/// `ctx` must be the `ucontext_t` the kernel passed to a SA_SIGINFO handler.
unsafe fn register(ctx: *mut libc::c_void, reg: libc::c_int) -> usize {
    // SAFETY: the caller guarantees ctx points to a valid ucontext_t; reg indexes gregs.
    unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[reg as usize] as usize }
}

/// Copies the NUL-terminated string at `addr` into `buf` (at most its length); returns the
/// bytes copied. A null address copies nothing.
///
/// # Safety
/// `addr` must be null or point to a readable NUL-terminated string (or at least `buf.len()`
/// readable bytes), as a system call's path argument does.
unsafe fn copy_c_string(addr: usize, buf: &mut [u8]) -> usize {
    if addr == 0 {
        return 0;
    }
    let src = addr as *const u8;
    let mut n = 0;
    while n < buf.len() {
        // SAFETY: within the string or the readable bytes the caller guarantees.
        let byte = unsafe { src.add(n).read() };
        if byte == 0 {
            break;
        }
        buf[n] = byte;
        n += 1;
    }
    n
}

/// Formats `value` in decimal into `buf` without allocating (usable in a signal handler).
fn format_decimal(value: i32, buf: &mut [u8; 12]) -> &[u8] {
    let negative = value < 0;
    let mut rest = value.unsigned_abs();
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if negative {
        start -= 1;
        buf[start] = b'-';
    }
    &buf[start..]
}

#[cfg(test)]
mod tests {
    #[test]
    fn c_strings_are_copied_up_to_the_nul_or_the_buffer() {
        let mut buf = [0u8; 8];
        let text = b"/sys/x\0";
        // SAFETY: a valid NUL-terminated string.
        let n = unsafe { super::copy_c_string(text.as_ptr() as usize, &mut buf) };
        assert_eq!(&buf[..n], b"/sys/x");
        let long = b"/a/very/long/path\0";
        // SAFETY: as above.
        let n = unsafe { super::copy_c_string(long.as_ptr() as usize, &mut buf) };
        assert_eq!(&buf[..n], b"/a/very/");
        // SAFETY: null copies nothing.
        assert_eq!(unsafe { super::copy_c_string(0, &mut buf) }, 0);
    }

    #[test]
    fn decimal_formatting() {
        assert_eq!(super::format_decimal(0, &mut [0; 12]), b"0");
        assert_eq!(super::format_decimal(59, &mut [0; 12]), b"59");
        assert_eq!(
            super::format_decimal(i32::MIN, &mut [0; 12]),
            b"-2147483648"
        );
    }
}
