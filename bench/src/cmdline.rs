//! Kernel command lines: the VMM's default (read from its source, so QEMU gets the same one)
//! and the benchmark's configurations (`VCPUS:default|quiet`).

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context};

/// Where the VMM's default command line is defined, relative to the workspace root.
pub const CMDLINE_SOURCE: &str = "vmm/src/boot/cmdline.rs";

/// What the guests run after boot: power off right after the readiness line.
pub const POWEROFF_RUN: &str = "vmm_run=\"poweroff -f\"";

/// What the memory measurement's guests run: stay up, idle.
pub const IDLE_WORKLOAD: &str = "vmm_workload=idle";

/// Extracts the value of `const DEFAULT_CMDLINE: &str = "...";` from Rust source, following
/// `\`-newline string continuations (which drop the newline and the next line's indentation).
pub fn extract_default_cmdline(source: &str) -> anyhow::Result<String> {
    const DECL: &str = "DEFAULT_CMDLINE: &str = \"";
    let at = source
        .find(DECL)
        .context("no `DEFAULT_CMDLINE: &str = \"` in the source")?;
    let mut out = String::new();
    let mut chars = source[at + DECL.len()..].chars();
    loop {
        match chars.next() {
            None => bail!("DEFAULT_CMDLINE's string is not closed"),
            Some('"') => break,
            Some('\\') => match chars.next() {
                Some('\n') => {
                    let rest = chars.as_str().trim_start();
                    chars = rest.chars();
                }
                Some('"') => out.push('"'),
                Some('\\') => out.push('\\'),
                Some(c) => bail!("DEFAULT_CMDLINE uses an escape this parser does not know: \\{c}"),
                None => bail!("DEFAULT_CMDLINE's string is not closed"),
            },
            Some(c) => out.push(c),
        }
    }
    if out.trim().is_empty() {
        bail!("DEFAULT_CMDLINE is empty");
    }
    Ok(out)
}

/// One boot configuration: vCPUs and whether `quiet` is appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSpec {
    /// Guest vCPUs.
    pub vcpus: u32,
    /// `quiet` on the command line.
    pub quiet: bool,
}

impl GroupSpec {
    /// `2vcpu-default`, `1vcpu-quiet`.
    pub fn name(&self) -> String {
        format!(
            "{}vcpu-{}",
            self.vcpus,
            if self.quiet { "quiet" } else { "default" }
        )
    }

    /// The extra command line of a boot in this configuration (after the VMM's defaults).
    pub fn extra_cmdline(&self, run: &str) -> String {
        if self.quiet {
            format!("quiet {run}")
        } else {
            run.to_string()
        }
    }
}

impl fmt::Display for GroupSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.vcpus,
            if self.quiet { "quiet" } else { "default" }
        )
    }
}

impl FromStr for GroupSpec {
    type Err = String;

    /// `VCPUS:default` or `VCPUS:quiet`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (v, c) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected VCPUS:default or VCPUS:quiet"))?;
        let vcpus: u32 = v
            .parse()
            .ok()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| format!("{s:?}: {v:?} is not a vCPU count (1-64)"))?;
        let quiet = match c {
            "default" => false,
            "quiet" => true,
            other => return Err(format!("{s:?}: {other:?} is neither `default` nor `quiet`")),
        };
        Ok(GroupSpec { vcpus, quiet })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_lines_are_joined() {
        let src = "/// doc\npub const DEFAULT_CMDLINE: &str = \"console=ttyS0 reboot=a \\\n    pci=off \\\"x\\\"\";\n";
        assert_eq!(
            extract_default_cmdline(src).unwrap(),
            "console=ttyS0 reboot=a pci=off \"x\""
        );
    }

    #[test]
    fn missing_or_unclosed() {
        assert!(extract_default_cmdline("const X: &str = \"a\";").is_err());
        assert!(extract_default_cmdline("DEFAULT_CMDLINE: &str = \"abc").is_err());
        assert!(extract_default_cmdline("DEFAULT_CMDLINE: &str = \"a\\tb\";").is_err());
    }

    /// The real source parses, to what the VMM's own tests expect it to start with.
    #[test]
    fn the_vmm_source_parses() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(CMDLINE_SOURCE);
        let src = std::fs::read_to_string(&path).unwrap();
        let line = extract_default_cmdline(&src).unwrap();
        assert!(line.starts_with("console=ttyS0"), "{line}");
        assert!(!line.contains('\\') && !line.contains('\n'), "{line}");
    }

    #[test]
    fn group_specs() {
        let g: GroupSpec = "2:quiet".parse().unwrap();
        assert_eq!(
            g,
            GroupSpec {
                vcpus: 2,
                quiet: true
            }
        );
        assert_eq!(g.name(), "2vcpu-quiet");
        assert_eq!(g.to_string(), "2:quiet");
        assert_eq!(g.extra_cmdline("r"), "quiet r");
        let d: GroupSpec = "1:default".parse().unwrap();
        assert_eq!(d.extra_cmdline("r"), "r");
        for bad in ["2", "0:quiet", "x:quiet", "2:loud"] {
            assert!(bad.parse::<GroupSpec>().is_err(), "{bad}");
        }
    }
}
