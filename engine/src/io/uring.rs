//! The io_uring engine: one ring, owned by one dedicated thread.
//!
//! The submitting thread puts its SQE on the ring and enters the kernel itself (under the
//! engine's mutex, which guards the submission queue and the in-flight table), so a submission
//! costs one syscall and no thread hand-off. The ring thread only reaps: it sleeps in
//! `io_uring_enter(GETEVENTS)` until a completion arrives — it never spins — then completes
//! the operations, resubmits the remainder of short transfers, and moves queued operations into
//! freed slots. Each operation owns its buffer; the in-flight table keeps it until the kernel's
//! completion arrives, then hands it back (or drops it, if the caller went away). Zero progress
//! on a read or write is an error, never success.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring, Probe};

use super::{
    lock, Completer, Completion, FileId, IoDone, IoEngine, IoOp, OpenMode, RealFiles, Reap,
};

/// user_data of the NOP that wakes the ring thread at shutdown; slots use their index.
const WAKE_TAG: u64 = u64::MAX;
/// Jobs waiting for a free slot. The volume's in-flight limit keeps the queue far below this;
/// the cap is a last line of defence against a caller that bypasses it.
const PENDING_JOBS_MAX: usize = 4096;
/// A transient error (EAGAIN, EINTR) is retried this many times before it is reported.
const RETRIES_MAX: u32 = 8;

struct InFlight {
    op: IoOp,
    completer: Completer,
    fd: RawFd,
    /// Bytes already transferred by earlier (short) completions.
    done_bytes: usize,
    retries: u32,
}

/// Everything that touches the submission queue or the in-flight table, under one mutex.
struct State {
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    pending: VecDeque<(IoOp, Completer)>,
    stopping: bool,
    /// Set when the ring failed; every later submission fails at once.
    broken: bool,
}

struct Shared {
    // Field order matters for drop: the ring is closed before the buffers it may reference.
    ring: IoUring,
    files: RealFiles,
    state: Mutex<State>,
}

impl Shared {
    /// Puts the SQE of `slot` on the submission queue. The caller holds the state lock, which is
    /// what makes the shared submission queue exclusive.
    fn push_sqe(&self, state: &mut State, slot: usize) {
        let Some(entry) = state.slots[slot].as_mut() else {
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
        self.push_entry(&sqe);
    }

    fn push_entry(&self, sqe: &io_uring::squeue::Entry) {
        loop {
            // SAFETY: the caller holds the state lock, so no other SubmissionQueue handle exists;
            // every buffer an SQE points to is owned by an in-flight slot and stays alive and
            // unmoved (heap memory) until its CQE is reaped.
            let pushed = unsafe { self.ring.submission_shared().push(sqe) };
            if pushed.is_ok() {
                return;
            }
            // In flight never exceeds the slots (entries - 1), so a full queue only means SQEs
            // not yet handed to the kernel; handing them over makes room.
            if let Err(err) = self.ring.submit() {
                tracing::warn!("io_uring submit while SQ full: {err}");
            }
        }
    }

    /// Hands queued SQEs to the kernel. A failure here is reported by the completions that
    /// never come: the ring thread notices the broken ring on its next enter.
    fn submit(&self) {
        loop {
            match self.ring.submit() {
                Ok(_) => return,
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
                // EAGAIN/EBUSY: the kernel is short of resources or the CQ is full; the ring
                // thread's next enter submits what is left.
                Err(err) => {
                    tracing::debug!("io_uring submit deferred: {err}");
                    return;
                }
            }
        }
    }

    /// Moves queued jobs into free slots (state lock held).
    fn fill_slots(&self, state: &mut State, failed: &mut Vec<(Completer, IoDone)>) -> bool {
        let mut pushed = false;
        while !state.free.is_empty() {
            let Some((op, completer)) = state.pending.pop_front() else {
                break;
            };
            match op_file(&op).and_then(|id| self.files.get(id)) {
                Ok(file) => {
                    let fd = file.file.as_raw_fd();
                    let Some(slot) = state.free.pop() else { break };
                    state.slots[slot] = Some(InFlight {
                        op,
                        completer,
                        fd,
                        done_bytes: 0,
                        retries: 0,
                    });
                    state.in_flight += 1;
                    self.push_sqe(state, slot);
                    pushed = true;
                }
                Err(err) => failed.push((
                    completer,
                    IoDone {
                        result: Err(err),
                        buf: op_buf(op),
                    },
                )),
            }
        }
        pushed
    }
}

impl Shared {
    /// Drains the completion queue, finishes what completed, refills freed slots. The caller
    /// holds the state lock, which makes the shared completion queue exclusive.
    fn reap_locked(
        &self,
        state: &mut State,
        cqes: &mut Vec<(u64, i32)>,
        finished: &mut Vec<(Completer, IoDone)>,
    ) {
        // SAFETY: the state lock is held, so no other CompletionQueue handle exists.
        let cq = unsafe { self.ring.completion_shared() };
        cqes.extend(cq.map(|cqe| (cqe.user_data(), cqe.result())));
        let mut resubmit = false;
        for &(user_data, result) in cqes.iter() {
            if user_data == WAKE_TAG {
                continue;
            }
            resubmit |= complete_slot(self, state, user_data as usize, result, finished);
        }
        cqes.clear();
        resubmit |= self.fill_slots(state, finished);
        if resubmit {
            self.submit();
        }
    }
}

impl Reap for Shared {
    fn reap(&self) {
        let mut finished = Vec::new();
        {
            // Never wait for the lock: the ring thread will deliver anything we miss.
            let Ok(mut state) = self.state.try_lock() else {
                return;
            };
            // At shutdown the ring thread must see the wake-up NOP's completion itself.
            if state.stopping {
                return;
            }
            let mut cqes = Vec::new();
            self.reap_locked(&mut state, &mut cqes, &mut finished);
        }
        for (completer, done) in finished {
            completer.complete(done);
        }
    }
}

/// io_uring engine with a dedicated completion thread.
pub struct UringEngine {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl UringEngine {
    /// Creates a ring of `entries` slots and its completion thread. Fails if the kernel refuses
    /// io_uring or lacks an opcode the engine uses.
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
            (opcode::Nop::CODE, "NOP"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::other(format!(
                    "kernel io_uring lacks IORING_OP_{name}"
                )));
            }
        }
        // One slot is kept for the shutdown NOP.
        let capacity = entries as usize - 1;
        let shared = Arc::new(Shared {
            ring,
            files: RealFiles::default(),
            state: Mutex::new(State {
                slots: (0..capacity).map(|_| None).collect(),
                free: (0..capacity).rev().collect(),
                in_flight: 0,
                pending: VecDeque::new(),
                stopping: false,
                broken: false,
            }),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("stretch-uring".into())
            .spawn(move || reap_loop(&thread_shared))?;
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
        let mut failed = Vec::new();
        {
            let mut state = lock(&self.shared.state);
            if state.stopping || state.broken || state.pending.len() >= PENDING_JOBS_MAX {
                drop(state);
                completer.complete(IoDone {
                    result: Err(io::Error::other("io_uring engine stopping, broken or full")),
                    buf: op_buf(op),
                });
                return completion;
            }
            state.pending.push_back((op, completer));
            if self.shared.fill_slots(&mut state, &mut failed) {
                // Submitting from the caller's thread costs one syscall and no thread hop.
                // (Deferring it to batch doorbells across tasks was measured: no gain here.)
                self.shared.submit();
            }
        }
        for (completer, done) in failed {
            completer.complete(done);
        }
        let reaper: Arc<dyn Reap> = self.shared.clone();
        completion.with_reaper(reaper)
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        {
            let mut state = lock(&self.shared.state);
            state.stopping = true;
            let nop = opcode::Nop::new().build().user_data(WAKE_TAG);
            self.shared.push_entry(&nop);
            self.shared.submit();
        }
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

fn op_file(op: &IoOp) -> io::Result<FileId> {
    Ok(match op {
        IoOp::Read { file, .. }
        | IoOp::Write { file, .. }
        | IoOp::Fdatasync { file }
        | IoOp::PunchHole { file, .. } => *file,
    })
}

/// The ring thread: wait for completions, finish them, refill.
fn reap_loop(shared: &Shared) {
    let mut cqes: Vec<(u64, i32)> = Vec::new();
    let mut finished: Vec<(Completer, IoDone)> = Vec::new();
    loop {
        match shared.ring.submitter().submit_and_wait(1) {
            Ok(_) => {}
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
                ) => {}
            Err(err) => {
                tracing::error!("io_uring_enter failed: {err}; failing in-flight I/O");
                fail_everything(shared, &err);
                return;
            }
        }
        {
            let mut state = lock(&shared.state);
            shared.reap_locked(&mut state, &mut cqes, &mut finished);
            if state.stopping && state.in_flight == 0 && state.pending.is_empty() {
                drop(state);
                for (completer, done) in finished.drain(..) {
                    completer.complete(done);
                }
                return;
            }
        }
        // Wake the callers outside the lock.
        for (completer, done) in finished.drain(..) {
            completer.complete(done);
        }
    }
}

/// Handles one CQE; returns true if it put a new SQE on the queue.
fn complete_slot(
    shared: &Shared,
    state: &mut State,
    slot: usize,
    result: i32,
    finished: &mut Vec<(Completer, IoDone)>,
) -> bool {
    let Some(entry) = state.slots.get_mut(slot).and_then(Option::as_mut) else {
        tracing::error!("io_uring completion for unknown slot {slot}");
        return false;
    };
    let outcome = if result < 0 {
        let errno = -result;
        if (errno == libc::EAGAIN || errno == libc::EINTR) && entry.retries < RETRIES_MAX {
            entry.retries += 1;
            shared.push_sqe(state, slot);
            return true;
        }
        match entry.op {
            // No hole punching on this filesystem: zero the range in place instead (rare, and
            // only for TRIM), so the range still reads as zeroes.
            IoOp::PunchHole { file, offset, len } if errno == libc::EOPNOTSUPP => shared
                .files
                .get(file)
                .and_then(|f| super::write_zeroes_blocking(&f, offset, len)),
            _ => Err(io::Error::from_raw_os_error(errno)),
        }
    } else {
        let transferred = result as usize;
        match &entry.op {
            IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => {
                let total = buf.len();
                if transferred == 0 && entry.done_bytes < total {
                    let kind = match entry.op {
                        IoOp::Read { .. } => io::ErrorKind::UnexpectedEof,
                        _ => io::ErrorKind::WriteZero,
                    };
                    Err(io::Error::new(kind, "short transfer with no progress"))
                } else {
                    entry.done_bytes += transferred;
                    if entry.done_bytes < total {
                        shared.push_sqe(state, slot);
                        return true;
                    }
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    };
    if let Some(entry) = state.slots[slot].take() {
        state.free.push(slot);
        state.in_flight -= 1;
        finished.push((
            entry.completer,
            IoDone {
                result: outcome,
                buf: op_buf(entry.op),
            },
        ));
    }
    false
}

/// The ring is unusable: fail what is in flight and queued. The buffers of in-flight operations
/// are leaked, because the kernel may still write into them.
fn fail_everything(shared: &Shared, err: &io::Error) {
    let mut finished = Vec::new();
    {
        let mut state = lock(&shared.state);
        state.broken = true;
        for slot in 0..state.slots.len() {
            if let Some(entry) = state.slots[slot].take() {
                let InFlight { op, completer, .. } = entry;
                std::mem::forget(op);
                finished.push((completer, None));
            }
        }
        while let Some((op, completer)) = state.pending.pop_front() {
            finished.push((completer, op_buf(op)));
        }
    }
    for (completer, buf) in finished {
        completer.complete(IoDone {
            result: Err(io::Error::new(err.kind(), err.to_string())),
            buf,
        });
    }
}
