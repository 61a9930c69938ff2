//! The mutation stamp: opaque to the engine, ordered by its bytes.
//!
//! The replicator encodes `(accept_epoch, hlc, origin_site)` big-endian into these 16 bytes so
//! that byte order is stamp order (DESIGN.md §4). The engine only stores, compares and returns
//! stamps; [`Stamp::ZERO`] is the stamp of a block never written.

/// 16 opaque bytes compared lexicographically.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Stamp(pub [u8; 16]);

impl Stamp {
    /// The stamp of a never-written block; every real stamp is greater.
    pub const ZERO: Stamp = Stamp([0; 16]);
    /// Encoded size on disk and on the wire.
    pub const LEN: usize = 16;
}

impl std::fmt::Debug for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stamp(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}
