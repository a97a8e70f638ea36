//! Debian packages through the ordinary clients: `apt-cache` to resolve names and versions,
//! `apt-get download` to fetch `.deb`s, `dpkg-deb -x` to unpack them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::{io_err, ImageError};

/// Tools the build needs on `PATH`.
pub(crate) const APT_TOOLS: [&str; 3] = ["apt-get", "apt-cache", "dpkg-deb"];

/// Names of the tools of [`APT_TOOLS`] that are not on `PATH`.
pub(crate) fn missing_tools() -> Vec<String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    APT_TOOLS
        .iter()
        .filter(|tool| {
            !std::env::split_paths(&path).any(|dir| {
                let candidate = dir.join(tool);
                candidate
                    .metadata()
                    .map(|m| {
                        m.is_file()
                            && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111
                                != 0
                    })
                    .unwrap_or(false)
            })
        })
        .map(|t| t.to_string())
        .collect()
}

/// Runs a command, returning its stdout; a non-zero exit becomes [`ImageError::CommandFailed`].
pub(crate) fn run(cmd: &mut Command) -> Result<String, ImageError> {
    let command = format!("{cmd:?}").replace('"', "");
    tracing::debug!(%command, "running");
    let out = cmd.output().map_err(|source| ImageError::Spawn {
        command: command.clone(),
        source,
    })?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        return Err(ImageError::CommandFailed {
            command,
            status: out.status.to_string(),
            stderr,
        });
    }
    if !stderr.is_empty() {
        tracing::debug!(%command, %stderr, "command printed warnings");
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `apt-cache`/`apt-get` with a package cache file of our own.
///
/// Debian's container images turn apt's binary cache off (`Dir::Cache::pkgcache ""`), which makes
/// every `apt-cache` call re-read all package lists (~1 s here); keeping the cache in our cache
/// folder makes later calls take ~20 ms. apt rebuilds it whenever the lists change.
#[derive(Debug, Clone)]
pub(crate) struct Apt {
    pkgcache: PathBuf,
}

impl Apt {
    /// apt tools whose binary cache lives under `dir`.
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            pkgcache: dir.join("pkgcache.bin"),
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg("-o")
            .arg(format!("Dir::Cache::pkgcache={}", self.pkgcache.display()));
        cmd
    }

    /// Candidate versions of `packages` (those apt has a candidate for).
    pub(crate) fn candidates(
        &self,
        packages: &[&str],
    ) -> Result<BTreeMap<String, String>, ImageError> {
        let out = run(self.command("apt-cache").arg("policy").args(packages))?;
        Ok(parse_policy(&out))
    }

    /// Lists the kernel packages the apt lists have and picks the newest.
    pub(crate) fn newest_kernel_package(&self) -> Result<Option<String>, ImageError> {
        let out = run(self.command("apt-cache").args([
            "search",
            "--names-only",
            crate::KERNEL_PACKAGE_PATTERN,
        ]))?;
        Ok(newest_kernel_package(&out))
    }
}

/// Package name -> candidate version from `apt-cache policy` output.
fn parse_policy(policy: &str) -> BTreeMap<String, String> {
    let mut candidates = BTreeMap::new();
    let mut package = None;
    for line in policy.lines() {
        if !line.starts_with(char::is_whitespace) {
            package = line.strip_suffix(':').map(str::to_string);
        } else if let (Some(name), Some(version)) =
            (&package, line.trim().strip_prefix("Candidate:"))
        {
            let version = version.trim();
            if !version.is_empty() && version != "(none)" {
                candidates.insert(name.clone(), version.to_string());
            }
        }
    }
    candidates
}

/// The `N` of a name `linux-image-6.12.N+deb12-cloud-amd64`, or `None` if it is not of that form.
pub(crate) fn kernel_package_patch(name: &str) -> Option<u64> {
    let middle = name
        .strip_prefix(crate::KERNEL_PACKAGE_PREFIX)?
        .strip_suffix(crate::KERNEL_PACKAGE_SUFFIX)?;
    if middle.is_empty() || !middle.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    middle.parse().ok()
}

/// The newest kernel package of `apt-cache search --names-only` output lines (`name - summary`).
pub(crate) fn newest_kernel_package(search_output: &str) -> Option<String> {
    search_output
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| kernel_package_patch(name).map(|n| (n, name)))
        .max()
        .map(|(_, name)| name.to_string())
}

/// One downloaded package, as recorded in `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRecord {
    /// Package name.
    pub name: String,
    /// Debian version.
    pub version: String,
    /// File name of the `.deb` under `<cache>/debs/`.
    pub file: String,
    /// Size of the `.deb`.
    pub size_bytes: u64,
    /// SHA-256 of the `.deb`, lowercase hex.
    pub sha256: String,
}

/// `manifest.json` in the cache folder: what was downloaded, with checksums.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Kernel release of the kernel package (`uname -r` in the guest).
    pub kernel_version: Option<String>,
    /// Kernel package name.
    pub kernel_package: Option<String>,
    /// Downloaded packages by name.
    pub packages: BTreeMap<String, PackageRecord>,
}

impl Manifest {
    /// Reads the manifest, or an empty one if the file does not exist.
    pub fn load(path: &Path) -> Result<Self, ImageError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ImageError::Json {
                op: "reading the package manifest",
                path: path.to_path_buf(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(io_err("reading the package manifest", path, e)),
        }
    }

    /// Writes the manifest atomically.
    pub fn store(&self, path: &Path) -> Result<(), ImageError> {
        let json = serde_json::to_vec_pretty(self).map_err(|source| ImageError::Json {
            op: "encoding the package manifest",
            path: path.to_path_buf(),
            source,
        })?;
        crate::write_atomic(path, &json, "writing the package manifest")
    }
}

/// Makes sure `version` of `package` is in `debs_dir`, downloading it if the manifest has no
/// matching file. Returns its record (with the checksum).
pub(crate) fn ensure_deb(
    apt: &Apt,
    package: &str,
    version: &str,
    debs_dir: &Path,
    manifest: &Manifest,
) -> Result<(PackageRecord, PathBuf), ImageError> {
    if let Some(rec) = manifest.packages.get(package) {
        let path = debs_dir.join(&rec.file);
        let size_ok = path
            .metadata()
            .map(|m| m.len() == rec.size_bytes)
            .unwrap_or(false);
        if rec.version == version && size_ok {
            tracing::debug!(package, %version, "using the cached .deb");
            return Ok((rec.clone(), path));
        }
    }
    tracing::info!(package, %version, "downloading");
    let staging = debs_dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| io_err("creating", &staging, e))?;
    let result = (|| {
        run(apt
            .command("apt-get")
            .args(["download", "-q", &format!("{package}={version}")])
            .current_dir(&staging))?;
        let mut debs = Vec::new();
        for entry in std::fs::read_dir(&staging).map_err(|e| io_err("listing", &staging, e))? {
            let entry = entry.map_err(|e| io_err("listing", &staging, e))?;
            if entry.file_name().to_string_lossy().ends_with(".deb") {
                debs.push(entry.path());
            }
        }
        let [downloaded] = debs.as_slice() else {
            return Err(ImageError::CommandFailed {
                command: format!("apt-get download {package}={version}"),
                status: "finished".into(),
                stderr: format!("expected one .deb, found {}", debs.len()),
            });
        };
        let file = downloaded
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (sha256, size_bytes) = crate::sha256_file(downloaded)?;
        let dest = debs_dir.join(&file);
        std::fs::rename(downloaded, &dest)
            .map_err(|e| io_err("moving the download to", &dest, e))?;
        tracing::info!(package, %version, size_bytes, %sha256, "downloaded");
        Ok((
            PackageRecord {
                name: package.to_string(),
                version: version.to_string(),
                file,
                size_bytes,
                sha256,
            },
            dest,
        ))
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// Name of the folder under `extract/` that holds the unpacked `rec`.
pub(crate) fn extract_dir_name(rec: &PackageRecord) -> String {
    let short = rec.sha256.get(..16).unwrap_or(&rec.sha256);
    format!("{}_{short}", rec.name)
}

/// Unpacks `deb` under `extract_root` (once per checksum) and returns the tree's root.
pub(crate) fn extract(
    deb: &Path,
    rec: &PackageRecord,
    extract_root: &Path,
) -> Result<PathBuf, ImageError> {
    let dir = extract_root.join(extract_dir_name(rec));
    let done = dir.join(".extracted");
    if done.exists() {
        return Ok(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| io_err("creating", &dir, e))?;
    tracing::info!(package = %rec.name, dir = %dir.display(), "extracting");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&dir))?;
    std::fs::write(&done, b"").map_err(|e| io_err("writing", &done, e))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_newest_kernel_by_number_not_text() {
        let search = "\
linux-image-6.12-cloud-amd64 - Linux for x86-64 cloud (meta-package)
linux-image-6.12.99+deb12-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)
linux-image-6.12.117+deb12-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)
linux-image-6.12.113+deb12-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)
linux-image-6.12.200+deb12-cloud-amd64-dbg - debug symbols
linux-image-6.12.300+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
";
        assert_eq!(
            newest_kernel_package(search).as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64")
        );
        assert_eq!(newest_kernel_package(""), None);
        assert_eq!(
            kernel_package_patch("linux-image-6.12.+deb12-cloud-amd64"),
            None
        );
        assert_eq!(
            kernel_package_patch("linux-image-6.12.1a+deb12-cloud-amd64"),
            None
        );
        assert_eq!(
            kernel_package_patch(crate::PINNED_KERNEL_PACKAGE),
            Some(117)
        );
    }

    #[test]
    fn parses_policy_candidates() {
        let policy = "\
linux-image-6.12.117+deb12-cloud-amd64:
  Installed: (none)
  Candidate: 6.12.117-1~deb12u1
  Version table:
     6.12.117-1~deb12u1 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
busybox-static:
  Installed: 1:1.35.0-4+deb12u1+b1
  Candidate: 1:1.35.0-4+deb12u1+b1
  Version table:
 *** 1:1.35.0-4+deb12u1+b1 500
        100 /var/lib/dpkg/status
virtual-thing:
  Installed: (none)
  Candidate: (none)
";
        let c = parse_policy(policy);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(
            c["linux-image-6.12.117+deb12-cloud-amd64"],
            "6.12.117-1~deb12u1"
        );
        assert_eq!(c["busybox-static"], "1:1.35.0-4+deb12u1+b1");
        assert!(parse_policy("").is_empty());
    }

    #[test]
    fn manifest_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        assert_eq!(Manifest::load(&path).unwrap(), Manifest::default());
        let mut m = Manifest {
            kernel_version: Some("6.12.117+deb12-cloud-amd64".into()),
            kernel_package: Some(crate::PINNED_KERNEL_PACKAGE.into()),
            ..Manifest::default()
        };
        m.packages.insert(
            "busybox-static".into(),
            PackageRecord {
                name: "busybox-static".into(),
                version: "1:1.35.0".into(),
                file: "busybox-static_1%3a1.35.0_amd64.deb".into(),
                size_bytes: 3,
                sha256: "ab".into(),
            },
        );
        m.store(&path).unwrap();
        assert_eq!(Manifest::load(&path).unwrap(), m);
    }
}
