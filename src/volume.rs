//! `stretch volume …`: offline volume management in a data directory, and (through a site's
//! admin API) a stretched volume's ack policy and async writer.

use anyhow::{bail, Context};

use crate::cli::VolumeCommand;
use crate::config::{check_volume_size, parse_size};
use stretch_engine::{delete_volume, list_volumes, Volume, VolumeConfig};

pub async fn run(cmd: VolumeCommand) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Policy(args) => crate::policy::run_policy(args).await?,
        VolumeCommand::Handoff(args) => crate::policy::run_handoff(args).await?,
        VolumeCommand::Create {
            name,
            size,
            data_dir,
        } => {
            let size_bytes = parse_size(&size)?;
            check_volume_size(size_bytes)?;
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("create data directory {}", data_dir.display()))?;
            let volume = Volume::create(&data_dir, &name, size_bytes, &VolumeConfig::default())
                .with_context(|| format!("create volume {name:?}"))?;
            let info = volume.info();
            println!(
                "created volume {} ({} bytes) at {}",
                info.name,
                info.size_bytes,
                info.data_path.display()
            );
        }
        VolumeCommand::List { data_dir, json } => {
            let volumes = list_volumes(&data_dir)
                .with_context(|| format!("list volumes in {}", data_dir.display()))?;
            if json {
                let rows: Vec<_> = volumes
                    .iter()
                    .map(|v| {
                        serde_json::json!({
                            "name": v.name,
                            "size_bytes": v.size_bytes,
                            "data_path": v.data_path,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<32} {:>16}  DATA FILE", "NAME", "SIZE (bytes)");
                for v in &volumes {
                    println!(
                        "{:<32} {:>16}  {}",
                        v.name,
                        v.size_bytes,
                        v.data_path.display()
                    );
                }
            }
        }
        VolumeCommand::Grow {
            name,
            size,
            data_dir,
        } => {
            let size_bytes = parse_size(&size)?;
            check_volume_size(size_bytes)?;
            let volume = Volume::open(&data_dir, &name, &VolumeConfig::default())
                .with_context(|| format!("open volume {name:?}"))?;
            let old = volume.info().size_bytes;
            if size_bytes < old {
                bail!("refusing to shrink volume {name:?} from {old} to {size_bytes} bytes: it would destroy data");
            }
            volume
                .grow(size_bytes)
                .with_context(|| format!("grow volume {name:?}"))?;
            println!("grew volume {name} from {old} to {size_bytes} bytes");
        }
        VolumeCommand::Delete {
            name,
            data_dir,
            yes,
        } => {
            if !yes {
                bail!("deleting volume {name:?} destroys its data; pass --yes to confirm");
            }
            delete_volume(&data_dir, &name).with_context(|| format!("delete volume {name:?}"))?;
            println!("deleted volume {name}");
        }
    }
    Ok(())
}
