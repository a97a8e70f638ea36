//! Test loads for the trim scenarios and benchmarks (hidden `guest-trimmer workload ...`):
//! read files once (cold page cache), re-read files in a loop (hot page cache), hold live
//! anonymous data with a hash to verify later, a "runtime" holding a heap cache it releases on a
//! hook, and a page cache residency probe (mincore).
//!
//! Each prints one `WORKLOAD-...` line per event on stdout for the console-watching tests.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;
const POLL: Duration = Duration::from_millis(20);

/// Errors of the workloads, naming the operation and path.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// A file operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// Operation.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WorkloadError {
    let path = path.to_path_buf();
    move |source| WorkloadError::Io { what, path, source }
}

/// Regular files below `dir`, sorted.
pub fn files_below(dir: &Path) -> Result<Vec<PathBuf>, WorkloadError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io("list", &d))? {
            let entry = entry.map_err(io("list", &d))?;
            let ty = entry.file_type().map_err(io("stat", &entry.path()))?;
            if ty.is_dir() {
                stack.push(entry.path());
            } else if ty.is_file() {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Reads every file once; returns the bytes read.
pub fn read_all(files: &[PathBuf]) -> Result<u64, WorkloadError> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    for f in files {
        let mut file = File::open(f).map_err(io("open", f))?;
        loop {
            let n = file.read(&mut buf).map_err(io("read", f))?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok(total)
}

/// `workload cold-read`: reads the files below `dir` once.
pub fn cold_read(dir: &Path) -> Result<(), WorkloadError> {
    let total = read_all(&files_below(dir)?)?;
    println!("WORKLOAD-COLD-READ {}", total >> 10);
    Ok(())
}

/// `workload hot-loop`: re-reads the files below `dir` until `until_file` exists (or forever).
pub fn hot_loop(dir: &Path, until_file: Option<&Path>) -> Result<(), WorkloadError> {
    let files = files_below(dir)?;
    let mut passes = 0u64;
    loop {
        let total = read_all(&files)?;
        passes += 1;
        if passes == 1 {
            println!("WORKLOAD-HOT-LOOP {}", total >> 10);
            let _ = std::io::stdout().flush();
        }
        if until_file.is_some_and(Path::exists) {
            println!("WORKLOAD-HOT-LOOP-DONE {passes}");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `dir/runtime.json`: a before-snapshot hook that sends `trim` to `socket` and expects
/// `ok` (see `policies::registered`). Written under a temporary name and renamed, so the
/// trimmer never reads half a file.
fn register_release_hook(dir: &Path, socket: &Path) -> Result<(), WorkloadError> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let reg = serde_json::json!({"before_snapshot": {
        "name": "runtime-release", "unix_socket": socket, "message": "trim\n",
        "expect_reply": "ok", "timeout_ms": 10000}});
    let tmp = dir.join(".runtime.json.tmp");
    std::fs::write(&tmp, reg.to_string()).map_err(io("write", &tmp))?;
    let path = dir.join("runtime.json");
    std::fs::rename(&tmp, &path).map_err(io("rename to", &path))
}

/// Fills `words` with a xorshift sequence from `seed`.
fn fill(words: &mut [u64], mut seed: u64) {
    for w in words.iter_mut() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        *w = seed;
    }
}

/// FNV-1a over the words (enough to notice any changed page).
pub fn hash_words(words: &[u64]) -> u64 {
    words.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, w| {
        (h ^ w).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `workload live-anon`: holds `mib` MiB of pseudo-random anonymous data; whenever
/// `check_file` appears, verifies the hash, prints the result and removes the file.
pub fn live_anon(mib: usize, check_file: &Path) -> Result<(), WorkloadError> {
    let mut words = vec![0u64; mib * MIB / 8];
    fill(&mut words, 0x9e37_79b9_7f4a_7c15);
    let hash = hash_words(&words);
    println!("WORKLOAD-LIVE-ANON {mib} {hash:016x}");
    let _ = std::io::stdout().flush();
    loop {
        if check_file.exists() {
            let now = hash_words(&words);
            let verdict = if now == hash { "ok" } else { "bad" };
            println!("WORKLOAD-LIVE-ANON-CHECK {verdict} {now:016x}");
            let _ = std::io::stdout().flush();
            let _ = std::fs::remove_file(check_file);
        }
        std::thread::sleep(POLL);
    }
}

static RELEASE_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    RELEASE_REQUESTED.store(true, Ordering::SeqCst);
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// `workload runtime`: a process with a `mib` MiB heap cache (64 KiB blocks interleaved with
/// small live objects, so freeing the cache leaves holes only `malloc_trim` returns) that it
/// releases on SIGUSR1 or a `trim` line on `socket` (answered `ok`). Writes its pid to
/// `pid_file`.
pub fn runtime(
    mib: usize,
    pid_file: &Path,
    socket: &Path,
    register_hook_in: Option<&Path>,
) -> Result<(), WorkloadError> {
    const BLOCK: usize = 64 * 1024;
    // SAFETY: installs an async-signal-safe handler (one atomic store) for SIGUSR1.
    unsafe { libc::signal(libc::SIGUSR1, on_sigusr1 as *const () as libc::sighandler_t) };
    let mut cache: Vec<Vec<u8>> = Vec::new();
    let mut live: Vec<Vec<u8>> = Vec::new();
    for i in 0..mib * MIB / BLOCK {
        let mut b = vec![0u8; BLOCK];
        for (j, chunk) in b.chunks_mut(PAGE).enumerate() {
            chunk[0] = (i + j) as u8 | 1;
        }
        cache.push(b);
        live.push(vec![i as u8; 64]);
    }
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(io("bind", socket))?;
    listener
        .set_nonblocking(true)
        .map_err(io("set non-blocking", socket))?;
    std::fs::write(pid_file, format!("{}\n", std::process::id())).map_err(io("write", pid_file))?;
    if let Some(dir) = register_hook_in {
        register_release_hook(dir, socket)?;
    }
    println!("WORKLOAD-RUNTIME-READY {mib} {}", rss_kib());
    let _ = std::io::stdout().flush();
    let mut released = false;
    loop {
        let mut client = None;
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                if BufReader::new(&stream).read_line(&mut line).is_ok() && line.trim() == "trim" {
                    RELEASE_REQUESTED.store(true, Ordering::SeqCst);
                    client = Some(stream);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(io("accept on", socket)(e)),
        }
        if RELEASE_REQUESTED.swap(false, Ordering::SeqCst) {
            let before = rss_kib();
            if !released {
                cache = Vec::new();
                // SAFETY: malloc_trim only returns free heap memory to the kernel.
                unsafe { libc::malloc_trim(0) };
                released = true;
            }
            println!("WORKLOAD-RUNTIME-RELEASED {mib} {before} {}", rss_kib());
            let _ = std::io::stdout().flush();
            if let Some(mut c) = client {
                let _ = c.write_all(b"ok\n");
            }
        }
        std::hint::black_box((&cache, &live));
        std::thread::sleep(POLL);
    }
}

/// Page cache residency of `files`: (resident KiB, total KiB), from mincore(2).
pub fn residency(files: &[PathBuf]) -> Result<(u64, u64), WorkloadError> {
    let (mut resident, mut total) = (0u64, 0u64);
    for f in files {
        let file = File::open(f).map_err(io("open", f))?;
        let len = file.metadata().map_err(io("stat", f))?.len() as usize;
        if len == 0 {
            continue;
        }
        let pages = len.div_ceil(PAGE);
        total += (pages * 4) as u64;
        // SAFETY: a fresh read-only shared mapping of the whole file; it is only passed to
        // mincore and unmapped below, never dereferenced.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io("mmap", f)(std::io::Error::last_os_error()));
        }
        let mut vec = vec![0u8; pages];
        // SAFETY: addr/len is the mapping made above; vec holds one byte per page.
        let rc = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
        let err = std::io::Error::last_os_error();
        // SAFETY: unmaps exactly the mapping made above.
        unsafe { libc::munmap(addr, len) };
        if rc != 0 {
            return Err(io("mincore", f)(err));
        }
        resident += vec.iter().filter(|b| **b & 1 == 1).count() as u64 * 4;
    }
    Ok((resident, total))
}

/// `workload mincore`: prints `WORKLOAD-MINCORE <label> <resident_kib> <total_kib>`.
pub fn mincore(dir: &Path, label: &str) -> Result<(), WorkloadError> {
    let (resident, total) = residency(&files_below(dir)?)?;
    println!("WORKLOAD-MINCORE {label} {resident} {total}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_registers_a_hook_every_policy_runs() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = dir.path().join("hooks.d");
        register_release_hook(&hooks, Path::new("/run/rt.sock")).unwrap();
        let regs = policies::registered::load_dir(&hooks);
        assert_eq!(regs.len(), 1);
        let hook = regs[0].1.as_ref().unwrap().before_snapshot.clone().unwrap();
        assert_eq!(hook.name, "runtime-release");
        assert_eq!(
            hook.action,
            policies::HookAction::UnixSocket {
                path: "/run/rt.sock".into(),
                message: "trim\n".into(),
                expect_reply: Some("ok".into()),
            }
        );
    }

    #[test]
    fn files_reads_and_residency() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 3 * PAGE]).unwrap();
        std::fs::write(dir.path().join("sub/b"), vec![2u8; PAGE + 1]).unwrap();
        std::fs::write(dir.path().join("empty"), b"").unwrap();
        let files = files_below(dir.path()).unwrap();
        assert_eq!(files.len(), 3);
        assert_eq!(read_all(&files).unwrap(), (4 * PAGE + 1) as u64);
        let (resident, total) = residency(&files).unwrap();
        assert_eq!(total, 5 * 4);
        // Just written and read: resident (tmpfs or page cache).
        assert!(resident <= total && resident > 0);
        let err = files_below(&dir.path().join("nope")).unwrap_err();
        assert!(err.to_string().starts_with("list "), "{err}");
    }

    #[test]
    fn hash_sees_every_word() {
        let mut w = vec![0u64; 1024];
        fill(&mut w, 7);
        let h = hash_words(&w);
        w[1000] ^= 1;
        assert_ne!(h, hash_words(&w));
    }
}
