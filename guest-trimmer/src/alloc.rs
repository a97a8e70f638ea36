//! `guest-trimmer alloc`: allocate anonymous memory, write every page, hold it, free it.
//!
//! A load generator for balloon and free-page-reporting tests: the host watches the console
//! for `ALLOC-DONE <mib>` (every page is written and resident) and `ALLOC-FREED` (the memory
//! went back to the guest kernel with munmap).
//!
//! The memory is one allocation: glibc's malloc serves it with its own private anonymous mmap
//! (anything above the mmap threshold, 128 KiB in a fresh process) and frees it with munmap,
//! so the pages go back to the guest kernel at once. One mapping also lets the kernel's
//! overcommit check refuse a request larger than the guest's RAM, which is reported
//! (`try_reserve_exact`), never an abort; the guest's OOM killer can still kill the process
//! while it writes the pages, which the caller sees as signal 9.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

/// Printed (with the MiB count) once every page is written.
pub const DONE_MARKER: &str = "ALLOC-DONE";
/// Printed once the memory is freed.
pub const FREED_MARKER: &str = "ALLOC-FREED";

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE / 8;
/// How often `--until-file` looks for its file.
const POLL: Duration = Duration::from_millis(100);

/// What to write into the pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    /// Zeros: pages are resident but read as zero (a host could deduplicate them).
    Zero,
    /// Pseudo-random bytes: nothing can dedupe or compress them.
    Random,
}

/// Arguments of `guest-trimmer alloc`.
#[derive(Debug, Clone, Args)]
pub struct AllocArgs {
    /// MiB of anonymous memory to allocate and write.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub mib: u64,
    /// Hold the memory this many seconds before freeing it (default 0).
    #[arg(long, conflicts_with = "until_file", value_parser = parse_seconds)]
    pub hold_s: Option<f64>,
    /// Hold the memory until this file exists.
    #[arg(long)]
    pub until_file: Option<PathBuf>,
    /// What to write into every page.
    #[arg(long, value_enum, default_value_t = Pattern::Random)]
    pub pattern: Pattern,
    /// Write one word per page instead of whole pages (faster; pages still become resident).
    #[arg(long)]
    pub touch_only: bool,
}

/// How long to hold the memory.
#[derive(Debug, Clone, PartialEq)]
pub enum Hold {
    /// A fixed time.
    For(Duration),
    /// Until the file exists.
    UntilFile(PathBuf),
}

impl AllocArgs {
    /// The hold policy the arguments ask for.
    pub fn hold(&self) -> Hold {
        match (&self.until_file, self.hold_s) {
            (Some(path), _) => Hold::UntilFile(path.clone()),
            (None, s) => Hold::For(Duration::from_secs_f64(s.unwrap_or(0.0))),
        }
    }
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || !(0.0..=86_400.0).contains(&v) {
        return Err(format!("{s} s is outside 0..=86400"));
    }
    Ok(v)
}

/// Errors of `alloc`.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// The allocator (the kernel's mmap) refused the memory.
    #[error("cannot allocate {mib} MiB of anonymous memory")]
    Allocate {
        /// Requested MiB.
        mib: u64,
        /// The allocator's error.
        #[source]
        source: std::collections::TryReserveError,
    },
    /// Writing to stdout failed.
    #[error("writing to stdout")]
    Stdout(#[source] std::io::Error),
}

/// xorshift64*: fast, and good enough that no page repeats.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Allocates `words` words and writes their pages; the words stay `MaybeUninit` (never read), the
/// vector keeps the mapping alive until dropped.
fn fill(
    words: usize,
    args: &AllocArgs,
    rng: &mut Rng,
) -> Result<Vec<u64>, std::collections::TryReserveError> {
    let mut v: Vec<u64> = Vec::new();
    v.try_reserve_exact(words)?;
    let spare = &mut v.spare_capacity_mut()[..words];
    let value = |rng: &mut Rng| match args.pattern {
        Pattern::Zero => 0,
        // Never zero, so even --touch-only pages are not zero pages.
        Pattern::Random => rng.next() | 1,
    };
    if args.touch_only {
        for page in spare.chunks_mut(WORDS_PER_PAGE) {
            page[0].write(value(rng));
        }
    } else {
        for w in spare.iter_mut() {
            w.write(value(rng));
        }
    }
    // Keep the stores: the compiler must assume the memory is read.
    std::hint::black_box(&mut v);
    Ok(v)
}

/// Runs `alloc`: allocate, write, print [`DONE_MARKER`], hold, free, print [`FREED_MARKER`].
pub fn run(args: &AllocArgs) -> Result<(), AllocError> {
    let t0 = Instant::now();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()));
    let words = usize::try_from(args.mib)
        .ok()
        .and_then(|m| m.checked_mul(MIB / 8))
        .unwrap_or(usize::MAX);
    let held = fill(words, args, &mut rng).map_err(|source| AllocError::Allocate {
        mib: args.mib,
        source,
    })?;
    let write_ms = t0.elapsed().as_millis();
    tracing::info!(mib = args.mib, write_ms, pattern = ?args.pattern, touch_only = args.touch_only, "allocated and written");
    let mut out = std::io::stdout().lock();
    writeln!(out, "{DONE_MARKER} {}", args.mib)
        .and_then(|()| out.flush())
        .map_err(AllocError::Stdout)?;
    match args.hold() {
        Hold::For(d) => std::thread::sleep(d),
        Hold::UntilFile(path) => {
            while !path.exists() {
                std::thread::sleep(POLL);
            }
        }
    }
    drop(held);
    writeln!(out, "{FREED_MARKER}")
        .and_then(|()| out.flush())
        .map_err(AllocError::Stdout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        a: AllocArgs,
    }

    fn parse(args: &[&str]) -> Result<AllocArgs, clap::Error> {
        T::try_parse_from(std::iter::once("alloc").chain(args.iter().copied())).map(|t| t.a)
    }

    #[test]
    fn defaults_and_hold_policies() {
        let a = parse(&["--mib", "300"]).unwrap();
        assert_eq!(a.mib, 300);
        assert_eq!(a.pattern, Pattern::Random);
        assert!(!a.touch_only);
        assert_eq!(a.hold(), Hold::For(Duration::ZERO));

        let a = parse(&[
            "--mib",
            "1",
            "--hold-s",
            "2.5",
            "--pattern",
            "zero",
            "--touch-only",
        ])
        .unwrap();
        assert_eq!(a.hold(), Hold::For(Duration::from_millis(2500)));
        assert_eq!(a.pattern, Pattern::Zero);
        assert!(a.touch_only);

        let a = parse(&["--mib", "8", "--until-file", "/tmp/go"]).unwrap();
        assert_eq!(a.hold(), Hold::UntilFile(PathBuf::from("/tmp/go")));
    }

    #[test]
    fn bad_arguments_are_rejected() {
        for bad in [
            &[][..],
            &["--mib", "0"],
            &["--mib", "-5"],
            &["--mib", "x"],
            &["--mib", "1", "--hold-s", "-1"],
            &["--mib", "1", "--hold-s", "nan"],
            &["--mib", "1", "--hold-s", "1", "--until-file", "/f"],
            &["--mib", "1", "--pattern", "ones"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn fills_pages_and_frees() {
        let mut rng = Rng(1);
        for (pattern, touch_only) in [
            (Pattern::Random, false),
            (Pattern::Random, true),
            (Pattern::Zero, false),
        ] {
            let args = AllocArgs {
                mib: 1,
                hold_s: None,
                until_file: None,
                pattern,
                touch_only,
            };
            let v = fill(MIB / 8, &args, &mut rng).unwrap();
            assert!(v.capacity() >= MIB / 8);
        }
        let too_big = AllocArgs {
            mib: 1,
            hold_s: None,
            until_file: None,
            pattern: Pattern::Zero,
            touch_only: true,
        };
        assert!(fill(usize::MAX / 8, &too_big, &mut rng).is_err());
    }

    #[test]
    fn random_words_do_not_repeat() {
        let mut rng = Rng(7);
        let words: std::collections::HashSet<u64> = (0..10_000).map(|_| rng.next()).collect();
        assert_eq!(words.len(), 10_000);
    }
}
