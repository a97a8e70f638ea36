//! A payload: a temporary directory whose files the rig copies to `/payload`.

use crate::{Result, RigError};
use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// A temporary directory of files (with names and modes) to run in the rig; removed on drop.
#[derive(Debug)]
pub struct Payload {
    dir: tempfile::TempDir,
}

impl Payload {
    /// Creates an empty payload under the system's temporary directory.
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("rig-payload.")
            .tempdir()
            .map_err(RigError::PayloadDir)?;
        Ok(Payload { dir })
    }

    /// The payload's directory (what [`crate::run_in_rig`] copies to `/payload`).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Copies `from` into the payload as `name` (a relative path; parents are created) with
    /// permission bits `mode`. Returns `self` for chaining.
    pub fn add_file(&mut self, from: impl AsRef<Path>, name: &str, mode: u32) -> Result<&mut Self> {
        let from = from.as_ref();
        let dest = self.dest(name)?;
        let err = |source| RigError::PayloadCopy {
            from: from.to_path_buf(),
            name: name.to_string(),
            source,
        };
        std::fs::copy(from, &dest).map_err(err)?;
        std::fs::set_permissions(&dest, Permissions::from_mode(mode)).map_err(err)?;
        tracing::debug!(from = %from.display(), name, mode = format_args!("{mode:o}"), "payload file added");
        Ok(self)
    }

    /// Writes `bytes` into the payload as `name` with permission bits `mode`.
    pub fn add_bytes(&mut self, name: &str, bytes: &[u8], mode: u32) -> Result<&mut Self> {
        let dest = self.dest(name)?;
        let err = |source| RigError::PayloadCopy {
            from: PathBuf::from("<bytes>"),
            name: name.to_string(),
            source,
        };
        std::fs::write(&dest, bytes).map_err(err)?;
        std::fs::set_permissions(&dest, Permissions::from_mode(mode)).map_err(err)?;
        Ok(self)
    }

    /// Keeps the directory instead of deleting it on drop, returning its path.
    pub fn keep(self) -> PathBuf {
        self.dir.keep()
    }

    /// Validates `name` and creates its parent directories.
    fn dest(&self, name: &str) -> Result<PathBuf> {
        let rel = Path::new(name);
        let ok = !name.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !ok {
            return Err(RigError::PayloadName {
                name: name.to_string(),
            });
        }
        let dest = self.dir.path().join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|source| RigError::PayloadCopy {
                from: parent.to_path_buf(),
                name: name.to_string(),
                source,
            })?;
        }
        Ok(dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_copied_with_names_and_modes() {
        let src = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(src.path(), b"hello").unwrap();
        let mut p = Payload::new().unwrap();
        p.add_file(src.path(), "bin/tool", 0o755)
            .unwrap()
            .add_bytes("data.txt", b"x", 0o600)
            .unwrap();
        let tool = p.path().join("bin/tool");
        assert_eq!(std::fs::read(&tool).unwrap(), b"hello");
        let mode = std::fs::metadata(&tool).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
        let mode = std::fs::metadata(p.path().join("data.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn bad_names_are_rejected() {
        let mut p = Payload::new().unwrap();
        for name in ["", "/abs", "../up", "a/../../b", "./x"] {
            let e = p.add_bytes(name, b"", 0o644).unwrap_err();
            assert!(matches!(e, RigError::PayloadName { .. }), "{name}: {e}");
        }
    }

    #[test]
    fn missing_source_names_the_file() {
        let mut p = Payload::new().unwrap();
        let e = p.add_file("/nonexistent/x", "x", 0o644).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x"), "{e}");
    }

    #[test]
    fn directory_is_removed_on_drop() {
        let p = Payload::new().unwrap();
        let path = p.path().to_path_buf();
        drop(p);
        assert!(!path.exists());
    }
}
