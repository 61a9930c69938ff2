//! The block store the core drives: one site's copy of a volume, per block data + stamp, and
//! the persistent dirty map (activity log).
//!
//! The core calls it directly instead of returning "apply" actions. Inside one call of
//! [`crate::core::Replica::step`] the stamp read, the comparison and the write of a block are
//! therefore one atomic unit: that is the "one logical lock" of the apply rule (DESIGN.md §4).
//! A driver over the real engine must keep that property by holding the engine's per-block
//! lock across the comparison and the submission (the engine's "apply if newer").

use stretch_engine::Stamp;

/// What a mutation puts into a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content<'a> {
    /// Exactly one block of data.
    Data(&'a [u8]),
    /// Zeroes (TRIM, WRITE_ZEROES): the stamp stays as a tombstone.
    Zero,
}

/// One site's storage as the replication core sees it.
///
/// Durability follows the engine, not an ideal disk: a `write` is visible to every later
/// `stamp`/`read` at once, but survives a crash only after [`BlockStore::flush`]. A crash may
/// lose any block written since the last flush (it comes back with its old content and
/// stamp, or — in the engine — torn, failing its checksum). Every such block is in the
/// persistent dirty map, because the core marks a block dirty before it writes it and
/// `clear_dirty` becomes persistent only with the next flush; that is the activity log from
/// which a restarted site learns which blocks it cannot trust (DESIGN.md §4).
pub trait BlockStore {
    /// Size of the volume in blocks.
    fn blocks(&self) -> u64;
    /// The stamp of a block's last mutation ([`Stamp::ZERO`] if never written).
    fn stamp(&self, lba: u64) -> Stamp;
    /// Copies one block into `out` (exactly one block long) and returns its stamp.
    fn read(&self, lba: u64, out: &mut [u8]) -> Stamp;
    /// Like [`BlockStore::read`], but `None` when the block fails its checksum (torn by a
    /// crash, damaged at rest) or cannot be read: such content is never returned to a client
    /// or sent to the peer (DESIGN.md §7 invariant 6). `out` then holds nothing meaningful.
    /// A store that cannot detect damage returns every block.
    fn read_checked(&self, lba: u64, out: &mut [u8]) -> Option<Stamp> {
        Some(self.read(lba, out))
    }
    /// Writes a block and its stamp together, unconditionally. The core applies the stamp
    /// comparison itself before calling this.
    fn write(&mut self, lba: u64, content: Content<'_>, stamp: Stamp);
    /// Marks a block as possibly different from the peer, persistently, before the
    /// mutation that may make it so.
    fn mark_dirty(&mut self, lba: u64);
    /// Clears the in-memory dirty bit at once; the persistent one is cleared no earlier than
    /// the next flush (a block cleared and then lost by a crash must still be dirty).
    fn clear_dirty(&mut self, lba: u64);
    /// Makes every write so far durable (data and stamps), and every dirty-bit clear.
    fn flush(&mut self);
    fn is_dirty(&self, lba: u64) -> bool;
    /// Every dirty block, in ascending order.
    fn dirty_blocks(&self) -> Vec<u64>;
    /// The persisted HLC high-water mark (0 on a fresh volume).
    fn hlc_high_water(&self) -> u64;
    fn persist_hlc_high_water(&mut self, value: u64);
    /// The largest stamp of any block (an HLC start input, DESIGN.md §4 "HLC").
    fn max_stamp(&self) -> Stamp;
    /// The epoch in which this site, as a loser, last discarded its divergent blocks.
    /// Persisted so a restart does not discard again: a second discard could wipe live
    /// writes the survivor already counts as delivered.
    fn resync_reset_epoch(&self) -> u32;
    fn persist_resync_reset_epoch(&mut self, epoch: u32);
}
