//! A proptest state machine: a `Volume` on the simulated engine against a model, with crashes.
//!
//! Properties (DESIGN.md §3, §4):
//! - a write acknowledged then flushed, or written with FUA, is never lost by a crash;
//! - reads never return data that was not written (after a crash a block holds a value it held
//!   at the last flush or one written since, or fails its checksum — only if written since);
//! - "apply if newer" keeps the greatest stamp whatever the order of arrival;
//! - after recovery the dirty map covers every block touched since the last clean point.
//!
//! Each case runs on a fresh simulated disk seeded from the case, so a failure replays.

mod common;

use proptest::prelude::*;
use stretch_engine::io::sim::SimDisk;
use stretch_engine::{
    AlignedBuf, ApplyMode, BlockDevice, BlockError, IoEngineKind, Stamp, Volume, VolumeConfig,
};

const BLOCKS: u64 = 48;
const REGION_BLOCKS: u32 = 4;

#[derive(Clone, Debug)]
enum Op {
    /// A plain write of `n` blocks (stamp ZERO).
    Write {
        lba: u64,
        n: u64,
        fua: bool,
    },
    /// A stamped write or trim, applied only where newer.
    Apply {
        lba: u64,
        n: u64,
        stamp: u8,
        trim: bool,
    },
    Read {
        lba: u64,
        n: u64,
    },
    Flush,
    /// Clears every dirty region: a new clean point.
    ClearDirty,
    /// Crash after `after` more mutating disk operations (0 = now), then recover.
    Crash {
        after: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..BLOCKS).prop_flat_map(|lba| (Just(lba), 1..=(BLOCKS - lba).min(4)));
    prop_oneof![
        4 => (range.clone(), any::<bool>()).prop_map(|((lba, n), fua)| Op::Write { lba, n, fua }),
        4 => (range.clone(), 1..20u8, prop::bool::weighted(0.2))
            .prop_map(|((lba, n), stamp, trim)| Op::Apply { lba, n, stamp, trim }),
        3 => range.prop_map(|(lba, n)| Op::Read { lba, n }),
        2 => Just(Op::Flush),
        1 => Just(Op::ClearDirty),
        1 => (0..6u8).prop_map(|after| Op::Crash { after }),
    ]
}

/// Block content for value `v` at `lba`: zeroes for 0, otherwise a self-describing pattern.
fn content(v: u32, lba: u64) -> Vec<u8> {
    if v == 0 {
        return vec![0; 4096];
    }
    let mut block = vec![(v as u8) ^ (lba as u8); 4096];
    block[..4].copy_from_slice(&v.to_le_bytes());
    block[4..12].copy_from_slice(&lba.to_le_bytes());
    block
}

fn decode(block: &[u8], lba: u64) -> Option<u32> {
    if block.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let v = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
    (content(v, lba) == block).then_some(v)
}

fn stamp(n: u8) -> Stamp {
    let mut s = [0u8; 16];
    s[15] = n;
    Stamp(s)
}

/// What the model knows of one block. `None` as a value means "fails its checksum".
#[derive(Clone, Debug)]
struct Cell {
    value: Option<u32>,
    stamp: u8,
    /// (value, stamp) pairs a crash may leave: the state at the last flush and every write
    /// since (acknowledged or failed mid-crash).
    candidates: Vec<(Option<u32>, u8)>,
    /// An acknowledged mutation touched the block since the last clean point.
    touched_since_clean: bool,
    /// The block at the last clean point; a block that differs from it must be dirty even if
    /// the mutation that changed it failed (crashed) before its reply.
    clean: (Option<u32>, u8),
}

struct Harness {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    cfg: VolumeConfig,
    disk: std::sync::Arc<SimDisk>,
    vol: Option<Volume>,
    cells: Vec<Cell>,
    next_value: u32,
}

impl Harness {
    fn new(seed: u64) -> Harness {
        let disk = SimDisk::new(seed);
        let cfg = VolumeConfig {
            io_engine: IoEngineKind::Sim,
            sim_disk: Some(disk.clone()),
            dirty_region_blocks: REGION_BLOCKS,
            ..VolumeConfig::default()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = Volume::create(dir.path(), "m", BLOCKS * 4096, &cfg).expect("create");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let cell = Cell {
            value: Some(0),
            stamp: 0,
            candidates: vec![(Some(0), 0)],
            touched_since_clean: false,
            clean: (Some(0), 0),
        };
        Harness {
            rt,
            dir,
            cfg,
            disk,
            vol: Some(vol),
            cells: vec![cell; BLOCKS as usize],
            next_value: 1,
        }
    }

    fn vol(&self) -> &Volume {
        self.vol.as_ref().expect("volume open")
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Write { lba, n, fua } => {
                let values: Vec<u32> = (0..n).map(|_| self.fresh()).collect();
                let mut buf = AlignedBuf::zeroed((n * 4096) as usize);
                for (i, &v) in values.iter().enumerate() {
                    buf[i * 4096..(i + 1) * 4096].copy_from_slice(&content(v, lba + i as u64));
                }
                let result = self.rt.block_on(self.vol().write(lba * 4096, buf, fua));
                for (i, &v) in values.iter().enumerate() {
                    let cell = &mut self.cells[(lba + i as u64) as usize];
                    cell.candidates.push((Some(v), 0));
                    if result.is_ok() {
                        cell.touched_since_clean = true;
                        cell.value = Some(v);
                        cell.stamp = 0;
                        if fua {
                            // NBD: FUA makes this write durable before the reply.
                            cell.candidates = vec![(Some(v), 0)];
                        }
                    }
                }
                self.after_io(result.err())?;
            }
            Op::Apply {
                lba,
                n,
                stamp: s,
                trim,
            } => {
                let values: Vec<u32> = (0..n)
                    .map(|_| if trim { 0 } else { self.fresh() })
                    .collect();
                let vol = self.vol.as_ref().expect("volume open");
                let result = if trim {
                    self.rt.block_on(vol.trim_stamped(
                        lba * 4096,
                        n * 4096,
                        false,
                        stamp(s),
                        ApplyMode::IfNewer,
                    ))
                } else {
                    let mut buf = AlignedBuf::zeroed((n * 4096) as usize);
                    for (i, &v) in values.iter().enumerate() {
                        buf[i * 4096..(i + 1) * 4096].copy_from_slice(&content(v, lba + i as u64));
                    }
                    self.rt.block_on(vol.write_stamped(
                        lba * 4096,
                        buf,
                        false,
                        stamp(s),
                        ApplyMode::IfNewer,
                    ))
                };
                let mut expect_applied = 0;
                for (i, &v) in values.iter().enumerate() {
                    let cell = &mut self.cells[(lba + i as u64) as usize];
                    if s > cell.stamp {
                        expect_applied += 1;
                        cell.candidates.push((Some(v), s));
                        if result.is_ok() {
                            cell.touched_since_clean = true;
                            cell.value = Some(v);
                            cell.stamp = s;
                        }
                    }
                }
                match result {
                    Ok(outcome) => {
                        prop_assert_eq!(
                            outcome.applied_blocks,
                            expect_applied,
                            "apply-if-newer count"
                        );
                        prop_assert_eq!(outcome.skipped_blocks, n - expect_applied);
                    }
                    Err(e) => self.after_io(Some(e))?,
                }
            }
            Op::Read { lba, n } => {
                let result = self
                    .rt
                    .block_on(self.vol().read_with_stamps(lba * 4096, (n * 4096) as u32));
                match result {
                    Ok((buf, stamps)) => {
                        for i in 0..n {
                            let cell = &self.cells[(lba + i) as usize];
                            let got = decode(&buf[(i * 4096) as usize..][..4096], lba + i);
                            prop_assert_eq!(got, cell.value, "block {} content", lba + i);
                            prop_assert_eq!(
                                stamps[i as usize],
                                stamp(cell.stamp),
                                "block {} stamp",
                                lba + i
                            );
                        }
                    }
                    Err(BlockError::Checksum { lba: bad }) => {
                        prop_assert!(bad >= lba && bad < lba + n);
                        prop_assert_eq!(
                            self.cells[bad as usize].value,
                            None,
                            "unexpected checksum error at {}",
                            bad
                        );
                    }
                    Err(e) => self.after_io(Some(e))?,
                }
            }
            Op::Flush => {
                let result = self.rt.block_on(self.vol().flush());
                if result.is_ok() {
                    for cell in &mut self.cells {
                        cell.candidates = vec![(cell.value, cell.stamp)];
                    }
                }
                self.after_io(result.err())?;
            }
            Op::ClearDirty => {
                let vol = self.vol.as_ref().expect("volume open");
                let regions = vol.dirty_regions(0, usize::MAX);
                let result = self.rt.block_on(vol.clear_dirty(&regions));
                if result.is_ok() {
                    // clear_dirty flushes first, so this is also a flush.
                    for cell in &mut self.cells {
                        cell.candidates = vec![(cell.value, cell.stamp)];
                        cell.touched_since_clean = false;
                        cell.clean = (cell.value, cell.stamp);
                    }
                }
                self.after_io(result.err())?;
            }
            Op::Crash { after } => {
                if after == 0 {
                    self.disk.crash();
                    self.recover()?;
                } else {
                    self.disk.crash_after_mutations(u64::from(after));
                }
            }
        }
        Ok(())
    }

    fn fresh(&mut self) -> u32 {
        self.next_value += 1;
        self.next_value
    }

    /// An operation failed: only a crash may cause that here; recover from it.
    fn after_io(&mut self, err: Option<BlockError>) -> Result<(), TestCaseError> {
        match err {
            None if !self.disk.is_crashed() => Ok(()),
            None => self.recover(),
            Some(e) => {
                prop_assert!(self.disk.is_crashed(), "I/O failed without a crash: {}", e);
                self.recover()
            }
        }
    }

    /// Reopens after a crash and settles the model from what the disk holds, checking it.
    fn recover(&mut self) -> Result<(), TestCaseError> {
        self.disk.clear_faults();
        drop(self.vol.take());
        self.disk.restart();
        let vol = Volume::open(self.dir.path(), "m", &self.cfg)
            .map_err(|e| TestCaseError::fail(format!("reopen after crash: {e}")))?;
        for lba in 0..BLOCKS {
            let cell = &mut self.cells[lba as usize];
            let region = lba / u64::from(REGION_BLOCKS);
            if cell.touched_since_clean {
                prop_assert!(
                    vol.is_region_dirty(region),
                    "block {} touched but region {} clean",
                    lba,
                    region
                );
            }
            let s = self
                .rt
                .block_on(vol.block_stamp(lba))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let got = match self.rt.block_on(vol.read(lba * 4096, 4096)) {
                Ok(buf) => {
                    let v = decode(&buf, lba);
                    prop_assert!(v.is_some(), "block {} returned data never written", lba);
                    v
                }
                Err(BlockError::Checksum { .. }) => None,
                Err(e) => return Err(TestCaseError::fail(format!("read after crash: {e}"))),
            };
            let stamp_n = s.0[15];
            let ok = match got {
                // Data and record are separate writes, so after a crash the content may come
                // from one candidate and the stamp from another when the two happen to agree
                // (e.g. an un-flushed TRIM's zeroes under the record of a never-written block).
                // Such a block lies in a dirty region, where stamps are settled from the peer.
                Some(v) => {
                    cell.candidates.iter().any(|&(cv, _)| cv == Some(v))
                        && cell.candidates.iter().any(|&(_, cs)| cs == stamp_n)
                }
                // A checksum failure only where something was written since the last flush
                // (or the block was already failing), with a stamp some candidate had.
                None => {
                    (cell.candidates.len() > 1 || cell.value.is_none())
                        && cell.candidates.iter().any(|&(_, cs)| cs == stamp_n)
                }
            };
            prop_assert!(
                ok,
                "block {}: after crash got {:?} stamp {}, candidates {:?}",
                lba,
                got,
                stamp_n,
                cell.candidates
            );
            cell.value = got;
            cell.stamp = stamp_n;
            cell.candidates = vec![(got, stamp_n)];
        }
        self.vol = Some(vol);
        Ok(())
    }
}

proptest! {
    // PROPTEST_CASES raises the count for a longer soak.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96),
        ..ProptestConfig::default()
    })]

    #[test]
    fn volume_matches_model_across_crashes(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..60)) {
        let mut h = Harness::new(seed);
        for op in &ops {
            h.apply(op)?;
        }
        // A final flush then crash: recovery must find exactly the flushed state.
        h.apply(&Op::Flush)?;
        h.apply(&Op::Crash { after: 0 })?;
    }
}
