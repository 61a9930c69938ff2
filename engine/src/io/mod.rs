//! The I/O engine: one trait, three implementations.
//!
//! - [`uring`]: io_uring, completions reaped on the caller's tokio runtime (eventfd), or by a
//!   fallback ring thread that blocks in the kernel; nothing spins when idle.
//! - [`psync`]: `pread`/`pwrite` on a small bounded thread pool; chosen automatically, with the
//!   reason logged, when io_uring cannot start.
//! - [`sim`]: an in-memory disk with a volatile cache and a durable image, injecting EIO,
//!   ENOSPC, torn writes and crashes, for tests.
//!
//! An operation owns its buffer ([`AlignedBuf`]) from submission until completion, so a caller
//! that drops the [`Completion`] (a cancelled future) can never free memory the kernel is still
//! writing into: the engine drops the buffer itself once the kernel is done with it.
//!
//! Bounds: the engines keep no queue of their own beyond what callers submit; the volume bounds
//! the number of operations in flight with a semaphore (`VolumeConfig::io_depth_max`).

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use crate::AlignedBuf;

pub mod psync;
pub mod sim;
pub mod uring;

/// Which I/O engine a volume uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngineKind {
    /// io_uring when it starts, otherwise psync (the reason is logged).
    #[default]
    Auto,
    /// io_uring only; opening fails if it cannot start.
    Uring,
    /// pread/pwrite on a bounded thread pool.
    Psync,
    /// The simulated in-memory disk (tests only: nothing reaches the real filesystem).
    Sim,
}

impl IoEngineKind {
    /// The engine named by the environment variable `STRETCH_IO_ENGINE`
    /// (`auto`, `uring`, `psync`, `sim`); `Auto` when unset or unrecognised (logged).
    pub fn from_env() -> IoEngineKind {
        match std::env::var("STRETCH_IO_ENGINE") {
            Ok(value) => value.parse().unwrap_or_else(|err| {
                tracing::warn!("{err}; using auto");
                IoEngineKind::Auto
            }),
            Err(_) => IoEngineKind::Auto,
        }
    }
}

impl FromStr for IoEngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(IoEngineKind::Auto),
            "uring" | "io_uring" => Ok(IoEngineKind::Uring),
            "psync" => Ok(IoEngineKind::Psync),
            "sim" => Ok(IoEngineKind::Sim),
            other => Err(format!(
                "unknown I/O engine {other:?} (expected auto, uring, psync or sim)"
            )),
        }
    }
}

impl std::fmt::Display for IoEngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoEngineKind::Auto => "auto",
            IoEngineKind::Uring => "uring",
            IoEngineKind::Psync => "psync",
            IoEngineKind::Sim => "sim",
        })
    }
}

/// A file opened through an engine: an index into its file table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId(pub u32);

/// One operation. Lengths of reads and writes are the buffer's `len()`.
#[derive(Debug)]
pub enum IoOp {
    /// Fill `buf` from `offset`. A short read is continued, never reported as success.
    Read {
        file: FileId,
        offset: u64,
        buf: AlignedBuf,
    },
    /// Write all of `buf` at `offset`. A short write is continued, never reported as success.
    Write {
        file: FileId,
        offset: u64,
        buf: AlignedBuf,
    },
    /// `fdatasync`: every write completed before it is durable.
    Fdatasync { file: FileId },
    /// Deallocate `[offset, offset+len)`; it reads as zeroes afterwards (file size unchanged).
    PunchHole { file: FileId, offset: u64, len: u64 },
}

/// The result of an [`IoOp`]; the buffer of a read or write comes back with it.
#[derive(Debug)]
pub struct IoDone {
    pub result: io::Result<()>,
    pub buf: Option<AlignedBuf>,
}

/// How an engine opens a file.
#[derive(Clone, Copy, Debug)]
pub struct OpenMode {
    /// Create the file, failing if it exists.
    pub create_new: bool,
    /// Try O_DIRECT; the engine falls back to buffered I/O where the filesystem refuses it.
    pub direct: bool,
}

/// The operations every engine offers.
pub trait IoEngine: Send + Sync + 'static {
    /// "io_uring", "psync" or "sim".
    fn name(&self) -> &'static str;
    /// Opens (or creates) a file and registers it with the engine.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<FileId>;
    /// True when the file was opened with O_DIRECT.
    fn is_direct(&self, file: FileId) -> bool;
    /// Current length of the file in bytes.
    fn file_len(&self, file: FileId) -> io::Result<u64>;
    /// Sets the length (sparse growth) and makes the new length durable.
    fn set_len(&self, file: FileId, len_bytes: u64) -> io::Result<()>;
    /// Starts an operation; the returned completion resolves once it finished.
    fn submit(&self, op: IoOp) -> Completion;
}

/// Builds the engine `kind` asks for. `Auto` tries io_uring and falls back to psync, logging why.
pub fn open_engine(
    kind: IoEngineKind,
    sim_disk: Option<&Arc<sim::SimDisk>>,
    psync_threads: usize,
    ring_entries: u32,
) -> io::Result<Arc<dyn IoEngine>> {
    match kind {
        IoEngineKind::Sim => {
            let disk = sim_disk.cloned().unwrap_or_else(sim::SimDisk::global);
            Ok(Arc::new(sim::SimEngine::new(disk)))
        }
        IoEngineKind::Psync => Ok(Arc::new(psync::PsyncEngine::new(psync_threads)?)),
        IoEngineKind::Uring => Ok(Arc::new(uring::UringEngine::new(ring_entries)?)),
        IoEngineKind::Auto => match uring::UringEngine::new(ring_entries) {
            Ok(engine) => Ok(Arc::new(engine)),
            Err(err) => {
                tracing::warn!(
                    "io_uring cannot start ({err}); falling back to the psync I/O engine"
                );
                Ok(Arc::new(psync::PsyncEngine::new(psync_threads)?))
            }
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Completion: a one-shot slot usable both as a future and by a blocking waiter, so management
// operations (open, grow) work without an async runtime.

struct SlotState {
    done: Option<IoDone>,
    waker: Option<Waker>,
    /// A thread is blocked in `wait()`: only then is the condition variable signalled (a
    /// signal is a futex syscall, which the async path should not pay per operation).
    blocking_waiter: bool,
}

struct Slot {
    state: Mutex<SlotState>,
    ready: Condvar,
}

/// Lets the thread polling a completion deliver completions that already arrived, instead of
/// waiting for the engine's thread to wake up and do it (one thread hand-off less under load).
pub trait Reap: Send + Sync {
    /// Delivers whatever completions are ready, if that can be done without blocking.
    fn reap(&self);
    /// Called by a future that found its result missing and stored its waker: the engine makes
    /// sure something will deliver the completion (for io_uring: a reaper task on the caller's
    /// async runtime, or the engine's own thread).
    fn watch(&self) {}
    /// A thread is about to block in [`Completion::wait`] (`true`) or stopped waiting
    /// (`false`): no async runtime can be relied on to deliver its completion.
    fn blocking_waiter(&self, _waiting: bool) {}
    /// Hands operations the engine deferred (to batch them) to the kernel, then delivers
    /// whatever completions are ready. Waits for the engine's lock, briefly.
    fn flush(&self) {}
    /// Whether [`Reap::wait_briefly`] would be tried now. The future then yields once first,
    /// so the other tasks its runtime has ready run (and submit) before it blocks the thread.
    fn may_wait_briefly(&self) -> bool {
        false
    }
    /// Called by a future whose result is not in yet, before it stores its waker: when the
    /// operation is the only one the device has, the engine may block this thread in the
    /// kernel until it completes — for a bounded time — and deliver it, which is quicker than
    /// sleeping in the runtime and being woken through it. True if it waited (the caller then
    /// looks for its result again).
    fn wait_briefly(&self) -> bool {
        false
    }
}

/// The caller's side of an operation: a future, or [`Completion::wait`] from blocking code.
pub struct Completion {
    slot: Arc<Slot>,
    reaper: Option<Arc<dyn Reap>>,
    /// The engine left the operation unsubmitted to batch it: the first poll yields once (so
    /// other tasks can add theirs), the next flushes. Dropping or waiting flushes too.
    deferred: bool,
    /// The future yielded once (to batch a deferred operation, or before a brief wait).
    yielded: bool,
    /// It yielded before a brief wait, which the next poll tries (see [`Reap::wait_briefly`]).
    brief_on_repoll: bool,
}

/// The engine's side of an operation: completes it exactly once (dropping it without
/// completing reports an error, so a waiter never hangs on an engine that died).
pub struct Completer(Option<Arc<Slot>>);

/// A fresh, connected pair.
pub fn completion_pair() -> (Completer, Completion) {
    let slot = Arc::new(Slot {
        state: Mutex::new(SlotState {
            done: None,
            waker: None,
            blocking_waiter: false,
        }),
        ready: Condvar::new(),
    });
    (
        Completer(Some(slot.clone())),
        Completion {
            slot,
            reaper: None,
            deferred: false,
            yielded: false,
            brief_on_repoll: false,
        },
    )
}

impl Completion {
    /// A completion that is already resolved.
    pub fn ready(done: IoDone) -> Completion {
        let (completer, completion) = completion_pair();
        completer.complete(done);
        completion
    }

    /// Adds a reaper the future calls when polled before its result is in.
    pub fn with_reaper(mut self, reaper: Arc<dyn Reap>) -> Completion {
        self.reaper = Some(reaper);
        self
    }

    /// Marks the operation as deferred by the engine (see [`Reap::flush`]).
    pub fn deferred(mut self) -> Completion {
        self.deferred = self.reaper.is_some();
        self
    }

    fn flush_deferred(&mut self) {
        if std::mem::take(&mut self.deferred) {
            if let Some(reaper) = &self.reaper {
                reaper.flush();
            }
        }
    }

    fn take_done(&self) -> Option<IoDone> {
        lock(&self.slot.state).done.take()
    }

    /// Blocks the calling thread until the operation finished.
    pub fn wait(mut self) -> IoDone {
        self.flush_deferred();
        struct Blocking<'a>(Option<&'a Arc<dyn Reap>>);
        impl Drop for Blocking<'_> {
            fn drop(&mut self) {
                if let Some(reaper) = self.0 {
                    reaper.blocking_waiter(false);
                }
            }
        }
        if let Some(done) = self.take_done() {
            return done;
        }
        if let Some(reaper) = &self.reaper {
            reaper.blocking_waiter(true);
        }
        let _blocking = Blocking(self.reaper.as_ref());
        let mut state = lock(&self.slot.state);
        loop {
            if let Some(done) = state.done.take() {
                return done;
            }
            state.blocking_waiter = true;
            state = self
                .slot
                .ready
                .wait(state)
                .unwrap_or_else(|poison| poison.into_inner());
        }
    }
}

impl Future for Completion {
    type Output = IoDone;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoDone> {
        let this = self.get_mut();
        if this.reaper.is_some() {
            if let Some(done) = this.take_done() {
                return Poll::Ready(done);
            }
            if this.deferred {
                // Once: let the other ready tasks queue their operations first.
                if std::mem::replace(&mut this.yielded, true) {
                    this.flush_deferred();
                } else {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            } else if let Some(reaper) = &this.reaper {
                reaper.reap();
                if let Some(done) = this.take_done() {
                    return Poll::Ready(done);
                }
                let brief = std::mem::take(&mut this.brief_on_repoll) || reaper.may_wait_briefly();
                if brief {
                    // Blocking the thread must not hold up tasks that are ready: yield once,
                    // so they run (and their I/O makes this operation no longer alone).
                    if !std::mem::replace(&mut this.yielded, true) {
                        this.brief_on_repoll = true;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    // Before the waker is stored, so a completion delivered meanwhile does not
                    // wake (and re-poll) the task that is already running.
                    if reaper.wait_briefly() {
                        if let Some(done) = this.take_done() {
                            return Poll::Ready(done);
                        }
                    }
                }
            }
        }
        let mut state = lock(&this.slot.state);
        if let Some(done) = state.done.take() {
            return Poll::Ready(done);
        }
        match &state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        drop(state);
        if let Some(reaper) = &this.reaper {
            reaper.watch();
        }
        Poll::Pending
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        // A cancelled future must not leave its operation waiting for someone else's submit.
        self.flush_deferred();
    }
}

impl Completer {
    /// Delivers the result and wakes the waiter.
    pub fn complete(mut self, done: IoDone) {
        if let Some(slot) = self.0.take() {
            Self::deliver(&slot, done);
        }
    }

    fn deliver(slot: &Slot, done: IoDone) {
        let (waker, blocking_waiter) = {
            let mut state = lock(&slot.state);
            state.done = Some(done);
            (state.waker.take(), state.blocking_waiter)
        };
        if blocking_waiter {
            slot.ready.notify_all();
        }
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            Self::deliver(
                &slot,
                IoDone {
                    result: Err(io::Error::other("I/O engine stopped before completing")),
                    buf: None,
                },
            );
        }
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves its data consistent
/// before any point that could panic.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

// ---------------------------------------------------------------------------------------------
// The file table shared by the two real engines.

pub(crate) struct RealFile {
    pub file: File,
    pub direct: bool,
}

/// Files one engine may open: a volume needs three (data, metadata, dirty map).
pub(crate) const FILES_MAX: usize = 16;

/// Files opened by a real engine; they stay open until the engine is dropped, so an fd handed
/// to the kernel is never closed (or reused) while an operation on it is in flight. A fixed
/// table of write-once slots: looking a file up on every operation is one atomic load, with no
/// lock and no reference count.
pub(crate) struct RealFiles {
    files: [OnceLock<RealFile>; FILES_MAX],
    /// Slots handed out so far (serialises `open`).
    opened: Mutex<usize>,
}

impl Default for RealFiles {
    fn default() -> RealFiles {
        RealFiles {
            files: std::array::from_fn(|_| OnceLock::new()),
            opened: Mutex::new(0),
        }
    }
}

impl RealFiles {
    pub fn open(&self, path: &Path, mode: OpenMode) -> io::Result<FileId> {
        let open = |direct: bool| {
            let mut options = std::fs::OpenOptions::new();
            options.read(true).write(true);
            if mode.create_new {
                options.create_new(true);
            }
            if direct {
                options.custom_flags(libc::O_DIRECT);
            }
            options.open(path)
        };
        let (file, direct) = if mode.direct {
            match open(true) {
                Ok(file) => (file, true),
                // The filesystem (tmpfs, some FUSE) refuses O_DIRECT: buffered I/O is still
                // correct because durability always comes from fdatasync, never from O_DIRECT.
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(
                        "{}: O_DIRECT not supported here, using buffered I/O",
                        path.display()
                    );
                    (open(false)?, false)
                }
                Err(err) => return Err(err),
            }
        } else {
            (open(false)?, false)
        };
        let mut opened = lock(&self.opened);
        let index = *opened;
        let slot = self.files.get(index).ok_or_else(|| {
            io::Error::other(format!(
                "too many files open in one engine (at most {FILES_MAX})"
            ))
        })?;
        if slot.set(RealFile { file, direct }).is_err() {
            return Err(io::Error::other("file slot already taken"));
        }
        *opened += 1;
        let id = u32::try_from(index).map_err(|_| io::Error::other("file id overflows"))?;
        Ok(FileId(id))
    }

    pub fn get(&self, id: FileId) -> io::Result<&RealFile> {
        self.files
            .get(id.0 as usize)
            .and_then(OnceLock::get)
            .ok_or_else(|| io::Error::other(format!("unknown file id {}", id.0)))
    }

    pub fn is_direct(&self, id: FileId) -> bool {
        self.get(id).map(|f| f.direct).unwrap_or(false)
    }

    pub fn file_len(&self, id: FileId) -> io::Result<u64> {
        Ok(self.get(id)?.file.metadata()?.len())
    }

    pub fn set_len(&self, id: FileId, len_bytes: u64) -> io::Result<()> {
        let file = self.get(id)?;
        file.file.set_len(len_bytes)?;
        // The new size is file metadata: fsync (not fdatasync) makes it durable.
        file.file.sync_all()
    }
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)`; falls back to writing zeroes where holes are not
/// supported, so TRIM always leaves zeroes behind.
pub(crate) fn punch_hole_blocking(file: &RealFile, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
    let length = libc::off_t::try_from(len).map_err(|_| io::Error::other("length too large"))?;
    // SAFETY: fallocate only reads its integer arguments; the fd is open for the call's duration
    // because `file` is borrowed.
    let rc = unsafe {
        libc::fallocate(
            file.file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            length,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    write_zeroes_blocking(file, offset, len)
}

/// Writes zeroes over a range, in bounded chunks.
pub(crate) fn write_zeroes_blocking(file: &RealFile, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK_BYTES: u64 = 1024 * 1024;
    let zeroes = AlignedBuf::zeroed(CHUNK_BYTES as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK_BYTES) as usize;
        pwrite_all(file, &zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// pwrite until every byte is written; a zero-length write is an error, not success.
pub(crate) fn pwrite_all(file: &RealFile, mut data: &[u8], mut offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    while !data.is_empty() {
        match file.file.write_at(data, offset) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "short write")),
            Ok(n) => {
                data = &data[n..];
                offset += n as u64;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// pread until the buffer is full; end of file before that is an error, not success.
pub(crate) fn pread_exact(file: &RealFile, mut data: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    while !data.is_empty() {
        match file.file.read_at(data, offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "short read: end of file",
                ))
            }
            Ok(n) => {
                data = &mut data[n..];
                offset += n as u64;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}
