//! `stretch up`: a ready-to-use local Stretch with one volume, printing how to attach it.
//!
//! Today this is a single site; it grows into two sites joined through the link emulator and
//! a witness as replication and arbitration land.

use std::path::PathBuf;

use anyhow::Context;

use crate::cli::UpArgs;
use crate::config::{parse_size, Config, SizeValue, VolumeConfig};

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let size_bytes = parse_size(&args.size)?;
    crate::config::check_volume_size(size_bytes)?;
    let data_dir = match args.data_dir {
        Some(dir) => dir,
        None => fresh_data_dir()?,
    };
    let mut config = Config::with_data_dir(data_dir.clone());
    config.nbd.listen = vec![args.listen];
    config.engine.io_engine = args.io_engine;
    config.volumes = vec![VolumeConfig {
        name: args.volume.clone(),
        size: Some(SizeValue::Bytes(size_bytes)),
        read_only: false,
        description: Some("stretch up default volume".into()),
    }];
    let running = crate::serve::start(&config).await?;
    let uri = format!("{}/{}", running.endpoints[0], args.volume);
    println!("stretch is up: one site, data in {}", data_dir.display());
    println!();
    println!("  site A  {uri}");
    println!();
    println!("try it:");
    println!("  qemu-io -f raw {uri} -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'");
    println!("  nbdinfo {uri}");
    println!("  qemu-system-x86_64 -drive file={uri},format=raw,if=virtio ...");
    println!();
    println!("Ctrl-C stops it (the data directory is kept).");
    crate::serve::wait_for_shutdown_signal().await;
    running.stop().await;
    Ok(())
}

fn fresh_data_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir();
    for attempt in 0..1000u32 {
        let dir = base.join(format!("stretch-up-{}-{attempt}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => {
                return Err(err).with_context(|| format!("create data directory {}", dir.display()))
            }
        }
    }
    anyhow::bail!(
        "could not create a fresh data directory under {}",
        base.display()
    )
}
