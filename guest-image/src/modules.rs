//! Kernel module selection: dependencies from `modules.dep` (or, when a package ships none, as
//! Debian's kernel packages do — `depmod` runs at install time — from each module's `.modinfo`
//! `depends=` field, which is what `depmod` reads) and a load order in which every module comes
//! after the modules it depends on.

use std::collections::{BTreeMap, BTreeSet};

/// Errors of reading `modules.dep` or ordering modules.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModuleError {
    /// A line of `modules.dep` is not `path: dep dep ...`.
    #[error("modules.dep line {line_no} is malformed: {line:?}")]
    Parse {
        /// 1-based line number.
        line_no: usize,
        /// The line.
        line: String,
    },
    /// A module (requested, or a dependency) has no entry in `modules.dep`.
    #[error("kernel module {module} is not in modules.dep{}", required_by.as_ref().map(|r| format!(" (required by {r})")).unwrap_or_default())]
    Missing {
        /// Normalized module name.
        module: String,
        /// The module that depends on it, if it is a dependency.
        required_by: Option<String>,
    },
    /// A module's ELF `.modinfo` section could not be read.
    #[error("reading .modinfo of kernel module {module}: {what}")]
    Modinfo {
        /// Module name or path.
        module: String,
        /// What is wrong.
        what: String,
    },
    /// The dependencies form a cycle.
    #[error("kernel module dependency cycle: {}", cycle.join(" -> "))]
    Cycle {
        /// The modules along the cycle, the first repeated at the end.
        cycle: Vec<String>,
    },
}

/// One module of `modules.dep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    /// Normalized module name (`-` replaced by `_`, no extension).
    pub name: String,
    /// Path relative to `/lib/modules/<version>/` (e.g. `kernel/net/vmw_vsock/vsock.ko.xz`).
    pub path: String,
    /// Normalized names of the modules it depends on.
    pub deps: Vec<String>,
}

impl ModuleEntry {
    /// File name of the decompressed module (e.g. `vsock.ko`).
    pub fn ko_file_name(&self) -> String {
        let base = self.path.rsplit('/').next().unwrap_or(&self.path);
        format!("{}.ko", strip_module_ext(base))
    }
}

/// Parsed `modules.dep`, indexed by normalized module name.
#[derive(Debug, Default, Clone)]
pub struct ModuleDeps {
    modules: BTreeMap<String, ModuleEntry>,
}

/// Normalizes a module name as the kernel does: `-` and `_` are the same.
pub fn normalize_name(name: &str) -> String {
    name.replace('-', "_")
}

fn strip_module_ext(file_name: &str) -> &str {
    for ext in [".ko.xz", ".ko.zst", ".ko.gz", ".ko"] {
        if let Some(stem) = file_name.strip_suffix(ext) {
            return stem;
        }
    }
    file_name
}

/// Module name of a path in `modules.dep`.
pub fn name_from_path(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    normalize_name(strip_module_ext(base))
}

impl ModuleDeps {
    /// Parses the text of `modules.dep`.
    pub fn parse(text: &str) -> Result<Self, ModuleError> {
        let mut modules = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let parse_err = || ModuleError::Parse {
                line_no: i + 1,
                line: line.to_string(),
            };
            let (path, deps) = trimmed.split_once(':').ok_or_else(parse_err)?;
            let path = path.trim();
            if path.is_empty() || path.contains(char::is_whitespace) {
                return Err(parse_err());
            }
            let entry = ModuleEntry {
                name: name_from_path(path),
                path: path.to_string(),
                deps: deps.split_whitespace().map(name_from_path).collect(),
            };
            modules.insert(entry.name.clone(), entry);
        }
        Ok(Self { modules })
    }

    /// Builds the index from entries (e.g. made from `.modinfo`); a later entry of the same name
    /// replaces an earlier one.
    pub fn from_entries(entries: impl IntoIterator<Item = ModuleEntry>) -> Self {
        Self {
            modules: entries.into_iter().map(|e| (e.name.clone(), e)).collect(),
        }
    }

    /// Looks a module up by (any spelling of) its name.
    pub fn get(&self, name: &str) -> Option<&ModuleEntry> {
        self.modules.get(&normalize_name(name))
    }

    /// The requested modules and everything they depend on, dependencies first. Ties keep the
    /// order of `requested`, so the result is deterministic.
    pub fn load_order(&self, requested: &[&str]) -> Result<Vec<&ModuleEntry>, ModuleError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            InProgress,
            Done,
        }
        struct Walk<'a> {
            deps: &'a ModuleDeps,
            marks: BTreeMap<String, Mark>,
            stack: Vec<String>,
            order: Vec<&'a ModuleEntry>,
        }
        impl<'a> Walk<'a> {
            fn visit(&mut self, name: &str, required_by: Option<&str>) -> Result<(), ModuleError> {
                match self.marks.get(name) {
                    Some(Mark::Done) => return Ok(()),
                    Some(Mark::InProgress) => {
                        let start = self.stack.iter().position(|n| n == name).unwrap_or(0);
                        let mut cycle = self.stack[start..].to_vec();
                        cycle.push(name.to_string());
                        return Err(ModuleError::Cycle { cycle });
                    }
                    None => {}
                }
                let deps = self.deps;
                let entry = deps.modules.get(name).ok_or_else(|| ModuleError::Missing {
                    module: name.to_string(),
                    required_by: required_by.map(str::to_string),
                })?;
                self.marks.insert(name.to_string(), Mark::InProgress);
                self.stack.push(name.to_string());
                for dep in &entry.deps {
                    self.visit(dep, Some(name))?;
                }
                self.stack.pop();
                self.marks.insert(name.to_string(), Mark::Done);
                self.order.push(entry);
                Ok(())
            }
        }
        let mut walk = Walk {
            deps: self,
            marks: BTreeMap::new(),
            stack: Vec::new(),
            order: Vec::new(),
        };
        for name in requested {
            walk.visit(&normalize_name(name), None)?;
        }
        Ok(walk.order)
    }
}

/// Names of modules built into the kernel, from the text of `modules.builtin` (one path a line).
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(name_from_path)
        .collect()
}

/// Reads the `depends=` field of the `.modinfo` section of an (uncompressed) ELF64
/// little-endian kernel module: the normalized names of the modules it needs.
pub fn modinfo_depends(module: &str, elf: &[u8]) -> Result<Vec<String>, ModuleError> {
    let err = |what: &str| ModuleError::Modinfo {
        module: module.to_string(),
        what: what.to_string(),
    };
    let u16_at = |off: usize| -> Result<usize, ModuleError> {
        elf.get(off..off + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
            .ok_or_else(|| err("truncated"))
    };
    let u64_at = |off: usize| -> Result<usize, ModuleError> {
        let b = elf.get(off..off + 8).ok_or_else(|| err("truncated"))?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        usize::try_from(u64::from_le_bytes(a)).map_err(|_| err("offset too large"))
    };
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(err("not an ELF file"));
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(err("not a 64-bit little-endian ELF file"));
    }
    let sh_off = u64_at(0x28)?;
    let sh_entsize = u16_at(0x3a)?;
    let sh_num = u16_at(0x3c)?;
    let sh_strndx = u16_at(0x3e)?;
    if sh_entsize < 0x40 || sh_strndx >= sh_num {
        return Err(err("bad section header table"));
    }
    // (offset, size) of section `i`.
    let section = |i: usize| -> Result<(usize, usize, usize), ModuleError> {
        let base = sh_off + i * sh_entsize;
        let name_off = elf
            .get(base..base + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| err("truncated section header"))?;
        Ok((name_off, u64_at(base + 0x18)?, u64_at(base + 0x20)?))
    };
    let (_, strtab_off, strtab_size) = section(sh_strndx)?;
    let strtab = elf
        .get(strtab_off..strtab_off + strtab_size)
        .ok_or_else(|| err("truncated section name table"))?;
    for i in 0..sh_num {
        let (name_off, off, size) = section(i)?;
        let name = strtab
            .get(name_off..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .unwrap_or_default();
        if name != b".modinfo" {
            continue;
        }
        let data = elf
            .get(off..off + size)
            .ok_or_else(|| err("truncated .modinfo"))?;
        for field in data.split(|&b| b == 0) {
            if let Some(value) = field.strip_prefix(b"depends=") {
                let value = std::str::from_utf8(value).map_err(|_| err("depends= not UTF-8"))?;
                return Ok(value
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(normalize_name)
                    .collect());
            }
        }
        return Ok(Vec::new());
    }
    Err(err("no .modinfo section"))
}

#[cfg(test)]
/// A minimal ELF64 relocatable with a `.modinfo` section holding `modinfo`.
pub(crate) fn fake_module(modinfo: &[u8]) -> Vec<u8> {
    let shstrtab = b"\0.modinfo\0.shstrtab\0";
    let mut elf = vec![0u8; 0x40];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // ELFCLASS64
    elf[5] = 1; // little endian
    let modinfo_off = elf.len();
    elf.extend_from_slice(modinfo);
    let strtab_off = elf.len();
    elf.extend_from_slice(shstrtab);
    while elf.len() & 7 != 0 {
        elf.push(0);
    }
    let sh_off = elf.len();
    let mut header = |name: u32, off: usize, size: usize| {
        let mut sh = [0u8; 0x40];
        sh[..4].copy_from_slice(&name.to_le_bytes());
        sh[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
        sh[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
        elf.extend_from_slice(&sh);
    };
    header(0, 0, 0); // SHN_UNDEF
    header(1, modinfo_off, modinfo.len());
    header(10, strtab_off, shstrtab.len());
    elf[0x28..0x30].copy_from_slice(&(sh_off as u64).to_le_bytes());
    elf[0x3a..0x3c].copy_from_slice(&0x40u16.to_le_bytes());
    elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
    elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
    elf
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz kernel/net/vmw_vsock/vsock.ko.xz
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz: kernel/net/vmw_vsock/vsock.ko.xz
kernel/net/vmw_vsock/vsock.ko.xz:
kernel/drivers/virtio/virtio_mmio.ko.xz:
kernel/drivers/virtio/virtio_balloon.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz:
kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko.xz kernel/fs/mbcache.ko.xz kernel/lib/crc16.ko.xz
kernel/fs/jbd2/jbd2.ko.xz:
kernel/fs/mbcache.ko.xz:
kernel/lib/crc16.ko.xz:
kernel/drivers/foo/foo-bar.ko.xz: kernel/lib/crc16.ko.xz
";

    fn names(order: &[&ModuleEntry]) -> Vec<String> {
        order.iter().map(|e| e.name.clone()).collect()
    }

    fn position(order: &[String], name: &str) -> usize {
        order.iter().position(|n| n == name).unwrap()
    }

    #[test]
    fn dependencies_come_before_dependents() {
        let deps = ModuleDeps::parse(DEP).unwrap();
        let order = deps
            .load_order(&[
                "virtio_mmio",
                "virtio_balloon",
                "vmw_vsock_virtio_transport",
                "vsock",
                "vmw_vsock_virtio_transport_common",
            ])
            .unwrap();
        let order = names(&order);
        assert_eq!(
            order,
            [
                "virtio_mmio",
                "virtio_balloon",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport"
            ]
        );
    }

    #[test]
    fn pulls_in_transitive_dependencies_once() {
        let deps = ModuleDeps::parse(DEP).unwrap();
        let order = names(&deps.load_order(&["ext4", "foo-bar"]).unwrap());
        assert_eq!(order.len(), 5, "{order:?}");
        for dep in ["jbd2", "mbcache", "crc16"] {
            assert!(position(&order, dep) < position(&order, "ext4"));
        }
        assert!(position(&order, "crc16") < position(&order, "foo_bar"));
        assert_eq!(
            deps.get("foo_bar").unwrap().ko_file_name(),
            "foo-bar.ko",
            "file names keep their spelling"
        );
    }

    #[test]
    fn missing_modules_are_named() {
        let deps = ModuleDeps::parse(DEP).unwrap();
        let err = deps.load_order(&["nope"]).unwrap_err();
        assert_eq!(
            err,
            ModuleError::Missing {
                module: "nope".into(),
                required_by: None
            }
        );
        let broken = ModuleDeps::parse("kernel/a.ko.xz: kernel/b.ko.xz\n").unwrap();
        let err = broken.load_order(&["a"]).unwrap_err();
        assert_eq!(
            err,
            ModuleError::Missing {
                module: "b".into(),
                required_by: Some("a".into())
            }
        );
        assert!(err
            .to_string()
            .contains("b is not in modules.dep (required by a)"));
    }

    #[test]
    fn cycles_are_named() {
        let deps = ModuleDeps::parse(
            "kernel/a.ko.xz: kernel/b.ko.xz\nkernel/b.ko.xz: kernel/c.ko.xz\nkernel/c.ko.xz: kernel/a.ko.xz\n",
        )
        .unwrap();
        let err = deps.load_order(&["a"]).unwrap_err();
        assert_eq!(
            err,
            ModuleError::Cycle {
                cycle: vec!["a".into(), "b".into(), "c".into(), "a".into()]
            }
        );
        assert!(err.to_string().contains("a -> b -> c -> a"));
    }

    #[test]
    fn malformed_lines_are_reported() {
        let err = ModuleDeps::parse("kernel/a.ko.xz:\nno colon here\n").unwrap_err();
        assert!(matches!(err, ModuleError::Parse { line_no: 2, .. }));
    }

    #[test]
    fn dash_and_underscore_spell_the_same_module() {
        // `a-b` and `a_b` are the same module name: the later line wins.
        let deps = ModuleDeps::parse(
            "kernel/x/a.ko.xz: kernel/y/a_b.ko.xz\nkernel/y/a_b.ko.xz:\nkernel/z/a-b.ko:\n",
        )
        .unwrap();
        assert_eq!(names(&deps.load_order(&["a"]).unwrap()), ["a_b", "a"]);
        assert_eq!(deps.get("a_b").unwrap().path, "kernel/z/a-b.ko");
    }

    #[test]
    fn reads_depends_from_modinfo() {
        let elf =
            fake_module(b"license=GPL\0depends=vmw_vsock_virtio_transport_common,vsock\0name=x\0");
        assert_eq!(
            modinfo_depends("x", &elf).unwrap(),
            ["vmw_vsock_virtio_transport_common", "vsock"]
        );
        let elf = fake_module(b"depends=\0name=virtio_mmio\0");
        assert!(modinfo_depends("virtio_mmio", &elf).unwrap().is_empty());
        let elf = fake_module(b"depends=crc-t10dif\0");
        assert_eq!(modinfo_depends("y", &elf).unwrap(), ["crc_t10dif"]);
        let err = modinfo_depends("z", b"not elf").unwrap_err();
        assert!(err.to_string().contains("z"), "{err}");
    }

    #[test]
    fn builtin_names_are_normalized() {
        let builtin =
            parse_builtin("kernel/drivers/virtio/virtio-pci.ko\nkernel/fs/ext4/ext4.ko\n");
        assert!(builtin.contains("virtio_pci"));
        assert!(builtin.contains("ext4"));
    }
}
