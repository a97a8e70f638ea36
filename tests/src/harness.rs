//! The host side of the end-to-end suite: on first use it finds real KVM, builds the static
//! binaries and the guest image, runs every scenario in ONE rig boot (or directly on a host whose
//! /dev/kvm boots stock guests) through `e2e-runner`, and keeps the results for the `#[test]`s.
//!
//! Environment:
//! - `VMM_E2E_BIN_DIR`: take `vmm`, `guest-trimmer` and `e2e-runner` from here instead of building
//!   them (they must be statically linked; without an `e2e-runner` there, only that is built);
//! - `VMM_E2E_KERNEL` + `VMM_E2E_INITRD`: use this guest image instead of `vmm image build`;
//! - `VMM_E2E_ONLY=a,b`: run only these scenarios (the others then fail as not run);
//! - `VMM_E2E_RIG_MEM` (MiB, default 3072), `VMM_E2E_RIG_SMP` (default 1),
//!   `VMM_E2E_TIMEOUT` (seconds for the whole run, default 2700);
//! - `VMM_KVM_RIG` / `VMM_KVM_BACKEND`: see the `rig` crate.

use crate::protocol::{parse_result, ScenarioResult};
use rig::{KvmBackend, Payload, RigOptions};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A step of the harness failed; each variant names it.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// Neither the host's KVM nor the rig can boot a stock guest.
    #[error("no real KVM to run the boot scenarios on: {reason}")]
    NoKvm {
        /// From [`rig::detect`].
        reason: String,
    },
    /// Building the static binaries failed.
    #[error("building the static vmm, guest-trimmer and e2e-runner")]
    Build(#[source] rig::RigError),
    /// A prebuilt binary is missing or not static.
    #[error("taking prebuilt binaries from $VMM_E2E_BIN_DIR: {0}")]
    Prebuilt(String),
    /// `vmm image build` failed.
    #[error("building the guest image (`vmm image build --json`): {0}")]
    Image(String),
    /// Assembling the payload failed.
    #[error("assembling the rig payload")]
    Payload(#[source] rig::RigError),
    /// Running the suite in the rig or on the host failed to start or finish.
    #[error("running e2e-runner ({backend})")]
    Run {
        /// Where it ran.
        backend: String,
        /// Why.
        #[source]
        source: rig::RigError,
    },
}

/// What one suite run produced.
#[derive(Debug)]
pub struct Suite {
    /// Where it ran.
    pub backend: KvmBackend,
    /// Results by scenario name.
    pub results: BTreeMap<String, ScenarioResult>,
    /// Exit status of the runner (via the rig).
    pub exit_code: i32,
    /// Whether the time limit ended it.
    pub timed_out: bool,
    /// The full output of the run.
    pub log: PathBuf,
    /// The last lines of the output (for failures).
    pub tail: Vec<String>,
    /// Wall time of the whole harness (builds + image + run).
    pub duration: Duration,
}

static SUITE: OnceLock<Result<Suite, String>> = OnceLock::new();

/// The suite's results, running it on first call (later calls, from other tests, wait for it).
pub fn suite() -> Result<&'static Suite, &'static str> {
    SUITE
        .get_or_init(|| run_suite().map_err(|e| error_chain(&e)))
        .as_ref()
        .map_err(String::as_str)
}

/// Asserts that scenario `name` ran and passed; panics with its detail (or why it did not run).
pub fn assert_scenario(name: &str) {
    let suite = match suite() {
        Ok(s) => s,
        Err(e) => panic!("the e2e suite could not run, so {name} did not run: {e}"),
    };
    match suite.results.get(name) {
        Some(r) if r.passed => {
            say(&format!(
                "{name}: passed in {} ms: {}",
                r.duration_ms, r.detail
            ));
        }
        Some(r) => panic!("{name} failed after {} ms: {}", r.duration_ms, r.detail),
        None if suite.exit_code != 0 || suite.timed_out => panic!(
            "{name} did not run (a scenario that did not run is a failure): the runner ended with \
             exit {}{}; full log {}; last lines:\n{}",
            suite.exit_code,
            if suite.timed_out { " (timed out)" } else { "" },
            suite.log.display(),
            suite.tail.join("\n")
        ),
        None => panic!(
            "{name} did not run (a scenario that did not run is a failure): the runner finished \
             normally without it (VMM_E2E_ONLY={:?}); full log {}",
            std::env::var("VMM_E2E_ONLY").unwrap_or_default(),
            suite.log.display()
        ),
    }
}

pub use error_text::error_chain;

/// A harness message on stderr, bypassing the test harness's output capture (so it is live).
pub fn say(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "e2e: {msg}");
}

/// `$var` parsed, or `default` when unset or unparsable.
pub fn env_num<T: std::str::FromStr>(var: &str, default: T) -> T {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The workspace root (this crate's parent).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The static binaries payloads need.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `vmm`.
    pub vmm: PathBuf,
    /// `guest-trimmer`.
    pub trimmer: PathBuf,
    /// `e2e-runner`.
    pub runner: PathBuf,
    /// The directory holding them.
    pub dir: PathBuf,
}

/// The static binaries: from `$VMM_E2E_BIN_DIR` if set, else built into `<root>/target/static`.
pub fn binaries(root: &Path) -> Result<Binaries, HarnessError> {
    if let Some(dir) = std::env::var_os("VMM_E2E_BIN_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        let get = |name: &str| -> Result<PathBuf, HarnessError> {
            let p = dir.join(name);
            match rig::is_static_executable(&p) {
                Ok(true) => Ok(p),
                Ok(false) => Err(HarnessError::Prebuilt(format!(
                    "{} is not a statically linked executable",
                    p.display()
                ))),
                Err(e) => Err(HarnessError::Prebuilt(error_chain(&e))),
            }
        };
        say(&format!("using prebuilt binaries from {}", dir.display()));
        let (vmm, trimmer) = (get("vmm")?, get("guest-trimmer")?);
        // A prebuild of only vmm + guest-trimmer (scripts/build-static.sh) lacks the runner:
        // build just this package then.
        let runner = if dir.join("e2e-runner").exists() {
            get("e2e-runner")?
        } else {
            let target = root.join("target/static");
            say(&format!(
                "{} has no e2e-runner: building it statically into {}",
                dir.display(),
                target.display()
            ));
            let built =
                rig::build_static(root, &["tests"], &target).map_err(HarnessError::Build)?;
            built
                .into_iter()
                .find(|p| p.file_name().is_some_and(|f| f == "e2e-runner"))
                .ok_or_else(|| HarnessError::Prebuilt("cargo built no e2e-runner".into()))?
        };
        return Ok(Binaries {
            vmm,
            trimmer,
            runner,
            dir,
        });
    }
    let target = root.join("target/static");
    say(&format!(
        "building static vmm, guest-trimmer, e2e-runner into {}",
        target.display()
    ));
    let built = rig::build_static(root, &["vmm", "guest-trimmer", "tests"], &target)
        .map_err(HarnessError::Build)?;
    let find = |name: &str| {
        built
            .iter()
            .find(|p| p.file_name().is_some_and(|f| f == name))
            .cloned()
            .ok_or_else(|| HarnessError::Prebuilt(format!("cargo built no {name}")))
    };
    let vmm = find("vmm")?;
    Ok(Binaries {
        dir: vmm.parent().map(Path::to_path_buf).unwrap_or_default(),
        vmm,
        trimmer: find("guest-trimmer")?,
        runner: find("e2e-runner")?,
    })
}

/// Kernel and initrd of the guest image.
#[derive(Debug, Clone)]
pub struct Image {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The data disk (`data_disk` of `vmm image build --json`, or `$VMM_E2E_DATA_DISK`).
    pub data_disk: Option<PathBuf>,
}

/// The guest image: `$VMM_E2E_KERNEL` + `$VMM_E2E_INITRD` if set, else what
/// `vmm image build --json --trimmer TRIMMER` prints.
pub fn image(vmm: &Path, trimmer: &Path) -> Result<Image, HarnessError> {
    if let (Some(k), Some(i)) = (
        std::env::var_os("VMM_E2E_KERNEL"),
        std::env::var_os("VMM_E2E_INITRD"),
    ) {
        say("using the guest image from $VMM_E2E_KERNEL / $VMM_E2E_INITRD");
        return Ok(Image {
            kernel: k.into(),
            initrd: i.into(),
            data_disk: std::env::var_os("VMM_E2E_DATA_DISK").map(PathBuf::from),
        });
    }
    let timeout = Duration::from_secs(env_num("VMM_E2E_IMAGE_TIMEOUT", 1200));
    say(&format!(
        "building the guest image: {} image build --json --trimmer {}",
        vmm.display(),
        trimmer.display()
    ));
    let mut cmd = Command::new(vmm);
    cmd.args(["image", "build", "--json", "--trimmer"])
        .arg(trimmer);
    let stdout = run_capture(cmd, timeout, "image").map_err(HarnessError::Image)?;
    let json = match (stdout.find('{'), stdout.rfind('}')) {
        (Some(a), Some(b)) if a < b => &stdout[a..=b],
        _ => {
            return Err(HarnessError::Image(format!(
                "no JSON object on stdout: {stdout:?}"
            )))
        }
    };
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| HarnessError::Image(format!("stdout is not JSON ({e}): {json:?}")))?;
    let path = |key: &str| {
        v.get(key)
            .and_then(|p| p.as_str())
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .ok_or_else(|| HarnessError::Image(format!("no existing file at {key:?} in {v}")))
    };
    Ok(Image {
        kernel: path("kernel")?,
        initrd: path("initrd")?,
        data_disk: path("data_disk").ok(),
    })
}

/// Runs `cmd`, streaming its stderr as `e2e: <tag>: ...`, and returns its stdout when it exits 0
/// within `timeout`.
fn run_capture(mut cmd: Command, timeout: Duration, tag: &str) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {shown}: {e}"))?;
    let mut out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let tag2 = tag.to_string();
    let err_t = std::thread::spawn(move || {
        let mut tail = Vec::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            say(&format!("{tag2}: {line}"));
            tail.push(line);
            if tail.len() > 20 {
                tail.remove(0);
            }
        }
        tail
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{shown} did not finish within {} s",
                    timeout.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("waiting for {shown}: {e}")),
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let tail = err_t.join().unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "{shown} failed ({status}); stderr ends: {}",
            tail.join(" | ")
        ));
    }
    Ok(stdout)
}

fn run_suite() -> Result<Suite, HarnessError> {
    let t0 = Instant::now();
    let backend = rig::detect();
    say(&format!("KVM backend: {backend}"));
    if let KvmBackend::Unavailable { reason } = &backend {
        return Err(HarnessError::NoKvm {
            reason: reason.clone(),
        });
    }
    let root = workspace_root();
    let bins = binaries(&root)?;
    let img = image(&bins.vmm, &bins.trimmer)?;

    let mut payload = Payload::new().map_err(HarnessError::Payload)?;
    payload
        .add_file(&bins.vmm, "vmm", 0o755)
        .and_then(|p| p.add_file(&bins.runner, "e2e-runner", 0o755))
        .and_then(|p| p.add_file(&img.kernel, "vmlinuz", 0o644))
        .and_then(|p| p.add_file(&img.initrd, "initrd", 0o644))
        .map_err(HarnessError::Payload)?;

    let mut args: Vec<String> = [
        "--vmm",
        "./vmm",
        "--kernel",
        "./vmlinuz",
        "--initrd",
        "./initrd",
    ]
    .map(String::from)
    .to_vec();
    // The data disk (~330 MiB) rides in the rig's RAM: only when a block scenario runs.
    let only_env = std::env::var("VMM_E2E_ONLY").unwrap_or_default();
    if let Some(disk) = img.data_disk.as_ref().filter(|_| {
        only_env.is_empty()
            || only_env.contains("block_")
            || only_env.contains("trim_")
            || only_env.contains("pipeline_")
    }) {
        payload
            .add_file(disk, "data.ext4", 0o644)
            .map_err(HarnessError::Payload)?;
        args.extend(["--data-disk".to_string(), "./data.ext4".to_string()]);
    }
    if let Ok(only) = std::env::var("VMM_E2E_ONLY") {
        if !only.is_empty() {
            args.extend(["--only".to_string(), only]);
        }
    }

    let log_dir = root.join("target/e2e");
    let _ = std::fs::create_dir_all(&log_dir);
    let log_path = log_dir.join("last-run.log");
    let log = Mutex::new(std::fs::File::create(&log_path).ok());
    let on_line = |line: &str| {
        // The hex copies of results are for parsing; people read the plain line before them.
        if !line.contains(crate::protocol::RESULT_HEX_MARKER) {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
        if let Ok(mut g) = log.lock() {
            if let Some(f) = g.as_mut() {
                let _ = writeln!(f, "{line}");
            }
        }
    };
    let timeout_s: u64 = env_num("VMM_E2E_TIMEOUT", 2700);
    let outcome = match &backend {
        KvmBackend::NestedRig { script } => {
            let opts = RigOptions {
                mem_mib: env_num("VMM_E2E_RIG_MEM", 3072),
                smp: env_num("VMM_E2E_RIG_SMP", 1),
                timeout_s,
            };
            let mut cmd = vec!["./e2e-runner".to_string()];
            cmd.extend(args);
            say(&format!(
                "running the scenarios in the rig: {}",
                cmd.join(" ")
            ));
            rig::run_in_rig(script, payload.path(), &cmd, opts, on_line)
        }
        KvmBackend::HostKvm => {
            say("running the scenarios on the host's /dev/kvm");
            rig::run_local(
                &payload.path().join("e2e-runner"),
                &args,
                payload.path(),
                Duration::from_secs(timeout_s),
                on_line,
            )
        }
        KvmBackend::Unavailable { .. } => unreachable!("handled above"),
    }
    .map_err(|source| HarnessError::Run {
        backend: backend.to_string(),
        source,
    })?;

    let mut results = BTreeMap::new();
    for line in &outcome.lines {
        if let Some(r) = parse_result(line) {
            results.insert(r.name.clone(), r);
        }
    }
    let readable: Vec<&String> = outcome
        .lines
        .iter()
        .filter(|l| !l.contains(crate::protocol::RESULT_HEX_MARKER))
        .collect();
    let n = readable.len();
    let tail = readable[n.saturating_sub(40)..]
        .iter()
        .map(|l| l.to_string())
        .collect();
    let passed = results.values().filter(|r| r.passed).count();
    say(&format!(
        "suite done in {:.0} s (run {:.0} s): {} results, {passed} passed; runner exit {}{}; log {}",
        t0.elapsed().as_secs_f64(),
        outcome.duration.as_secs_f64(),
        results.len(),
        outcome.exit_code,
        if outcome.timed_out { " (timed out)" } else { "" },
        log_path.display()
    ));
    Ok(Suite {
        backend,
        results,
        exit_code: outcome.exit_code,
        timed_out: outcome.timed_out,
        log: log_path,
        tail,
        duration: t0.elapsed(),
    })
}
