//! Builds the guest image — a kernel (bzImage) and an initramfs — from Debian packages.
//!
//! [`build`] downloads Debian's 6.12 cloud kernel ([`PINNED_KERNEL_PACKAGE`]) and
//! `busybox-static` with `apt-get download` into a cache folder ([`default_cache_dir`]), unpacks
//! them with `dpkg-deb -x`, and writes an uncompressed newc initramfs ([`cpio`]) holding busybox,
//! our static `guest-trimmer`, the virtio/vsock kernel modules (decompressed, with a load order
//! computed from their dependencies, see [`modules`]) and the `/init` script ([`INIT_SCRIPT`]).
//! A stamp over every input sits beside the outputs, so a second build with the same inputs
//! returns at once with [`GuestImage::rebuilt`] false.
//!
//! Cache layout: `manifest.json` (downloaded packages with sha256), `debs/`, `extract/`, and
//! `image/{vmlinuz,initramfs.cpio,image.json}`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod apt;
pub mod cpio;
pub mod data_disk;
pub mod modules;

pub use apt::{Manifest, PackageRecord};
use cpio::CpioWriter;
use modules::{ModuleDeps, ModuleEntry, ModuleError};

/// The kernel package the image is built from when the apt lists have it.
pub const PINNED_KERNEL_PACKAGE: &str = "linux-image-6.12.117+deb12-cloud-amd64";
/// Start of the names of acceptable fallback kernel packages (`linux-image-6.12.N+deb12-cloud-amd64`).
pub const KERNEL_PACKAGE_PREFIX: &str = "linux-image-6.12.";
/// End of the names of acceptable fallback kernel packages.
pub const KERNEL_PACKAGE_SUFFIX: &str = "+deb12-cloud-amd64";
/// `apt-cache search --names-only` pattern listing the fallback kernel packages.
pub const KERNEL_PACKAGE_PATTERN: &str = r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64$";
/// The Debian package providing a static busybox at `/bin/busybox`.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Kernel modules the guest needs (a module built into the kernel is skipped).
pub const REQUIRED_MODULES: [&str; 5] = [
    "virtio_mmio",
    "virtio_balloon",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];
/// Kernel modules included when the kernel package has them.
pub const OPTIONAL_MODULES: [&str; 1] = ["virtio_blk"];
/// The guest's `/init` (busybox sh).
pub const INIT_SCRIPT: &str = include_str!("init.sh");
/// Version of the image layout; bump it whenever the image contents change for the same inputs.
pub const IMAGE_FORMAT_VERSION: u32 = 1;
/// Where the guest-trimmer binary lives in the guest.
pub const GUEST_TRIMMER_PATH: &str = "/bin/guest-trimmer";
/// Environment variable naming the guest-trimmer binary, if it is not next to the executable.
pub const TRIMMER_ENV: &str = "VMM_GUEST_TRIMMER";
/// How to build a guest-trimmer that runs in the guest (statically linked).
pub const TRIMMER_BUILD_HINT: &str = "RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release --target x86_64-unknown-linux-gnu -p guest-trimmer";

/// File names inside `<cache>/image/`.
const KERNEL_FILE: &str = "vmlinuz";
const INITRD_FILE: &str = "initramfs.cpio";
const RECORD_FILE: &str = "image.json";

/// Errors of building or locating the guest image. Each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// apt or dpkg tools are not installed.
    #[error(
        "checking for apt: {} not found on PATH; the guest image is built from Debian packages \
         with apt and dpkg; without them, pass a kernel and an initramfs by hand: \
         `vmm run --kernel BZIMAGE --initrd INITRAMFS`",
        missing.join(", ")
    )]
    AptMissing {
        /// The missing tools.
        missing: Vec<String>,
    },
    /// A command could not be started.
    #[error("starting `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// How it exited.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Neither the pinned kernel package nor a fallback is in the apt lists.
    #[error(
        "no kernel package: neither {pinned} nor any package matching {pattern} is in the apt \
         lists (run `apt-get update`?)"
    )]
    NoKernelPackage {
        /// The pinned package name.
        pinned: String,
        /// The fallback search pattern.
        pattern: String,
    },
    /// A package is not in the apt lists.
    #[error("looking up package {package}: not in the apt lists (run `apt-get update`?)")]
    PackageNotFound {
        /// The package name.
        package: String,
    },
    /// A file system operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file could not be read or written.
    #[error("{op} {}", path.display())]
    Json {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// No guest-trimmer binary was found.
    #[error(
        "finding the guest-trimmer binary: not found ({searched}); build it with `{hint}`, then \
         pass --trimmer PATH, copy it next to the vmm executable, or set {env}",
        hint = TRIMMER_BUILD_HINT,
        env = TRIMMER_ENV
    )]
    TrimmerNotFound {
        /// Where it was looked for.
        searched: String,
    },
    /// The kernel package does not have the expected files.
    #[error("reading the kernel package {}: {what}", root.display())]
    KernelLayout {
        /// Root of the unpacked package.
        root: PathBuf,
        /// What is missing or unexpected.
        what: String,
    },
    /// Selecting or ordering the kernel modules failed.
    #[error("selecting kernel modules in {}", dir.display())]
    Modules {
        /// The kernel's module folder.
        dir: PathBuf,
        /// Underlying error.
        #[source]
        source: ModuleError,
    },
    /// A compressed kernel module could not be decompressed.
    #[error("decompressing kernel module {}", path.display())]
    Decompress {
        /// The module file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A kernel module uses a compression this builder does not handle.
    #[error("decompressing kernel module {}: only .ko and .ko.xz are supported", path.display())]
    UnsupportedCompression {
        /// The module file.
        path: PathBuf,
    },
    /// Writing the initramfs archive failed.
    #[error("writing the initramfs {}", path.display())]
    Cpio {
        /// The initramfs file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: cpio::CpioError,
    },
    /// `vmm image path` found no built image.
    #[error("locating the guest image: none built in {}; run `vmm image build`", cache_dir.display())]
    NotBuilt {
        /// The cache folder looked in.
        cache_dir: PathBuf,
    },
}

pub(crate) fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> ImageError {
    ImageError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What to build and where.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// Cache folder for downloads, unpacked packages and the image ([`default_cache_dir`]).
    pub cache_dir: PathBuf,
    /// Kernel package to use instead of [`PINNED_KERNEL_PACKAGE`] (no fallback for it).
    pub kernel_package: Option<String>,
    /// The statically linked guest-trimmer binary to put at `/bin/guest-trimmer`.
    pub trimmer_path: PathBuf,
    /// Rebuild even if the stamp says the image is up to date.
    pub force: bool,
}

/// A built guest image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestImage {
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    /// The initramfs (uncompressed newc cpio).
    pub initrd: PathBuf,
    /// Kernel release, e.g. `6.12.117+deb12-cloud-amd64`.
    pub kernel_version: String,
    /// Debian package the kernel came from.
    pub kernel_package: String,
    /// Whether this call wrote the outputs (false: they were up to date).
    pub rebuilt: bool,
    /// Size of the initramfs.
    pub initrd_size_bytes: u64,
    /// Kernel module files in `/lib/modules/load-order` order.
    pub modules: Vec<String>,
}

/// The default cache folder: `$VMM_CACHE_DIR`, else `$XDG_CACHE_HOME/vmm`, else `~/.cache/vmm`.
pub fn default_cache_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("VMM_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = var("XDG_CACHE_HOME").map(PathBuf::from) {
        if dir.is_absolute() {
            return dir.join("vmm");
        }
    }
    match var("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("vmm"),
        None => std::env::temp_dir().join("vmm-cache"),
    }
}

/// The default guest-trimmer: `guest-trimmer` next to the running executable, else
/// `$VMM_GUEST_TRIMMER`.
pub fn default_trimmer_path() -> Result<PathBuf, ImageError> {
    let mut searched = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        let candidate = dir.join("guest-trimmer");
        if candidate.is_file() {
            return Ok(candidate);
        }
        searched.push(candidate.display().to_string());
    }
    match std::env::var_os(TRIMMER_ENV).filter(|v| !v.is_empty()) {
        Some(path) => {
            let path = PathBuf::from(path);
            if path.is_file() {
                return Ok(path);
            }
            searched.push(format!("${TRIMMER_ENV}={}", path.display()));
        }
        None => searched.push(format!("${TRIMMER_ENV} is not set")),
    }
    Err(ImageError::TrimmerNotFound {
        searched: searched.join("; "),
    })
}

/// Builds the guest image into `opts.cache_dir`, or returns the existing one if no input
/// changed (and `opts.force` is false).
pub fn build(opts: &ImageOptions) -> Result<GuestImage, ImageError> {
    let missing = apt::missing_tools();
    if !missing.is_empty() {
        return Err(ImageError::AptMissing { missing });
    }
    let cache = &opts.cache_dir;
    std::fs::create_dir_all(cache).map_err(|e| io_err("creating the cache folder", cache, e))?;
    let _lock = CacheLock::acquire(cache)?;

    let trimmer = std::fs::read(&opts.trimmer_path)
        .map_err(|e| io_err("reading the guest-trimmer binary", &opts.trimmer_path, e))?;
    if elf_has_interpreter(&trimmer) != Some(false) {
        tracing::warn!(
            trimmer = %opts.trimmer_path.display(),
            "guest-trimmer is not a statically linked ELF binary: it will not run in the guest \
             (build it with `{TRIMMER_BUILD_HINT}`)"
        );
    }

    let apt_dir = cache.join("apt");
    std::fs::create_dir_all(&apt_dir).map_err(|e| io_err("creating", &apt_dir, e))?;
    let apt = apt::Apt::new(&apt_dir);
    let (kernel_package, kernel_version, busybox_version) =
        resolve_packages(&apt, opts.kernel_package.as_deref())?;
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| io_err("creating", &debs, e))?;
    let manifest_path = cache.join("manifest.json");
    let manifest = Manifest::load(&manifest_path)?;
    let (kernel_rec, kernel_deb) =
        apt::ensure_deb(&apt, &kernel_package, &kernel_version, &debs, &manifest)?;
    let (busybox_rec, busybox_deb) =
        apt::ensure_deb(&apt, BUSYBOX_PACKAGE, &busybox_version, &debs, &manifest)?;

    let trimmer_sha256 = sha256_hex(&trimmer);
    let inputs = StampInputs {
        kernel_package: &kernel_package,
        kernel_deb_sha256: &kernel_rec.sha256,
        busybox_deb_sha256: &busybox_rec.sha256,
        trimmer_sha256: &trimmer_sha256,
        init_script: INIT_SCRIPT,
        required_modules: &REQUIRED_MODULES,
        optional_modules: &OPTIONAL_MODULES,
    };
    let extract_root = cache.join("extract");
    let image = build_core(&inputs, &trimmer, &cache.join("image"), opts.force, || {
        std::fs::create_dir_all(&extract_root).map_err(|e| io_err("creating", &extract_root, e))?;
        let kernel_root = apt::extract(&kernel_deb, &kernel_rec, &extract_root)?;
        let busybox_root = apt::extract(&busybox_deb, &busybox_rec, &extract_root)?;
        Ok(Extracted {
            kernel_root,
            busybox: busybox_root.join("bin").join("busybox"),
        })
    })?;

    let mut packages = BTreeMap::new();
    packages.insert(kernel_rec.name.clone(), kernel_rec);
    packages.insert(busybox_rec.name.clone(), busybox_rec);
    let new_manifest = Manifest {
        kernel_version: Some(image.kernel_version.clone()),
        kernel_package: Some(kernel_package),
        packages,
    };
    if new_manifest != manifest {
        new_manifest.store(&manifest_path)?;
        prune_cache(&debs, &extract_root, &new_manifest);
    }
    Ok(image)
}

/// Removes `.deb`s and unpacked trees of packages the manifest no longer lists (best effort).
fn prune_cache(debs: &Path, extract_root: &Path, manifest: &Manifest) {
    let keep_debs: BTreeSet<String> = manifest.packages.values().map(|p| p.file.clone()).collect();
    let keep_trees: BTreeSet<String> = manifest
        .packages
        .values()
        .map(apt::extract_dir_name)
        .collect();
    for (dir, keep) in [(debs, keep_debs), (extract_root, keep_trees)] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || keep.contains(&name) {
                continue;
            }
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing an unused cache entry");
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

/// The image already built in `cache_dir` (by [`build`]), without checking its inputs.
pub fn locate(cache_dir: &Path) -> Result<GuestImage, ImageError> {
    let out_dir = cache_dir.join("image");
    let record = match ImageRecord::load(&out_dir)? {
        Some(record) if record.outputs_exist(&out_dir) => record,
        _ => {
            return Err(ImageError::NotBuilt {
                cache_dir: cache_dir.to_path_buf(),
            })
        }
    };
    Ok(record.into_image(&out_dir, false))
}

/// Picks the kernel package — the one asked for, else the pinned one, else (with a warning) the
/// newest `linux-image-6.12.N+deb12-cloud-amd64` in the apt lists — and returns it with its
/// candidate version and busybox-static's.
fn resolve_packages(
    apt: &apt::Apt,
    requested: Option<&str>,
) -> Result<(String, String, String), ImageError> {
    let kernel = requested.unwrap_or(PINNED_KERNEL_PACKAGE);
    let mut candidates = apt.candidates(&[kernel, BUSYBOX_PACKAGE])?;
    let busybox_version =
        candidates
            .remove(BUSYBOX_PACKAGE)
            .ok_or_else(|| ImageError::PackageNotFound {
                package: BUSYBOX_PACKAGE.to_string(),
            })?;
    if let Some(version) = candidates.remove(kernel) {
        return Ok((kernel.to_string(), version, busybox_version));
    }
    if requested.is_some() {
        return Err(ImageError::PackageNotFound {
            package: kernel.to_string(),
        });
    }
    let not_found = || ImageError::NoKernelPackage {
        pinned: PINNED_KERNEL_PACKAGE.to_string(),
        pattern: KERNEL_PACKAGE_PATTERN.to_string(),
    };
    let fallback = apt.newest_kernel_package()?.ok_or_else(not_found)?;
    tracing::warn!(
        "the pinned kernel package {PINNED_KERNEL_PACKAGE} is not in the apt lists; \
         using the newest available, {fallback}"
    );
    let version = apt
        .candidates(&[&fallback])?
        .remove(&fallback)
        .ok_or_else(not_found)?;
    Ok((fallback, version, busybox_version))
}

/// Everything the image depends on; its digest is the stamp kept beside the outputs.
#[derive(Debug, Clone)]
pub struct StampInputs<'a> {
    /// Kernel package name.
    pub kernel_package: &'a str,
    /// SHA-256 of the kernel `.deb`.
    pub kernel_deb_sha256: &'a str,
    /// SHA-256 of the busybox-static `.deb`.
    pub busybox_deb_sha256: &'a str,
    /// SHA-256 of the guest-trimmer binary.
    pub trimmer_sha256: &'a str,
    /// Text of `/init`.
    pub init_script: &'a str,
    /// Modules that must be in the image.
    pub required_modules: &'a [&'a str],
    /// Modules included if present.
    pub optional_modules: &'a [&'a str],
}

impl StampInputs<'_> {
    /// SHA-256 (hex) over all inputs and [`IMAGE_FORMAT_VERSION`].
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |name: &str, value: &[u8]| {
            for part in [name.as_bytes(), value] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part);
            }
        };
        field("format_version", &IMAGE_FORMAT_VERSION.to_le_bytes());
        field("kernel_package", self.kernel_package.as_bytes());
        field("kernel_deb_sha256", self.kernel_deb_sha256.as_bytes());
        field("busybox_deb_sha256", self.busybox_deb_sha256.as_bytes());
        field("trimmer_sha256", self.trimmer_sha256.as_bytes());
        field("init_script", self.init_script.as_bytes());
        field(
            "required_modules",
            self.required_modules.join(",").as_bytes(),
        );
        field(
            "optional_modules",
            self.optional_modules.join(",").as_bytes(),
        );
        hex(&h.finalize())
    }
}

/// `image/image.json`: the stamp and what was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ImageRecord {
    format_version: u32,
    stamp: String,
    kernel_package: String,
    kernel_version: String,
    kernel_file: String,
    kernel_size_bytes: u64,
    initrd_file: String,
    initrd_size_bytes: u64,
    trimmer_sha256: String,
    modules: Vec<String>,
}

impl ImageRecord {
    fn load(out_dir: &Path) -> Result<Option<Self>, ImageError> {
        let path = out_dir.join(RECORD_FILE);
        match std::fs::read(&path) {
            // An unreadable or old-format record just means "rebuild".
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading the image record", &path, e)),
        }
    }

    fn outputs_exist(&self, out_dir: &Path) -> bool {
        let size = |f: &str| out_dir.join(f).metadata().ok().map(|m| m.len());
        size(&self.kernel_file) == Some(self.kernel_size_bytes)
            && size(&self.initrd_file) == Some(self.initrd_size_bytes)
    }

    fn into_image(self, out_dir: &Path, rebuilt: bool) -> GuestImage {
        GuestImage {
            kernel: out_dir.join(&self.kernel_file),
            initrd: out_dir.join(&self.initrd_file),
            kernel_version: self.kernel_version,
            kernel_package: self.kernel_package,
            rebuilt,
            initrd_size_bytes: self.initrd_size_bytes,
            modules: self.modules,
        }
    }
}

/// Unpacked inputs, produced only when a rebuild is needed.
struct Extracted {
    /// Root of the unpacked kernel package.
    kernel_root: PathBuf,
    /// The static busybox binary.
    busybox: PathBuf,
}

/// Returns the image in `out_dir` if its stamp matches `inputs`, else extracts (via `extract`)
/// and writes it.
fn build_core(
    inputs: &StampInputs<'_>,
    trimmer: &[u8],
    out_dir: &Path,
    force: bool,
    extract: impl FnOnce() -> Result<Extracted, ImageError>,
) -> Result<GuestImage, ImageError> {
    let stamp = inputs.digest();
    if !force {
        if let Some(record) = ImageRecord::load(out_dir)? {
            if record.stamp == stamp
                && record.format_version == IMAGE_FORMAT_VERSION
                && record.outputs_exist(out_dir)
            {
                tracing::info!(dir = %out_dir.display(), "guest image is up to date");
                return Ok(record.into_image(out_dir, false));
            }
        }
    }
    let extracted = extract()?;
    let busybox = std::fs::read(&extracted.busybox)
        .map_err(|e| io_err("reading busybox", &extracted.busybox, e))?;
    let kernel_root = &extracted.kernel_root;
    let (kernel_version, module_dir) = kernel_release(kernel_root)?;
    let vmlinuz = kernel_root
        .join("boot")
        .join(format!("vmlinuz-{kernel_version}"));
    if !vmlinuz.is_file() {
        return Err(ImageError::KernelLayout {
            root: kernel_root.clone(),
            what: format!("no boot/vmlinuz-{kernel_version}"),
        });
    }
    let modules = select_modules(&module_dir)?;

    std::fs::create_dir_all(out_dir).map_err(|e| io_err("creating", out_dir, e))?;
    // The old record goes first: a half-written image is never taken as up to date.
    let record_path = out_dir.join(RECORD_FILE);
    match std::fs::remove_file(&record_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("removing the old image record", &record_path, e)),
    }

    let initrd_path = out_dir.join(INITRD_FILE);
    tracing::info!(path = %initrd_path.display(), modules = modules.len(), "writing initramfs");
    let archive =
        write_initramfs(&busybox, trimmer, &modules).map_err(|source| ImageError::Cpio {
            path: initrd_path.clone(),
            source,
        })?;
    write_atomic(&initrd_path, &archive, "writing the initramfs")?;
    let initrd_size_bytes = archive.len() as u64;
    tracing::info!(
        path = %initrd_path.display(),
        initrd_size_bytes,
        "wrote initramfs"
    );

    let kernel_path = out_dir.join(KERNEL_FILE);
    let kernel = std::fs::read(&vmlinuz).map_err(|e| io_err("reading the kernel", &vmlinuz, e))?;
    write_atomic(&kernel_path, &kernel, "writing the kernel")?;

    let record = ImageRecord {
        format_version: IMAGE_FORMAT_VERSION,
        stamp,
        kernel_package: inputs.kernel_package.to_string(),
        kernel_version,
        kernel_file: KERNEL_FILE.to_string(),
        kernel_size_bytes: kernel.len() as u64,
        initrd_file: INITRD_FILE.to_string(),
        initrd_size_bytes,
        trimmer_sha256: inputs.trimmer_sha256.to_string(),
        modules: modules.iter().map(|m| m.file_name.clone()).collect(),
    };
    let json = serde_json::to_vec_pretty(&record).map_err(|source| ImageError::Json {
        op: "encoding the image record",
        path: record_path.clone(),
        source,
    })?;
    write_atomic(&record_path, &json, "writing the image record")?;
    tracing::info!(kernel = %kernel_path.display(), kernel_version = %record.kernel_version, "guest image built");
    Ok(record.into_image(out_dir, true))
}

/// The kernel release (the only folder under `lib/modules/`) and that folder.
fn kernel_release(kernel_root: &Path) -> Result<(String, PathBuf), ImageError> {
    let lib_modules = kernel_root.join("lib").join("modules");
    let mut releases = Vec::new();
    for entry in std::fs::read_dir(&lib_modules)
        .map_err(|e| io_err("listing kernel modules", &lib_modules, e))?
    {
        let entry = entry.map_err(|e| io_err("listing kernel modules", &lib_modules, e))?;
        if entry.path().is_dir() {
            releases.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    match releases.as_slice() {
        [release] => Ok((release.clone(), lib_modules.join(release))),
        _ => Err(ImageError::KernelLayout {
            root: kernel_root.to_path_buf(),
            what: format!("expected one folder in lib/modules, found {releases:?}"),
        }),
    }
}

/// A decompressed kernel module for the initramfs.
struct ModuleFile {
    /// File name in `/lib/modules/` (e.g. `vsock.ko`).
    file_name: String,
    /// Uncompressed ELF contents.
    data: Vec<u8>,
}

/// Picks [`REQUIRED_MODULES`] and the present [`OPTIONAL_MODULES`] plus their dependencies from
/// the kernel's module folder, decompressed, dependencies first.
fn select_modules(module_dir: &Path) -> Result<Vec<ModuleFile>, ImageError> {
    let modules_err = |source| ImageError::Modules {
        dir: module_dir.to_path_buf(),
        source,
    };
    let builtin_path = module_dir.join("modules.builtin");
    let builtin = match std::fs::read_to_string(&builtin_path) {
        Ok(text) => modules::parse_builtin(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => return Err(io_err("reading", &builtin_path, e)),
    };
    let mut decompressed: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let wanted: Vec<&str> = REQUIRED_MODULES
        .iter()
        .chain(OPTIONAL_MODULES.iter())
        .copied()
        .collect();
    let dep_path = module_dir.join("modules.dep");
    let deps = match std::fs::read_to_string(&dep_path) {
        Ok(text) => ModuleDeps::parse(&text).map_err(modules_err)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::debug!("no modules.dep (Debian runs depmod at install); reading .modinfo");
            deps_from_modinfo(module_dir, &wanted, &mut decompressed)?
        }
        Err(e) => return Err(io_err("reading", &dep_path, e)),
    };
    let mut requested = Vec::new();
    for name in REQUIRED_MODULES {
        if deps.get(name).is_some() {
            requested.push(name);
        } else if builtin.contains(&modules::normalize_name(name)) {
            tracing::info!(module = name, "built into the kernel; not adding it");
        } else {
            return Err(modules_err(ModuleError::Missing {
                module: name.to_string(),
                required_by: None,
            }));
        }
    }
    for name in OPTIONAL_MODULES {
        if deps.get(name).is_some() {
            requested.push(name);
        } else {
            tracing::info!(module = name, "optional module not in the kernel package");
        }
    }
    let order = deps.load_order(&requested).map_err(modules_err)?;
    let mut files = Vec::with_capacity(order.len());
    for entry in order {
        let data = match decompressed.remove(&entry.name) {
            Some(data) => data,
            None => read_module(&module_dir.join(&entry.path))?,
        };
        files.push(ModuleFile {
            file_name: entry.ko_file_name(),
            data,
        });
    }
    Ok(files)
}

/// Dependencies of `wanted` (and theirs) read from the modules' `.modinfo`, for packages without
/// `modules.dep`. Decompressed modules are left in `decompressed` for reuse.
fn deps_from_modinfo(
    module_dir: &Path,
    wanted: &[&str],
    decompressed: &mut BTreeMap<String, Vec<u8>>,
) -> Result<ModuleDeps, ImageError> {
    // name -> path relative to module_dir, for every module file in the tree.
    let mut index: BTreeMap<String, String> = BTreeMap::new();
    let mut stack = vec![PathBuf::from("kernel")];
    while let Some(rel) = stack.pop() {
        let dir = module_dir.join(&rel);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("listing kernel modules", &dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_err("listing kernel modules", &dir, e))?;
            let file_type = entry
                .file_type()
                .map_err(|e| io_err("listing kernel modules", &entry.path(), e))?;
            let rel_path = rel.join(entry.file_name());
            if file_type.is_dir() {
                stack.push(rel_path);
            } else {
                let rel_text = rel_path.to_string_lossy().into_owned();
                if rel_text.contains(".ko") {
                    index.insert(modules::name_from_path(&rel_text), rel_text);
                }
            }
        }
    }
    let mut entries = Vec::new();
    let mut queue: Vec<String> = wanted.iter().map(|n| modules::normalize_name(n)).collect();
    let mut seen = BTreeSet::new();
    while let Some(name) = queue.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        // Absent modules are reported (or skipped, if optional or built in) by the caller.
        let Some(path) = index.get(&name) else {
            continue;
        };
        let data = read_module(&module_dir.join(path))?;
        let deps = modules::modinfo_depends(path, &data).map_err(|source| ImageError::Modules {
            dir: module_dir.to_path_buf(),
            source,
        })?;
        queue.extend(deps.iter().cloned());
        decompressed.insert(name.clone(), data);
        entries.push(ModuleEntry {
            name,
            path: path.clone(),
            deps,
        });
    }
    Ok(ModuleDeps::from_entries(entries))
}

/// Reads a kernel module, decompressing `.ko.xz`.
fn read_module(path: &Path) -> Result<Vec<u8>, ImageError> {
    let name = path.to_string_lossy();
    if name.ends_with(".ko") {
        return std::fs::read(path).map_err(|e| io_err("reading kernel module", path, e));
    }
    if !name.ends_with(".ko.xz") {
        return Err(ImageError::UnsupportedCompression {
            path: path.to_path_buf(),
        });
    }
    let file = File::open(path).map_err(|e| io_err("opening kernel module", path, e))?;
    let mut data = Vec::new();
    xz2::read::XzDecoder::new(file)
        .read_to_end(&mut data)
        .map_err(|source| ImageError::Decompress {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(data)
}

/// Lays out the initramfs and returns the archive bytes.
fn write_initramfs(
    busybox: &[u8],
    trimmer: &[u8],
    modules: &[ModuleFile],
) -> Result<Vec<u8>, cpio::CpioError> {
    let mut w = CpioWriter::new(Vec::new());
    for (dir, perm) in [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("lib", 0o755),
        ("lib/modules", 0o755),
        ("mnt", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("run", 0o755),
        ("sbin", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("usr", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("var", 0o755),
    ] {
        w.dir(dir, perm)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.file("bin/busybox", 0o755, busybox)?;
    // /init's `#!/bin/sh` needs this before `busybox --install` runs.
    w.symlink("bin/sh", "busybox")?;
    w.file(GUEST_TRIMMER_PATH.trim_start_matches('/'), 0o755, trimmer)?;
    let mut load_order = String::new();
    for m in modules {
        w.file(&format!("lib/modules/{}", m.file_name), 0o644, &m.data)?;
        load_order.push_str(&m.file_name);
        load_order.push('\n');
    }
    w.file("lib/modules/load-order", 0o644, load_order.as_bytes())?;
    w.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
    w.finish()
}

/// Writes `data` to a temporary file beside `path`, then renames it over `path`.
pub(crate) fn write_atomic(path: &Path, data: &[u8], op: &'static str) -> Result<(), ImageError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, data).map_err(|e| io_err(op, &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(op, path, e)
    })
}

/// SHA-256 (hex) and size of a file.
pub(crate) fn sha256_file(path: &Path) -> Result<(String, u64), ImageError> {
    let mut file = File::open(path).map_err(|e| io_err("opening", path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size_bytes = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| io_err("reading", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size_bytes += n as u64;
    }
    Ok((hex(&h.finalize()), size_bytes))
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether an ELF file asks for a dynamic loader (`PT_INTERP`); `None` if it is not a 64-bit
/// little-endian ELF file.
fn elf_has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if elf.get(..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None;
    }
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let ph_off = usize::try_from(u64::from_le_bytes(elf.get(0x20..0x28)?.try_into().ok()?)).ok()?;
    let ph_entsize = usize::from(u16_at(0x36)?);
    let ph_num = usize::from(u16_at(0x38)?);
    for i in 0..ph_num {
        let at = ph_off + i * ph_entsize;
        let p_type = u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?);
        if p_type == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

/// An exclusive `flock` on `<cache>/.lock`, so concurrent builds do not interleave.
struct CacheLock {
    _file: File,
}

impl CacheLock {
    fn acquire(cache: &Path) -> Result<Self, ImageError> {
        let path = cache.join(".lock");
        let file = File::create(&path).map_err(|e| io_err("creating the cache lock", &path, e))?;
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err(
                "locking the cache",
                &path,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests;
