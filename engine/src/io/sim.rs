//! The simulated engine: an in-memory disk with a volatile cache and a durable image.
//!
//! Every file has the content reads see (`volatile`), the content that survives a crash
//! (`durable`) and the log of writes since its last `fdatasync`. A crash keeps the durable image
//! and replays each logged write at random: dropped, applied, or torn (a random subset of its
//! 512-byte sectors), so reordering and torn writes both happen. Faults are injected by rule
//! (EIO or ENOSPC on the next N operations of a kind, optionally on one file) and a crash can be
//! scheduled after N mutating operations, or called at once. Everything is driven by one seeded
//! RNG, so a failing run replays from its seed.
//!
//! File creation, length changes and removal are durable at once (as after an fsync of the
//! file and its directory); only data writes are volatile.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{lock, Completion, FileId, IoDone, IoEngine, IoOp, OpenMode};

/// Torn writes tear at this granularity (a disk sector).
pub const SECTOR_BYTES: usize = 512;
/// Un-synced writes remembered per file; older ones are written back to the durable image, as a
/// real cache may do at any time. Bounds the simulator's memory.
const UNSYNCED_WRITES_MAX: usize = 65_536;

/// Which operations a fault rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimOpKind {
    Read,
    Write,
    Sync,
    Punch,
    /// Any of the above.
    Any,
}

/// Fail the next `count` matching operations with `errno`.
#[derive(Clone, Debug)]
pub struct FaultRule {
    pub op: SimOpKind,
    /// Only files whose path ends with this (e.g. ".img", ".meta"); `None` for every file.
    pub path_suffix: Option<String>,
    pub errno: i32,
    pub count: u32,
}

#[derive(Default)]
struct SimFile {
    volatile: Vec<u8>,
    durable: Vec<u8>,
    unsynced: VecDeque<(u64, Vec<u8>)>,
}

struct State {
    files: BTreeMap<PathBuf, SimFile>,
    rules: Vec<FaultRule>,
    crash_after_mutations: Option<u64>,
    crashed: bool,
    /// Bumped by every crash; engines from an older generation are dead (their process "died").
    generation: u64,
    rng: SmallRng,
    seed: u64,
    ops_total: u64,
}

/// The simulated disk shared by all [`SimEngine`]s that open files on it.
pub struct SimDisk {
    state: Mutex<State>,
}

impl SimDisk {
    /// A fresh, empty disk whose random choices all derive from `seed`.
    pub fn new(seed: u64) -> Arc<SimDisk> {
        Arc::new(SimDisk {
            state: Mutex::new(State {
                files: BTreeMap::new(),
                rules: Vec::new(),
                crash_after_mutations: None,
                crashed: false,
                generation: 0,
                rng: SmallRng::seed_from_u64(seed),
                seed,
                ops_total: 0,
            }),
        })
    }

    /// The process-wide disk used when a config asks for `Sim` without giving one (so the
    /// ordinary test suite runs on the simulator with `STRETCH_IO_ENGINE=sim`).
    pub fn global() -> Arc<SimDisk> {
        static GLOBAL: OnceLock<Arc<SimDisk>> = OnceLock::new();
        GLOBAL.get_or_init(|| SimDisk::new(0x5eed)).clone()
    }

    /// The seed this disk was created with.
    pub fn seed(&self) -> u64 {
        lock(&self.state).seed
    }

    /// Adds a fault rule.
    pub fn inject(&self, rule: FaultRule) {
        lock(&self.state).rules.push(rule);
    }

    /// Removes every fault rule and any scheduled crash.
    pub fn clear_faults(&self) {
        let mut state = lock(&self.state);
        state.rules.clear();
        state.crash_after_mutations = None;
    }

    /// Crashes just before the `n`-th next mutating operation (write, sync, punch); that
    /// operation and everything after it fails with EIO until [`SimDisk::restart`].
    pub fn crash_after_mutations(&self, n: u64) {
        lock(&self.state).crash_after_mutations = Some(n);
    }

    /// Crashes now: un-synced writes are dropped, applied or torn at random.
    pub fn crash(&self) {
        let mut state = lock(&self.state);
        crash_locked(&mut state);
    }

    /// True after a crash until [`SimDisk::restart`].
    pub fn is_crashed(&self) -> bool {
        lock(&self.state).crashed
    }

    /// Powers the disk back on after a crash: new engines may open files again.
    pub fn restart(&self) {
        lock(&self.state).crashed = false;
    }

    /// True if the file exists.
    pub fn exists(&self, path: &Path) -> bool {
        lock(&self.state).files.contains_key(path)
    }

    /// Removes a file.
    pub fn remove(&self, path: &Path) -> io::Result<()> {
        match lock(&self.state).files.remove(path) {
            Some(_) => Ok(()),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    /// The files directly inside `dir`.
    pub fn list(&self, dir: &Path) -> Vec<PathBuf> {
        lock(&self.state)
            .files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .cloned()
            .collect()
    }

    /// Overwrites bytes of a file behind the engine's back, durably (a test's bit rot).
    pub fn corrupt(&self, path: &Path, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut state = lock(&self.state);
        let file = state
            .files
            .get_mut(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        for image in [&mut file.volatile, &mut file.durable] {
            let end = offset as usize + bytes.len();
            if image.len() < end {
                image.resize(end, 0);
            }
            image[offset as usize..end].copy_from_slice(bytes);
        }
        Ok(())
    }

    /// Sets a file's length durably behind the engine's back (a test's truncation).
    pub fn truncate(&self, path: &Path, len_bytes: u64) -> io::Result<()> {
        let mut state = lock(&self.state);
        let file = state
            .files
            .get_mut(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        file.volatile.resize(len_bytes as usize, 0);
        file.durable.resize(len_bytes as usize, 0);
        file.unsynced.clear();
        Ok(())
    }

    /// The bytes a read would see now.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        lock(&self.state)
            .files
            .get(path)
            .map(|f| f.volatile.clone())
    }

    /// Total operations executed (for seeding crash points within a run).
    pub fn ops_total(&self) -> u64 {
        lock(&self.state).ops_total
    }
}

fn crash_locked(state: &mut State) {
    let State {
        files,
        rng,
        crashed,
        ..
    } = state;
    for file in files.values_mut() {
        let mut image = std::mem::take(&mut file.durable);
        for (offset, data) in file.unsynced.drain(..) {
            let offset = offset as usize;
            match rng.random_range(0..3u8) {
                0 => {}
                1 => apply(&mut image, offset, &data),
                _ => {
                    for (i, sector) in data.chunks(SECTOR_BYTES).enumerate() {
                        if rng.random_bool(0.5) {
                            apply(&mut image, offset + i * SECTOR_BYTES, sector);
                        }
                    }
                }
            }
        }
        image.resize(file.volatile.len(), 0);
        file.volatile = image.clone();
        file.durable = image;
    }
    *crashed = true;
    state.generation += 1;
}

fn apply(image: &mut Vec<u8>, offset: usize, data: &[u8]) {
    let end = offset + data.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[offset..end].copy_from_slice(data);
}

/// An engine whose files live on a [`SimDisk`]. Operations complete synchronously.
pub struct SimEngine {
    disk: Arc<SimDisk>,
    generation: u64,
    files: Mutex<Vec<PathBuf>>,
}

impl SimEngine {
    /// An engine on `disk`, belonging to the disk's current generation (the current "boot").
    pub fn new(disk: Arc<SimDisk>) -> SimEngine {
        let generation = lock(&disk.state).generation;
        SimEngine {
            disk,
            generation,
            files: Mutex::new(Vec::new()),
        }
    }

    fn path(&self, file: FileId) -> io::Result<PathBuf> {
        lock(&self.files)
            .get(file.0 as usize)
            .cloned()
            .ok_or_else(|| io::Error::other(format!("unknown file id {}", file.0)))
    }

    fn check_alive(&self, state: &State) -> io::Result<()> {
        if state.crashed || state.generation != self.generation {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    fn execute(&self, op: &mut IoOp) -> io::Result<()> {
        let (file, kind) = match op {
            IoOp::Read { file, .. } => (*file, SimOpKind::Read),
            IoOp::Write { file, .. } => (*file, SimOpKind::Write),
            IoOp::Fdatasync { file } => (*file, SimOpKind::Sync),
            IoOp::PunchHole { file, .. } => (*file, SimOpKind::Punch),
        };
        let path = self.path(file)?;
        let mut state = lock(&self.disk.state);
        self.check_alive(&state)?;
        state.ops_total += 1;
        if kind != SimOpKind::Read {
            if let Some(left) = state.crash_after_mutations {
                if left == 0 {
                    state.crash_after_mutations = None;
                    crash_locked(&mut state);
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                state.crash_after_mutations = Some(left - 1);
            }
        }
        let path_str = path.to_string_lossy().into_owned();
        if let Some(rule) = state.rules.iter_mut().find(|r| {
            r.count > 0
                && (r.op == kind || r.op == SimOpKind::Any)
                && r.path_suffix.as_ref().is_none_or(|s| path_str.ends_with(s))
        }) {
            rule.count -= 1;
            return Err(io::Error::from_raw_os_error(rule.errno));
        }
        state.rules.retain(|r| r.count > 0);
        let sim_file = state
            .files
            .get_mut(&path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        match op {
            IoOp::Read { offset, buf, .. } => {
                let start = *offset as usize;
                let end = start + buf.len();
                if end > sim_file.volatile.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "short read: end of file",
                    ));
                }
                buf.copy_from_slice(&sim_file.volatile[start..end]);
            }
            IoOp::Write { offset, buf, .. } => {
                write_volatile(sim_file, *offset, buf.to_vec());
            }
            IoOp::PunchHole { offset, len, .. } => {
                let end = (*offset + *len).min(sim_file.volatile.len() as u64);
                if end > *offset {
                    write_volatile(sim_file, *offset, vec![0; (end - *offset) as usize]);
                }
            }
            IoOp::Fdatasync { .. } => {
                sim_file.durable = sim_file.volatile.clone();
                sim_file.unsynced.clear();
            }
        }
        Ok(())
    }
}

fn write_volatile(file: &mut SimFile, offset: u64, data: Vec<u8>) {
    apply(&mut file.volatile, offset as usize, &data);
    if file.unsynced.len() >= UNSYNCED_WRITES_MAX {
        if let Some((old_offset, old_data)) = file.unsynced.pop_front() {
            apply(&mut file.durable, old_offset as usize, &old_data);
        }
    }
    file.unsynced.push_back((offset, data));
}

impl IoEngine for SimEngine {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<FileId> {
        let mut state = lock(&self.disk.state);
        self.check_alive(&state)?;
        let exists = state.files.contains_key(path);
        if mode.create_new && exists {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        if !mode.create_new && !exists {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        if mode.create_new {
            state.files.insert(path.to_path_buf(), SimFile::default());
        }
        drop(state);
        let mut files = lock(&self.files);
        let id = u32::try_from(files.len()).map_err(|_| io::Error::other("too many files"))?;
        files.push(path.to_path_buf());
        Ok(FileId(id))
    }

    fn is_direct(&self, _file: FileId) -> bool {
        false
    }

    fn file_len(&self, file: FileId) -> io::Result<u64> {
        let path = self.path(file)?;
        let state = lock(&self.disk.state);
        self.check_alive(&state)?;
        state
            .files
            .get(&path)
            .map(|f| f.volatile.len() as u64)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn set_len(&self, file: FileId, len_bytes: u64) -> io::Result<()> {
        let path = self.path(file)?;
        let mut state = lock(&self.disk.state);
        self.check_alive(&state)?;
        let sim_file = state
            .files
            .get_mut(&path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        sim_file.volatile.resize(len_bytes as usize, 0);
        sim_file.durable.resize(len_bytes as usize, 0);
        Ok(())
    }

    fn submit(&self, mut op: IoOp) -> Completion {
        let result = self.execute(&mut op);
        let buf = match op {
            IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => Some(buf),
            _ => None,
        };
        Completion::ready(IoDone { result, buf })
    }
}
