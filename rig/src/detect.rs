//! Which real KVM this process can use: the host's, the nested rig, or none (and why).

use std::fs::OpenOptions;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Environment variable that overrides where the rig script (`run.sh`) is.
pub const RIG_ENV: &str = "VMM_KVM_RIG";

/// Environment variable that forces a backend: `host` or `rig`.
pub const BACKEND_ENV: &str = "VMM_KVM_BACKEND";

/// Where real KVM is for this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmBackend {
    /// The host's `/dev/kvm` exists, is accessible and is not PVM: it can boot a stock guest.
    HostKvm,
    /// The host's KVM cannot boot a stock guest (PVM, or missing), but the nested rig script was
    /// found: run payloads through it.
    NestedRig {
        /// The rig's `run.sh`.
        script: PathBuf,
    },
    /// Neither works.
    Unavailable {
        /// Why: no /dev/kvm, not permitted, PVM without the rig script, ...
        reason: String,
    },
}

impl std::fmt::Display for KvmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvmBackend::HostKvm => write!(f, "host /dev/kvm"),
            KvmBackend::NestedRig { script } => write!(f, "nested KVM rig ({})", script.display()),
            KvmBackend::Unavailable { reason } => write!(f, "no usable KVM: {reason}"),
        }
    }
}

/// What [`detect_with`] looks at; [`DetectEnv::system`] is the real machine, tests inject roots.
#[derive(Debug, Clone)]
pub struct DetectEnv {
    /// Directory holding `kvm` (normally `/dev`).
    pub dev_root: PathBuf,
    /// Directory holding `module/` (normally `/sys`).
    pub sys_root: PathBuf,
    /// The rig script, if already known (normally from [`find_rig_script`]).
    pub rig_script: Option<PathBuf>,
    /// Forced backend (`host` or `rig`), normally from `$VMM_KVM_BACKEND`.
    pub force: Option<String>,
}

impl DetectEnv {
    /// The real machine: `/dev`, `/sys`, the rig script from [`find_rig_script`], `$VMM_KVM_BACKEND`.
    pub fn system() -> Self {
        DetectEnv {
            dev_root: PathBuf::from("/dev"),
            sys_root: PathBuf::from("/sys"),
            rig_script: find_rig_script(),
            force: std::env::var(BACKEND_ENV).ok().filter(|s| !s.is_empty()),
        }
    }
}

/// Detects the backend on this machine (see [`detect_with`]).
pub fn detect() -> KvmBackend {
    let backend = detect_with(&DetectEnv::system());
    tracing::debug!(%backend, "detected KVM backend");
    backend
}

/// Detects the backend from `env`.
///
/// The host's KVM is used when `<dev>/kvm` is a character device that opens read-write and
/// `<sys>/module/kvm_pvm` is absent. Otherwise the rig is used when its script is known (the rig
/// emulates its CPU with TCG, so it needs no host KVM at all). `$VMM_KVM_BACKEND=host|rig` forces
/// a choice, still failing with a reason when the forced one cannot work.
pub fn detect_with(env: &DetectEnv) -> KvmBackend {
    let host = host_kvm_problem(env);
    let rig = env.rig_script.as_ref().filter(|s| s.is_file()).cloned();
    let rig_missing = || {
        match &env.rig_script {
        Some(s) => format!("the rig script {} does not exist", s.display()),
        None => format!(
            "the rig script was not found (looked for <repo>/../shared/kvm-rig/run.sh; set ${RIG_ENV})"
        ),
    }
    };
    match env.force.as_deref() {
        Some("host") => {
            return match host {
                None => KvmBackend::HostKvm,
                Some(p) => KvmBackend::Unavailable {
                    reason: format!("{BACKEND_ENV}=host but {p}"),
                },
            }
        }
        Some("rig") => {
            return match rig {
                Some(script) => KvmBackend::NestedRig { script },
                None => KvmBackend::Unavailable {
                    reason: format!("{BACKEND_ENV}=rig but {}", rig_missing()),
                },
            }
        }
        Some(other) => {
            return KvmBackend::Unavailable {
                reason: format!("{BACKEND_ENV}={other:?} is neither `host` nor `rig`"),
            }
        }
        None => {}
    }
    match (host, rig) {
        (None, _) => KvmBackend::HostKvm,
        (Some(problem), Some(script)) => {
            tracing::debug!(%problem, "host KVM unusable; using the nested rig");
            KvmBackend::NestedRig { script }
        }
        (Some(problem), None) => KvmBackend::Unavailable {
            reason: format!("{problem}, and {}", rig_missing()),
        },
    }
}

/// Why the host's KVM cannot boot a stock guest, or `None` when it can.
fn host_kvm_problem(env: &DetectEnv) -> Option<String> {
    let dev = env.dev_root.join("kvm");
    let pvm = env.sys_root.join("module/kvm_pvm");
    if pvm.exists() {
        return Some(format!(
            "host {} is kvm_pvm ({} exists), which cannot boot a stock Linux guest",
            dev.display(),
            pvm.display()
        ));
    }
    match std::fs::metadata(&dev) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some(format!("host has no {}", dev.display()))
        }
        Err(e) => return Some(format!("cannot stat {}: {e}", dev.display())),
        Ok(m) if !m.file_type().is_char_device() => {
            return Some(format!("{} is not a character device", dev.display()))
        }
        Ok(_) => {}
    }
    match OpenOptions::new().read(true).write(true).open(&dev) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Some(format!(
            "{} is not accessible (permission denied; add the user to the kvm group)",
            dev.display()
        )),
        Err(e) => Some(format!("cannot open {}: {e}", dev.display())),
    }
}

/// Finds the rig's `run.sh`: `$VMM_KVM_RIG` if set, else `<repo root>/../shared/kvm-rig/run.sh`
/// where the repo root is searched upward from this crate's source directory, the current
/// directory and the running executable.
pub fn find_rig_script() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(RIG_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let mut starts: Vec<PathBuf> = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR"))];
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    starts.iter().find_map(|s| rig_script_above(s))
}

/// The first `<ancestor>/../shared/kvm-rig/run.sh` (or `<ancestor>/shared/kvm-rig/run.sh`) that
/// exists, walking up from `start`.
fn rig_script_above(start: &Path) -> Option<PathBuf> {
    start.ancestors().find_map(|dir| {
        let candidates = [
            dir.join("../shared/kvm-rig/run.sh"),
            dir.join("shared/kvm-rig/run.sh"),
        ];
        candidates
            .into_iter()
            .find(|c| c.is_file())
            .map(|c| c.canonicalize().unwrap_or(c))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    struct Fake {
        _dir: tempfile::TempDir,
        env: DetectEnv,
    }

    /// A fake root whose `dev/kvm` is `kvm` (None: absent) and with `kvm_pvm` loaded or not.
    fn fake(kvm: Option<&str>, pvm: bool, rig: bool) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev");
        let sys = dir.path().join("sys");
        std::fs::create_dir_all(dev.as_path()).unwrap();
        std::fs::create_dir_all(sys.join("module")).unwrap();
        if pvm {
            std::fs::create_dir_all(sys.join("module/kvm_pvm/parameters")).unwrap();
        }
        match kvm {
            // /dev/null is an accessible character device: a stand-in for a real /dev/kvm.
            Some("chardev") => std::os::unix::fs::symlink("/dev/null", dev.join("kvm")).unwrap(),
            Some("file") => std::fs::write(dev.join("kvm"), b"").unwrap(),
            Some(other) => panic!("unknown fake {other}"),
            None => {}
        }
        let script = dir.path().join("shared/kvm-rig/run.sh");
        if rig {
            std::fs::create_dir_all(script.parent().unwrap()).unwrap();
            std::fs::write(&script, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Fake {
            env: DetectEnv {
                dev_root: dev,
                sys_root: sys,
                rig_script: Some(script),
                force: None,
            },
            _dir: dir,
        }
    }

    #[test]
    fn usable_host_kvm_wins() {
        let f = fake(Some("chardev"), false, true);
        assert_eq!(detect_with(&f.env), KvmBackend::HostKvm);
    }

    #[test]
    fn pvm_host_uses_the_rig() {
        let f = fake(Some("chardev"), true, true);
        match detect_with(&f.env) {
            KvmBackend::NestedRig { script } => assert!(script.ends_with("kvm-rig/run.sh")),
            other => panic!("expected the rig, got {other:?}"),
        }
    }

    #[test]
    fn pvm_without_rig_is_unavailable_with_reason() {
        let f = fake(Some("chardev"), true, false);
        match detect_with(&f.env) {
            KvmBackend::Unavailable { reason } => {
                assert!(reason.contains("kvm_pvm"), "{reason}");
                assert!(reason.contains("rig script"), "{reason}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[test]
    fn missing_dev_kvm_is_named() {
        let mut f = fake(None, false, false);
        f.env.rig_script = None;
        match detect_with(&f.env) {
            KvmBackend::Unavailable { reason } => {
                assert!(reason.contains("has no"), "{reason}");
                assert!(reason.contains(RIG_ENV), "{reason}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[test]
    fn regular_file_is_not_kvm() {
        let f = fake(Some("file"), false, false);
        match detect_with(&f.env) {
            KvmBackend::Unavailable { reason } => {
                assert!(reason.contains("not a character device"), "{reason}")
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[test]
    fn forcing_works_and_fails_with_reason() {
        let mut f = fake(Some("chardev"), false, true);
        f.env.force = Some("rig".into());
        assert!(matches!(detect_with(&f.env), KvmBackend::NestedRig { .. }));
        let mut f = fake(Some("chardev"), true, true);
        f.env.force = Some("host".into());
        match detect_with(&f.env) {
            KvmBackend::Unavailable { reason } => assert!(reason.contains("=host"), "{reason}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
        f.env.force = Some("bogus".into());
        assert!(matches!(
            detect_with(&f.env),
            KvmBackend::Unavailable { .. }
        ));
    }

    #[test]
    fn rig_script_is_found_above_a_nested_dir() {
        let f = fake(None, false, true);
        let repo = f.env.dev_root.parent().unwrap().join("repo/sub/dir");
        std::fs::create_dir_all(&repo).unwrap();
        let found = rig_script_above(&repo).expect("found");
        assert!(found.ends_with("shared/kvm-rig/run.sh"));
    }
}
