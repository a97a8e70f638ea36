//! The filters refuse what a thread kind must not do and allow what it needs; each check runs
//! in a forked child so a refused call (which ends the process) does not end the test runner.

use super::*;

/// Forks; the child installs `kind`'s filter (compiled before the fork, so the child does not
/// allocate), runs `call` and exits 0. Returns the child's wait status.
fn run_filtered(kind: ThreadKind, call: fn()) -> nix::sys::wait::WaitStatus {
    sigsys::install_handler().expect("SIGSYS handler");
    let program = compile(kind).expect("filter compiles");
    // SAFETY: the child only installs the filter (prctl, seccomp), makes `call`'s raw system
    // calls and exits with _exit: no locks or allocation after fork.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            let code = match apply(kind, &program) {
                Ok(()) => {
                    call();
                    0
                }
                Err(_) => 2,
            };
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            nix::sys::wait::waitpid(child, None).expect("waitpid")
        }
    }
}

fn exited(code: i32) -> impl Fn(nix::sys::wait::WaitStatus) -> bool {
    move |status| matches!(status, nix::sys::wait::WaitStatus::Exited(_, c) if c == code)
}

fn inet_socket() {
    // SAFETY: socket has no memory arguments; the descriptor (if any) is closed by _exit.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
}

fn unix_socket() {
    // SAFETY: as above.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        // SAFETY: _exit ends the child.
        unsafe { libc::_exit(3) }
    }
}

fn exec_true() {
    let path = c"/bin/true";
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: NUL-terminated path, argv and envp arrays.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
}

fn kvm_check_extension_ioctl_on_stdin() {
    // KVM_CHECK_EXTENSION on a non-KVM descriptor: allowed by the filter, refused by the kernel.
    // SAFETY: an ioctl with an integer argument.
    unsafe { libc::ioctl(0, 0xAE03, 0) };
}

fn terminal_ioctl() {
    // SAFETY: winsize is plain integers; all zeros is valid.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into `size`.
    unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut size) };
}

#[test]
fn every_kind_compiles() {
    for kind in ThreadKind::ALL {
        let program = compile(kind).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        assert!(!program.is_empty());
    }
}

#[test]
fn vcpu_threads_cannot_open_inet_sockets_but_can_open_unix_ones() {
    assert!(exited(DENIED_EXIT_CODE)(run_filtered(
        ThreadKind::Vcpu,
        inet_socket
    )));
    assert!(exited(0)(run_filtered(ThreadKind::Vcpu, unix_socket)));
}

#[test]
fn no_thread_kind_may_exec() {
    for kind in ThreadKind::ALL {
        let status = run_filtered(kind, exec_true);
        assert!(exited(DENIED_EXIT_CODE)(status), "{kind:?}: {status:?}");
    }
}

#[test]
fn vcpu_threads_may_make_kvm_ioctls_but_not_terminal_ones() {
    assert!(exited(0)(run_filtered(
        ThreadKind::Vcpu,
        kvm_check_extension_ioctl_on_stdin
    )));
    assert!(exited(DENIED_EXIT_CODE)(run_filtered(
        ThreadKind::Vcpu,
        terminal_ioctl
    )));
}

#[test]
fn helper_threads_cannot_make_kvm_ioctls() {
    let status = run_filtered(ThreadKind::Helper, kvm_check_extension_ioctl_on_stdin);
    assert!(exited(DENIED_EXIT_CODE)(status), "{status:?}");
}

#[test]
fn unfiltered_children_run_the_same_calls() {
    // The checks above fail because of the filter, not because the calls fail anyway.
    // SAFETY: the child makes raw system calls and leaves with _exit.
    let status = match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            inet_socket();
            terminal_ioctl();
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => nix::sys::wait::waitpid(child, None).unwrap(),
    };
    assert!(exited(0)(status));
}

#[test]
fn dirty_log_ioctl_number_matches_kvm() {
    let size = std::mem::size_of::<kvm_bindings::kvm_dirty_log>() as u64;
    assert_eq!(common::KVM_GET_DIRTY_LOG, (1 << 30) | (size << 16) | 0xAE42);
}

fn get_dirty_log_on_stdin() {
    // SAFETY: on a non-KVM descriptor the kernel refuses the ioctl before reading the argument.
    unsafe { libc::ioctl(0, common::KVM_GET_DIRTY_LOG, std::ptr::null_mut::<u8>()) };
}

fn kvm_run_on_stdin() {
    // SAFETY: KVM_RUN takes no argument; on a non-KVM descriptor it fails.
    unsafe { libc::ioctl(0, 0xAE80, 0) };
}

#[test]
fn workers_and_api_threads_may_sync_the_dirty_log_but_not_run_vcpus() {
    for kind in [ThreadKind::Worker, ThreadKind::Api] {
        let status = run_filtered(kind, get_dirty_log_on_stdin);
        assert!(exited(0)(status), "{kind:?}: {status:?}");
        let status = run_filtered(kind, kvm_run_on_stdin);
        assert!(exited(DENIED_EXIT_CODE)(status), "{kind:?}: {status:?}");
    }
}

#[test]
fn each_kind_has_its_own_compiled_filter_slot() {
    for (i, kind) in ThreadKind::ALL.into_iter().enumerate() {
        assert_eq!(kind as usize, i, "{kind:?}");
        let once = compiled(kind).expect("filter compiles");
        assert_eq!(once, &compile(kind).unwrap(), "{kind:?}");
        assert!(
            std::ptr::eq(once, compiled(kind).unwrap()),
            "{kind:?}: compiled twice"
        );
    }
}
