//! Hooks that applications register themselves, so that a policy's hooks step calls them
//! without the policy naming them (a runtime started in any guest image announces how to ask
//! it to release its caches, whichever policy the host then trims with).
//!
//! One JSON file per application in [`HOOKS_DIR`], e.g. `/run/guest-trimmer/hooks.d/jvm.json`:
//!
//! ```json
//! { "before_snapshot": { "name": "jvm-gc", "command": ["/usr/bin/jcmd", "1", "GC.run"], "timeout_ms": 5000 },
//!   "after_restore":   { "name": "jvm-reseed", "signal": "SIGUSR2", "pid_file": "/run/jvm.pid", "timeout_ms": 1000 } }
//! ```
//!
//! Each hook has the fields of a policy's hook (see [`Hook`]) and the same rules. Files are
//! read at every trim, in file-name order; only `*.json` files count.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Hook, PolicyError};

/// Where applications put their registrations.
pub const HOOKS_DIR: &str = "/run/guest-trimmer/hooks.d";

/// Most registration files read (the rest are reported and ignored).
pub const MAX_REGISTRATIONS: usize = 64;

/// Largest registration file read, in bytes.
pub const MAX_REGISTRATION_BYTES: u64 = 16 * 1024;

/// One application's hooks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookRegistration {
    /// Run by a policy's hooks step (unless the step sets `"registered": false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before_snapshot: Option<Hook>,
    /// Run after a restore, after the policy's own after-restore hooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_restore: Option<Hook>,
}

impl HookRegistration {
    /// Reads, parses and checks one registration file.
    pub fn load(path: &Path) -> Result<HookRegistration, PolicyError> {
        let read_error = |source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read_error)?.len();
        if len > MAX_REGISTRATION_BYTES {
            return Err(read_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{len} bytes, expected at most {MAX_REGISTRATION_BYTES}"),
            )));
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        Self::parse(&text, format!("hook registration {}", path.display()))
    }

    /// Parses and checks registration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: String) -> Result<HookRegistration, PolicyError> {
        let reg: HookRegistration =
            serde_json::from_str(text).map_err(|source| PolicyError::Parse {
                line: source.line(),
                column: source.column(),
                origin: origin.clone(),
                source,
            })?;
        for (at, hook) in [
            ("before_snapshot", &reg.before_snapshot),
            ("after_restore", &reg.after_restore),
        ] {
            if let Some(hook) = hook {
                crate::validate::validate_hook(at, hook).map_err(|source| {
                    PolicyError::Invalid {
                        origin: origin.clone(),
                        source,
                    }
                })?;
            }
        }
        Ok(reg)
    }
}

/// Every registration in `dir`, in file-name order, each with its file: a file that cannot be
/// read or parsed comes with its error (the caller reports it and goes on with the others). A
/// missing directory means no registrations.
pub fn load_dir(dir: &Path) -> Vec<(PathBuf, Result<HookRegistration, PolicyError>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json") && p.is_file())
        .collect();
    files.sort();
    files.truncate(MAX_REGISTRATIONS);
    files
        .into_iter()
        .map(|f| {
            let reg = HookRegistration::load(&f);
            (f, reg)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_load_in_file_order_and_bad_ones_name_their_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_dir(&dir.path().join("absent")).is_empty());
        let put = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        put(
            "b-runtime.json",
            r#"{"before_snapshot": {"name": "rt", "unix_socket": "/run/rt.sock", "message": "trim\n", "expect_reply": "ok", "timeout_ms": 5000}}"#,
        );
        put(
            "a-jvm.json",
            r#"{"after_restore": {"name": "reseed", "signal": "SIGUSR2", "pid_file": "/run/jvm.pid", "timeout_ms": 1000}}"#,
        );
        put(
            "c-bad.json",
            r#"{"before_snapshot": {"name": "x", "command": ["rel"], "timeout_ms": 10}, "extra": 1}"#,
        );
        put(
            "d-invalid.json",
            r#"{"before_snapshot": {"name": "x", "command": ["rel"], "timeout_ms": 10}}"#,
        );
        put("notes.txt", "not a registration");
        let regs = load_dir(dir.path());
        let names: Vec<String> = regs
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "a-jvm.json",
                "b-runtime.json",
                "c-bad.json",
                "d-invalid.json"
            ]
        );
        let a = regs[0].1.as_ref().unwrap();
        assert!(a.before_snapshot.is_none());
        assert_eq!(a.after_restore.as_ref().unwrap().name, "reseed");
        let b = regs[1].1.as_ref().unwrap();
        assert_eq!(b.before_snapshot.as_ref().unwrap().timeout_ms, 5000);
        let bad = crate::error_chain(regs[2].1.as_ref().unwrap_err());
        assert!(bad.contains("c-bad.json") && bad.contains("extra"), "{bad}");
        let invalid = crate::error_chain(regs[3].1.as_ref().unwrap_err());
        assert!(
            invalid.contains("d-invalid.json") && invalid.contains("before_snapshot.command[0]"),
            "{invalid}"
        );
    }

    #[test]
    fn oversized_registration_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("big.json");
        std::fs::write(&f, vec![b' '; MAX_REGISTRATION_BYTES as usize + 1]).unwrap();
        let e = crate::error_chain(&HookRegistration::load(&f).unwrap_err());
        assert!(e.contains("big.json") && e.contains("at most"), "{e}");
    }
}
