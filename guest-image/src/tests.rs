//! Tests of the image assembly, the stamp and `/init`, on a fake kernel package (no apt needed).

use std::io::Write;
use std::path::Path;

use super::*;
use crate::cpio::{S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG};
use crate::modules::fake_module;

const RELEASE: &str = "6.12.1+test-cloud-amd64";

fn xz(data: &[u8]) -> Vec<u8> {
    let mut enc = xz2::write::XzEncoder::new(Vec::new(), 6);
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// A kernel package tree like Debian's: no modules.dep, `.ko.xz` modules with `.modinfo`.
fn fake_kernel_tree(root: &Path, with_virtio_blk: bool) {
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::write(
        root.join("boot").join(format!("vmlinuz-{RELEASE}")),
        b"fake bzImage",
    )
    .unwrap();
    let mods = root.join("lib/modules").join(RELEASE);
    let put = |rel: &str, depends: &str| {
        let path = mods.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let modinfo = format!("license=GPL\0depends={depends}\0name=x\0");
        std::fs::write(path, xz(&fake_module(modinfo.as_bytes()))).unwrap();
    };
    put("kernel/drivers/virtio/virtio_mmio.ko.xz", "");
    put("kernel/drivers/virtio/virtio_balloon.ko.xz", "");
    put("kernel/net/vmw_vsock/vsock.ko.xz", "");
    put(
        "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz",
        "vsock",
    );
    put(
        "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz",
        "vmw_vsock_virtio_transport_common,vsock",
    );
    put(
        "kernel/net/vmw_vsock/vmw_vsock_vmci_transport.ko.xz",
        "vsock",
    );
    if with_virtio_blk {
        put("kernel/drivers/block/virtio_blk.ko.xz", "");
    }
    std::fs::write(
        mods.join("modules.builtin"),
        "kernel/fs/ext4/ext4.ko\nkernel/drivers/virtio/virtio_pci.ko\n",
    )
    .unwrap();
}

struct Fixture {
    _dir: tempfile::TempDir,
    kernel_root: PathBuf,
    busybox: PathBuf,
    out_dir: PathBuf,
}

fn fixture(with_virtio_blk: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let kernel_root = dir.path().join("kernel");
    fake_kernel_tree(&kernel_root, with_virtio_blk);
    let busybox = dir.path().join("busybox");
    std::fs::write(&busybox, b"fake busybox").unwrap();
    let out_dir = dir.path().join("image");
    Fixture {
        kernel_root,
        busybox,
        out_dir,
        _dir: dir,
    }
}

fn inputs<'a>(trimmer_sha256: &'a str) -> StampInputs<'a> {
    StampInputs {
        kernel_package: "linux-image-test",
        kernel_deb_sha256: "k",
        busybox_deb_sha256: "b",
        trimmer_sha256,
        init_script: INIT_SCRIPT,
        required_modules: &REQUIRED_MODULES,
        optional_modules: &OPTIONAL_MODULES,
    }
}

fn build_fixture(
    fx: &Fixture,
    trimmer: &[u8],
    force: bool,
    extracted: &mut u32,
) -> Result<GuestImage, ImageError> {
    let sha = sha256_hex(trimmer);
    build_core(&inputs(&sha), trimmer, &fx.out_dir, force, || {
        *extracted += 1;
        Ok(Extracted {
            kernel_root: fx.kernel_root.clone(),
            busybox: fx.busybox.clone(),
        })
    })
}

#[test]
fn builds_an_initramfs_with_everything_in_place() {
    let fx = fixture(true);
    let mut extracted = 0;
    let image = build_fixture(&fx, b"fake trimmer", false, &mut extracted).unwrap();
    assert!(image.rebuilt);
    assert_eq!(extracted, 1);
    assert_eq!(image.kernel_version, RELEASE);
    assert_eq!(image.kernel_package, "linux-image-test");
    assert_eq!(std::fs::read(&image.kernel).unwrap(), b"fake bzImage");

    let archive = std::fs::read(&image.initrd).unwrap();
    assert_eq!(archive.len() as u64, image.initrd_size_bytes);
    let entries = cpio::parse(&archive).unwrap();
    let find = |name: &str| {
        entries
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    for dir in [
        "dev",
        "proc",
        "sys",
        "tmp",
        "mnt",
        "root",
        "bin",
        "lib/modules",
    ] {
        assert_eq!(find(dir).file_type(), S_IFDIR, "{dir}");
    }
    let console = find("dev/console");
    assert_eq!(console.file_type(), S_IFCHR);
    assert_eq!((console.rdev_major, console.rdev_minor), (5, 1));
    assert_eq!(find("bin/busybox").data, b"fake busybox");
    assert_eq!(find("bin/sh").file_type(), S_IFLNK);
    assert_eq!(find("bin/guest-trimmer").data, b"fake trimmer");
    assert_eq!(find("bin/guest-trimmer").mode, S_IFREG | 0o755);
    let init = find("init");
    assert_eq!(init.mode, S_IFREG | 0o755);
    assert_eq!(init.data, INIT_SCRIPT.as_bytes());

    let load_order = String::from_utf8(find("lib/modules/load-order").data.clone()).unwrap();
    let order: Vec<&str> = load_order.lines().collect();
    assert_eq!(order.len(), 6, "{order:?}");
    let pos = |m: &str| order.iter().position(|o| *o == m).unwrap();
    assert!(pos("vsock.ko") < pos("vmw_vsock_virtio_transport_common.ko"));
    assert!(pos("vmw_vsock_virtio_transport_common.ko") < pos("vmw_vsock_virtio_transport.ko"));
    assert!(order.contains(&"virtio_blk.ko"));
    assert!(!order.contains(&"vmw_vsock_vmci_transport.ko"));
    assert_eq!(image.modules, order);
    for m in &order {
        // Decompressed: plain ELF, not xz.
        let data = &find(&format!("lib/modules/{m}")).data;
        assert_eq!(&data[..4], b"\x7fELF", "{m}");
    }
    // Parents come before children in the archive (the kernel needs that).
    let index = |n: &str| entries.iter().position(|e| e.name == n).unwrap();
    assert!(index("lib/modules") < index("lib/modules/vsock.ko"));
    assert!(index("bin") < index("bin/busybox"));

    // `vmm image path` finds the same image.
    let cache = fx.out_dir.parent().unwrap();
    let located = locate(cache).unwrap();
    assert_eq!(
        located,
        GuestImage {
            rebuilt: false,
            ..image
        }
    );
}

#[test]
fn optional_module_may_be_absent() {
    let fx = fixture(false);
    let image = build_fixture(&fx, b"t", false, &mut 0).unwrap();
    assert_eq!(image.modules.len(), 5);
    assert!(!image.modules.iter().any(|m| m == "virtio_blk.ko"));
}

#[test]
fn missing_required_module_is_named() {
    let fx = fixture(true);
    std::fs::remove_file(
        fx.kernel_root
            .join("lib/modules")
            .join(RELEASE)
            .join("kernel/net/vmw_vsock/vsock.ko.xz"),
    )
    .unwrap();
    let err = build_fixture(&fx, b"t", false, &mut 0).unwrap_err();
    let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(text.contains("vsock is not in modules.dep"), "{text}");
}

#[test]
fn modules_dep_is_used_when_present() {
    let fx = fixture(true);
    let mods = fx.kernel_root.join("lib/modules").join(RELEASE);
    // A modules.dep that (unlike .modinfo) makes virtio_balloon depend on virtio_mmio.
    std::fs::write(
        mods.join("modules.dep"),
        "kernel/drivers/virtio/virtio_balloon.ko.xz: kernel/drivers/virtio/virtio_mmio.ko.xz\n\
         kernel/drivers/virtio/virtio_mmio.ko.xz:\n\
         kernel/net/vmw_vsock/vsock.ko.xz:\n\
         kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz: kernel/net/vmw_vsock/vsock.ko.xz\n\
         kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz kernel/net/vmw_vsock/vsock.ko.xz\n",
    )
    .unwrap();
    let image = build_fixture(&fx, b"t", false, &mut 0).unwrap();
    // virtio_blk is in the tree but not in modules.dep: modules.dep is authoritative.
    assert_eq!(
        image.modules,
        [
            "virtio_mmio.ko",
            "virtio_balloon.ko",
            "vsock.ko",
            "vmw_vsock_virtio_transport_common.ko",
            "vmw_vsock_virtio_transport.ko"
        ]
    );
}

#[test]
fn same_inputs_do_not_rebuild_and_changes_do() {
    let fx = fixture(true);
    let mut extracted = 0;
    let first = build_fixture(&fx, b"trimmer v1", false, &mut extracted).unwrap();
    assert!(first.rebuilt);
    let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let (kernel_mtime, initrd_mtime) = (mtime(&first.kernel), mtime(&first.initrd));
    std::thread::sleep(std::time::Duration::from_millis(20));

    // Same inputs: nothing extracted, nothing written.
    let second = build_fixture(&fx, b"trimmer v1", false, &mut extracted).unwrap();
    assert!(!second.rebuilt);
    assert_eq!(extracted, 1);
    assert_eq!(mtime(&second.kernel), kernel_mtime);
    assert_eq!(mtime(&second.initrd), initrd_mtime);
    assert_eq!(
        GuestImage {
            rebuilt: true,
            ..second
        },
        first
    );

    // A changed trimmer rebuilds.
    let third = build_fixture(&fx, b"trimmer v2", false, &mut extracted).unwrap();
    assert!(third.rebuilt);
    assert_eq!(extracted, 2);
    let entries = cpio::parse(&std::fs::read(&third.initrd).unwrap()).unwrap();
    let trimmer = entries
        .iter()
        .find(|e| e.name == "bin/guest-trimmer")
        .unwrap();
    assert_eq!(trimmer.data, b"trimmer v2");

    // --force rebuilds with unchanged inputs.
    let forced = build_fixture(&fx, b"trimmer v2", true, &mut extracted).unwrap();
    assert!(forced.rebuilt);
    assert_eq!(extracted, 3);

    // A deleted output rebuilds.
    std::fs::remove_file(&forced.initrd).unwrap();
    assert!(
        build_fixture(&fx, b"trimmer v2", false, &mut extracted)
            .unwrap()
            .rebuilt
    );
    assert_eq!(extracted, 4);
}

#[test]
fn stamp_covers_every_input() {
    let base = inputs("t");
    let digest = base.digest();
    assert_eq!(digest, inputs("t").digest(), "deterministic");
    assert_eq!(digest.len(), 64);
    let variants = [
        StampInputs {
            kernel_package: "other",
            ..base.clone()
        },
        StampInputs {
            kernel_deb_sha256: "k2",
            ..base.clone()
        },
        StampInputs {
            busybox_deb_sha256: "b2",
            ..base.clone()
        },
        StampInputs {
            trimmer_sha256: "t2",
            ..base.clone()
        },
        StampInputs {
            init_script: "#!/bin/sh\n",
            ..base.clone()
        },
        StampInputs {
            required_modules: &["vsock"],
            ..base.clone()
        },
        StampInputs {
            optional_modules: &[],
            ..base.clone()
        },
    ];
    for v in variants {
        assert_ne!(v.digest(), digest, "{v:?}");
    }
    // Field boundaries matter: moving bytes between fields changes the digest.
    let a = StampInputs {
        kernel_deb_sha256: "ab",
        busybox_deb_sha256: "c",
        ..base.clone()
    };
    let b = StampInputs {
        kernel_deb_sha256: "a",
        busybox_deb_sha256: "bc",
        ..base
    };
    assert_ne!(a.digest(), b.digest());
}

#[test]
fn locate_without_image_says_how_to_build() {
    let dir = tempfile::tempdir().unwrap();
    let err = locate(dir.path()).unwrap_err();
    assert!(err.to_string().contains("run `vmm image build`"), "{err}");
}

#[test]
fn init_script_is_valid_shell() {
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), INIT_SCRIPT).unwrap();
    let mut checked = 0;
    for shell in [
        &["sh"][..],
        &["busybox", "sh"],
        &["dash"],
        &["bash", "--posix"],
    ] {
        let Ok(out) = std::process::Command::new(shell[0])
            .args(&shell[1..])
            .arg("-n")
            .arg(script.path())
            .output()
        else {
            continue;
        };
        assert!(
            out.status.success(),
            "{shell:?} -n: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked > 0, "no shell to check /init with");
}

#[test]
fn init_script_speaks_the_console_protocol() {
    assert!(INIT_SCRIPT.starts_with("#!/bin/sh\n"));
    assert!(INIT_SCRIPT.contains("echo \"VMM-GUEST-READY\"\n"));
    assert!(INIT_SCRIPT.contains("echo \"VMM-SYSINFO $sysinfo\""));
    assert!(INIT_SCRIPT.contains("/bin/guest-trimmer sysinfo --json"));
    assert!(INIT_SCRIPT.contains("echo \"VMM-RUN-EXIT $status\""));
    assert!(INIT_SCRIPT.contains("echo \"VMM-COUNTER $n\""));
    assert!(INIT_SCRIPT.contains("poweroff -f"));
    assert!(INIT_SCRIPT.contains("/lib/modules/load-order"));
    // READY comes after SYSINFO, which comes after module loading.
    let at = |s: &str| INIT_SCRIPT.find(s).unwrap();
    assert!(at("insmod \"") < at("echo \"VMM-SYSINFO"));
    assert!(at("VMM-SYSINFO $sysinfo") < at("echo \"VMM-GUEST-READY"));
}

/// Runs the part of /init after the mounts in a plain shell with stub commands, checking the
/// dispatch on `vmm_run`, `vmm_after` and `vmm_workload`.
#[test]
fn init_script_dispatches_boot_parameters() {
    if std::process::Command::new("sh")
        .arg("-c")
        .arg("true")
        .status()
        .is_err()
    {
        return;
    }
    let start = INIT_SCRIPT.find("sysinfo=\"\"").unwrap();
    let tail = &INIT_SCRIPT[start..];
    let dir = tempfile::tempdir().unwrap();
    // Stubs: poweroff/halt/setsid/sync log and exit; guest-trimmer is absent (-> {}).
    let stubs = "\
BB=:\n\
poweroff() { echo \"STUB poweroff $*\"; exit 0; }\n\
halt() { echo \"STUB halt $*\"; exit 0; }\n\
sync() { :; }\n\
setsid() { echo \"STUB shell\"; }\n\
sh() { if [ \"$1\" = -c ]; then command sh \"$@\"; else echo \"STUB shell\"; fi; }\n\
sleep() { :; }\n\
die_off() { echo \"STUB poweroff -f\"; exit 0; }\n";
    let script = dir.path().join("tail.sh");
    std::fs::write(&script, format!("{stubs}{tail}")).unwrap();
    let run = |env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new("sh");
        cmd.arg(&script)
            .env_remove("vmm_run")
            .env_remove("vmm_workload")
            .env_remove("vmm_after");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = run(&[("vmm_run", "echo hello; exit 3")]);
    assert_eq!(
        out,
        "VMM-SYSINFO {}\nVMM-GUEST-READY\nhello\nVMM-RUN-EXIT 3\nSTUB poweroff -f\n"
    );
    let out = run(&[("vmm_run", "true"), ("vmm_after", "halt")]);
    assert!(out.contains("VMM-RUN-EXIT 0\nSTUB halt -f\n"), "{out}");
    let out = run(&[("vmm_run", "true"), ("vmm_after", "shell")]);
    assert!(
        out.ends_with("VMM-RUN-EXIT 0\nSTUB shell\nSTUB poweroff -f\n"),
        "{out}"
    );
    let out = run(&[("vmm_workload", "nope")]);
    assert!(out.contains("unknown vmm_workload=nope"), "{out}");
    assert!(out.ends_with("STUB poweroff -f\n"), "{out}");
    let out = run(&[]);
    assert!(
        out.ends_with("VMM-GUEST-READY\nSTUB shell\nSTUB poweroff -f\n"),
        "{out}"
    );
}

#[test]
fn elf_interpreter_detection() {
    let mut elf = vec![0u8; 0x40 + 2 * 0x38];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
    elf[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
    elf[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
    elf[0x40..0x44].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    assert_eq!(elf_has_interpreter(&elf), Some(false));
    elf[0x78..0x7c].copy_from_slice(&3u32.to_le_bytes()); // PT_INTERP
    assert_eq!(elf_has_interpreter(&elf), Some(true));
    assert_eq!(elf_has_interpreter(b"#!/bin/sh\n"), None);
}

#[test]
fn default_paths_follow_the_environment() {
    // The only test touching these variables.
    let saved: Vec<_> = ["VMM_CACHE_DIR", "XDG_CACHE_HOME", "HOME", TRIMMER_ENV]
        .iter()
        .map(|k| (*k, std::env::var_os(k)))
        .collect();
    std::env::set_var("VMM_CACHE_DIR", "/c/vmm");
    std::env::set_var("XDG_CACHE_HOME", "/x");
    std::env::set_var("HOME", "/h");
    assert_eq!(default_cache_dir(), PathBuf::from("/c/vmm"));
    std::env::set_var("VMM_CACHE_DIR", "");
    assert_eq!(default_cache_dir(), PathBuf::from("/x/vmm"));
    std::env::remove_var("XDG_CACHE_HOME");
    assert_eq!(default_cache_dir(), PathBuf::from("/h/.cache/vmm"));

    let dir = tempfile::tempdir().unwrap();
    let trimmer = dir.path().join("trimmer");
    std::fs::write(&trimmer, b"x").unwrap();
    std::env::set_var(TRIMMER_ENV, &trimmer);
    // No guest-trimmer next to the test executable, so the variable wins.
    if !std::env::current_exe()
        .unwrap()
        .with_file_name("guest-trimmer")
        .is_file()
    {
        assert_eq!(default_trimmer_path().unwrap(), trimmer);
        std::env::set_var(TRIMMER_ENV, dir.path().join("absent"));
        let err = default_trimmer_path().unwrap_err().to_string();
        assert!(err.contains("crt-static"), "{err}");
        assert!(err.contains("absent"), "{err}");
    }
    for (k, v) in saved {
        match v {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
}

#[test]
fn missing_apt_tools_are_named_with_the_manual_route() {
    let err = ImageError::AptMissing {
        missing: vec!["apt-get".into(), "dpkg-deb".into()],
    };
    let text = err.to_string();
    assert!(text.contains("apt-get, dpkg-deb"), "{text}");
    assert!(
        text.contains("vmm run --kernel BZIMAGE --initrd INITRAMFS"),
        "{text}"
    );
}
