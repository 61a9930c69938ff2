//! The io_uring engine: one ring per volume.
//!
//! The submitting thread puts its SQE on the ring and enters the kernel itself (under the
//! engine's mutex, which guards the submission queue and the in-flight table), so a submission
//! costs one syscall and no thread hand-off. Completions are reaped where the caller runs: the
//! ring signals an eventfd on every completion, and a reaper task on the caller's tokio runtime
//! (registered through `AsyncFd` the first time a future has to wait) drains the completion
//! queue and wakes the waiting tasks on the runtime's own thread — the kernel wakes one thread
//! per batch, as it does fio's. A future also drains the queue itself when polled.
//!
//! At queue depth 1 — the future's operation is the only one on the ring — the future does not
//! go back to its runtime at all: it waits inside `io_uring_enter(GETEVENTS)` on its own thread,
//! as fio does, for a bounded time, and returns with the result (`Shared::wait_briefly`). That
//! skips the eventfd, two `epoll_wait`s and two task polls per operation.
//!
//! The dedicated ring thread sleeps on a condition variable while such a reaper task exists,
//! and otherwise sleeps in `io_uring_enter(GETEVENTS)`: when a caller blocks in
//! `Completion::wait` (management calls without a runtime), when the runtime has no I/O driver
//! or callers come from a second runtime (both switch the engine to the thread for good), and
//! at shutdown. Nothing spins when idle. It completes operations, resubmits the remainder of
//! short transfers, and moves queued operations into freed slots. Each operation owns its
//! buffer; the in-flight table keeps it until the kernel's completion arrives, then hands it
//! back (or drops it, if the caller went away). Zero progress on a read or write is an error,
//! never success.
//!
//! Writes to a file opened without O_DIRECT (`--buffered-io`) are page-cache copies: they are
//! done with `pwrite` on the caller's thread, because ext4 cannot do them non-blocking and
//! io_uring would bounce every one through a kernel worker thread. Reads of such a file are
//! tried with `preadv2(RWF_NOWAIT)` first: a page-cache hit completes inline, without a
//! completion event; only a miss goes to the ring.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;

use io_uring::{opcode, types, EnterFlags, IoUring, Probe};

use super::{
    lock, Completer, Completion, FileId, IoDone, IoEngine, IoOp, OpenMode, RealFiles, Reap,
};

/// A deferred batch is handed to the kernel once it holds this many times (in hundredths) the
/// operations the kernel already has; see `submit_now`.
const BATCH_PER_IN_KERNEL_PCT: usize = 800;
/// user_data of the NOP that wakes the ring thread at shutdown; slots use their index.
const WAKE_TAG: u64 = u64::MAX;
/// Jobs waiting for a free slot. The volume's in-flight limit keeps the queue far below this;
/// the cap is a last line of defence against a caller that bypasses it.
const PENDING_JOBS_MAX: usize = 4096;
/// A transient error (EAGAIN, EINTR) is retried this many times before it is reported.
const RETRIES_MAX: u32 = 8;
/// The hard bound on one brief wait (see `Shared::wait_briefly`). It is longer than a timer
/// tick at 250 Hz and more on purpose: a kernel timeout earlier than the next tick makes the
/// kernel reprogram the CPU's timer when the wait starts and again when it ends — two VM exits
/// on a virtual machine, measured at +2 µs per 4 KiB read with a 100 µs timeout, against
/// nothing measurable at 3–20 ms. The time actually spent blocked is kept short by
/// `BRIEF_WAIT_SLOW_NS` instead; this bound only matters when the device stalls.
const BRIEF_WAIT_TIMEOUT_NS: u64 = 5_000_000;
/// A brief wait longer than this (a slow device: a disk, a remote volume) makes the next
/// ones be skipped: 1, 2, 4 … `BRIEF_SKIP_MAX` of them after slow waits in a row; one quick
/// wait resets that. A fast device with a rare slow request loses one wait; a slow one blocks
/// a thread in at most one of every `BRIEF_SKIP_MAX` + 1 operations it runs alone.
const BRIEF_WAIT_SLOW_NS: u64 = 500_000;
const BRIEF_SKIP_MAX: u32 = 1024;

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
    /// SQEs on the queue not yet handed to the kernel (deferred submissions).
    unsubmitted: usize,
}

impl State {
    /// Operations the kernel holds now (on the queue but unsubmitted ones do not count).
    fn in_kernel(&self) -> usize {
        self.in_flight.saturating_sub(self.unsubmitted)
    }
}

/// Who delivers completions while the runtime is idle.
///
/// The fast path is a reaper task on the caller's tokio runtime, woken by the eventfd the ring
/// signals on every completion: the kernel wakes the runtime's own thread (one hop, like fio).
/// The ring thread sleeps on `Shared::demand_cv` and takes over (blocking in
/// `io_uring_enter`) whenever that cannot be relied on: no live reaper task, a blocking
/// `Completion::wait`, a caller on another runtime or on a runtime without an I/O driver
/// (`fallback`, sticky), or shutdown.
#[derive(Default)]
struct Demand {
    /// The runtime a live reaper task runs on.
    reaper: Option<tokio::runtime::Id>,
    /// Tried and failed to rely on a reaper task: the ring thread reaps from now on.
    fallback: bool,
    /// Threads blocked in `Completion::wait`.
    blocking: usize,
    stopping: bool,
}

impl Demand {
    fn thread_needed(&self) -> bool {
        self.reaper.is_none() || self.fallback || self.blocking > 0 || self.stopping
    }
}

struct Shared {
    // Field order matters for drop: the ring is closed before the buffers it may reference.
    ring: IoUring,
    files: RealFiles,
    state: Mutex<State>,
    /// Signalled by the kernel on every completion (registered with the ring).
    eventfd: OwnedFd,
    demand: Mutex<Demand>,
    demand_cv: Condvar,
    /// Mirror of `Demand::fallback`, read without the lock on every pending poll.
    fallback: AtomicBool,
    /// A reaper task delivers completions (so the ring thread sleeps on its condition
    /// variable): `Demand::reaper` is set and not `fallback`. Read without the lock by
    /// `wait_briefly`, which must not race the ring thread for completions.
    async_reaper: AtomicBool,
    /// The kernel takes a timeout with `io_uring_enter` (IORING_FEAT_EXT_ARG, Linux 5.11).
    ext_arg: bool,
    /// Brief waits still to skip after a slow one, and how many the last slow one set.
    brief_skip: AtomicU32,
    brief_backoff: AtomicU32,
    /// Brief waits done (tests check the fast path is taken).
    #[cfg(test)]
    brief_waits: std::sync::atomic::AtomicU64,
    /// Set by `UringEngine::new`: the weak self handed to reaper tasks.
    me: Mutex<Weak<Shared>>,
    /// The engine was dropped: reaper tasks end (woken through the eventfd).
    closed: AtomicBool,
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
            state.unsubmitted = 0;
            self.submit();
        }
    }
}

impl Shared {
    /// Reaps from the async reaper task: waits for the lock (held only briefly).
    fn reap_wait(&self) {
        let mut finished = Vec::new();
        {
            let mut state = lock(&self.state);
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

    /// A brief wait (see `wait_briefly`) can be tried: the kernel takes a timeout, a reaper
    /// task (not the ring thread) delivers completions, and the ring holds one operation —
    /// the caller's, whose result is not in — with nothing queued behind it.
    fn alone(&self, state: &State) -> bool {
        self.ext_arg
            && !self.fallback.load(Ordering::Relaxed)
            && self.async_reaper.load(Ordering::Relaxed)
            && !state.stopping
            && !state.broken
            && state.in_flight == 1
            && state.unsubmitted == 0
            && state.pending.is_empty()
    }

    /// Wakes the reaper task as a completion would.
    fn signal_eventfd(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local u64 to the eventfd this engine owns.
        unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn set_demand(&self, change: impl FnOnce(&mut Demand)) {
        let mut demand = lock(&self.demand);
        change(&mut demand);
        self.mirror_demand(&demand);
        if demand.thread_needed() {
            self.demand_cv.notify_all();
        }
    }

    /// Updates the lock-free copies of `demand` (its lock held).
    fn mirror_demand(&self, demand: &Demand) {
        if demand.fallback {
            self.fallback.store(true, Ordering::Relaxed);
        }
        self.async_reaper.store(
            demand.reaper.is_some() && !demand.fallback,
            Ordering::Relaxed,
        );
    }

    /// Starts a reaper task on the current runtime; false if there is no runtime or it has no
    /// I/O driver.
    fn spawn_reaper(&self, handle: &tokio::runtime::Handle, id: tokio::runtime::Id) -> bool {
        // SAFETY: `dup` only reads the integer fd, which `self.eventfd` keeps open.
        let dup = unsafe { libc::fcntl(self.eventfd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return false;
        }
        // SAFETY: `dup` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(dup) };
        // A runtime built without `enable_io` panics here instead of returning an error; that
        // case falls back to the ring thread (once per engine: the fallback is sticky).
        let registered = std::panic::catch_unwind(move || {
            // SAFETY: the AsyncFd owns `fd`, so the descriptor stays open (and is not reused)
            // for as long as it is registered with the reactor.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            }
        });
        let Ok(Ok(afd)) = registered else {
            return false;
        };
        let weak = lock(&self.me).clone();
        let guard = ReaperGuard(weak.clone(), id);
        handle.spawn(async move {
            let _guard = guard;
            loop {
                let Ok(mut ready) = afd.readable().await else {
                    break;
                };
                let mut count = 0u64;
                // SAFETY: reads 8 bytes into a local u64; the fd is non-blocking, EAGAIN is fine.
                unsafe {
                    libc::read(
                        afd.get_ref().as_raw_fd(),
                        (&mut count as *mut u64).cast(),
                        8,
                    )
                };
                ready.clear_ready();
                let Some(shared) = weak.upgrade() else { break };
                if shared.closed.load(Ordering::Acquire) {
                    break;
                }
                shared.reap_wait();
            }
        });
        true
    }
}

/// Lives in the reaper task; when the task ends (its runtime shut down), the ring thread takes
/// over again.
struct ReaperGuard(Weak<Shared>, tokio::runtime::Id);

impl Drop for ReaperGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            let id = self.1;
            shared.set_demand(|d| {
                if d.reaper == Some(id) {
                    d.reaper = None;
                }
            });
        }
    }
}

impl Reap for Shared {
    fn watch(&self) {
        if self.fallback.load(Ordering::Relaxed) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.set_demand(|d| d.fallback = true);
            return;
        };
        let id = handle.id();
        {
            let mut demand = lock(&self.demand);
            match demand.reaper {
                Some(reaper) if reaper == id => return,
                // A live reaper on another runtime, which may not be running now: fall back.
                Some(_) => {}
                None if demand.fallback => return,
                None => {
                    // Claimed before spawning (without holding the lock across the spawn: a
                    // runtime shutting down drops the task, and its guard, at once).
                    demand.reaper = Some(id);
                    self.mirror_demand(&demand);
                    drop(demand);
                    if self.spawn_reaper(&handle, id) {
                        return;
                    }
                }
            }
        }
        self.set_demand(|d| {
            if d.reaper == Some(id) {
                d.reaper = None;
            }
            d.fallback = true;
        });
    }

    fn flush(&self) {
        let mut finished = Vec::new();
        {
            let mut state = lock(&self.state);
            if state.unsubmitted > 0 {
                state.unsubmitted = 0;
                self.submit();
            }
            if !state.stopping {
                let mut cqes = Vec::new();
                self.reap_locked(&mut state, &mut cqes, &mut finished);
            }
        }
        for (completer, done) in finished {
            completer.complete(done);
        }
    }

    /// The queue-depth-1 fast path. Normally a future waits in its runtime: the completion's
    /// task work interrupts the runtime thread's `epoll_wait`, posts the CQE and signals the
    /// eventfd; the runtime polls again, runs the reaper task (which reads the eventfd and
    /// reaps), which wakes the future's task — two `epoll_wait`s, a `read` and two task polls
    /// after the wake-up. When the operation is the only one on the ring, this thread has no
    /// other completion of this engine to deliver and nothing to batch, so it waits as fio
    /// does: inside `io_uring_enter(GETEVENTS)`, where the kernel runs the task work and
    /// returns with the CQE. A sleep, never a spin, bounded by `BRIEF_WAIT_TIMEOUT_NS` and
    /// kept brief by the back-off of `BRIEF_WAIT_SLOW_NS`. Not while the ring thread reaps
    /// (it would wake for the same CQE), nor with other operations in flight.
    ///
    /// The eventfd is muted meanwhile (IORING_CQ_EVENTFD_DISABLED), so the completion does not
    /// also wake the runtime for a reaper task that would find nothing. Another thread's
    /// operation completing while it is muted is delivered here: the unmute and reap below run
    /// under the state lock, and if anything is still in flight afterwards the eventfd is
    /// signalled by hand — the kernel may have seen the mute just before it was lifted, and
    /// its CQE may not be visible to this reap yet; the reaper task then delivers it.
    fn may_wait_briefly(&self) -> bool {
        let alone = self.state.try_lock().is_ok_and(|state| self.alone(&state));
        // Counted here, once per operation that could wait, so skipped ones count too.
        alone
            && self
                .brief_skip
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_err()
    }

    fn wait_briefly(&self) -> bool {
        {
            let Ok(state) = self.state.try_lock() else {
                return false;
            };
            if !self.alone(&state) {
                return false;
            }
            // SAFETY: the state lock is held, so no other CompletionQueue handle exists.
            unsafe { self.ring.completion_shared() }.disable_eventfd();
        }
        let started = std::time::Instant::now();
        let timeout = types::Timespec::from(std::time::Duration::from_nanos(BRIEF_WAIT_TIMEOUT_NS));
        let args = types::SubmitArgs::new().timespec(&timeout);
        let flags = EnterFlags::GETEVENTS | EnterFlags::EXT_ARG;
        // SAFETY: submits nothing (to_submit 0) and waits for one completion; `args` is an
        // `io_uring_getevents_arg` (SubmitArgs is repr(transparent)) pointing at `timeout`,
        // both alive for the call; the kernel accepts EXT_ARG (checked at start).
        let waited = unsafe {
            self.ring.submitter().enter::<types::SubmitArgs<'_, '_>>(
                0,
                1,
                flags.bits(),
                Some(&args),
            )
        };
        // EINTR (a signal) and the like count as quick: the reaper task delivers as usual.
        let timed_out = matches!(&waited, Err(err) if err.raw_os_error() == Some(libc::ETIME));
        let slow = timed_out || started.elapsed().as_nanos() > u128::from(BRIEF_WAIT_SLOW_NS);
        let backoff = brief_backoff(self.brief_backoff.load(Ordering::Relaxed), slow);
        self.brief_backoff.store(backoff, Ordering::Relaxed);
        self.brief_skip.store(backoff, Ordering::Relaxed);
        #[cfg(test)]
        self.brief_waits.fetch_add(1, Ordering::Relaxed);
        let mut finished = Vec::new();
        let still_in_flight = {
            let mut state = lock(&self.state);
            // SAFETY: the state lock is held, so no other CompletionQueue handle exists.
            unsafe { self.ring.completion_shared() }.enable_eventfd();
            // The unmute must be visible before the CQ tail is read (a locked RMW on x86
            // already is a full barrier; this keeps other architectures honest).
            std::sync::atomic::fence(Ordering::SeqCst);
            if !state.stopping {
                let mut cqes = Vec::new();
                self.reap_locked(&mut state, &mut cqes, &mut finished);
            }
            state.in_flight > 0
        };
        for (completer, done) in finished {
            completer.complete(done);
        }
        if still_in_flight {
            self.signal_eventfd();
        }
        true
    }

    fn blocking_waiter(&self, waiting: bool) {
        self.set_demand(|d| {
            if waiting {
                d.blocking += 1;
            } else {
                d.blocking -= 1;
            }
        });
    }

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
        let ext_arg = ring.params().is_feature_ext_arg();
        // SAFETY: eventfd takes integer arguments only.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor nobody else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
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
                unsubmitted: 0,
            }),
            eventfd,
            demand: Mutex::new(Demand::default()),
            demand_cv: Condvar::new(),
            fallback: AtomicBool::new(false),
            async_reaper: AtomicBool::new(false),
            ext_arg,
            brief_skip: AtomicU32::new(0),
            brief_backoff: AtomicU32::new(0),
            #[cfg(test)]
            brief_waits: std::sync::atomic::AtomicU64::new(0),
            me: Mutex::new(Weak::new()),
            closed: AtomicBool::new(false),
        });
        *lock(&shared.me) = Arc::downgrade(&shared);
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
        // A write to a page-cached (not O_DIRECT) file is a copy into the page cache. ext4 cannot
        // do that without blocking (IOCB_NOWAIT), so io_uring would hand every such write to a
        // kernel worker thread and back (measured: 3 context switches per 4 KiB write). Copying
        // it from the caller's thread is what a plain `pwrite` server does, and is faster.
        let op = match op {
            IoOp::Write { file, offset, buf } => match self.shared.files.get(file) {
                Ok(f) if !f.direct => {
                    let result = super::pwrite_all(f, &buf, offset);
                    return Completion::ready(IoDone {
                        result,
                        buf: Some(buf),
                    });
                }
                _ => IoOp::Write { file, offset, buf },
            },
            // A page-cached read is tried inline, without blocking (RWF_NOWAIT): a hit is a
            // copy and needs no completion event at all; a miss (EAGAIN), a short read or an
            // error goes to the ring as usual, which reports it.
            IoOp::Read { file, offset, buf } => match self.shared.files.get(file) {
                Ok(f) if !f.direct => match read_nowait(f, buf, offset) {
                    Ok(buf) => {
                        return Completion::ready(IoDone {
                            result: Ok(()),
                            buf: Some(buf),
                        })
                    }
                    Err(buf) => IoOp::Read { file, offset, buf },
                },
                _ => IoOp::Read { file, offset, buf },
            },
            op => op,
        };
        let (completer, completion) = super::completion_pair();
        let mut failed = Vec::new();
        let mut deferred = false;
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
                // The new SQE is on the queue. Hand it (and any deferred ones) to the kernel
                // now if the device is short of work, otherwise leave it for one scheduler
                // turn: the future yields once, then flushes, so one `io_uring_enter` carries
                // the SQEs of every task that ran meanwhile (see `submit_now`).
                let in_kernel = state.in_kernel().saturating_sub(1);
                if submit_now(in_kernel, state.unsubmitted + 1) {
                    state.unsubmitted = 0;
                    self.shared.submit();
                } else {
                    state.unsubmitted += 1;
                    deferred = true;
                }
            }
        }
        for (completer, done) in failed {
            completer.complete(done);
        }
        let reaper: Arc<dyn Reap> = self.shared.clone();
        let completion = completion.with_reaper(reaper);
        if deferred {
            completion.deferred()
        } else {
            completion
        }
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
        self.shared.set_demand(|d| d.stopping = true);
        if let Some(thread) = self.thread.take() {
            // A panicked ring thread dropped its completers, which reported errors.
            let _ = thread.join();
        }
        // End the reaper task (if any) now rather than when its runtime shuts down.
        self.shared.closed.store(true, Ordering::Release);
        self.shared.signal_eventfd();
    }
}

/// `preadv2(RWF_NOWAIT)` of the whole buffer from the page cache; the buffer back in `Err` unless
/// every byte was there.
fn read_nowait(
    file: &super::RealFile,
    mut buf: crate::AlignedBuf,
    offset: u64,
) -> Result<crate::AlignedBuf, crate::AlignedBuf> {
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Err(buf);
    };
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: the iovec describes `buf`, which is alive and exclusively borrowed for the call;
    // the fd is open for the call's duration because `file` is borrowed.
    let n = unsafe { libc::preadv2(file.file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    if n >= 0 && n as usize == buf.len() {
        Ok(buf)
    } else {
        Err(buf)
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

/// Whether to enter the kernel now for `waiting` SQEs on the queue (the new one included) while
/// the kernel holds `in_kernel` operations, or to defer them to the end of the scheduler turn.
///
/// Each `io_uring_enter` with I/O costs a syscall, a block-layer plug flush and a device
/// doorbell (a VM exit on virtio), so batching saves CPU. But a deferred SQE waits for every
/// other task that runs in the same turn — at queue depth 32, the CRC checks, record updates
/// and task polls of a whole batch of completions (~100 µs) — and the device idles if its
/// queue drains meanwhile. So: submit at once while the batch is small next to the work the
/// device still has queued, and let it grow geometrically. An idle device (`in_kernel == 0`,
/// e.g. queue depth 1) gets its request at once; after a burst of 32 completions the batches
/// are 1, 9 and the last 22 at the end of the turn: three syscalls instead of 32, and the
/// device starts on the burst after one request's processing instead of 32. The factor (8x)
/// was the best of 1x–16x and of "only when idle" in side-by-side runs against fio at QD32.
fn submit_now(in_kernel: usize, waiting: usize) -> bool {
    waiting * 100 > in_kernel * BATCH_PER_IN_KERNEL_PCT
}

/// Brief waits to skip after one that was `slow` (or timed out), given the skip after the
/// previous one: none after a quick wait, doubling after slow ones in a row.
fn brief_backoff(previous: u32, slow: bool) -> u32 {
    if slow {
        previous.saturating_mul(2).clamp(1, BRIEF_SKIP_MAX)
    } else {
        0
    }
}

/// The ring thread: wait for completions, finish them, refill.
fn reap_loop(shared: &Shared) {
    let mut cqes: Vec<(u64, i32)> = Vec::new();
    let mut finished: Vec<(Completer, IoDone)> = Vec::new();
    loop {
        {
            // Sleep (no spinning) while a reaper task on the callers' runtime delivers.
            let mut demand = lock(&shared.demand);
            while !demand.thread_needed() {
                demand = shared
                    .demand_cv
                    .wait(demand)
                    .unwrap_or_else(|poison| poison.into_inner());
            }
        }
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
                .and_then(|f| super::write_zeroes_blocking(f, offset, len)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AlignedBuf;

    fn engine_and_file(direct: bool) -> (tempfile::TempDir, UringEngine, FileId) {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = UringEngine::new(64).expect("io_uring");
        let file = engine
            .open(
                &dir.path().join("f"),
                OpenMode {
                    create_new: true,
                    direct,
                },
            )
            .expect("open");
        engine.set_len(file, 64 * 4096).expect("set_len");
        (dir, engine, file)
    }

    /// Writes `pattern(seed)` at `offset`, reads it back and checks it.
    async fn write_and_read_back(engine: &UringEngine, file: FileId, offset: u64, seed: u8) {
        engine
            .submit(IoOp::Write {
                file,
                offset,
                buf: pattern(seed),
            })
            .await
            .result
            .expect("write");
        let done = engine
            .submit(IoOp::Read {
                file,
                offset,
                buf: AlignedBuf::zeroed(8192),
            })
            .await;
        done.result.expect("read");
        assert_eq!(&done.buf.expect("buffer")[..], &pattern(seed)[..]);
    }

    fn pattern(seed: u8) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(8192);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31) ^ seed;
        }
        buf
    }

    /// The batching rule of `submit_now`: an idle device gets a request at once, and a burst of
    /// 32 resubmissions goes out in geometrically growing batches.
    #[test]
    fn deferred_batches_grow_with_the_work_in_the_kernel() {
        assert!(
            submit_now(0, 1),
            "an idle device must get its request at once"
        );
        let (mut in_kernel, mut waiting, mut batches) = (0, 0, Vec::new());
        for _ in 0..32 {
            waiting += 1;
            if submit_now(in_kernel, waiting) {
                batches.push(waiting);
                in_kernel += waiting;
                waiting = 0;
            }
        }
        batches.push(waiting);
        assert_eq!(batches, [1, 9, 22]);
    }

    /// After a slow brief wait the next ones are skipped, doubling up to the cap; a quick one
    /// ends the back-off.
    #[test]
    fn brief_waits_back_off_after_slow_ones() {
        let mut skip = 0;
        let mut seen = Vec::new();
        for _ in 0..13 {
            skip = brief_backoff(skip, true);
            seen.push(skip);
        }
        assert_eq!(
            seen,
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1024, 1024]
        );
        assert_eq!(brief_backoff(skip, false), 0);
        assert_eq!(brief_backoff(0, false), 0);
    }

    /// Queue depth 1 on a runtime with an I/O driver: the futures wait in the kernel (brief
    /// waits), and the eventfd is never left muted, so overlapping operations — which are
    /// not waited for that way — still complete through the reaper task.
    #[test]
    fn queue_depth_one_waits_in_the_kernel_and_leaves_the_eventfd_armed() {
        let (_dir, engine, file) = engine_and_file(true);
        if !engine.shared.ext_arg || !engine.is_direct(file) {
            eprintln!("SKIPPED: needs IORING_FEAT_EXT_ARG and O_DIRECT in the temp dir");
            return;
        }
        let engine = Arc::new(engine);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        let eventfd_muted = |engine: &UringEngine| {
            let _state = lock(&engine.shared.state);
            // SAFETY: the state lock is held, so no other CompletionQueue handle exists.
            unsafe { engine.shared.ring.completion_shared() }.eventfd_disabled()
        };
        rt.block_on(async {
            for i in 0..64u64 {
                let offset = (i % 8) * 8192;
                write_and_read_back(&engine, file, offset, i as u8).await;
            }
        });
        let brief = engine.shared.brief_waits.load(Ordering::Relaxed);
        assert!(
            brief >= 64,
            "only {brief} of 128 QD1 operations waited in the kernel"
        );
        assert!(!eventfd_muted(&engine), "eventfd left muted");
        // Now overlapping operations: some wait briefly, the others rely on the eventfd.
        rt.block_on(async {
            let mut tasks = Vec::new();
            for i in 0..16u64 {
                let engine = engine.clone();
                tasks.push(tokio::spawn(async move {
                    for round in 0..8u8 {
                        let offset = (i % 8) * 8192 + 64 * 1024;
                        engine
                            .submit(IoOp::Write {
                                file,
                                offset,
                                buf: pattern(round),
                            })
                            .await
                            .result
                            .expect("write");
                        tokio::task::yield_now().await;
                    }
                }));
            }
            for t in tasks {
                t.await.expect("task");
            }
        });
        assert!(!eventfd_muted(&engine), "eventfd left muted");
    }

    /// Page-cached files: writes go inline (pwrite), reads try RWF_NOWAIT, and a read past the
    /// end still fails through the ring instead of succeeding short.
    #[test]
    fn buffered_writes_inline_and_reads_nowait_round_trip() {
        let (_dir, engine, file) = engine_and_file(false);
        let done = engine
            .submit(IoOp::Write {
                file,
                offset: 4096,
                buf: pattern(7),
            })
            .wait();
        done.result.expect("write");
        let done = engine
            .submit(IoOp::Read {
                file,
                offset: 4096,
                buf: AlignedBuf::zeroed(8192),
            })
            .wait();
        done.result.expect("read");
        assert_eq!(&done.buf.expect("buffer")[..], &pattern(7)[..]);
        let done = engine
            .submit(IoOp::Read {
                file,
                offset: 63 * 4096,
                buf: AlignedBuf::zeroed(8192),
            })
            .wait();
        assert!(done.result.is_err(), "a short read must be an error");
    }

    /// Many concurrent futures on a runtime with an I/O driver (reaper task, deferred
    /// submissions), then on one without (the ring thread takes over): all complete.
    #[test]
    fn futures_complete_with_and_without_an_io_driver() {
        let (_dir, engine, file) = engine_and_file(true);
        let engine = Arc::new(engine);
        let run = |rt: tokio::runtime::Runtime, seed: u8| {
            let engine = engine.clone();
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for i in 0..32u64 {
                    let engine = engine.clone();
                    tasks.push(tokio::spawn(async move {
                        let offset = (i % 8) * 8192;
                        write_and_read_back(&engine, file, offset, seed).await;
                    }));
                }
                for t in tasks {
                    t.await.expect("task");
                }
            });
        };
        let with_io = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        run(with_io, 1);
        let without_io = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        run(without_io, 2);
    }
}
