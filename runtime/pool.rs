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
//! A job that panics on a worker thread is caught there (the worker still
//! counts the job done and lives on); `run` waits for every worker and then
//! re-raises the panic on the caller, once, as `std::thread::scope` does. A
//! panic of the caller's own share also waits for every worker (a drop
//! guard) before it unwinds, so no worker ever touches buffers the caller
//! has dropped.
//!
//! Invariants: `run` performs no heap allocation and spawns nothing when no
//! job panics; a job never outlives the `run` call that issued it, whether it
//! returns or panics; after a panic the pool is as usable as before.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
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
    /// The first panic of a worker during the current job.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
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
    /// Jobs run, and nanoseconds the caller waited for the other workers
    /// after finishing its own share (see [`PoolStats`]).
    jobs: AtomicU64,
    wait_ns: AtomicU64,
}

/// What the pool's joins cost so far: `jobs` parallel jobs (`run` calls
/// with more than one worker), and `caller_wait_ns`, the time the caller
/// spent at the join after its own share was done — load imbalance plus
/// the workers' wake-up and hand-back latency.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Parallel jobs run.
    pub jobs: u64,
    /// Nanoseconds the caller waited at their joins.
    pub caller_wait_ns: u64,
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
            panic: Mutex::new(None),
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
        WorkerPool { shared, handles, workers, jobs: AtomicU64::new(0), wait_ns: AtomicU64::new(0) }
    }

    /// Joins so far and the caller's time waiting at them.
    pub fn stats(&self) -> PoolStats {
        PoolStats { jobs: self.jobs.load(Ordering::Relaxed), caller_wait_ns: self.wait_ns.load(Ordering::Relaxed) }
    }

    /// Number of workers, the caller included.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Runs `job(worker, workers)` on every worker and waits for all.
    ///
    /// # Panics
    /// When the job panics on any worker: after every worker has finished,
    /// the caller's own panic or else the first worker's is raised here.
    pub fn run<'a>(&self, job: &'a (dyn Fn(usize, usize) + Sync + 'a)) {
        if self.workers == 1 {
            job(0, 1);
            return;
        }
        // SAFETY: the reference is erased to 'static only for the duration of
        // this call: workers use it while `pending > 0`, and this function
        // neither returns nor unwinds (see `WaitForWorkers`) before `pending`
        // reaches 0 and the slot is cleared.
        let erased: &'static Job =
            unsafe { std::mem::transmute::<&'a (dyn Fn(usize, usize) + Sync + 'a), &'static Job>(job) };
        *lock(&self.shared.job) = Some(erased);
        assert_eq!(self.shared.pending.load(Ordering::SeqCst), 0, "a job is already running");
        self.shared.pending.store(self.workers - 1, Ordering::SeqCst);
        let waiter = WaitForWorkers(&self.shared);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        if self.shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = lock(&self.shared.wake_lock);
            self.shared.wake.notify_all();
        }
        job(0, self.workers);
        let own_share_done = std::time::Instant::now();
        drop(waiter);
        self.jobs.fetch_add(1, Ordering::Relaxed);
        self.wait_ns.fetch_add(own_share_done.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Some(payload) = lock(&self.shared.panic).take() {
            resume_unwind(payload);
        }
    }
}

/// Waits until every worker has finished the current job and clears it, on
/// return and on unwind alike.
struct WaitForWorkers<'a>(&'a Shared);

impl Drop for WaitForWorkers<'_> {
    fn drop(&mut self) {
        let mut polls = 0u32;
        while self.0.pending.load(Ordering::Acquire) > 0 {
            polls += 1;
            if polls < SPIN_POLLS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *lock(&self.0.job) = None;
        if std::thread::panicking() {
            // The caller's panic wins; a worker's would be a second one.
            lock(&self.0.panic).take();
        }
    }
}

/// Locks `m`, ignoring poisoning (no lock here is held across a job).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
            let mut guard = lock(&shared.wake_lock);
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
        let job = *lock(&shared.job);
        if let Some(job) = job {
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| job(index, workers))) {
                lock(&shared.panic).get_or_insert(payload);
            }
        }
        shared.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _guard = lock(&self.shared.wake_lock);
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
    fn stats_count_every_parallel_join() {
        let pool = WorkerPool::new(2);
        for _ in 0..3 {
            pool.run(&|_, _| {});
        }
        assert_eq!(pool.stats().jobs, 3);
        let single = WorkerPool::new(1);
        single.run(&|_, _| {});
        assert_eq!(single.stats(), PoolStats::default(), "one worker never joins");
    }

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

    /// Runs `job` on `pool`, expecting it to panic; returns the message.
    fn panic_message(pool: &WorkerPool, job: &(dyn Fn(usize, usize) + Sync)) -> String {
        let payload = catch_unwind(AssertUnwindSafe(|| pool.run(job))).expect_err("the job panicked");
        payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
    }

    #[test]
    fn a_panicking_job_panics_the_caller_once_after_every_worker_finished() {
        let pool = WorkerPool::new(3);
        for panicking in [1, 2, 0] {
            let finished = AtomicUsize::new(0);
            let message = panic_message(&pool, &|w, _| {
                if w == panicking {
                    panic!("worker {w} failed");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                finished.fetch_add(1, Ordering::SeqCst);
            });
            assert_eq!(message, format!("worker {panicking} failed"));
            // Both other workers had finished when the panic reached the caller.
            assert_eq!(finished.load(Ordering::SeqCst), 2);
            // The pool is usable afterwards: every worker runs the next job once.
            let hits = [AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0)];
            pool.run(&|w, _| {
                hits[w].fetch_add(1, Ordering::SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == 1));
        }
    }

    #[test]
    fn the_callers_panic_wins_over_a_workers() {
        let pool = WorkerPool::new(2);
        assert_eq!(panic_message(&pool, &|w, _| panic!("from {w}")), "from 0");
        let total = AtomicUsize::new(0);
        pool.run(&|_, _| {
            total.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(total.load(Ordering::SeqCst), 2);
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
