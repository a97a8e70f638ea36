//! The data disk: an ext4 image holding the standard scenario's files (shared README §2), so
//! the guest's page cache holds real, reclaimable file pages.
//!
//! `data.ext4` (next to the kernel and initramfs) holds `cold/cold-NN.bin` (the 256 MiB cold
//! set), `hot/hot-NN.bin` (the 32 MiB hot set) and `SHA256SUMS` (`sha256sum -c` format,
//! paths relative to the file system root). File contents are pseudo-random from a fixed seed,
//! so every build has the same files and checksums. The image is made on the host with
//! `mkfs.ext4 -d` (no loop mount, no root) and rebuilt only when [`DataDiskSpec`] or the format
//! version changes; `data.json` beside it records the stamp.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{hex, io_err, ImageError};

/// File name of the data disk in the image folder.
pub const DATA_DISK_FILE: &str = "data.ext4";
/// Its record (stamp and size).
const RECORD_FILE: &str = "data.json";
/// Bumped when the layout or the generator changes.
const DATA_DISK_FORMAT_VERSION: u32 = 1;
/// The manifest inside the file system.
pub const MANIFEST_FILE: &str = "SHA256SUMS";
/// Fixed UUID, so the image's identity does not change between builds.
const FS_UUID: &str = "5e1f0d1a-7b4c-4d2e-9a6b-0c3f2e1d4b5a";

/// What the data disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataDiskSpec {
    /// Files in `cold/`.
    pub cold_files: u32,
    /// Size of each cold file.
    pub cold_file_mib: u32,
    /// Files in `hot/`.
    pub hot_files: u32,
    /// Size of each hot file.
    pub hot_file_mib: u32,
    /// PRNG seed of the contents.
    pub seed: u64,
}

impl Default for DataDiskSpec {
    /// The standard scenario: 16 x 16 MiB cold, 4 x 8 MiB hot.
    fn default() -> Self {
        DataDiskSpec {
            cold_files: 16,
            cold_file_mib: 16,
            hot_files: 4,
            hot_file_mib: 8,
            seed: 0x5eed_da7a_d15c,
        }
    }
}

impl DataDiskSpec {
    /// Total file bytes.
    pub fn files_mib(&self) -> u64 {
        u64::from(self.cold_files) * u64::from(self.cold_file_mib)
            + u64::from(self.hot_files) * u64::from(self.hot_file_mib)
    }

    /// The files: (path relative to the root, size in MiB), cold first.
    pub fn files(&self) -> Vec<(String, u32)> {
        let cold =
            (0..self.cold_files).map(|i| (format!("cold/cold-{i:02}.bin"), self.cold_file_mib));
        let hot = (0..self.hot_files).map(|i| (format!("hot/hot-{i:02}.bin"), self.hot_file_mib));
        cold.chain(hot).collect()
    }

    fn stamp(&self) -> String {
        let text = format!("{DATA_DISK_FORMAT_VERSION}:{self:?}");
        hex(&Sha256::digest(text.as_bytes()))
    }
}

/// `data.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DataDiskRecord {
    stamp: String,
    size_bytes: u64,
    files_mib: u64,
}

/// A built data disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataDisk {
    /// The ext4 image.
    pub path: PathBuf,
    /// Its size.
    pub size_bytes: u64,
    /// Bytes of files on it, in MiB.
    pub files_mib: u64,
    /// Whether this call wrote it.
    pub rebuilt: bool,
}

/// The data disk in `out_dir` if it is up to date with `spec`.
pub fn locate(out_dir: &Path, spec: &DataDiskSpec) -> Option<DataDisk> {
    let record: DataDiskRecord =
        serde_json::from_slice(&std::fs::read(out_dir.join(RECORD_FILE)).ok()?).ok()?;
    let path = out_dir.join(DATA_DISK_FILE);
    let size = path.metadata().ok()?.len();
    (record.stamp == spec.stamp() && size == record.size_bytes).then_some(DataDisk {
        path,
        size_bytes: size,
        files_mib: record.files_mib,
        rebuilt: false,
    })
}

/// Builds `out_dir/data.ext4` unless it is up to date (or `force`).
pub fn build(out_dir: &Path, spec: &DataDiskSpec, force: bool) -> Result<DataDisk, ImageError> {
    if !force {
        if let Some(disk) = locate(out_dir, spec) {
            tracing::info!(path = %disk.path.display(), "data disk is up to date");
            return Ok(disk);
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|e| io_err("creating", out_dir, e))?;
    let record_path = out_dir.join(RECORD_FILE);
    match std::fs::remove_file(&record_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("removing the old data disk record", &record_path, e)),
    }
    let tree = out_dir.join("data-tree.tmp");
    let _ = std::fs::remove_dir_all(&tree);
    write_tree(&tree, spec)?;
    let path = out_dir.join(DATA_DISK_FILE);
    let tmp = out_dir.join("data.ext4.tmp");
    let _ = std::fs::remove_file(&tmp);
    // Files plus ext4 metadata (inode tables, bitmaps) and slack: 1/8 extra and 32 MiB.
    let size_mib = spec.files_mib() + spec.files_mib() / 8 + 32;
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", "vmmdata", "-U", FS_UUID, "-m", "0", "-E"])
        .arg(format!("root_owner=0:0,hash_seed={FS_UUID}"))
        .arg("-d")
        .arg(&tree)
        .arg(&tmp)
        .arg(format!("{size_mib}M"))
        .env("E2FSPROGS_FAKE_TIME", "1700000000");
    let command = format!("{cmd:?}");
    tracing::info!(%command, "writing the data disk");
    let out = cmd.output().map_err(|source| ImageError::Spawn {
        command: command.clone(),
        source,
    })?;
    let _ = std::fs::remove_dir_all(&tree);
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(ImageError::CommandFailed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    std::fs::rename(&tmp, &path)
        .map_err(|e| io_err("renaming the data disk into place", &path, e))?;
    let size_bytes = path
        .metadata()
        .map_err(|e| io_err("reading the size of", &path, e))?
        .len();
    let record = DataDiskRecord {
        stamp: spec.stamp(),
        size_bytes,
        files_mib: spec.files_mib(),
    };
    let json = serde_json::to_vec_pretty(&record).map_err(|source| ImageError::Json {
        op: "encoding the data disk record",
        path: record_path.clone(),
        source,
    })?;
    crate::write_atomic(&record_path, &json, "writing the data disk record")?;
    tracing::info!(path = %path.display(), size_bytes, "data disk built");
    Ok(DataDisk {
        path,
        size_bytes,
        files_mib: spec.files_mib(),
        rebuilt: true,
    })
}

/// Writes the files and `SHA256SUMS` under `root`.
pub fn write_tree(root: &Path, spec: &DataDiskSpec) -> Result<(), ImageError> {
    let mut sums = String::new();
    let mut buf = vec![0u8; 1 << 20];
    for (index, (name, mib)) in spec.files().into_iter().enumerate() {
        let path = root.join(&name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
        }
        let mut file = std::fs::File::create(&path).map_err(|e| io_err("creating", &path, e))?;
        let mut rng = SplitMix64(spec.seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut hash = Sha256::new();
        for _ in 0..mib {
            rng.fill(&mut buf);
            hash.update(&buf);
            file.write_all(&buf)
                .map_err(|e| io_err("writing", &path, e))?;
        }
        sums.push_str(&format!("{}  {name}\n", hex(&hash.finalize())));
    }
    let manifest = root.join(MANIFEST_FILE);
    std::fs::write(&manifest, sums).map_err(|e| io_err("writing", &manifest, e))
}

/// splitmix64: fast, deterministic, good enough to defeat compression and deduplication.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_exact_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> DataDiskSpec {
        DataDiskSpec {
            cold_files: 2,
            cold_file_mib: 1,
            hot_files: 1,
            hot_file_mib: 1,
            seed: 7,
        }
    }

    #[test]
    fn tree_is_deterministic_and_manifest_matches() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        write_tree(a.path(), &small()).unwrap();
        write_tree(b.path(), &small()).unwrap();
        let manifest = std::fs::read_to_string(a.path().join(MANIFEST_FILE)).unwrap();
        assert_eq!(
            manifest,
            std::fs::read_to_string(b.path().join(MANIFEST_FILE)).unwrap()
        );
        assert_eq!(manifest.lines().count(), 3);
        for line in manifest.lines() {
            let (sum, name) = line.split_once("  ").unwrap();
            let bytes = std::fs::read(a.path().join(name)).unwrap();
            assert_eq!(bytes.len(), 1 << 20);
            assert_eq!(hex(&Sha256::digest(&bytes)), sum);
        }
        // Different files differ.
        let c0 = std::fs::read(a.path().join("cold/cold-00.bin")).unwrap();
        let c1 = std::fs::read(a.path().join("cold/cold-01.bin")).unwrap();
        assert_ne!(c0, c1);
    }

    #[test]
    fn image_is_built_once_and_rebuilt_when_the_spec_changes() {
        let dir = tempfile::tempdir().unwrap();
        let disk = build(dir.path(), &small(), false).unwrap();
        assert!(disk.rebuilt && disk.size_bytes >= 35 << 20);
        // An ext4 superblock magic (0xEF53) at 1024 + 56.
        let bytes = std::fs::read(&disk.path).unwrap();
        assert_eq!(&bytes[1080..1082], &[0x53, 0xef]);
        assert!(!build(dir.path(), &small(), false).unwrap().rebuilt);
        let other = DataDiskSpec { seed: 8, ..small() };
        assert!(locate(dir.path(), &other).is_none());
        assert!(build(dir.path(), &other, false).unwrap().rebuilt);
    }
}
