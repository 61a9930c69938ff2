//! [`Checker`]: what clients saw, and the invariants of DESIGN.md §7 checked against it.
//!
//! It knows every client operation, the stamp each acknowledged mutation got, and the data
//! each read returned (every written block carries its op id and LBA in its first bytes).

use std::collections::BTreeMap;

use stretch_engine::{Stamp, BLOCK_SIZE};

use crate::core::{ClientOpId, Role};
use crate::stamp::SiteId;

const BLOCK_BYTES: usize = BLOCK_SIZE as usize;
/// Written blocks start with this tag, then the op id and the LBA (little-endian).
const TAG: u64 = 0x5354_5245_5443_4831;

/// The data a simulated client writes to `lba` in op `id`: recognisable on read-back.
pub fn block_pattern(id: ClientOpId, lba: u64) -> Vec<u8> {
    let mut block = vec![(id as u8) ^ (lba as u8) ^ 0xA5; BLOCK_BYTES];
    block[0..8].copy_from_slice(&TAG.to_le_bytes());
    block[8..16].copy_from_slice(&id.to_le_bytes());
    block[16..24].copy_from_slice(&lba.to_le_bytes());
    block
}

/// Which op wrote this block's data: `Ok(None)` for zeroes, `Err` for data no op wrote.
fn parse_block(block: &[u8]) -> Result<Option<(ClientOpId, u64)>, String> {
    if block.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&block[i..i + 8]);
        u64::from_le_bytes(b)
    };
    if word(0) != TAG {
        return Err("block data has no write tag".into());
    }
    let (id, lba) = (word(8), word(16));
    if block != block_pattern(id, lba).as_slice() {
        return Err(format!("block data of op {id} lba {lba} is damaged"));
    }
    Ok(Some((id, lba)))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    Acked(Stamp),
    Failed,
    /// The site crashed with the op outstanding: the client never learns the outcome.
    Lost,
}

#[derive(Clone, Debug)]
struct WriteRec {
    lba: u64,
    blocks: u32,
    zero: bool,
    outcome: Outcome,
}

#[derive(Clone, Debug)]
struct ReadRec {
    site: SiteId,
    lba: u64,
    /// Per block: the smallest stamp the read may return (§7 invariant 4).
    min_stamps: Vec<Stamp>,
    epoch: u32,
    outcome: Outcome,
}

/// The client-side record and the invariant checks; see the module documentation.
#[derive(Debug)]
pub struct Checker {
    writes: BTreeMap<ClientOpId, WriteRec>,
    reads: BTreeMap<ClientOpId, ReadRec>,
    flushes: BTreeMap<ClientOpId, Outcome>,
    stamp_owner: BTreeMap<Stamp, ClientOpId>,
    /// Per block: the largest stamp of an acknowledged mutation.
    acked_max: Vec<Stamp>,
    /// Per block: the largest stamp a checked read returned.
    observed_max: Vec<Stamp>,
    pub reads_checked: u64,
    pub writes_acked: u64,
}

impl Checker {
    pub fn new(blocks: u64) -> Checker {
        Checker {
            writes: BTreeMap::new(),
            reads: BTreeMap::new(),
            flushes: BTreeMap::new(),
            stamp_owner: BTreeMap::new(),
            acked_max: vec![Stamp::ZERO; blocks as usize],
            observed_max: vec![Stamp::ZERO; blocks as usize],
            reads_checked: 0,
            writes_acked: 0,
        }
    }

    pub fn start_write(&mut self, id: ClientOpId, lba: u64, blocks: u32, zero: bool) {
        self.writes.insert(
            id,
            WriteRec {
                lba,
                blocks,
                zero,
                outcome: Outcome::Pending,
            },
        );
    }

    pub fn start_flush(&mut self, id: ClientOpId) {
        self.flushes.insert(id, Outcome::Pending);
    }

    pub fn on_flush_done(&mut self, id: ClientOpId) -> Result<(), String> {
        match self.flushes.get_mut(&id) {
            Some(o @ Outcome::Pending) => {
                *o = Outcome::Acked(Stamp::ZERO);
                Ok(())
            }
            Some(o) => Err(format!("flush {id} completed twice ({o:?}, then done)")),
            None => Err(format!("flush reply for unknown op {id}")),
        }
    }

    pub fn start_read(&mut self, id: ClientOpId, site: SiteId, lba: u64, blocks: u32, epoch: u32) {
        let min_stamps = (lba..lba + u64::from(blocks))
            .map(|b| self.acked_max[b as usize].max(self.observed_max[b as usize]))
            .collect();
        self.reads.insert(
            id,
            ReadRec {
                site,
                lba,
                min_stamps,
                epoch,
                outcome: Outcome::Pending,
            },
        );
    }

    pub fn outcome(&self, id: ClientOpId) -> Option<Outcome> {
        self.writes
            .get(&id)
            .map(|w| w.outcome)
            .or_else(|| self.reads.get(&id).map(|r| r.outcome))
            .or_else(|| self.flushes.get(&id).copied())
    }

    pub fn outstanding(&self) -> usize {
        self.writes
            .values()
            .filter(|w| w.outcome == Outcome::Pending)
            .count()
            + self
                .reads
                .values()
                .filter(|r| r.outcome == Outcome::Pending)
                .count()
            + self
                .flushes
                .values()
                .filter(|o| **o == Outcome::Pending)
                .count()
    }

    pub fn on_ack(&mut self, id: ClientOpId, stamp: Stamp) -> Result<(), String> {
        let Some(w) = self.writes.get_mut(&id) else {
            return Err(format!("ack for unknown or non-write op {id}"));
        };
        if w.outcome != Outcome::Pending {
            return Err(format!(
                "op {id} completed twice ({:?}, then ack)",
                w.outcome
            ));
        }
        w.outcome = Outcome::Acked(stamp);
        if let Some(other) = self.stamp_owner.insert(stamp, id) {
            return Err(format!("stamp {stamp:?} given to ops {other} and {id}"));
        }
        for b in w.lba..w.lba + u64::from(w.blocks) {
            let m = &mut self.acked_max[b as usize];
            *m = (*m).max(stamp);
        }
        self.writes_acked += 1;
        Ok(())
    }

    pub fn on_fail(&mut self, id: ClientOpId) -> Result<(), String> {
        if let Some(w) = self.writes.get_mut(&id) {
            if w.outcome != Outcome::Pending {
                return Err(format!("op {id} completed twice"));
            }
            w.outcome = Outcome::Failed;
        } else if let Some(r) = self.reads.get_mut(&id) {
            if r.outcome != Outcome::Pending {
                return Err(format!("op {id} completed twice"));
            }
            r.outcome = Outcome::Failed;
        } else if let Some(f) = self.flushes.get_mut(&id) {
            if *f != Outcome::Pending {
                return Err(format!("op {id} completed twice"));
            }
            *f = Outcome::Failed;
        } else {
            return Err(format!("failure for unknown op {id}"));
        }
        Ok(())
    }

    /// A crash: the client of every outstanding op at `site` loses its connection.
    pub fn on_crash(&mut self, ids: &[ClientOpId]) {
        for id in ids {
            if let Some(w) = self.writes.get_mut(id) {
                w.outcome = Outcome::Lost;
            }
            if let Some(r) = self.reads.get_mut(id) {
                r.outcome = Outcome::Lost;
            }
            if let Some(f) = self.flushes.get_mut(id) {
                *f = Outcome::Lost;
            }
        }
    }

    /// DESIGN.md §7 invariant 4: a read that starts after a write's reply (or after another
    /// read's reply) returns that version or a later one, and its data is what the write
    /// with the returned stamp wrote. Checked while the serving site is in sync (or the
    /// survivor) in the epoch in which the read started.
    pub fn on_read_done(
        &mut self,
        id: ClientOpId,
        data: &[u8],
        stamps: &[Stamp],
        site_role_now: Role,
        epoch_now: u32,
    ) -> Result<(), String> {
        let Some(r) = self.reads.get_mut(&id) else {
            return Err(format!("read reply for unknown op {id}"));
        };
        if r.outcome != Outcome::Pending {
            return Err(format!("read {id} completed twice"));
        }
        r.outcome = Outcome::Acked(Stamp::ZERO);
        let r = r.clone();
        if stamps.len() != r.min_stamps.len() || data.len() != stamps.len() * BLOCK_BYTES {
            return Err(format!("read {id} returned the wrong number of blocks"));
        }
        // A catching-up loser's reads are checked like any other (DESIGN.md §4 "Resync": it
        // serves them); a read that started in an earlier epoch is not.
        let _ = site_role_now;
        if epoch_now != r.epoch {
            return Ok(());
        }
        self.reads_checked += 1;
        for (i, (block, &stamp)) in data.chunks_exact(BLOCK_BYTES).zip(stamps).enumerate() {
            let lba = r.lba + i as u64;
            if stamp < r.min_stamps[i] {
                return Err(format!(
                    "invariant 4: read {id} at site {} returned block {lba} with stamp {stamp:?}, \
                     older than {:?} which was acknowledged or read before the read started",
                    r.site, r.min_stamps[i]
                ));
            }
            let owner = self.stamp_owner.get(&stamp).copied();
            match parse_block(block).map_err(|e| format!("read {id} block {lba}: {e}"))? {
                None => {
                    if let Some(op) = owner.and_then(|o| self.writes.get(&o)) {
                        if !op.zero {
                            return Err(format!(
                                "read {id} block {lba}: zeroes under the stamp of a data write"
                            ));
                        }
                    }
                }
                Some((writer, tagged_lba)) => {
                    if tagged_lba != lba {
                        return Err(format!("read {id} block {lba}: data of block {tagged_lba}"));
                    }
                    if owner.is_some_and(|o| o != writer) {
                        return Err(format!(
                            "read {id} block {lba}: data of op {writer} under the stamp of op {owner:?}"
                        ));
                    }
                    if let Some(Outcome::Acked(s)) = self.writes.get(&writer).map(|w| w.outcome) {
                        if s != stamp {
                            return Err(format!(
                                "read {id} block {lba}: op {writer}'s data with a foreign stamp"
                            ));
                        }
                    }
                }
            }
            let m = &mut self.observed_max[lba as usize];
            *m = (*m).max(stamp);
        }
        Ok(())
    }

    /// The stamp every copy that counts (in-sync or survivor) must have reached per block:
    /// nothing acknowledged or read may be lost (DESIGN.md §7 invariants 2 and 5).
    pub fn required_stamp(&self, lba: u64) -> Stamp {
        self.acked_max[lba as usize].max(self.observed_max[lba as usize])
    }

    /// Checks a whole store's block data against the writes' tags (used at convergence).
    pub fn check_block(&self, lba: u64, data: Option<&[u8]>, stamp: Stamp) -> Result<(), String> {
        let Some(data) = data else { return Ok(()) };
        match parse_block(data).map_err(|e| format!("block {lba}: {e}"))? {
            None => Ok(()),
            Some((writer, tagged)) => {
                if tagged != lba {
                    return Err(format!("block {lba} holds the data of block {tagged}"));
                }
                match self.writes.get(&writer).map(|w| w.outcome) {
                    Some(Outcome::Acked(s)) if s != stamp => Err(format!(
                        "block {lba} holds op {writer}'s data under stamp {stamp:?}, op got {s:?}"
                    )),
                    _ => Ok(()),
                }
            }
        }
    }
}
