//! Bundling the host's QEMU into a rig payload: the binary, every shared library `ldd` lists,
//! the dynamic loader, and the firmware the microvm machine loads.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Firmware and option ROMs the microvm machine may load from its data directory (`-L`):
/// `bios-microvm.bin` (its default firmware, qboot), `linuxboot_dma.bin` (the option ROM
/// that boots `-kernel`), and small ones other paths of x86 `-kernel` loading refer to.
pub const FIRMWARE: &[&str] = &[
    "bios-microvm.bin",
    "qboot.rom",
    "linuxboot_dma.bin",
    "linuxboot.bin",
    "pvh.bin",
    "kvmvapic.bin",
    "multiboot_dma.bin",
];

/// Firmware without which microvm does not start.
pub const REQUIRED_FIRMWARE: &[&str] = &["bios-microvm.bin", "linuxboot_dma.bin"];

/// Where firmware is looked for, in order.
pub const FIRMWARE_DIRS: &[&str] = &["/usr/share/qemu", "/usr/share/seabios"];

/// One shared object `ldd` reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedObject {
    /// The soname (`libc.so.6`).
    pub name: String,
    /// Where it resolved to.
    pub path: PathBuf,
}

/// What `ldd` says a binary needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LddOutput {
    /// Libraries (`name => path`), in ldd's order.
    pub libs: Vec<SharedObject>,
    /// The ELF interpreter (`/lib64/ld-linux-x86-64.so.2`).
    pub loader: Option<PathBuf>,
}

/// Parses `ldd`'s output; a `not found` library is an error naming it.
pub fn parse_ldd(text: &str) -> anyhow::Result<LddOutput> {
    let mut out = LddOutput {
        libs: Vec::new(),
        loader: None,
    };
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some((name, rest)) = line.split_once("=>") {
            let name = name.trim().to_string();
            let rest = rest.trim();
            if rest.starts_with("not found") {
                bail!("ldd: {name} not found");
            }
            let path = rest.split_whitespace().next().unwrap_or("");
            if path.starts_with('/') {
                out.libs.push(SharedObject {
                    name,
                    path: PathBuf::from(path),
                });
            }
            // `linux-vdso.so.1 =>  (0x...)` on some ldd versions: the vDSO has no file.
        } else if let Some(first) = line.split_whitespace().next() {
            if first.starts_with('/') {
                out.loader = Some(PathBuf::from(first));
            }
            // `linux-vdso.so.1 (0x...)`: no file.
        }
    }
    Ok(out)
}

/// A QEMU ready to be copied into a payload.
#[derive(Debug, Clone)]
pub struct QemuBundle {
    /// The binary.
    pub binary: PathBuf,
    /// Its libraries.
    pub libs: Vec<SharedObject>,
    /// Its loader.
    pub loader: PathBuf,
    /// Firmware files found: (name, source path).
    pub firmware: Vec<(String, PathBuf)>,
    /// `--version`'s first line, run on the host.
    pub version: String,
    /// Bytes of binary + libraries + loader.
    pub bytes: u64,
}

/// Finds QEMU's libraries, loader and firmware on this host.
pub fn bundle(binary: &Path) -> anyhow::Result<QemuBundle> {
    bundle_from(binary, None, &[])
}

/// Like [`bundle`] for a QEMU unpacked outside the system (e.g. from bookworm-backports):
/// `lib_dir` is searched first for its libraries (`LD_LIBRARY_PATH` for ldd and `--version`),
/// `firmware_dirs` before the system's [`FIRMWARE_DIRS`].
pub fn bundle_from(
    binary: &Path,
    lib_dir: Option<&Path>,
    firmware_dirs: &[PathBuf],
) -> anyhow::Result<QemuBundle> {
    let with_libs = |cmd: &mut Command| {
        if let Some(dir) = lib_dir {
            cmd.env("LD_LIBRARY_PATH", dir);
        }
    };
    let mut ldd = Command::new("ldd");
    with_libs(&mut ldd);
    let out = ldd
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    if !out.status.success() {
        bail!(
            "ldd {} failed ({}): {}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let ldd = parse_ldd(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("reading ldd's output for {}", binary.display()))?;
    let loader = ldd
        .loader
        .with_context(|| format!("ldd names no dynamic loader for {}", binary.display()))?;
    let mut firmware = Vec::new();
    let dirs: Vec<PathBuf> = firmware_dirs
        .iter()
        .cloned()
        .chain(FIRMWARE_DIRS.iter().map(PathBuf::from))
        .collect();
    for name in FIRMWARE {
        if let Some(p) = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
            firmware.push((name.to_string(), p));
        }
    }
    for name in REQUIRED_FIRMWARE {
        if !firmware.iter().any(|(n, _)| n == name) {
            bail!(
                "QEMU firmware {name} is not in any of {dirs:?} (install qemu-system-data / seabios)"
            );
        }
    }
    let mut version = Command::new(binary);
    with_libs(&mut version);
    let version = version
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", binary.display()))?;
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let mut bytes = 0;
    for p in std::iter::once(binary)
        .chain(ldd.libs.iter().map(|l| l.path.as_path()))
        .chain(std::iter::once(loader.as_path()))
    {
        bytes += std::fs::metadata(p)
            .with_context(|| format!("stat {}", p.display()))?
            .len();
    }
    Ok(QemuBundle {
        binary: binary.to_path_buf(),
        libs: ldd.libs,
        loader,
        firmware,
        version,
        bytes,
    })
}

/// The first line of `program --version`, or why it could not be run.
pub fn version_of(program: &Path) -> String {
    match Command::new(program).arg("--version").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string(),
        Ok(o) => format!("`{} --version` failed: {}", program.display(), o.status),
        Err(e) => format!("`{} --version` could not run: {e}", program.display()),
    }
}

/// `(major, minor)` of a `QEMU emulator version 10.0.2 (Debian ...)` line.
pub fn parse_version(line: &str) -> Option<(u32, u32)> {
    let rest = line.split("version ").nth(1)?;
    let mut nums = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    Some((nums.next()?.parse().ok()?, nums.next()?.parse().ok()?))
}

/// Whether a QEMU of this `--version` line has the `mapped-ram` migration capability (9.0+);
/// `Err` says why not.
pub fn mapped_ram_support(version_line: &str) -> Result<(), String> {
    match parse_version(version_line) {
        Some((major, _)) if major >= 9 => Ok(()),
        Some((major, minor)) => Err(format!(
            "QEMU {major}.{minor} has no mapped-ram migration capability (it arrived in 9.0)"
        )),
        None => Err(format!("cannot read a QEMU version from {version_line:?}")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_and_mapped_ram() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"),
            Some((10, 0))
        );
        assert_eq!(
            parse_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18+b3)"),
            Some((7, 2))
        );
        assert!(mapped_ram_support("QEMU emulator version 9.0.0").is_ok());
        let e = mapped_ram_support("QEMU emulator version 7.2.19").unwrap_err();
        assert!(e.contains("7.2") && e.contains("9.0"), "{e}");
        assert!(mapped_ram_support("garbage").is_err());
    }

    use super::*;

    const LDD: &str = "\tlinux-vdso.so.1 (0x00007ff83a5e1000)
\tlibpixman-1.so.0 => /lib/x86_64-linux-gnu/libpixman-1.so.0 (0x00007ff839355000)
\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007ff839300000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007ff837fdb000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007ff83a5e3000)
";

    #[test]
    fn ldd_libraries_and_loader() {
        let o = parse_ldd(LDD).unwrap();
        assert_eq!(o.libs.len(), 3);
        assert_eq!(o.libs[0].name, "libpixman-1.so.0");
        assert_eq!(
            o.libs[2].path,
            PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6")
        );
        assert_eq!(o.loader, Some(PathBuf::from("/lib64/ld-linux-x86-64.so.2")));
    }

    #[test]
    fn missing_library_is_named() {
        let e = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(e.to_string().contains("libfoo.so.1"), "{e}");
    }

    #[test]
    fn old_style_vdso_line_is_skipped() {
        let o = parse_ldd("\tlinux-vdso.so.1 =>  (0x00007fff)\n").unwrap();
        assert!(o.libs.is_empty() && o.loader.is_none());
    }
}
