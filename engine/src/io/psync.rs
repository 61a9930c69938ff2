//! The fallback engine: `pread`/`pwrite`/`fdatasync` on a fixed pool of threads.
//!
//! Used when io_uring cannot start (old kernel, seccomp, `io_uring_disabled`), or when asked
//! for. Threads sleep on a condition variable when there is no work; the queue is bounded.

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::{
    lock, pread_exact, punch_hole_blocking, pwrite_all, Completer, Completion, FileId, IoDone,
    IoEngine, IoOp, OpenMode, RealFiles,
};

/// Jobs waiting for a thread. The volume's in-flight limit keeps the queue far below this; the
/// hard cap is a last line of defence against a caller that bypasses it.
const QUEUE_JOBS_MAX: usize = 4096;

struct Queue {
    jobs: VecDeque<(IoOp, Completer)>,
    stopping: bool,
}

struct Shared {
    files: RealFiles,
    queue: Mutex<Queue>,
    work: Condvar,
}

/// pread/pwrite on `threads` worker threads.
pub struct PsyncEngine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl PsyncEngine {
    /// Starts `threads` workers (at least one).
    pub fn new(threads: usize) -> io::Result<PsyncEngine> {
        let shared = Arc::new(Shared {
            files: RealFiles::default(),
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                stopping: false,
            }),
            work: Condvar::new(),
        });
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let shared = shared.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("stretch-psync-{i}"))
                    .spawn(move || worker(&shared))?,
            );
        }
        Ok(PsyncEngine { shared, workers })
    }
}

fn worker(shared: &Shared) {
    loop {
        let (op, completer) = {
            let mut queue = lock(&shared.queue);
            loop {
                if let Some(job) = queue.jobs.pop_front() {
                    break job;
                }
                if queue.stopping {
                    return;
                }
                queue = shared
                    .work
                    .wait(queue)
                    .unwrap_or_else(|poison| poison.into_inner());
            }
        };
        completer.complete(execute(&shared.files, op));
    }
}

fn execute(files: &RealFiles, op: IoOp) -> IoDone {
    match op {
        IoOp::Read {
            file,
            offset,
            mut buf,
        } => {
            let result = files
                .get(file)
                .and_then(|f| pread_exact(f, &mut buf, offset));
            IoDone {
                result,
                buf: Some(buf),
            }
        }
        IoOp::Write { file, offset, buf } => {
            let result = files.get(file).and_then(|f| pwrite_all(f, &buf, offset));
            IoDone {
                result,
                buf: Some(buf),
            }
        }
        IoOp::Fdatasync { file } => IoDone {
            result: files.get(file).and_then(|f| f.file.sync_data()),
            buf: None,
        },
        IoOp::PunchHole { file, offset, len } => IoDone {
            result: files
                .get(file)
                .and_then(|f| punch_hole_blocking(f, offset, len)),
            buf: None,
        },
    }
}

impl IoEngine for PsyncEngine {
    fn name(&self) -> &'static str {
        "psync"
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
        let mut queue = lock(&self.shared.queue);
        if queue.stopping || queue.jobs.len() >= QUEUE_JOBS_MAX {
            drop(queue);
            let buf = match op {
                IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => Some(buf),
                _ => None,
            };
            completer.complete(IoDone {
                result: Err(io::Error::other("psync queue full or stopping")),
                buf,
            });
            return completion;
        }
        queue.jobs.push_back((op, completer));
        drop(queue);
        self.shared.work.notify_one();
        completion
    }
}

impl Drop for PsyncEngine {
    fn drop(&mut self) {
        lock(&self.shared.queue).stopping = true;
        self.shared.work.notify_all();
        for worker in self.workers.drain(..) {
            // A worker that panicked has nothing left to clean up; its jobs' completers were
            // dropped, which reported an error to their waiters.
            let _ = worker.join();
        }
    }
}
