//! Building the project's statically linked binaries (payloads for the rig's busybox userland).

use crate::{is_static_executable, Result, RigError};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The target triple of static builds (must be explicit so `RUSTFLAGS` skips build scripts and
/// proc macros, which cannot be static).
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// `RUSTFLAGS` of static builds.
pub const STATIC_RUSTFLAGS: &str = "-C target-feature=+crt-static";

/// Environment an outer cargo (e.g. `cargo test`) may set that would leak into the inner build:
/// `CARGO_ENCODED_RUSTFLAGS` overrides `RUSTFLAGS`, the make flags carry a jobserver.
const SCRUBBED_ENV: &[&str] = &[
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
];

/// Builds the binaries of `packages` in `workspace_root` with
/// `cargo build --release --target x86_64-unknown-linux-gnu` and `RUSTFLAGS="-C
/// target-feature=+crt-static"`, using `target_dir` as `CARGO_TARGET_DIR` (separate from the
/// caller's, so a build run from inside `cargo test` does not wait on the outer cargo's lock).
///
/// Returns every executable built, in cargo's order; each is checked to have no ELF interpreter.
/// Cargo's progress and diagnostics go to this process's stderr.
pub fn build_static(
    workspace_root: &Path,
    packages: &[&str],
    target_dir: &Path,
) -> Result<Vec<PathBuf>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace_root)
        .args(["build", "--release", "--target", STATIC_TARGET])
        .arg("--message-format=json-render-diagnostics");
    for p in packages {
        cmd.args(["-p", p]);
    }
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.env("RUSTFLAGS", STATIC_RUSTFLAGS)
        .env("CARGO_TARGET_DIR", target_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    tracing::info!(?packages, target_dir = %target_dir.display(), "building static binaries");
    let program = format!("{} build", cargo.to_string_lossy());
    let mut child = cmd.spawn().map_err(|source| RigError::Spawn {
        program: program.clone(),
        source,
    })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut built: Vec<(String, PathBuf)> = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if let Some(artifact) = executable_artifact(&line) {
            if !built.contains(&artifact) {
                built.push(artifact);
            }
        }
    }
    let status = child
        .wait()
        .map_err(|source| RigError::Wait { program, source })?;
    if !status.success() {
        return Err(RigError::CargoFailed {
            packages: packages.iter().map(|p| p.to_string()).collect(),
            status,
        });
    }
    for p in packages {
        if !built.iter().any(|(pkg, _)| pkg == p) {
            return Err(RigError::NoExecutable {
                package: p.to_string(),
            });
        }
    }
    let paths: Vec<PathBuf> = built.into_iter().map(|(_, path)| path).collect();
    for path in &paths {
        if !is_static_executable(path)? {
            return Err(RigError::NotStatic { path: path.clone() });
        }
    }
    tracing::info!(?paths, "static binaries built");
    Ok(paths)
}

/// `(package name, executable)` from one line of cargo's JSON messages, if it reports a binary.
fn executable_artifact(line: &str) -> Option<(String, PathBuf)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("reason")?.as_str()? != "compiler-artifact" {
        return None;
    }
    let kinds = v.get("target")?.get("kind")?.as_array()?;
    if !kinds.iter().any(|k| k.as_str() == Some("bin")) {
        return None;
    }
    let exe = v.get("executable")?.as_str()?;
    let package = package_name(v.get("package_id")?.as_str()?)?;
    Some((package, PathBuf::from(exe)))
}

/// The package name in a cargo package id: `path+file:///w/vmm#0.1.0` (name = last path
/// component), `path+file:///w/x#name@0.1.0`, or the old `name 0.1.0 (path+file:///w/x)`.
fn package_name(id: &str) -> Option<String> {
    if let Some((url, frag)) = id.rsplit_once('#') {
        if let Some((name, _version)) = frag.split_once('@') {
            return Some(name.to_string());
        }
        return url.rsplit('/').next().map(str::to_string);
    }
    id.split_whitespace().next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_ids() {
        assert_eq!(package_name("path+file:///w/vmm#0.1.0").unwrap(), "vmm");
        assert_eq!(
            package_name("path+file:///w/some-dir#guest-trimmer@0.1.0").unwrap(),
            "guest-trimmer"
        );
        assert_eq!(
            package_name("vmm 0.1.0 (path+file:///w/vmm)").unwrap(),
            "vmm"
        );
    }

    #[test]
    fn artifacts() {
        let bin = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#0.1.0","target":{"kind":["bin"],"name":"e2e-runner"},"executable":"/t/release/e2e-runner"}"#;
        assert_eq!(
            executable_artifact(bin).unwrap(),
            ("tests".to_string(), PathBuf::from("/t/release/e2e-runner"))
        );
        let lib = r#"{"reason":"compiler-artifact","package_id":"registry+https://x#libc@0.2.1","target":{"kind":["lib"]},"executable":null}"#;
        assert!(executable_artifact(lib).is_none());
        assert!(executable_artifact(r#"{"reason":"build-finished","success":true}"#).is_none());
        assert!(executable_artifact("not json").is_none());
    }
}
