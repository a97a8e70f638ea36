//! `bench checksums`: the memory chunk checksums on this host's CPU and, with `--rig`, on the
//! nested rig's emulated one: why format 4 chose XXH64 (`vmm/src/snapshot/checksum.rs`).
//!
//! One buffer of pseudo-random bytes, hashed whole in 2 MiB pieces by each algorithm, a copy
//! for scale. `--rig` runs the static bench binary with the same arguments in the rig.

use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};

use crate::host::{say, workspace_root};
use crate::rig_script::write_results;

/// The line the in-rig run prints its figures on.
const MARKER: &str = "CHECKSUMS";

/// Arguments of `bench checksums`.
#[derive(clap::Args, Debug)]
pub struct ChecksumsArgs {
    /// Size of the buffer hashed.
    #[arg(long, default_value_t = 32)]
    pub mib: usize,
    /// Also run in the nested rig (emulated CPU) and write bench-results/checksums.*.
    #[arg(long)]
    pub rig: bool,
    /// Print the figures as one `CHECKSUMS {json}` line (what the in-rig run does).
    #[arg(long, hide = true)]
    pub line: bool,
}

/// GiB/s of each algorithm over `mib` MiB.
fn measure(mib: usize) -> Value {
    let data: Vec<u8> = (0..mib << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let rate = |f: &dyn Fn(&[u8]) -> u64| {
        let t = Instant::now();
        let mut acc = 0u64;
        for piece in data.chunks(2 << 20) {
            acc ^= f(piece);
        }
        std::hint::black_box(acc);
        mib as f64 / 1024.0 / t.elapsed().as_secs_f64()
    };
    json!({
        "crc32c_gib_s": rate(&|p| u64::from(vmm::snapshot::crc32c::crc32c(p))),
        "xxh64_gib_s": rate(&|p| xxhash_rust::xxh64::xxh64(p, 0)),
        "xxh3_gib_s": rate(&|p| xxhash_rust::xxh3::xxh3_64(p)),
        "memcpy_gib_s": rate(&|p| u64::from(p.to_vec()[p.len() - 1])),
        "mib": mib,
    })
}

/// Runs the benchmark; returns the exit code.
pub fn run(args: ChecksumsArgs) -> anyhow::Result<i32> {
    let here = measure(args.mib);
    if args.line {
        println!("{MARKER} {here}");
        return Ok(0);
    }
    say(&format!("this host: {here}"));
    if !args.rig {
        return Ok(0);
    }
    let root = workspace_root();
    let bench = crate::host::build_static_bench(&root)?;
    let script = rig::find_rig_script().context("the rig's run.sh was not found")?;
    let mut payload = rig::Payload::new()?;
    payload.add_file(&bench, "bench", 0o755)?;
    let mib = args.mib.to_string();
    let cmd = ["./bench", "checksums", "--line", "--mib", mib.as_str()];
    let outcome = rig::run_in_rig(
        &script,
        payload.path(),
        &cmd,
        rig::RigOptions::default(),
        |l| eprintln!("  {l}"),
    )?;
    let rig_figures: Value = outcome
        .lines
        .iter()
        .find_map(|l| l.split_once(&format!("{MARKER} ")))
        .and_then(|(_, j)| serde_json::from_str(j).ok())
        .with_context(|| {
            format!(
                "the rig printed no {MARKER} line (exit {})",
                outcome.exit_code
            )
        })?;
    let row = |name: &str, key: &str| {
        format!(
            "| {name} | {:.2} | {:.2} |\n",
            here[key].as_f64().unwrap_or(0.0),
            rig_figures[key].as_f64().unwrap_or(0.0)
        )
    };
    let md = format!(
        "# Checksums\n\n`cargo run --release -p bench -- checksums --rig`: {} MiB hashed in 2 MiB \
         pieces, GiB/s (the rig's CPU is emulated: compare within a column).\n\n\
         | algorithm | this host | nested rig (TCG) |\n|---|---|---|\n{}{}{}{}",
        args.mib,
        row("CRC-32C (SSE4.2 `crc32`; formats 1-3)", "crc32c_gib_s"),
        row("XXH3-64 (SSE2)", "xxh3_gib_s"),
        row("XXH64 (scalar; format 4)", "xxh64_gib_s"),
        row("memcpy", "memcpy_gib_s"),
    );
    write_results("checksums", &json!({"host": here, "rig": rig_figures}), &md)?;
    Ok(0)
}
