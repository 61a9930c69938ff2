//! Volume behaviour and every error path, on the engine `STRETCH_IO_ENGINE` selects
//! (fault injection always uses the simulator).

mod common;

use common::{config, corrupt, file_bytes, pattern, runtime, sim_config, truncate};
use stretch_engine::io::sim::{FaultRule, SimOpKind};
use stretch_engine::{
    delete_volume_with, list_volumes_with, AlignedBuf, ApplyMode, BlockDevice, BlockError,
    EngineError, Extent, Stamp, Volume, ZeroFlags,
};

const MIB: u64 = 1024 * 1024;

fn stamp(n: u8) -> Stamp {
    let mut s = [0u8; 16];
    s[15] = n;
    Stamp(s)
}

#[test]
fn create_write_reopen_list_grow_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config();
    let rt = runtime();
    let vol = Volume::create(dir.path(), "vol-1", 4 * MIB, &cfg).expect("create");
    assert_eq!(vol.size_bytes(), 4 * MIB);
    eprintln!("engine under test: {}", vol.io_engine_name());
    let uuid = vol.info().uuid;
    rt.block_on(async {
        vol.write(8192, pattern(1, 3), false).await.expect("write");
        vol.flush().await.expect("flush");
        let back = vol.read(8192, 3 * 4096).await.expect("read");
        assert_eq!(back, pattern(1, 3));
        // An unaligned read returns exactly the bytes asked for.
        let part = vol.read(8192 + 100, 5000).await.expect("unaligned read");
        assert_eq!(&part[..], &pattern(1, 3)[100..5100]);
        // Never-written blocks read as zeroes.
        let zero = vol.read(0, 8192).await.expect("read unwritten");
        assert!(zero.iter().all(|&b| b == 0));
    });
    drop(vol);

    let listed = list_volumes_with(dir.path(), &cfg).expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "vol-1");
    assert_eq!(listed[0].size_bytes, 4 * MIB);
    assert_eq!(listed[0].uuid, uuid);
    assert_eq!(listed[0].data_path, dir.path().join("vol-1.img"));

    let vol = Volume::open(dir.path(), "vol-1", &cfg).expect("reopen");
    assert_eq!(vol.info().uuid, uuid);
    rt.block_on(async {
        assert_eq!(vol.read(8192, 3 * 4096).await.expect("read"), pattern(1, 3));
    });
    // The data file is a plain raw image: byte-identical to what was written.
    let raw = file_bytes(&cfg, &vol.info().data_path);
    assert_eq!(raw.len() as u64, 4 * MIB);
    assert_eq!(&raw[8192..8192 + 3 * 4096], &pattern(1, 3)[..]);

    vol.grow(8 * MIB).expect("grow");
    assert_eq!(vol.size_bytes(), 8 * MIB);
    rt.block_on(async {
        vol.write(7 * MIB, pattern(2, 1), true)
            .await
            .expect("write grown");
        assert_eq!(vol.read(7 * MIB, 4096).await.expect("read"), pattern(2, 1));
        assert!(vol
            .read(6 * MIB, 4096)
            .await
            .expect("read")
            .iter()
            .all(|&b| b == 0));
    });
    assert!(matches!(
        vol.grow(4 * MIB),
        Err(EngineError::InvalidSize { .. })
    ));
    drop(vol);
    let vol = Volume::open(dir.path(), "vol-1", &cfg).expect("reopen after grow");
    assert_eq!(vol.size_bytes(), 8 * MIB);
    rt.block_on(async {
        assert_eq!(vol.read(7 * MIB, 4096).await.expect("read"), pattern(2, 1));
        assert_eq!(vol.read(8192, 3 * 4096).await.expect("read"), pattern(1, 3));
    });
    drop(vol);

    delete_volume_with(dir.path(), "vol-1", &cfg).expect("delete");
    assert!(list_volumes_with(dir.path(), &cfg)
        .expect("list")
        .is_empty());
    assert!(matches!(
        Volume::open(dir.path(), "vol-1", &cfg),
        Err(EngineError::NotFound { .. })
    ));
    assert!(matches!(
        delete_volume_with(dir.path(), "vol-1", &cfg),
        Err(EngineError::NotFound { .. })
    ));
}

#[test]
fn management_errors_are_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config();
    for bad in ["", ".hidden", "a/b", "sp ace", &"x".repeat(65)] {
        let err = Volume::create(dir.path(), bad, MIB, &cfg).err();
        assert!(
            matches!(err, Some(EngineError::InvalidName { .. })),
            "{bad:?}: {err:?}"
        );
    }
    for size in [0, 4095, MIB + 1] {
        let err = Volume::create(dir.path(), "v", size, &cfg).err();
        assert!(
            matches!(err, Some(EngineError::InvalidSize { .. })),
            "{size}: {err:?}"
        );
    }
    let _vol = Volume::create(dir.path(), "v", MIB, &cfg).expect("create");
    let err = Volume::create(dir.path(), "v", MIB, &cfg).err();
    assert!(
        matches!(err, Some(EngineError::AlreadyExists { .. })),
        "{err:?}"
    );
    let msg = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("already exists"), "{msg}");
}

#[test]
fn out_of_range_misaligned_and_too_large() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config();
    let vol = Volume::create(dir.path(), "v", MIB, &cfg).expect("create");
    runtime().block_on(async {
        let oor = |r: Result<_, BlockError>| matches!(r, Err(BlockError::OutOfRange { .. }));
        assert!(oor(vol.read(MIB - 4096, 8192).await.map(|_| ())));
        assert!(oor(vol.read(u64::MAX - 10, 100).await.map(|_| ())));
        assert!(oor(vol.write(MIB, pattern(0, 1), false).await));
        assert!(oor(vol.trim(MIB - 4096, 8192, false).await));
        assert!(oor(vol
            .write_zeroes(u64::MAX - 4095, 4096, ZeroFlags::default())
            .await));
        assert!(oor(vol.block_status(MIB, 4096).await.map(|_| ())));
        assert!(oor(vol.block_stamps(256, 1).await.map(|_| ())));

        let mis = |r: Result<(), BlockError>| matches!(r, Err(BlockError::Misaligned { .. }));
        assert!(mis(vol.write(100, pattern(0, 1), false).await));
        assert!(mis(vol.write(0, AlignedBuf::zeroed(100), false).await));
        assert!(mis(vol.trim(4096, 100, false).await));
        assert!(mis(vol.write_zeroes(1, 4096, ZeroFlags::default()).await));

        let big = vol.read(0, stretch_engine::REQUEST_BYTES_MAX + 1).await;
        assert!(matches!(big, Err(BlockError::TooLarge { .. })));
        // Nothing above changed the volume.
        assert!(vol
            .read(0, MIB as u32)
            .await
            .expect("read")
            .iter()
            .all(|&b| b == 0));
    });
}

#[test]
fn checksum_mismatch_is_an_error_never_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config();
    let rt = runtime();
    let vol = Volume::create(dir.path(), "v", MIB, &cfg).expect("create");
    let data_path = vol.info().data_path;
    rt.block_on(async {
        vol.write(0, pattern(7, 4), false).await.expect("write");
        vol.flush().await.expect("flush");
    });
    drop(vol);
    // Bit rot in block 2, behind the engine's back.
    corrupt(&cfg, &data_path, 2 * 4096 + 17, &[0xEE]);
    // A misdirected write: block 1's content lands in block 3 (same bytes, wrong place).
    let raw = file_bytes(&cfg, &data_path);
    corrupt(&cfg, &data_path, 3 * 4096, &raw[4096..8192]);
    let vol = Volume::open(dir.path(), "v", &cfg).expect("reopen");
    rt.block_on(async {
        assert_eq!(vol.read(0, 8192).await.expect("good blocks"), pattern(7, 2));
        let err = vol.read(0, 4 * 4096).await;
        assert!(
            matches!(err, Err(BlockError::Checksum { lba: 2 })),
            "{err:?}"
        );
        let err = vol.read(3 * 4096 + 10, 10).await;
        assert!(
            matches!(err, Err(BlockError::Checksum { lba: 3 })),
            "{err:?}"
        );
        // Never-written block 10 gets garbage: it must read as zeroes, so that fails too.
    });
    corrupt(&cfg, &data_path, 10 * 4096, &[1, 2, 3]);
    rt.block_on(async {
        let err = vol.read(10 * 4096, 4096).await;
        assert!(
            matches!(err, Err(BlockError::Checksum { lba: 10 })),
            "{err:?}"
        );
        // Rewriting a damaged block repairs it.
        vol.write(2 * 4096, pattern(9, 1), false)
            .await
            .expect("rewrite");
        assert_eq!(vol.read(2 * 4096, 4096).await.expect("read"), pattern(9, 1));
    });
}

#[test]
fn truncated_or_garbage_metadata_is_a_clear_error() {
    let rt = runtime();
    let cfg = config();
    type Damage<'a> = Box<dyn Fn(&std::path::Path) + 'a>;
    let cases: Vec<(&str, Damage)> = vec![
        (
            "meta truncated to 100 bytes",
            Box::new(|d| truncate(&cfg, &d.join("v.meta"), 100)),
        ),
        (
            "meta truncated after superblocks",
            Box::new(|d| truncate(&cfg, &d.join("v.meta"), 8192)),
        ),
        (
            "meta garbage",
            Box::new(|d| corrupt(&cfg, &d.join("v.meta"), 0, &[0xA5; 8192])),
        ),
        (
            "meta empty",
            Box::new(|d| truncate(&cfg, &d.join("v.meta"), 0)),
        ),
        (
            "data truncated",
            Box::new(|d| truncate(&cfg, &d.join("v.img"), 4096)),
        ),
        (
            "dirty map truncated",
            Box::new(|d| truncate(&cfg, &d.join("v.dirty"), 0)),
        ),
    ];
    for (what, damage) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = Volume::create(dir.path(), "v", 4 * MIB, &cfg).expect("create");
        rt.block_on(async { vol.write(0, pattern(1, 1), true).await.expect("write") });
        drop(vol);
        damage(dir.path());
        match Volume::open(dir.path(), "v", &cfg) {
            Err(EngineError::Corrupt { path, reason }) => {
                assert!(!reason.is_empty(), "{what}");
                eprintln!("{what}: {path}: {reason}");
            }
            Err(other) => panic!("{what}: expected Corrupt, got {other}"),
            Ok(_) => panic!("{what}: opened a damaged volume"),
        }
    }
}

#[test]
fn one_damaged_superblock_copy_is_survivable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config();
    let vol = Volume::create(dir.path(), "v", MIB, &cfg).expect("create");
    vol.grow(2 * MIB).expect("grow"); // generation 2 goes to copy 0
    drop(vol);
    corrupt(&cfg, &dir.path().join("v.meta"), 40, &[0xFF; 8]);
    let vol = Volume::open(dir.path(), "v", &cfg).expect("open with the older copy");
    // The older copy (generation 1) is the one left: the pre-grow size.
    assert_eq!(vol.size_bytes(), MIB);
}

#[test]
fn damaged_record_sector_marks_blocks_for_repair() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config();
    let rt = runtime();
    let vol = Volume::create(dir.path(), "v", 4 * MIB, &cfg).expect("create");
    rt.block_on(async {
        vol.write(0, pattern(3, 30), false).await.expect("write");
        vol.flush().await.expect("flush");
    });
    let region_bytes = vol.dirty_region_bytes();
    rt.block_on(async {
        let dirty = vol.dirty_regions(0, 100);
        vol.clear_dirty(&dirty).await.expect("clear");
    });
    assert!(vol.dirty_regions(0, 100).is_empty());
    drop(vol);
    // Records of blocks 21..42 live in sector 1 of the first record page (page 2 of the file).
    corrupt(
        &cfg,
        &dir.path().join("v.meta"),
        2 * 4096 + 512 + 5,
        &[0x42],
    );
    let vol = Volume::open(dir.path(), "v", &cfg).expect("open");
    rt.block_on(async {
        assert_eq!(
            vol.read(0, 21 * 4096).await.expect("intact"),
            pattern(3, 21)
        );
        let err = vol.read(21 * 4096, 4096).await;
        assert!(
            matches!(err, Err(BlockError::Checksum { lba: 21 })),
            "{err:?}"
        );
    });
    assert!(vol.is_region_dirty(21 * 4096 / region_bytes));
}

#[test]
fn apply_if_newer_keeps_the_greatest_stamp_and_tombstones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config();
    let vol = Volume::create(dir.path(), "v", MIB, &cfg).expect("create");
    runtime().block_on(async {
        let newer = ApplyMode::IfNewer;
        let out = vol
            .write_stamped(0, pattern(1, 2), false, stamp(5), newer)
            .await
            .expect("apply");
        assert_eq!(out.applied_blocks, 2);
        // Older: skipped; the data stays.
        let out = vol
            .write_stamped(0, pattern(2, 2), false, stamp(4), newer)
            .await
            .expect("apply older");
        assert_eq!((out.applied_blocks, out.skipped_blocks), (0, 2));
        assert_eq!(vol.read(0, 8192).await.expect("read"), pattern(1, 2));
        // Equal is not newer.
        let out = vol
            .write_stamped(0, pattern(2, 1), false, stamp(5), newer)
            .await
            .expect("apply equal");
        assert_eq!(out.applied_blocks, 0);
        // A newer TRIM over block 1 and 2 leaves its stamp as a tombstone.
        let out = vol
            .trim_stamped(4096, 8192, false, stamp(9), newer)
            .await
            .expect("trim");
        assert_eq!(out.applied_blocks, 2);
        assert_eq!(
            vol.block_stamps(0, 3).await.expect("stamps"),
            vec![stamp(5), stamp(9), stamp(9)]
        );
        // A write older than the tombstone loses; one newer than block 0 only applies there.
        let out = vol
            .write_stamped(0, pattern(3, 2), false, stamp(7), newer)
            .await
            .expect("mixed");
        assert_eq!((out.applied_blocks, out.skipped_blocks), (1, 1));
        let (data, stamps) = vol.read_with_stamps(0, 8192).await.expect("read");
        assert_eq!(&data[..4096], &pattern(3, 2)[..4096]);
        assert!(data[4096..].iter().all(|&b| b == 0));
        assert_eq!(stamps, vec![stamp(7), stamp(9)]);
        // Zeroes keep a tombstone too.
        vol.write_zeroes_stamped(0, 4096, ZeroFlags::default(), stamp(11), newer)
            .await
            .expect("zeroes");
        assert_eq!(vol.block_stamp(0).await.expect("stamp"), stamp(11));
        assert_eq!(vol.max_stamp(), stamp(11));
        // A bare write stamps ZERO.
        vol.write(8 * 4096, pattern(1, 1), false)
            .await
            .expect("bare");
        assert_eq!(vol.block_stamp(8).await.expect("stamp"), Stamp::ZERO);
    });
}

#[test]
fn trim_zeroes_and_block_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config();
    let vol = Volume::create(dir.path(), "v", MIB, &cfg).expect("create");
    runtime().block_on(async {
        let status = vol.block_status(0, MIB).await.expect("status");
        assert_eq!(
            status,
            vec![Extent {
                len_bytes: MIB,
                hole: true,
                zero: true
            }]
        );
        vol.write(0, pattern(1, 4), false).await.expect("write");
        vol.trim(4096, 4096, false).await.expect("trim");
        let zf = ZeroFlags {
            no_hole: true,
            ..ZeroFlags::default()
        };
        vol.write_zeroes(2 * 4096, 4096, zf).await.expect("zeroes");
        let fast = ZeroFlags {
            no_hole: true,
            fast: true,
            fua: false,
        };
        assert!(matches!(
            vol.write_zeroes(0, 4096, fast).await,
            Err(BlockError::NotFast)
        ));
        let data = vol.read(0, 4 * 4096).await.expect("read");
        assert_eq!(&data[..4096], &pattern(1, 4)[..4096]);
        assert!(data[4096..3 * 4096].iter().all(|&b| b == 0));
        assert_eq!(&data[3 * 4096..], &pattern(1, 4)[3 * 4096..]);
        let status = vol.block_status(0, 5 * 4096).await.expect("status");
        let expect = |len_bytes, hole, zero| Extent {
            len_bytes,
            hole,
            zero,
        };
        assert_eq!(
            status,
            vec![
                expect(4096, false, false),
                expect(4096, true, true),
                expect(4096, false, true),
                expect(4096, false, false),
                expect(4096, true, true),
            ]
        );
        vol.flush().await.expect("flush");
    });
    // The trimmed block is zero in the raw image too.
    let raw = file_bytes(&cfg, &vol.info().data_path);
    assert!(raw[4096..8192].iter().all(|&b| b == 0));
}

#[test]
fn dirty_map_marks_before_write_and_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config();
    let rt = runtime();
    let vol = Volume::create(dir.path(), "v", 8 * MIB, &cfg).expect("create");
    let region = vol.dirty_region_bytes();
    assert_eq!(region, MIB);
    assert_eq!(vol.dirty_region_count(), 8);
    assert!(vol.dirty_regions(0, 100).is_empty());
    rt.block_on(async {
        vol.write(3 * MIB + 4096, pattern(1, 1), false)
            .await
            .expect("write");
        vol.trim(5 * MIB, 4096, false).await.expect("trim");
        vol.mark_dirty(7 * MIB + 1, 1).await.expect("mark");
    });
    assert_eq!(vol.dirty_regions(0, 100), vec![3, 5, 7]);
    assert_eq!(vol.dirty_regions(4, 1), vec![5]);
    drop(vol);
    let vol = Volume::open(dir.path(), "v", &cfg).expect("reopen");
    assert_eq!(vol.dirty_regions(0, 100), vec![3, 5, 7]);
    rt.block_on(async { vol.clear_dirty(&[3, 7]).await.expect("clear") });
    assert_eq!(vol.dirty_regions(0, 100), vec![5]);
    drop(vol);
    let vol = Volume::open(dir.path(), "v", &cfg).expect("reopen");
    assert_eq!(vol.dirty_regions(0, 100), vec![5]);
    assert!(!vol.is_region_dirty(3));
}

#[test]
fn concurrent_writers_and_readers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config();
    let vol = std::sync::Arc::new(Volume::create(dir.path(), "v", 4 * MIB, &cfg).expect("create"));
    runtime().block_on(async {
        let mut tasks = Vec::new();
        for t in 0..8u8 {
            let vol = vol.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50u64 {
                    let lba = (i * 8 + u64::from(t)) % 1024;
                    vol.write(lba * 4096, pattern(t, 1), false)
                        .await
                        .expect("write");
                    let back = vol.read(lba * 4096, 4096).await.expect("read");
                    // Another task may have written the same block since; any read must verify.
                    assert_eq!(back.len(), 4096);
                }
                vol.flush().await.expect("flush");
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
    });
}

// ------------------------------------------------------------------------------------------
// Fault injection (always on the simulator).

#[test]
fn eio_on_read_and_write_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, disk) = sim_config(1);
    let vol = Volume::create(dir.path(), "v", MIB, &cfg).expect("create");
    runtime().block_on(async {
        vol.write(0, pattern(1, 1), false).await.expect("write");
        disk.inject(FaultRule {
            op: SimOpKind::Read,
            path_suffix: Some(".img".into()),
            errno: libc::EIO,
            count: 1,
        });
        let err = vol.read(0, 4096).await;
        assert!(
            matches!(&err, Err(BlockError::Io(e)) if e.raw_os_error() == Some(libc::EIO)),
            "{err:?}"
        );
        assert_eq!(vol.read(0, 4096).await.expect("retry"), pattern(1, 1));
        disk.inject(FaultRule {
            op: SimOpKind::Write,
            path_suffix: Some(".img".into()),
            errno: libc::EIO,
            count: 1,
        });
        let err = vol.write(4096, pattern(2, 1), false).await;
        assert!(matches!(err, Err(BlockError::Io(_))), "{err:?}");
    });
}

#[test]
fn disk_full_is_no_space() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, disk) = sim_config(2);
    let vol = Volume::create(dir.path(), "v", 4 * MIB, &cfg).expect("create");
    runtime().block_on(async {
        disk.inject(FaultRule {
            op: SimOpKind::Write,
            path_suffix: Some(".img".into()),
            errno: libc::ENOSPC,
            count: 1,
        });
        let err = vol.write(0, pattern(1, 1), false).await;
        assert!(matches!(err, Err(BlockError::NoSpace)), "{err:?}");
        // The failed write changed nothing visible.
        assert!(vol
            .read(0, 4096)
            .await
            .expect("read")
            .iter()
            .all(|&b| b == 0));
        // A full dirty-map or metadata device is reported the same way.
        disk.inject(FaultRule {
            op: SimOpKind::Write,
            path_suffix: Some(".dirty".into()),
            errno: libc::ENOSPC,
            count: 1,
        });
        let err = vol.write(2 * MIB, pattern(1, 1), false).await;
        assert!(matches!(err, Err(BlockError::NoSpace)), "{err:?}");
    });
}

#[test]
fn failed_fdatasync_fails_the_volume_until_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, disk) = sim_config(3);
    let vol = Volume::create(dir.path(), "v", MIB, &cfg).expect("create");
    runtime().block_on(async {
        vol.write(0, pattern(1, 1), false).await.expect("write");
        disk.inject(FaultRule {
            op: SimOpKind::Sync,
            path_suffix: Some(".img".into()),
            errno: libc::EIO,
            count: 1,
        });
        assert!(vol.flush().await.is_err());
        // The kernel may have dropped the dirty pages: no later flush may claim success.
        assert!(vol.flush().await.is_err());
        assert!(vol.write(0, pattern(2, 1), false).await.is_err());
        // Reads still work.
        assert_eq!(vol.read(0, 4096).await.expect("read"), pattern(1, 1));
    });
}

#[test]
fn crash_keeps_flushed_and_fua_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    for seed in 0..20 {
        let (cfg, disk) = sim_config(seed);
        let name = format!("v{seed}");
        let vol = Volume::create(dir.path(), &name, MIB, &cfg).expect("create");
        let rt = runtime();
        rt.block_on(async {
            vol.write(0, pattern(1, 4), false).await.expect("write");
            vol.flush().await.expect("flush");
            vol.write(4 * 4096, pattern(2, 1), true).await.expect("fua");
            vol.write(8 * 4096, pattern(3, 2), false)
                .await
                .expect("unflushed");
        });
        disk.crash();
        drop(vol);
        disk.restart();
        let vol = Volume::open(dir.path(), &name, &cfg).expect("reopen after crash");
        rt.block_on(async {
            assert_eq!(vol.read(0, 4 * 4096).await.expect("flushed"), pattern(1, 4));
            assert_eq!(vol.read(4 * 4096, 4096).await.expect("fua"), pattern(2, 1));
            for lba in 8..10u64 {
                match vol.read(lba * 4096, 4096).await {
                    Ok(buf) => {
                        let new = &pattern(3, 2)[((lba - 8) * 4096) as usize..][..4096];
                        assert!(
                            buf.iter().all(|&b| b == 0) || &buf[..] == new,
                            "seed {seed}"
                        );
                    }
                    Err(BlockError::Checksum { .. }) => {}
                    Err(e) => panic!("seed {seed}: {e}"),
                }
            }
        });
        assert!(vol.is_region_dirty(0));
    }
}
