//! Where a voter keeps each generation's Raft state, and which generation is current.
//!
//! Generation 0 keeps its log, vote and snapshot directly in the voter's directory (the layout
//! from before `force-survivor` existed). Generation `g > 0` keeps them in `gen-<g>/` inside
//! it, and the file `generation` names the current one. A new generation therefore never
//! reads, merges or truncates the old one's state: the old files stay where they were, for
//! forensics, and the old group's node ids are never used again.

use std::io;
use std::path::{Path, PathBuf};

use super::log_store::write_atomic;
use super::GENERATION_MAX;

const GENERATION_FILE: &str = "generation";

/// The directory holding generation `generation`'s Raft state inside `dir`.
pub fn generation_dir(dir: &Path, generation: u64) -> PathBuf {
    if generation == 0 {
        dir.to_path_buf()
    } else {
        dir.join(format!("gen-{generation}"))
    }
}

/// The current generation recorded in `dir` (0 if none was ever recorded).
pub fn read_generation(dir: &Path) -> io::Result<u64> {
    let path = dir.join(GENERATION_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let generation = text.trim().parse::<u64>().map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not a generation number: {e}", path.display()),
                )
            })?;
            if generation > GENERATION_MAX {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} names generation {generation}, above {GENERATION_MAX}",
                        path.display()
                    ),
                ));
            }
            Ok(generation)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Records `generation` as current in `dir`, durably (temp file, fsync, rename, fsync dir).
pub fn write_generation(dir: &Path, generation: u64) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    write_atomic(dir, GENERATION_FILE, format!("{generation}\n").as_bytes())
}

/// Whether `dir` holds any Raft state of the generation stored there (log, vote, snapshot).
pub fn has_raft_state(dir: &Path) -> bool {
    ["raft-log", "raft-vote", "map-snapshot"]
        .iter()
        .any(|f| dir.join(f).exists())
}

/// Removes generation `generation`'s directory (`g > 0`) so it can be started afresh: a
/// `force-survivor` interrupted before it recorded the generation left it half made.
pub fn discard_unrecorded(dir: &Path, generation: u64) -> io::Result<()> {
    if generation == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "generation 0's state is never discarded",
        ));
    }
    match std::fs::remove_dir_all(generation_dir(dir, generation)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_live_apart_and_the_record_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_generation(dir.path()).expect("read"), 0);
        assert_eq!(generation_dir(dir.path(), 0), dir.path());
        assert_ne!(generation_dir(dir.path(), 1), dir.path());
        write_generation(dir.path(), 3).expect("write");
        assert_eq!(read_generation(dir.path()).expect("read"), 3);
        std::fs::write(dir.path().join(GENERATION_FILE), "256\n").expect("write");
        assert!(read_generation(dir.path()).is_err());
        std::fs::create_dir_all(generation_dir(dir.path(), 2)).expect("mkdir");
        std::fs::write(generation_dir(dir.path(), 2).join("raft-log"), b"x").expect("write");
        assert!(has_raft_state(&generation_dir(dir.path(), 2)));
        discard_unrecorded(dir.path(), 2).expect("discard");
        assert!(!generation_dir(dir.path(), 2).exists());
        assert!(discard_unrecorded(dir.path(), 0).is_err());
    }
}
