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
    _ctx: *mut libc::c_void,
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
    let mut message = [0u8; 160];
    let mut len = 0;
    for part in [
        b"vmm: seccomp refused system call ".as_slice(),
        format_decimal(call, &mut [0u8; 12]),
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
    fn decimal_formatting() {
        assert_eq!(super::format_decimal(0, &mut [0; 12]), b"0");
        assert_eq!(super::format_decimal(59, &mut [0; 12]), b"59");
        assert_eq!(
            super::format_decimal(i32::MIN, &mut [0; 12]),
            b"-2147483648"
        );
    }
}
