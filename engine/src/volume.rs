//! [`Volume`]: a local volume on disk, and volume management (create, open, grow, list, delete).
//!
//! # Files
//! A volume `NAME` in directory `DIR` is three files:
//! - `DIR/NAME.img`: the data, a raw sparse file exactly `size_bytes` long (`qemu-img info`,
//!   `cmp`, `dd` read it at rest). Opened with O_DIRECT where the filesystem allows it.
//! - `DIR/NAME.meta`: two superblock copies and one 24-byte record per block (CRC + stamp),
//!   see [`crate::meta`].
//! - `DIR/NAME.dirty`: the persistent dirty map, see [`crate::dirty`].
//!
//! # Crash consistency (DESIGN.md §3)
//! A mutation (1) takes the exclusive per-block locks, (2) marks its regions durably dirty,
//! (3) writes the data, (4) updates the in-memory records. Records reach the metadata file at
//! the next FLUSH (or this write's FUA), which writes the changed record pages and then
//! `fdatasync`s data and metadata. After a crash, a block written since the last flush holds
//! its old or new data and its old or new record; any mismatch fails its CRC (a read gets
//! [`BlockError::Checksum`]) and lies in a dirty region, so it is repaired from the peer. A block
//! not written since the last flush is exactly as that flush left it.
//!
//! # Stamps
//! Plain [`BlockDevice`] mutations on a bare volume store [`Stamp::ZERO`]: a bare volume has no
//! replicator assigning stamps, and ZERO loses to every real stamp, so a later replicated
//! write always applies. The replicator uses the `*_stamped` methods.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::dirty::{dirty_file_bytes, DirtyMap};
use crate::io::sim::SimDisk;
use crate::io::{lock, open_engine, FileId, IoEngine, IoEngineKind, IoOp, OpenMode};
use crate::lock::StripeLocks;
use crate::meta::{
    self, block_crc, meta_file_bytes, record_pages, Record, Records, Superblock, FLAG_BAD,
    FLAG_HOLE, FLAG_WRITTEN, FLAG_ZERO, PAGE_BYTES, RECORDS_FIRST_PAGE, RECORDS_PER_PAGE,
};
use crate::{
    AlignedBuf, BlockDevice, BlockError, EngineError, Extent, Stamp, ZeroFlags, BLOCK_SIZE,
    REQUEST_BYTES_MAX,
};

const BLOCK_BYTES: u64 = BLOCK_SIZE as u64;
/// Blocks per dirty region: 1 MiB regions, 128 KiB of bitmap per TiB.
pub const DIRTY_REGION_BLOCKS: u32 = 256;
/// The largest volume: 256 TiB (its records take 1.5 TiB of memory; see docs/design.md).
pub const VOLUME_BYTES_MAX: u64 = 256 << 40;
/// The largest TRIM or WRITE_ZEROES in one call: 4 GiB, the most one NBD request can carry.
/// Bounds the per-request bookkeeping (one flag per block).
pub const ZERO_BYTES_MAX: u64 = 4 << 30;
/// Record pages written concurrently by a flush.
const FLUSH_PAGES_IN_FLIGHT: usize = 32;
/// Pages read per I/O when loading metadata at open.
const LOAD_PAGES_PER_IO: u64 = 256;

/// How a volume is opened.
#[derive(Clone)]
pub struct VolumeConfig {
    /// The I/O engine. The default comes from `STRETCH_IO_ENGINE` (auto when unset).
    pub io_engine: IoEngineKind,
    /// The simulated disk for [`IoEngineKind::Sim`]; `None` uses the process-wide one.
    pub sim_disk: Option<Arc<SimDisk>>,
    /// Try O_DIRECT for the data file (falls back to buffered I/O where unsupported).
    pub direct_io: bool,
    /// Operations in flight per volume; callers beyond this wait (back-pressure).
    pub io_depth_max: usize,
    /// Worker threads of the psync engine.
    pub psync_threads: usize,
    /// Submission-queue entries of the io_uring engine.
    pub ring_entries: u32,
    /// Blocks per dirty-map region for volumes created with this config (a power of two;
    /// stored in the superblock, so `open` ignores it). Default 256 (1 MiB).
    pub dirty_region_blocks: u32,
}

impl Default for VolumeConfig {
    fn default() -> VolumeConfig {
        VolumeConfig {
            io_engine: IoEngineKind::from_env(),
            sim_disk: None,
            direct_io: true,
            io_depth_max: 256,
            psync_threads: 32,
            ring_entries: 512,
            dirty_region_blocks: DIRTY_REGION_BLOCKS,
        }
    }
}

impl std::fmt::Debug for VolumeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeConfig")
            .field("io_engine", &self.io_engine)
            .field("direct_io", &self.direct_io)
            .field("io_depth_max", &self.io_depth_max)
            .field("psync_threads", &self.psync_threads)
            .field("ring_entries", &self.ring_entries)
            .finish()
    }
}

/// What `list_volumes` and [`Volume::info`] report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub size_bytes: u64,
    pub uuid: [u8; 16],
    /// The raw data file (`<dir>/<name>.img`).
    pub data_path: PathBuf,
    /// The metadata file (`<dir>/<name>.meta`).
    pub meta_path: PathBuf,
    /// The dirty-map file (`<dir>/<name>.dirty`).
    pub dirty_path: PathBuf,
}

impl VolumeInfo {
    /// The UUID in the usual 8-4-4-4-12 hex form.
    pub fn uuid_string(&self) -> String {
        let h: String = self.uuid.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

/// Whether a stamped mutation always applies or only where its stamp is newer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyMode {
    /// Write every block (local writes, the survivor's resync copies).
    Always,
    /// Write only blocks whose current stamp is smaller than the incoming one (DESIGN.md §4).
    IfNewer,
}

/// How many blocks a stamped mutation wrote and skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub applied_blocks: u64,
    pub skipped_blocks: u64,
}

enum Payload {
    Data(AlignedBuf),
    Trim,
    Zeroes { no_hole: bool },
}

fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.img")),
        dir.join(format!("{name}.meta")),
        dir.join(format!("{name}.dirty")),
    )
}

fn validate_name(name: &str) -> Result<(), EngineError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(EngineError::InvalidName {
            name: name.to_string(),
        })
    }
}

fn validate_size(size_bytes: u64) -> Result<(), EngineError> {
    let reason = if size_bytes == 0 {
        "must be greater than zero".to_string()
    } else if size_bytes % BLOCK_BYTES != 0 {
        format!("must be a multiple of {BLOCK_SIZE} bytes")
    } else if size_bytes > VOLUME_BYTES_MAX {
        format!("exceeds the maximum of {VOLUME_BYTES_MAX} bytes")
    } else {
        return Ok(());
    };
    Err(EngineError::InvalidSize { size_bytes, reason })
}

/// Maps an I/O error to the block error the NBD server turns into an errno.
pub(crate) fn io_error(err: io::Error) -> BlockError {
    match err.raw_os_error() {
        Some(errno) => BlockError::from_errno(errno),
        None => BlockError::Io(err),
    }
}

/// Where volume files live: the real filesystem, or a simulated disk.
enum Namespace {
    Real,
    Sim(Arc<SimDisk>),
}

impl Namespace {
    fn of(cfg: &VolumeConfig) -> Namespace {
        match cfg.io_engine {
            IoEngineKind::Sim => {
                Namespace::Sim(cfg.sim_disk.clone().unwrap_or_else(SimDisk::global))
            }
            _ => Namespace::Real,
        }
    }

    fn exists(&self, path: &Path) -> bool {
        match self {
            Namespace::Real => path.exists(),
            Namespace::Sim(disk) => disk.exists(path),
        }
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        match self {
            Namespace::Real => std::fs::remove_file(path),
            Namespace::Sim(disk) => disk.remove(path),
        }
    }

    fn meta_files(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let mut out: Vec<PathBuf> = match self {
            Namespace::Real => std::fs::read_dir(dir)?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .collect(),
            Namespace::Sim(disk) => disk.list(dir),
        };
        out.retain(|p| p.extension().is_some_and(|e| e == "meta"));
        out.sort();
        Ok(out)
    }

    fn read_superblocks(&self, path: &Path) -> io::Result<Vec<u8>> {
        match self {
            Namespace::Real => {
                use std::io::Read;
                let mut bytes = Vec::new();
                std::fs::File::open(path)?
                    .take(2 * PAGE_BYTES as u64)
                    .read_to_end(&mut bytes)?;
                Ok(bytes)
            }
            Namespace::Sim(disk) => {
                let mut bytes = disk
                    .contents(path)
                    .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
                bytes.truncate(2 * PAGE_BYTES);
                Ok(bytes)
            }
        }
    }
}

/// Picks the valid superblock copy with the higher generation.
fn choose_superblock(bytes: &[u8], path: &Path) -> Result<Superblock, EngineError> {
    let corrupt = |reason: String| EngineError::Corrupt {
        path: path.display().to_string(),
        reason,
    };
    if bytes.len() < 2 * PAGE_BYTES {
        return Err(corrupt(format!(
            "truncated: {} bytes, shorter than the two superblock pages",
            bytes.len()
        )));
    }
    let a = Superblock::decode(&bytes[..PAGE_BYTES]);
    let b = Superblock::decode(&bytes[PAGE_BYTES..2 * PAGE_BYTES]);
    match (a, b) {
        (Ok(a), Ok(b)) => Ok(if b.generation > a.generation { b } else { a }),
        (Ok(a), Err(_)) => Ok(a),
        (Err(_), Ok(b)) => Ok(b),
        (Err(a), Err(b)) => Err(corrupt(format!(
            "no valid superblock (copy 0: {a}; copy 1: {b})"
        ))),
    }
}

/// Lists the volumes in `dir` (on the engine `VolumeConfig::default()` picks, so the simulated
/// disk under `STRETCH_IO_ENGINE=sim`). Volumes whose metadata is unreadable are skipped with a
/// warning.
pub fn list_volumes(dir: &Path) -> Result<Vec<VolumeInfo>, EngineError> {
    list_volumes_with(dir, &VolumeConfig::default())
}

/// [`list_volumes`] with an explicit config.
pub fn list_volumes_with(dir: &Path, cfg: &VolumeConfig) -> Result<Vec<VolumeInfo>, EngineError> {
    let ns = Namespace::of(cfg);
    let metas = ns
        .meta_files(dir)
        .map_err(|e| EngineError::io(format_args!("list {}", dir.display()), e))?;
    let mut out = Vec::new();
    for meta_path in metas {
        let Some(name) = meta_path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if validate_name(name).is_err() {
            continue;
        }
        let sb = ns
            .read_superblocks(&meta_path)
            .map_err(|e| EngineError::io(format_args!("read {}", meta_path.display()), e))
            .and_then(|bytes| choose_superblock(&bytes, &meta_path));
        match sb {
            Ok(sb) => {
                let (data_path, meta_path, dirty_path) = paths(dir, name);
                out.push(VolumeInfo {
                    name: name.to_string(),
                    size_bytes: sb.size_bytes,
                    uuid: sb.uuid,
                    data_path,
                    meta_path,
                    dirty_path,
                });
            }
            Err(err) => tracing::warn!("skipping volume {name:?}: {err}"),
        }
    }
    Ok(out)
}

/// Deletes a volume's files (on the engine `VolumeConfig::default()` picks). The volume must
/// not be open.
pub fn delete_volume(dir: &Path, name: &str) -> Result<(), EngineError> {
    delete_volume_with(dir, name, &VolumeConfig::default())
}

/// [`delete_volume`] with an explicit config.
pub fn delete_volume_with(dir: &Path, name: &str, cfg: &VolumeConfig) -> Result<(), EngineError> {
    validate_name(name)?;
    let ns = Namespace::of(cfg);
    let (data, meta, dirty) = paths(dir, name);
    if !ns.exists(&meta) && !ns.exists(&data) {
        return Err(EngineError::NotFound {
            name: name.to_string(),
            dir: dir.display().to_string(),
        });
    }
    // The metadata goes first: without it the volume no longer exists, so a crash midway
    // leaves stray files, never a volume with missing parts.
    for path in [&meta, &dirty, &data] {
        match ns.remove(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(EngineError::io(
                    format_args!("remove {}", path.display()),
                    e,
                ))
            }
        }
    }
    Ok(())
}

/// A local volume. `Send + Sync`; share it in an `Arc`. Its I/O methods are async and need no
/// particular runtime (completions wake the task directly); management methods (`create`,
/// `open`, `grow`) block the calling thread and work without a runtime — from async code, call
/// them through `spawn_blocking`.
pub struct Volume {
    name: String,
    dir: PathBuf,
    uuid: [u8; 16],
    size_bytes: AtomicU64,
    engine: Arc<dyn IoEngine>,
    data: FileId,
    meta: FileId,
    records: Records,
    dirty: DirtyMap,
    locks: StripeLocks,
    io_slots: tokio::sync::Semaphore,
    flush_lock: tokio::sync::Mutex<()>,
    superblock: Mutex<Superblock>,
    /// Set when an fdatasync failed: the kernel may have dropped dirty pages, so no later flush
    /// could honestly report success. Mutations and flushes fail until the volume is reopened.
    failed: AtomicBool,
}

impl Volume {
    /// Creates a volume of `size_bytes` (a non-zero multiple of 4096) and opens it.
    /// Blocks the calling thread; needs no runtime.
    pub fn create(
        dir: &Path,
        name: &str,
        size_bytes: u64,
        cfg: &VolumeConfig,
    ) -> Result<Volume, EngineError> {
        validate_name(name)?;
        validate_size(size_bytes)?;
        let ns = Namespace::of(cfg);
        let (data_path, meta_path, dirty_path) = paths(dir, name);
        if [&data_path, &meta_path, &dirty_path]
            .iter()
            .any(|p| ns.exists(p))
        {
            return Err(EngineError::AlreadyExists {
                name: name.to_string(),
                dir: dir.display().to_string(),
            });
        }
        let engine = Self::start_engine(cfg)?;
        let blocks = size_bytes / BLOCK_BYTES;
        if cfg.dirty_region_blocks == 0 || !cfg.dirty_region_blocks.is_power_of_two() {
            return Err(EngineError::InvalidSize {
                size_bytes: u64::from(cfg.dirty_region_blocks) * BLOCK_BYTES,
                reason: "dirty region must be a power-of-two number of blocks".into(),
            });
        }
        let regions = blocks.div_ceil(u64::from(cfg.dirty_region_blocks));
        let sb = Superblock {
            generation: 1,
            size_bytes,
            uuid: rand::random(),
            dirty_region_blocks: cfg.dirty_region_blocks,
        };
        let result = (|| {
            let create = |path: &Path, direct: bool, len: u64| {
                let file = engine
                    .open(
                        path,
                        OpenMode {
                            create_new: true,
                            direct,
                        },
                    )
                    .map_err(|e| EngineError::io(format_args!("create {}", path.display()), e))?;
                engine
                    .set_len(file, len)
                    .map_err(|e| EngineError::io(format_args!("size {}", path.display()), e))?;
                Ok::<_, EngineError>(file)
            };
            // Data and dirty map first, metadata (whose superblock makes the volume exist) last.
            create(&data_path, cfg.direct_io, size_bytes)?;
            create(&dirty_path, false, dirty_file_bytes(regions))?;
            let meta = create(&meta_path, false, meta_file_bytes(blocks))?;
            let page = sb.encode();
            for slot in 0..2u64 {
                let done = engine
                    .submit(IoOp::Write {
                        file: meta,
                        offset: slot * PAGE_BYTES as u64,
                        buf: AlignedBuf::from_slice(&page),
                    })
                    .wait();
                done.result
                    .map_err(|e| EngineError::io("write superblock", e))?;
            }
            let done = engine.submit(IoOp::Fdatasync { file: meta }).wait();
            done.result
                .map_err(|e| EngineError::io("sync superblock", e))
        })();
        if let Err(err) = result {
            for path in [&meta_path, &dirty_path, &data_path] {
                // Best effort: the error being returned matters more than a stray file.
                let _ = ns.remove(path);
            }
            return Err(err);
        }
        drop(engine);
        Self::open(dir, name, cfg)
    }

    fn start_engine(cfg: &VolumeConfig) -> Result<Arc<dyn IoEngine>, EngineError> {
        open_engine(
            cfg.io_engine,
            cfg.sim_disk.as_ref(),
            cfg.psync_threads,
            cfg.ring_entries,
        )
        .map_err(|source| EngineError::Engine {
            engine: cfg.io_engine.to_string(),
            source,
        })
    }

    /// Opens an existing volume, loading its records and dirty map into memory. A truncated or
    /// garbage metadata file is [`EngineError::Corrupt`]; record pages that fail their checksum
    /// (a crash mid-flush) are marked bad and their regions dirty, to be repaired from the peer.
    /// Blocks the calling thread; needs no runtime.
    pub fn open(dir: &Path, name: &str, cfg: &VolumeConfig) -> Result<Volume, EngineError> {
        validate_name(name)?;
        let ns = Namespace::of(cfg);
        let (data_path, meta_path, dirty_path) = paths(dir, name);
        if !ns.exists(&meta_path) {
            return Err(EngineError::NotFound {
                name: name.to_string(),
                dir: dir.display().to_string(),
            });
        }
        let corrupt = |path: &Path, reason: String| EngineError::Corrupt {
            path: path.display().to_string(),
            reason,
        };
        let engine = Self::start_engine(cfg)?;
        let open = |path: &Path, direct: bool| {
            engine
                .open(
                    path,
                    OpenMode {
                        create_new: false,
                        direct,
                    },
                )
                .map_err(|e| EngineError::io(format_args!("open {}", path.display()), e))
        };
        let meta = open(&meta_path, false)?;
        let read = |file: FileId, offset: u64, len: usize, path: &Path| {
            let done = engine
                .submit(IoOp::Read {
                    file,
                    offset,
                    buf: AlignedBuf::zeroed(len),
                })
                .wait();
            done.result
                .map_err(|e| EngineError::io(format_args!("read {}", path.display()), e))?;
            done.buf
                .ok_or_else(|| EngineError::io("read", io::Error::other("engine lost the buffer")))
        };
        let len_of = |file: FileId, path: &Path| {
            engine
                .file_len(file)
                .map_err(|e| EngineError::io(format_args!("stat {}", path.display()), e))
        };
        let meta_len = len_of(meta, &meta_path)?;
        if meta_len < 2 * PAGE_BYTES as u64 {
            return Err(corrupt(
                &meta_path,
                format!("truncated: {meta_len} bytes, shorter than the two superblock pages"),
            ));
        }
        let sb_bytes = read(meta, 0, 2 * PAGE_BYTES, &meta_path)?;
        let sb = choose_superblock(&sb_bytes, &meta_path)?;
        let blocks = sb.size_bytes / BLOCK_BYTES;
        let region_blocks = u64::from(sb.dirty_region_blocks);
        let regions = blocks.div_ceil(region_blocks);
        if meta_len < meta_file_bytes(blocks) {
            return Err(corrupt(
                &meta_path,
                format!(
                    "truncated: {meta_len} bytes, a {}-byte volume needs {}",
                    sb.size_bytes,
                    meta_file_bytes(blocks)
                ),
            ));
        }
        if !ns.exists(&data_path) {
            return Err(corrupt(&data_path, "data file missing".into()));
        }
        let data = open(&data_path, cfg.direct_io)?;
        let data_len = len_of(data, &data_path)?;
        if data_len < sb.size_bytes {
            return Err(corrupt(
                &data_path,
                format!("truncated: {data_len} bytes, volume is {}", sb.size_bytes),
            ));
        }
        if !ns.exists(&dirty_path) {
            return Err(corrupt(&dirty_path, "dirty-map file missing".into()));
        }
        let dirty_file = open(&dirty_path, false)?;
        let dirty_len = len_of(dirty_file, &dirty_path)?;
        if dirty_len < dirty_file_bytes(regions) {
            return Err(corrupt(
                &dirty_path,
                format!(
                    "truncated: {dirty_len} bytes, needs {}",
                    dirty_file_bytes(regions)
                ),
            ));
        }
        // Records: load every page, checking each page's CRC.
        let pages_total = record_pages(blocks);
        let mut pages = Vec::with_capacity(pages_total as usize);
        let mut bad_pages = Vec::new();
        let mut bad_records: Vec<u64> = Vec::new();
        let mut page = 0;
        while page < pages_total {
            let n = (pages_total - page).min(LOAD_PAGES_PER_IO);
            let chunk = read(
                meta,
                (RECORDS_FIRST_PAGE + page) * PAGE_BYTES as u64,
                n as usize * PAGE_BYTES,
                &meta_path,
            )?;
            for bytes in chunk.chunks(PAGE_BYTES) {
                let mut boxed = Box::new([0u8; PAGE_BYTES]);
                boxed.copy_from_slice(bytes);
                let lost = meta::repair_page(&mut boxed[..]);
                let page_index = pages.len() as u64;
                if !lost.is_empty() {
                    bad_records.extend(
                        lost.into_iter()
                            .map(|i| page_index * RECORDS_PER_PAGE + i as u64)
                            .filter(|&lba| lba < blocks),
                    );
                    bad_pages.push(page_index);
                }
                pages.push(boxed);
            }
            page += n;
        }
        let bitmap = read(
            dirty_file,
            0,
            dirty_file_bytes(regions) as usize,
            &dirty_path,
        )?;
        let dirty = DirtyMap::new(engine.clone(), dirty_file, region_blocks, regions, &bitmap);
        let records = Records::new(pages);
        if !bad_pages.is_empty() {
            tracing::warn!(
                "volume {name}: {} block record(s) failed their checksum; those blocks are \
                 marked for repair and their regions dirty",
                bad_records.len()
            );
            for &p in &bad_pages {
                records.mark_page_dirty(p);
            }
            let mut bad_regions: Vec<u64> =
                bad_records.iter().map(|&lba| lba / region_blocks).collect();
            bad_regions.dedup();
            dirty
                .mark_blocking(&bad_regions)
                .map_err(|e| EngineError::io("mark damaged regions dirty", io::Error::other(e)))?;
        }
        Ok(Volume {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            uuid: sb.uuid,
            size_bytes: AtomicU64::new(sb.size_bytes),
            engine,
            data,
            meta,
            records,
            dirty,
            locks: StripeLocks::new(),
            io_slots: tokio::sync::Semaphore::new(cfg.io_depth_max.max(1)),
            flush_lock: tokio::sync::Mutex::new(()),
            superblock: Mutex::new(sb),
            failed: AtomicBool::new(false),
        })
    }

    /// Grows the volume to `new_size_bytes` (a multiple of 4096, not smaller than now). New
    /// blocks read as zeroes. Crash-safe: the size changes when the new superblock copy is
    /// durable; until then the old size stands and the longer files are harmless.
    /// Blocks the calling thread; safe to call while I/O is running.
    pub fn grow(&self, new_size_bytes: u64) -> Result<(), EngineError> {
        validate_size(new_size_bytes)?;
        let mut sb = lock(&self.superblock);
        if new_size_bytes < sb.size_bytes {
            return Err(EngineError::InvalidSize {
                size_bytes: new_size_bytes,
                reason: format!("shrinking is not supported (volume is {})", sb.size_bytes),
            });
        }
        if new_size_bytes == sb.size_bytes {
            return Ok(());
        }
        let blocks = new_size_bytes / BLOCK_BYTES;
        let regions = blocks.div_ceil(self.dirty.region_blocks);
        let grow_file = |file: FileId, len: u64, what: &str| {
            let current = self
                .engine
                .file_len(file)
                .map_err(|e| EngineError::io(format_args!("stat {what}"), e))?;
            if current < len {
                self.engine
                    .set_len(file, len)
                    .map_err(|e| EngineError::io(format_args!("extend {what}"), e))?;
            }
            Ok::<_, EngineError>(())
        };
        grow_file(self.data, new_size_bytes, "data file")?;
        grow_file(self.meta, meta_file_bytes(blocks), "metadata file")?;
        grow_file(self.dirty_file(), dirty_file_bytes(regions), "dirty map")?;
        let next = Superblock {
            generation: sb.generation + 1,
            size_bytes: new_size_bytes,
            ..sb.clone()
        };
        let slot = next.generation % 2;
        let done = self
            .engine
            .submit(IoOp::Write {
                file: self.meta,
                offset: slot * PAGE_BYTES as u64,
                buf: AlignedBuf::from_slice(&next.encode()),
            })
            .wait();
        done.result
            .map_err(|e| EngineError::io("write superblock", e))?;
        let done = self
            .engine
            .submit(IoOp::Fdatasync { file: self.meta })
            .wait();
        done.result
            .map_err(|e| EngineError::io("sync superblock", e))?;
        self.records.grow(record_pages(blocks));
        self.dirty.grow(regions);
        *sb = next;
        self.size_bytes.store(new_size_bytes, Ordering::SeqCst);
        Ok(())
    }

    fn dirty_file(&self) -> FileId {
        self.dirty.file()
    }

    /// Name, size, UUID and file paths.
    pub fn info(&self) -> VolumeInfo {
        let (data_path, meta_path, dirty_path) = paths(&self.dir, &self.name);
        VolumeInfo {
            name: self.name.clone(),
            size_bytes: self.size_bytes.load(Ordering::SeqCst),
            uuid: self.uuid,
            data_path,
            meta_path,
            dirty_path,
        }
    }

    /// "io_uring", "psync" or "sim".
    pub fn io_engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// True when the data file is open with O_DIRECT.
    pub fn is_direct_io(&self) -> bool {
        self.engine.is_direct(self.data)
    }

    // -----------------------------------------------------------------------------------------
    // I/O plumbing

    async fn io(&self, op: IoOp) -> Result<Option<AlignedBuf>, BlockError> {
        let _slot = self
            .io_slots
            .acquire()
            .await
            .map_err(|_| BlockError::Shutdown)?;
        let done = self.engine.submit(op).await;
        done.result.map_err(io_error)?;
        Ok(done.buf)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        crate::check_range(offset, len, self.size_bytes.load(Ordering::SeqCst))
    }

    fn check_failed(&self) -> Result<(), BlockError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(BlockError::Io(io::Error::other(
                "volume failed after an fdatasync error; reopen it",
            )));
        }
        Ok(())
    }

    /// Reads and verifies blocks `[first, first + count)`; the caller holds their locks.
    async fn read_blocks_locked(&self, first: u64, count: u64) -> Result<AlignedBuf, BlockError> {
        let records = self.records.get_range(first, count);
        if let Some(i) = records.iter().position(|r| r.flags & FLAG_BAD != 0) {
            return Err(BlockError::Checksum {
                lba: first + i as u64,
            });
        }
        let len = (count * BLOCK_BYTES) as usize;
        // Blocks that should read as zeroes are read and checked too, rather than answered
        // from the record alone: after a crash an un-recorded write may have reached the disk,
        // and the block must then fail the same way whichever request covers it.
        let buf = self
            .io(IoOp::Read {
                file: self.data,
                offset: first * BLOCK_BYTES,
                buf: AlignedBuf::for_overwrite(len),
            })
            .await?
            .ok_or_else(|| BlockError::Io(io::Error::other("engine lost the read buffer")))?;
        for (i, (block, record)) in buf.chunks(BLOCK_BYTES as usize).zip(&records).enumerate() {
            let lba = first + i as u64;
            let good = if record.flags & FLAG_WRITTEN != 0 {
                block_crc(&self.uuid, lba, block) == record.crc
            } else {
                block.iter().all(|&b| b == 0)
            };
            if !good {
                return Err(BlockError::Checksum { lba });
            }
        }
        Ok(buf)
    }

    fn check_mutation(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_failed()?;
        crate::check_aligned(offset, len)?;
        self.check_range(offset, len)
    }

    async fn mutate(
        &self,
        offset: u64,
        len: u64,
        mut payload: Payload,
        fua: bool,
        stamp: Stamp,
        mode: ApplyMode,
    ) -> Result<ApplyOutcome, BlockError> {
        self.check_mutation(offset, len)?;
        let max = match payload {
            Payload::Data(_) => u64::from(REQUEST_BYTES_MAX),
            _ => ZERO_BYTES_MAX,
        };
        if len > max {
            return Err(BlockError::TooLarge { len, max });
        }
        if len == 0 {
            if fua {
                self.flush_inner().await?;
            }
            return Ok(ApplyOutcome::default());
        }
        let first = offset / BLOCK_BYTES;
        let count = len / BLOCK_BYTES;
        // Checksums are computed before taking the locks, to keep them held briefly.
        let crcs: Vec<u32> = match &payload {
            Payload::Data(buf) => buf
                .chunks(BLOCK_BYTES as usize)
                .enumerate()
                .map(|(i, block)| block_crc(&self.uuid, first + i as u64, block))
                .collect(),
            _ => Vec::new(),
        };
        let _guards = self.locks.write(first, count).await;
        // "Always" is one run of every block, with no per-block bookkeeping to allocate.
        let every_block = 0..count;
        let newer_runs;
        let runs: &[std::ops::Range<u64>] = match mode {
            ApplyMode::Always => std::slice::from_ref(&every_block),
            ApplyMode::IfNewer => {
                let apply: Vec<bool> = (0..count)
                    .map(|i| stamp > self.records.get(first + i).stamp)
                    .collect();
                newer_runs = true_runs(&apply);
                &newer_runs
            }
        };
        let applied_blocks: u64 = runs.iter().map(|r| r.end - r.start).sum();
        let outcome = ApplyOutcome {
            applied_blocks,
            skipped_blocks: count - applied_blocks,
        };
        if runs.is_empty() {
            // Every block already holds something newer; FUA still promises that what the
            // caller now sees is durable, so honour it.
            if fua {
                self.flush_inner().await?;
            }
            return Ok(outcome);
        }
        let (first_run, last_run) = (runs[0].start, runs[runs.len() - 1].end);
        self.dirty
            .mark(
                self.dirty
                    .regions_of(first + first_run, last_run - first_run),
            )
            .await?;
        let whole = runs.len() == 1 && runs[0].start == 0 && runs[0].end == count;
        for run in runs {
            let run_lba = first + run.start;
            let run_blocks = run.end - run.start;
            let run_offset = run_lba * BLOCK_BYTES;
            let run_bytes = run_blocks * BLOCK_BYTES;
            let flags = match &mut payload {
                Payload::Data(buf) => {
                    let data = if whole {
                        std::mem::replace(buf, AlignedBuf::zeroed(0))
                    } else {
                        let at = (run.start * BLOCK_BYTES) as usize;
                        AlignedBuf::from_slice(&buf[at..at + run_bytes as usize])
                    };
                    self.io(IoOp::Write {
                        file: self.data,
                        offset: run_offset,
                        buf: data,
                    })
                    .await?;
                    FLAG_WRITTEN
                }
                Payload::Trim | Payload::Zeroes { no_hole: false } => {
                    self.io(IoOp::PunchHole {
                        file: self.data,
                        offset: run_offset,
                        len: run_bytes,
                    })
                    .await?;
                    FLAG_ZERO | FLAG_HOLE
                }
                Payload::Zeroes { no_hole: true } => {
                    self.write_zero_bytes(run_offset, run_bytes).await?;
                    FLAG_ZERO
                }
            };
            for i in run.clone() {
                let crc = crcs.get(i as usize).copied().unwrap_or(0);
                self.records.set(first + i, Record { crc, flags, stamp });
            }
        }
        if fua {
            self.flush_inner().await?;
        }
        Ok(outcome)
    }

    /// Writes allocated zeroes (WRITE_ZEROES with NO_HOLE) in bounded chunks.
    async fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        const CHUNK_BYTES: u64 = 1024 * 1024;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK_BYTES);
            self.io(IoOp::Write {
                file: self.data,
                offset: offset + done,
                buf: AlignedBuf::zeroed(n as usize),
            })
            .await?;
            done += n;
        }
        Ok(())
    }

    async fn flush_inner(&self) -> Result<(), BlockError> {
        self.check_failed()?;
        let _flush = self.flush_lock.lock().await;
        let pages = self.records.take_dirty_pages();
        if let Err(err) = self.write_record_pages(&pages).await {
            self.records.restore_dirty_pages(&pages);
            return Err(err);
        }
        let data_sync = self.engine.submit(IoOp::Fdatasync { file: self.data });
        let meta_sync = self.engine.submit(IoOp::Fdatasync { file: self.meta });
        let (data_done, meta_done) = (data_sync.await, meta_sync.await);
        if let Err(err) = data_done.result.and(meta_done.result) {
            // After a failed fdatasync the kernel may have dropped the dirty pages; a later
            // "successful" fsync would be a lie. Fail the volume until it is reopened.
            self.failed.store(true, Ordering::SeqCst);
            self.records.restore_dirty_pages(&pages);
            tracing::error!(
                "volume {}: fdatasync failed ({err}); volume failed",
                self.name
            );
            return Err(io_error(err));
        }
        Ok(())
    }

    async fn write_record_pages(&self, pages: &[u64]) -> Result<(), BlockError> {
        for batch in pages.chunks(FLUSH_PAGES_IN_FLIGHT) {
            let mut pending = Vec::with_capacity(batch.len());
            for &page in batch {
                let Some(buf) = self.records.sealed_page(page) else {
                    continue;
                };
                pending.push(self.io(IoOp::Write {
                    file: self.meta,
                    offset: (RECORDS_FIRST_PAGE + page) * PAGE_BYTES as u64,
                    buf,
                }));
            }
            let mut first_err = None;
            for op in pending {
                if let Err(err) = op.await {
                    first_err.get_or_insert(err);
                }
            }
            if let Some(err) = first_err {
                return Err(err);
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // What the replicator needs

    /// Writes whole blocks with `stamp`. With [`ApplyMode::IfNewer`] each block is written only
    /// if `stamp` is greater than its current stamp, under the block's lock (DESIGN.md §4).
    pub async fn write_stamped(
        &self,
        offset: u64,
        data: AlignedBuf,
        fua: bool,
        stamp: Stamp,
        mode: ApplyMode,
    ) -> Result<ApplyOutcome, BlockError> {
        let len = data.len() as u64;
        self.mutate(offset, len, Payload::Data(data), fua, stamp, mode)
            .await
    }

    /// TRIM with a stamp; the stamp stays as the blocks' tombstone.
    pub async fn trim_stamped(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        stamp: Stamp,
        mode: ApplyMode,
    ) -> Result<ApplyOutcome, BlockError> {
        self.mutate(offset, len, Payload::Trim, fua, stamp, mode)
            .await
    }

    /// WRITE_ZEROES with a stamp; the stamp stays as the blocks' tombstone.
    pub async fn write_zeroes_stamped(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
        stamp: Stamp,
        mode: ApplyMode,
    ) -> Result<ApplyOutcome, BlockError> {
        if flags.fast && flags.no_hole {
            // Allocated zeroes are written like data: not faster than a write.
            return Err(BlockError::NotFast);
        }
        let payload = Payload::Zeroes {
            no_hole: flags.no_hole,
        };
        self.mutate(offset, len, payload, flags.fua, stamp, mode)
            .await
    }

    /// The stamps of blocks `[lba, lba + count)`, after any mutation in flight on them.
    pub async fn block_stamps(&self, lba: u64, count: u64) -> Result<Vec<Stamp>, BlockError> {
        let max_blocks = u64::from(REQUEST_BYTES_MAX) / BLOCK_BYTES;
        if count > max_blocks {
            return Err(BlockError::TooLarge {
                len: count * BLOCK_BYTES,
                max: u64::from(REQUEST_BYTES_MAX),
            });
        }
        let offset = lba.saturating_mul(BLOCK_BYTES);
        self.check_range(offset, count * BLOCK_BYTES)?;
        let _guards = self.locks.read(lba, count).await;
        Ok(self
            .records
            .get_range(lba, count)
            .into_iter()
            .map(|r| r.stamp)
            .collect())
    }

    /// The stamp of one block.
    pub async fn block_stamp(&self, lba: u64) -> Result<Stamp, BlockError> {
        let stamps = self.block_stamps(lba, 1).await?;
        stamps
            .first()
            .copied()
            .ok_or_else(|| BlockError::Io(io::Error::other("no stamp returned")))
    }

    /// Reads whole blocks with their stamps, atomically with respect to mutations (for resync
    /// and verify).
    pub async fn read_with_stamps(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<(AlignedBuf, Vec<Stamp>), BlockError> {
        let len64 = u64::from(len);
        if offset % BLOCK_BYTES != 0 || len64 % BLOCK_BYTES != 0 {
            return Err(BlockError::Misaligned { offset, len: len64 });
        }
        if len > REQUEST_BYTES_MAX {
            return Err(BlockError::TooLarge {
                len: len64,
                max: u64::from(REQUEST_BYTES_MAX),
            });
        }
        self.check_range(offset, len64)?;
        if len == 0 {
            return Ok((AlignedBuf::zeroed(0), Vec::new()));
        }
        let (first, count) = (offset / BLOCK_BYTES, len64 / BLOCK_BYTES);
        let _guards = self.locks.read(first, count).await;
        let buf = self.read_blocks_locked(first, count).await?;
        let stamps = self
            .records
            .get_range(first, count)
            .into_iter()
            .map(|r| r.stamp)
            .collect();
        Ok((buf, stamps))
    }

    /// The greatest stamp stored on this volume (seeds the HLC at start, DESIGN.md §4).
    /// Scans every record: O(blocks), call it once at start.
    pub fn max_stamp(&self) -> Stamp {
        self.records.max_stamp()
    }

    /// Bytes covered by one dirty-map region (1 MiB).
    pub fn dirty_region_bytes(&self) -> u64 {
        self.dirty.region_blocks * BLOCK_BYTES
    }

    /// Number of dirty-map regions (the last may be partial).
    pub fn dirty_region_count(&self) -> u64 {
        self.dirty.region_count()
    }

    /// The region holding byte `offset`.
    pub fn region_of(&self, offset: u64) -> u64 {
        offset / self.dirty_region_bytes()
    }

    /// True if region `region` may differ from the peer.
    pub fn is_region_dirty(&self, region: u64) -> bool {
        self.dirty.is_dirty(region)
    }

    /// Up to `max_regions` dirty regions at or after `start_region`, ascending. Iterate by
    /// calling again from the last returned region + 1.
    pub fn dirty_regions(&self, start_region: u64, max_regions: usize) -> Vec<u64> {
        self.dirty.dirty_regions(start_region, max_regions)
    }

    /// Marks the regions covering `[offset, offset + len)` durably dirty (e.g. a write the peer
    /// refused). Any alignment.
    pub async fn mark_dirty(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let first = offset / BLOCK_BYTES;
        let last = (offset + len - 1) / BLOCK_BYTES;
        self.dirty
            .mark(self.dirty.regions_of(first, last - first + 1))
            .await
    }

    /// Clears regions the caller knows match the peer. Waits for mutations in flight on the
    /// whole volume, makes the local copy durable (a flush), then clears: so a region is never
    /// clean on disk while a write to it could still be lost or torn by a crash.
    pub async fn clear_dirty(&self, regions: &[u64]) -> Result<(), BlockError> {
        if regions.is_empty() {
            return Ok(());
        }
        let count = self.size_bytes.load(Ordering::SeqCst) / BLOCK_BYTES;
        let _guards = self.locks.write(0, count).await;
        self.flush_inner().await?;
        self.dirty.clear(regions).await
    }
}

/// Ranges of consecutive `true` entries.
fn true_runs(flags: &[bool]) -> Vec<std::ops::Range<u64>> {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, &f) in flags.iter().enumerate() {
        match (f, start) {
            (true, None) => start = Some(i as u64),
            (false, Some(s)) => {
                runs.push(s..i as u64);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        runs.push(s..flags.len() as u64);
    }
    runs
}

impl BlockDevice for Volume {
    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::SeqCst)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, BlockError> {
        crate::check_read_len(len)?;
        let len64 = u64::from(len);
        self.check_range(offset, len64)?;
        if len == 0 {
            return Ok(AlignedBuf::zeroed(0));
        }
        let first = offset / BLOCK_BYTES;
        let last = (offset + len64 - 1) / BLOCK_BYTES;
        let count = last - first + 1;
        let _guards = self.locks.read(first, count).await;
        let mut buf = self.read_blocks_locked(first, count).await?;
        let skip = (offset - first * BLOCK_BYTES) as usize;
        if skip == 0 {
            buf.set_len(len as usize);
            Ok(buf)
        } else {
            Ok(AlignedBuf::from_slice(&buf[skip..skip + len as usize]))
        }
    }

    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), BlockError> {
        self.write_stamped(offset, data, fua, Stamp::ZERO, ApplyMode::Always)
            .await
            .map(|_| ())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.flush_inner().await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        self.trim_stamped(offset, len, fua, Stamp::ZERO, ApplyMode::Always)
            .await
            .map(|_| ())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BlockError> {
        self.write_zeroes_stamped(offset, len, flags, Stamp::ZERO, ApplyMode::Always)
            .await
            .map(|_| ())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        self.check_range(offset, len)?;
        let size = self.size_bytes.load(Ordering::SeqCst);
        // Report at least one block, and at most what one NBD reply reasonably carries.
        let end = offset
            .saturating_add(len.clamp(1, ZERO_BYTES_MAX))
            .min(size)
            .div_ceil(BLOCK_BYTES)
            * BLOCK_BYTES;
        let mut extents: Vec<Extent> = Vec::new();
        let mut lba = offset / BLOCK_BYTES;
        let mut at = offset;
        while at < end {
            let record = self.records.get(lba);
            let (hole, zero) = if record.flags & (FLAG_BAD | FLAG_WRITTEN) != 0 {
                (false, false)
            } else if record.flags & FLAG_ZERO != 0 {
                (record.flags & FLAG_HOLE != 0, true)
            } else {
                (true, true)
            };
            let block_end = (lba + 1) * BLOCK_BYTES;
            let piece = block_end - at;
            match extents.last_mut() {
                Some(last) if last.hole == hole && last.zero == zero => last.len_bytes += piece,
                _ => extents.push(Extent {
                    len_bytes: piece,
                    hole,
                    zero,
                }),
            }
            at = block_end;
            lba += 1;
        }
        if extents.is_empty() {
            return Err(BlockError::OutOfRange { offset, len, size });
        }
        Ok(extents)
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        // A clean close: write the changed records and sync, so a volume dropped without a
        // final FLUSH does not come back with its last writes failing their checksums. Errors
        // (a crashed simulated disk, a failed volume) leave the crash-recovery path to cope.
        if self.failed.load(Ordering::SeqCst) {
            return;
        }
        let pages = self.records.take_dirty_pages();
        for page in pages {
            let Some(buf) = self.records.sealed_page(page) else {
                continue;
            };
            let done = self
                .engine
                .submit(IoOp::Write {
                    file: self.meta,
                    offset: (RECORDS_FIRST_PAGE + page) * PAGE_BYTES as u64,
                    buf,
                })
                .wait();
            if done.result.is_err() {
                return;
            }
        }
        for file in [self.data, self.meta] {
            if self
                .engine
                .submit(IoOp::Fdatasync { file })
                .wait()
                .result
                .is_err()
            {
                return;
            }
        }
    }
}

// The NBD server and the replicator share a volume across tokio worker threads.
const _: fn() = || {
    fn assert_shareable<T: Send + Sync + 'static>() {}
    assert_shareable::<Volume>();
};
