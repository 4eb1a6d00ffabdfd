//! A persistent pool of worker threads for the decoder's parallel loops.
//!
//! Principal type: [`WorkerPool`].
//!
//! `run(job)` calls `job(worker, workers)` once on every worker — the caller
//! is worker 0 — and returns when all have finished; the job partitions its
//! work by `worker` (statically, like ggml's thread split). Threads are
//! spawned once, at session start. Between jobs a worker spins briefly on a
//! generation counter (a decode step issues a few hundred jobs back to back)
//! and then sleeps on a condition variable, so an idle session burns no CPU.
//!
//! Invariants: `run` performs no heap allocation and spawns nothing; a job
//! never outlives the `run` call that issued it; a job must not panic (the
//! decoder's jobs are bounds-checked arithmetic over preallocated buffers).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = dyn Fn(usize, usize) + Sync;

/// How many times an idle worker polls before it sleeps (≈ tens of µs).
const SPIN_POLLS: u32 = 20_000;

struct Shared {
    generation: AtomicU64,
    /// The current job, lifetime erased; valid while `pending > 0`.
    job: Mutex<Option<&'static Job>>,
    pending: AtomicUsize,
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    wake_lock: Mutex<()>,
    wake: Condvar,
}

/// A fixed set of worker threads; see the module documentation.
pub struct WorkerPool {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    workers: usize,
}

impl WorkerPool {
    /// Starts `workers - 1` threads (the caller of [`run`](Self::run) is the
    /// last worker). `workers` is at least 1.
    pub fn new(workers: usize) -> WorkerPool {
        let workers = workers.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: Mutex::new(None),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            wake_lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let handles = (1..workers)
            .map(|index| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("nocturne-worker-{index}"))
                    .spawn(move || worker_loop(&shared, index, workers))
                    .expect("cannot spawn a worker thread")
            })
            .collect();
        WorkerPool { shared, handles, workers }
    }

    /// Number of workers, the caller included.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Runs `job(worker, workers)` on every worker and waits for all.
    pub fn run<'a>(&self, job: &'a (dyn Fn(usize, usize) + Sync + 'a)) {
        if self.workers == 1 {
            job(0, 1);
            return;
        }
        // SAFETY: the reference is erased to 'static only for the duration of
        // this call: workers use it while `pending > 0`, and this function
        // does not return (nor clear the slot) before `pending` reaches 0.
        let erased: &'static Job =
            unsafe { std::mem::transmute::<&'a (dyn Fn(usize, usize) + Sync + 'a), &'static Job>(job) };
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(erased);
        self.shared.pending.store(self.workers - 1, Ordering::SeqCst);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        if self.shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.shared.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        job(0, self.workers);
        let mut polls = 0u32;
        while self.shared.pending.load(Ordering::Acquire) > 0 {
            polls += 1;
            if polls < SPIN_POLLS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn worker_loop(shared: &Shared, index: usize, workers: usize) {
    let mut seen = 0u64;
    loop {
        let mut polls = 0u32;
        while shared.generation.load(Ordering::SeqCst) == seen && !shared.shutdown.load(Ordering::SeqCst) {
            polls += 1;
            if polls < SPIN_POLLS {
                std::hint::spin_loop();
                continue;
            }
            let mut guard = shared.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.sleepers.fetch_add(1, Ordering::SeqCst);
            while shared.generation.load(Ordering::SeqCst) == seen && !shared.shutdown.load(Ordering::SeqCst) {
                guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        seen = shared.generation.load(Ordering::SeqCst);
        let job = *shared.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            job(index, workers);
        }
        shared.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

/// The contiguous share `[start, end)` of `n` items that worker `worker` of
/// `workers` takes.
pub fn share(n: usize, worker: usize, workers: usize) -> std::ops::Range<usize> {
    (n * worker / workers)..(n * (worker + 1) / workers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_runs_each_job_once() {
        let pool = WorkerPool::new(3);
        let hits = [AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0)];
        for round in 1..=500 {
            pool.run(&|w, n| {
                assert_eq!(n, 3);
                hits[w].fetch_add(1, Ordering::SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == round));
        }
    }

    #[test]
    fn workers_wake_after_sleeping_and_shares_cover_everything() {
        let pool = WorkerPool::new(2);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let total = AtomicUsize::new(0);
        pool.run(&|w, n| {
            total.fetch_add(share(1001, w, n).len(), Ordering::SeqCst);
        });
        assert_eq!(total.load(Ordering::SeqCst), 1001);
    }
}
