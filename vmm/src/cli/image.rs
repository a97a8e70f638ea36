//! `vmm image build|path`: build or locate the guest image (kernel + initramfs).
use std::path::PathBuf;

use anyhow::Context;
use guest_image::{GuestImage, ImageOptions};

use super::CliResult;

/// `vmm image` subcommands.
#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Build the guest image (Debian's 6.12 cloud kernel + our initramfs) into the cache; a no-op
    /// when no input changed.
    Build(BuildArgs),
    /// Print the paths of the already-built default image.
    Path(PathArgs),
}

/// Arguments of `vmm image build`.
#[derive(clap::Args)]
pub struct BuildArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Cache folder [default: $VMM_CACHE_DIR, else $XDG_CACHE_HOME/vmm, else ~/.cache/vmm].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Debian kernel package to use instead of the pinned one.
    #[arg(long, value_name = "NAME")]
    kernel_package: Option<String>,
    /// Statically linked guest-trimmer binary [default: `guest-trimmer` next to this
    /// executable, else $VMM_GUEST_TRIMMER].
    #[arg(long, value_name = "PATH")]
    trimmer: Option<PathBuf>,
    /// Rebuild even if the image is up to date.
    #[arg(long)]
    force: bool,
}

/// Arguments of `vmm image path`.
#[derive(clap::Args)]
pub struct PathArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Cache folder [default: as for `vmm image build`].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

/// Runs a `vmm image` subcommand.
pub fn run(cmd: ImageCommand) -> CliResult {
    match cmd {
        ImageCommand::Build(args) => build(args),
        ImageCommand::Path(args) => path(args),
    }
}

fn build(args: BuildArgs) -> CliResult {
    let cache_dir = args
        .cache_dir
        .unwrap_or_else(guest_image::default_cache_dir);
    let trimmer_path = match args.trimmer {
        Some(path) => path,
        None => guest_image::default_trimmer_path()?,
    };
    let opts = ImageOptions {
        cache_dir: cache_dir.clone(),
        kernel_package: args.kernel_package,
        trimmer_path,
        force: args.force,
    };
    let image = guest_image::build(&opts).context("building the guest image")?;
    let data_disk = guest_image::data_disk::build(
        &cache_dir.join("image"),
        &guest_image::data_disk::DataDiskSpec::default(),
        args.force,
    )
    .context("building the data disk")?;
    print_image(&image, Some(&data_disk), &cache_dir, args.json)?;
    Ok(0)
}

fn path(args: PathArgs) -> CliResult {
    let cache_dir = args
        .cache_dir
        .unwrap_or_else(guest_image::default_cache_dir);
    let image = guest_image::locate(&cache_dir)?;
    let data_disk = guest_image::data_disk::locate(
        &cache_dir.join("image"),
        &guest_image::data_disk::DataDiskSpec::default(),
    );
    print_image(&image, data_disk.as_ref(), &cache_dir, args.json)?;
    Ok(0)
}

fn print_image(
    image: &GuestImage,
    data_disk: Option<&guest_image::data_disk::DataDisk>,
    cache_dir: &std::path::Path,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let value = serde_json::json!({
            "kernel": image.kernel,
            "initrd": image.initrd,
            "kernel_package": image.kernel_package,
            "kernel_version": image.kernel_version,
            "cache_dir": cache_dir,
            "rebuilt": image.rebuilt,
            "initrd_size_bytes": image.initrd_size_bytes,
            "data_disk": data_disk.map(|d| &d.path),
        });
        println!("{}", serde_json::to_string(&value)?);
    } else {
        println!("kernel: {}", image.kernel.display());
        println!("initrd: {}", image.initrd.display());
        if let Some(disk) = data_disk {
            println!("data_disk: {}", disk.path.display());
        }
    }
    Ok(())
}
