//! The io_uring engine: one ring, owned by one dedicated thread.
//!
//! Callers push operations on a mutex-protected queue and, only if the ring thread is asleep,
//! write to an eventfd. The ring keeps a read of that eventfd armed at all times, so the thread
//! sleeps in `io_uring_enter` until either an operation completes or new work arrives: it never
//! spins. Each operation owns its buffer; the thread keeps the buffer in its in-flight table
//! until the kernel's completion arrives, then hands it back (or drops it, if the caller went
//! away). A short read or write is resubmitted for the remainder; zero progress is an error.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring, Probe};

use super::{lock, Completer, Completion, FileId, IoDone, IoEngine, IoOp, OpenMode, RealFiles};

/// user_data of the eventfd read; operation slots use their index, always below this.
const EVENTFD_TAG: u64 = u64::MAX;
/// Jobs waiting for a ring slot. The volume's in-flight limit keeps the queue far below this;
/// the cap is a last line of defence against a caller that bypasses it.
const PENDING_JOBS_MAX: usize = 4096;
/// A transient error (EAGAIN, EINTR) is retried this many times before it is reported.
const RETRIES_MAX: u32 = 8;

struct Pending {
    jobs: VecDeque<(IoOp, Completer)>,
    stopping: bool,
}

struct Shared {
    files: RealFiles,
    pending: Mutex<Pending>,
    /// True while the ring thread is (about to be) blocked in the kernel; a submitter that
    /// flips it to false owes the thread an eventfd wake-up.
    sleeping: AtomicBool,
    eventfd: OwnedFd,
}

impl Shared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to an eventfd we own. A failed write can only
        // be EAGAIN on counter overflow, which means a wake-up is already pending.
        unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// io_uring engine with a dedicated ring thread.
pub struct UringEngine {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl UringEngine {
    /// Creates a ring of `entries` slots (one is kept for the wake-up eventfd) and its thread.
    /// Fails if the kernel refuses io_uring or lacks an opcode the engine uses.
    pub fn new(entries: u32) -> io::Result<UringEngine> {
        let entries = entries.clamp(8, 4096);
        let ring = IoUring::new(entries)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Fsync::CODE, "FSYNC"),
            (opcode::Fallocate::CODE, "FALLOCATE"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::other(format!(
                    "kernel io_uring lacks IORING_OP_{name}"
                )));
            }
        }
        // SAFETY: eventfd takes two integers and returns a new fd or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created fd that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        let shared = Arc::new(Shared {
            files: RealFiles::default(),
            pending: Mutex::new(Pending {
                jobs: VecDeque::new(),
                stopping: false,
            }),
            sleeping: AtomicBool::new(false),
            eventfd,
        });
        let capacity = entries as usize - 1;
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("stretch-uring".into())
            .spawn(move || RingThread::new(ring, thread_shared, capacity).run())?;
        Ok(UringEngine {
            shared,
            thread: Some(thread),
        })
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<FileId> {
        self.shared.files.open(path, mode)
    }

    fn is_direct(&self, file: FileId) -> bool {
        self.shared.files.is_direct(file)
    }

    fn file_len(&self, file: FileId) -> io::Result<u64> {
        self.shared.files.file_len(file)
    }

    fn set_len(&self, file: FileId, len_bytes: u64) -> io::Result<()> {
        self.shared.files.set_len(file, len_bytes)
    }

    fn submit(&self, op: IoOp) -> Completion {
        let (completer, completion) = super::completion_pair();
        {
            let mut pending = lock(&self.shared.pending);
            if pending.stopping || pending.jobs.len() >= PENDING_JOBS_MAX {
                drop(pending);
                completer.complete(IoDone {
                    result: Err(io::Error::other("io_uring queue full or stopping")),
                    buf: op_buf(op),
                });
                return completion;
            }
            pending.jobs.push_back((op, completer));
        }
        if self.shared.sleeping.swap(false, Ordering::SeqCst) {
            self.shared.wake();
        }
        completion
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        lock(&self.shared.pending).stopping = true;
        self.shared.wake();
        if let Some(thread) = self.thread.take() {
            // A panicked ring thread dropped its completers, which reported errors.
            let _ = thread.join();
        }
    }
}

fn op_buf(op: IoOp) -> Option<crate::AlignedBuf> {
    match op {
        IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => Some(buf),
        _ => None,
    }
}

struct InFlight {
    op: IoOp,
    completer: Completer,
    fd: RawFd,
    /// Bytes already transferred by earlier (short) completions.
    done_bytes: usize,
    retries: u32,
}

struct RingThread {
    // Field order matters for drop: the ring is dropped before the buffers it may reference.
    ring: IoUring,
    shared: Arc<Shared>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    eventfd_buf: Box<u64>,
    eventfd_armed: bool,
}

impl RingThread {
    fn new(ring: IoUring, shared: Arc<Shared>, capacity: usize) -> RingThread {
        RingThread {
            ring,
            shared,
            slots: (0..capacity).map(|_| None).collect(),
            free: (0..capacity).rev().collect(),
            in_flight: 0,
            eventfd_buf: Box::new(0),
            eventfd_armed: false,
        }
    }

    fn run(mut self) {
        self.arm_eventfd();
        loop {
            let stopping = self.take_pending();
            if stopping && self.in_flight == 0 {
                break;
            }
            // Announce the sleep, then look once more, so a job pushed in between is either
            // seen here or its submitter sees `sleeping` and writes the eventfd.
            self.shared.sleeping.store(true, Ordering::SeqCst);
            let more = !self.free.is_empty() && !lock(&self.shared.pending).jobs.is_empty();
            if more {
                self.shared.sleeping.store(false, Ordering::SeqCst);
                continue;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
                Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {}
                Err(err) => {
                    tracing::error!("io_uring_enter failed: {err}; failing in-flight I/O");
                    self.shared.sleeping.store(false, Ordering::SeqCst);
                    self.fail_everything(&err);
                    return;
                }
            }
            self.shared.sleeping.store(false, Ordering::SeqCst);
            self.reap();
        }
        self.disarm_eventfd();
    }

    /// Moves queued jobs into free slots; returns whether the engine is stopping.
    fn take_pending(&mut self) -> bool {
        let shared = self.shared.clone();
        let mut pending = lock(&shared.pending);
        while !self.free.is_empty() {
            let Some((op, completer)) = pending.jobs.pop_front() else {
                break;
            };
            let fd = match op_file(&op).and_then(|id| self.shared.files.get(id)) {
                Ok(file) => file.file.as_raw_fd(),
                Err(err) => {
                    completer.complete(IoDone {
                        result: Err(err),
                        buf: op_buf(op),
                    });
                    continue;
                }
            };
            let Some(slot) = self.free.pop() else { break };
            self.slots[slot] = Some(InFlight {
                op,
                completer,
                fd,
                done_bytes: 0,
                retries: 0,
            });
            self.in_flight += 1;
            self.push_sqe(slot);
        }
        pending.stopping
    }

    fn push_sqe(&mut self, slot: usize) {
        let Some(entry) = self.slots[slot].as_mut() else {
            return;
        };
        let fd = types::Fd(entry.fd);
        let done = entry.done_bytes;
        let sqe = match &mut entry.op {
            IoOp::Read { offset, buf, .. } => {
                let remaining = buf.len() - done;
                // SAFETY: `done < buf.len()`, so the pointer stays inside the buffer's allocation.
                let ptr = unsafe { buf.as_mut_ptr().add(done) };
                opcode::Read::new(fd, ptr, remaining as u32)
                    .offset(*offset + done as u64)
                    .build()
            }
            IoOp::Write { offset, buf, .. } => {
                let remaining = buf.len() - done;
                // SAFETY: as for Read: `done < buf.len()`.
                let ptr = unsafe { buf.as_ptr().add(done) };
                opcode::Write::new(fd, ptr, remaining as u32)
                    .offset(*offset + done as u64)
                    .build()
            }
            IoOp::Fdatasync { .. } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoOp::PunchHole { offset, len, .. } => opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        }
        .user_data(slot as u64);
        self.push(&sqe);
    }

    fn push(&mut self, sqe: &io_uring::squeue::Entry) {
        loop {
            // SAFETY: every buffer an SQE points to is owned by an in-flight slot (or is
            // `eventfd_buf`) and stays alive and unmoved (heap memory) until its CQE is reaped.
            let pushed = unsafe { self.ring.submission().push(sqe) };
            if pushed.is_ok() {
                return;
            }
            // The SQ holds at most `capacity + 1` entries between submits, so a full queue is
            // only possible transiently; flushing it to the kernel makes room.
            if let Err(err) = self.ring.submit() {
                tracing::warn!("io_uring submit while SQ full: {err}");
            }
        }
    }

    fn arm_eventfd(&mut self) {
        let ptr: *mut u64 = &mut *self.eventfd_buf;
        let sqe = opcode::Read::new(
            types::Fd(self.shared.eventfd.as_raw_fd()),
            ptr.cast(),
            std::mem::size_of::<u64>() as u32,
        )
        .build()
        .user_data(EVENTFD_TAG);
        self.push(&sqe);
        self.eventfd_armed = true;
    }

    /// Completes the armed eventfd read before the ring goes away, so the kernel never writes
    /// into `eventfd_buf` after it is freed.
    fn disarm_eventfd(&mut self) {
        let mut attempts = 0;
        while self.eventfd_armed && attempts < 1000 {
            attempts += 1;
            self.shared.wake();
            if self.ring.submit_and_wait(1).is_err() {
                continue;
            }
            let cqes: Vec<_> = self.ring.completion().collect();
            for cqe in cqes {
                if cqe.user_data() == EVENTFD_TAG {
                    self.eventfd_armed = false;
                }
            }
        }
        if self.eventfd_armed {
            // Should never happen; leaking 8 bytes is better than a use-after-free.
            std::mem::forget(std::mem::replace(&mut self.eventfd_buf, Box::new(0)));
        }
    }

    fn reap(&mut self) {
        // Collect first: completing may resubmit, which needs the submission queue.
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (user_data, result) in cqes {
            if user_data == EVENTFD_TAG {
                self.eventfd_armed = false;
                self.arm_eventfd();
                continue;
            }
            self.complete_slot(user_data as usize, result);
        }
    }

    fn complete_slot(&mut self, slot: usize, result: i32) {
        let Some(entry) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            tracing::error!("io_uring completion for unknown slot {slot}");
            return;
        };
        if result < 0 {
            let errno = -result;
            if (errno == libc::EAGAIN || errno == libc::EINTR) && entry.retries < RETRIES_MAX {
                entry.retries += 1;
                self.push_sqe(slot);
                return;
            }
            if errno == libc::EOPNOTSUPP {
                if let IoOp::PunchHole { file, offset, len } = entry.op {
                    // No hole punching on this filesystem: zero the range in place instead
                    // (rare, and only for TRIM), so the range still reads as zeroes.
                    let outcome = self
                        .shared
                        .files
                        .get(file)
                        .and_then(|f| super::write_zeroes_blocking(&f, offset, len));
                    return self.finish(slot, outcome);
                }
            }
            return self.finish(slot, Err(io::Error::from_raw_os_error(errno)));
        }
        let transferred = result as usize;
        let total = match &entry.op {
            IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => buf.len(),
            _ => return self.finish(slot, Ok(())),
        };
        if transferred == 0 && entry.done_bytes < total {
            let kind = match entry.op {
                IoOp::Read { .. } => io::ErrorKind::UnexpectedEof,
                _ => io::ErrorKind::WriteZero,
            };
            return self.finish(
                slot,
                Err(io::Error::new(kind, "short transfer with no progress")),
            );
        }
        entry.done_bytes += transferred;
        if entry.done_bytes < total {
            self.push_sqe(slot);
            return;
        }
        self.finish(slot, Ok(()));
    }

    fn finish(&mut self, slot: usize, result: io::Result<()>) {
        if let Some(entry) = self.slots[slot].take() {
            self.free.push(slot);
            self.in_flight -= 1;
            entry.completer.complete(IoDone {
                result,
                buf: op_buf(entry.op),
            });
        }
    }

    /// The ring is unusable: fail what is in flight and queued. The buffers of in-flight
    /// operations are leaked, because the kernel may still write into them.
    fn fail_everything(&mut self, err: &io::Error) {
        for slot in 0..self.slots.len() {
            if let Some(entry) = self.slots[slot].take() {
                let InFlight { op, completer, .. } = entry;
                std::mem::forget(op);
                completer.complete(IoDone {
                    result: Err(io::Error::new(err.kind(), err.to_string())),
                    buf: None,
                });
            }
        }
        let mut pending = lock(&self.shared.pending);
        pending.stopping = true;
        while let Some((op, completer)) = pending.jobs.pop_front() {
            completer.complete(IoDone {
                result: Err(io::Error::new(err.kind(), err.to_string())),
                buf: op_buf(op),
            });
        }
        std::mem::forget(std::mem::replace(&mut self.eventfd_buf, Box::new(0)));
    }
}

fn op_file(op: &IoOp) -> io::Result<FileId> {
    Ok(match op {
        IoOp::Read { file, .. }
        | IoOp::Write { file, .. }
        | IoOp::Fdatasync { file }
        | IoOp::PunchHole { file, .. } => *file,
    })
}
