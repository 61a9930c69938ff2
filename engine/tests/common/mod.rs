//! Helpers shared by the engine's integration tests. The engine under test comes from
//! `STRETCH_IO_ENGINE` (auto, uring, psync, sim), so the same suite covers all three.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use stretch_engine::io::sim::SimDisk;
use stretch_engine::{AlignedBuf, IoEngineKind, VolumeConfig};

/// The config every test uses: the engine from the environment; with `sim`, a fresh simulated
/// disk per test so tests cannot see each other's files or faults.
pub fn config() -> VolumeConfig {
    let mut cfg = VolumeConfig::default();
    if cfg.io_engine == IoEngineKind::Sim {
        cfg.sim_disk = Some(SimDisk::new(0x5747_4554));
    }
    cfg
}

/// A config on the simulator (for fault injection, whatever the environment says).
pub fn sim_config(seed: u64) -> (VolumeConfig, Arc<SimDisk>) {
    let disk = SimDisk::new(seed);
    let cfg = VolumeConfig {
        io_engine: IoEngineKind::Sim,
        sim_disk: Some(disk.clone()),
        ..VolumeConfig::default()
    };
    (cfg, disk)
}

/// Overwrites bytes of a volume file behind the engine's back, durably.
pub fn corrupt(cfg: &VolumeConfig, path: &Path, offset: u64, bytes: &[u8]) {
    match &cfg.sim_disk {
        Some(disk) if cfg.io_engine == IoEngineKind::Sim => {
            disk.corrupt(path, offset, bytes).expect("corrupt sim file")
        }
        _ => {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .expect("open file to corrupt");
            file.write_all_at(bytes, offset).expect("corrupt file");
            file.sync_all().expect("sync corrupted file");
        }
    }
}

/// Truncates a volume file behind the engine's back.
pub fn truncate(cfg: &VolumeConfig, path: &Path, len_bytes: u64) {
    match &cfg.sim_disk {
        Some(disk) if cfg.io_engine == IoEngineKind::Sim => {
            disk.truncate(path, len_bytes).expect("truncate sim file")
        }
        _ => std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(len_bytes))
            .expect("truncate file"),
    }
}

/// The content of a volume file as it is now.
pub fn file_bytes(cfg: &VolumeConfig, path: &Path) -> Vec<u8> {
    match &cfg.sim_disk {
        Some(disk) if cfg.io_engine == IoEngineKind::Sim => {
            disk.contents(path).expect("sim file exists")
        }
        _ => std::fs::read(path).expect("read file"),
    }
}

/// `blocks` blocks of data, different per `seed` and per block.
pub fn pattern(seed: u8, blocks: usize) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed(blocks * 4096);
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = seed.wrapping_add((i / 4096) as u8).wrapping_mul(31) ^ (i % 251) as u8;
    }
    buf
}

/// A multi-thread runtime like the daemon's.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build runtime")
}
