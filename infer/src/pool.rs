//! A small persistent thread pool for per-token work.
//!
//! A token's forward pass makes hundreds of parallel calls (one per matrix), each a few
//! microseconds to a few milliseconds long, so a call must cost little: [`Pool::run`]
//! publishes the job with one atomic epoch bump, workers that are spinning pick it up
//! within nanoseconds, and the caller does worker 0's share itself. Idle workers spin for a
//! short while ([`SPIN_HOT`]), then yield their time slice until [`SPIN`] has passed, then
//! sleep on a condition variable: an idle pool burns no CPU.
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use tern_infer::pool::{split_range, Pool};
//!
//! let pool = Pool::new(4);
//! let data: Vec<usize> = (0..1000).collect();
//! let total = AtomicUsize::new(0);
//! pool.run(|i, n| {
//!     let part: usize = data[split_range(data.len(), 8, i, n)].iter().sum();
//!     total.fetch_add(part, Ordering::Relaxed);
//! });
//! assert_eq!(total.into_inner(), 999 * 1000 / 2);
//! ```

use std::any::Any;
use std::cell::UnsafeCell;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker (or a waiting caller) busy-spins before it starts yielding.
pub const SPIN_HOT: Duration = Duration::from_micros(20);
/// How long an idle worker (or a waiting caller) waits (spinning, then yielding its time
/// slice to other threads) before it sleeps on a condition variable.
pub const SPIN: Duration = Duration::from_micros(300);

/// Spin-then-yield waiting; `snooze` returns false once the thread should sleep instead.
struct Backoff {
    start: Instant,
    spins: u32,
    yielding: bool,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            start: Instant::now(),
            spins: 0,
            yielding: false,
        }
    }

    #[inline]
    fn snooze(&mut self) -> bool {
        if self.yielding {
            if self.start.elapsed() >= SPIN {
                return false;
            }
            // Lets an oversubscribed machine run the threads we are waiting for.
            std::thread::yield_now();
            return true;
        }
        self.spins = self.spins.wrapping_add(1);
        if self.spins.is_multiple_of(64) && self.start.elapsed() >= SPIN_HOT {
            self.yielding = true;
        }
        std::hint::spin_loop();
        true
    }
}

/// The job of one `run` call, type-erased. Lives on the caller's stack for that call.
type Job<'a> = &'a (dyn Fn(usize, usize) + Sync + 'a);

struct Shared {
    /// Bumped once per `run` (and once more at shutdown); workers wait for it to change.
    epoch: AtomicU64,
    /// The current job: written by the caller before it bumps `epoch`, read by workers after
    /// they see the new epoch, not touched again until every worker reported done.
    job: UnsafeCell<Option<Job<'static>>>,
    /// Workers (not counting the caller) still running the current job.
    pending: AtomicUsize,
    /// Set at drop: workers exit.
    shutdown: AtomicBool,
    /// Workers asleep (or about to sleep) on `wake`.
    sleepers: AtomicUsize,
    /// Whether the caller is asleep (or about to sleep) on `done`.
    caller_sleeping: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
    done: Condvar,
    /// The first panic payload of the current job's workers.
    panic: Mutex<Option<Box<dyn Any + Send + 'static>>>,
}

// SAFETY: `job` is the only non-Sync field. It is written only by the thread inside `run`
// (serialized by `Pool::busy`) while no worker reads it (all finished the previous job:
// `pending == 0`), and read by workers only between the epoch bump (Release/Acquire) that
// publishes the write and their `pending` decrement (Release), after which the caller
// (Acquire) may write it again. The referenced closure is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: see above; the `Job` reference is only dereferenced while `run` keeps its
// referent alive, and the closure is `Sync`, so using it from worker threads is fine.
unsafe impl Send for Shared {}

/// A persistent pool of `threads - 1` worker threads plus the calling thread.
pub struct Pool {
    threads: usize,
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    /// Set while a `run` is in progress: a concurrent or nested `run` executes inline.
    busy: AtomicBool,
}

impl Pool {
    /// A pool of `threads` threads *including the caller* (`threads - 1` are spawned;
    /// `0` is treated as `1`; `1` runs every job inline on the calling thread).
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            caller_sleeping: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            done: Condvar::new(),
            panic: Mutex::new(None),
        });
        let handles = (1..threads)
            .map(|index| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("tern-worker-{index}"))
                    .spawn(move || worker_loop(&shared, index, threads))
                    .expect("failed to spawn a pool worker thread")
            })
            .collect();
        Pool {
            threads,
            shared,
            handles,
            busy: AtomicBool::new(false),
        }
    }

    /// Number of threads that run each job, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(worker, n)` once for every `worker in 0..n` (`n == self.threads()`), the
    /// calling thread being worker 0, and returns when all are done.
    ///
    /// If `f` panics on any worker, the panic is re-raised here once every worker has
    /// finished (the pool stays usable). A nested call (from inside `f`) or a call from
    /// another thread while a job is running does not deadlock: it runs `f(0, n)`,
    /// `f(1, n)`, … sequentially on its own thread.
    pub fn run<F: Fn(usize, usize) + Sync>(&self, f: F) {
        let n = self.threads;
        if n == 1 {
            f(0, 1);
            return;
        }
        if self.busy.swap(true, Acquire) {
            for i in 0..n {
                f(i, n);
            }
            return;
        }
        let sh = &*self.shared;
        let job: Job<'_> = &f;
        // SAFETY: erasing the lifetime is sound because this function does not return (nor
        // unwind) before every worker has finished with the job (`pending == 0` below) and
        // `job` is cleared again before returning.
        let job: Job<'static> = unsafe { std::mem::transmute::<Job<'_>, Job<'static>>(job) };
        // SAFETY: `busy` gives this thread exclusive use of the job slot, and no worker reads
        // it now: the previous run waited for `pending == 0` (Acquire).
        unsafe { *sh.job.get() = Some(job) };
        sh.pending.store(n - 1, Relaxed);
        // SeqCst pairs with the workers' `sleepers` increment + epoch re-check.
        sh.epoch.fetch_add(1, SeqCst);
        if sh.sleepers.load(SeqCst) > 0 {
            let _g = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.wake.notify_all();
        }

        let mine = catch_unwind(AssertUnwindSafe(|| f(0, n)));

        // Wait for the workers: spin, yield, then sleep.
        let mut backoff = Backoff::new();
        while sh.pending.load(Acquire) != 0 {
            if backoff.snooze() {
                continue;
            }
            let mut g = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.caller_sleeping.store(true, SeqCst);
            while sh.pending.load(SeqCst) != 0 {
                g = sh.done.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            sh.caller_sleeping.store(false, SeqCst);
        }
        // SAFETY: every worker is done with the job (pending == 0, Acquire); clear the slot
        // so no dangling reference outlives `f`.
        unsafe { *sh.job.get() = None };
        let theirs = sh.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.busy.store(false, Release);
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if let Some(p) = theirs {
            resume_unwind(p);
        }
    }

    /// Cuts `out` into `parts` pieces ([`split_range`]`(out.len(), align, c, parts)`) and
    /// runs `f(worker, range, &mut out[range])` for each, the workers claiming pieces one at
    /// a time: the safe way for workers to write disjoint parts of one output (e.g. the rows
    /// of a GEMV, `align` = 4 rows). With several pieces per worker, a worker slowed down by
    /// other load on its core ends up doing less of the work instead of keeping the others
    /// waiting. `f` receives the index of the worker running it. Same panic and nesting
    /// behaviour as [`Pool::run`].
    pub fn run_chunks<T, F>(&self, out: &mut [T], align: usize, parts: usize, f: F)
    where
        T: Send,
        F: Fn(usize, Range<usize>, &mut [T]) + Sync,
    {
        let len = out.len();
        let parts = parts.max(1);
        let base = SendPtr(out.as_mut_ptr());
        let next = AtomicUsize::new(0);
        self.run(|i, _| loop {
            let c = next.fetch_add(1, Relaxed);
            if c >= parts {
                break;
            }
            let r = split_range(len, align, c, parts);
            let base = &base;
            // SAFETY: `out` is exclusively borrowed for this call and `run` returns only
            // after every worker finished; each piece index `c` is claimed by exactly one
            // worker (`fetch_add`), and the pieces of distinct indices are disjoint and inside
            // `0..len` (split_range), so each slice is a unique borrow of its part.
            let part = unsafe { std::slice::from_raw_parts_mut(base.0.add(r.start), r.len()) };
            f(i, r, part);
        });
    }
}

/// A raw pointer that may be shared with the workers of one `run_chunks` call.
struct SendPtr<T>(*mut T);
// SAFETY: only used by `run_chunks`, which hands out disjoint parts; `T: Send`.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl Drop for Pool {
    fn drop(&mut self) {
        let sh = &*self.shared;
        sh.shutdown.store(true, SeqCst);
        sh.epoch.fetch_add(1, SeqCst);
        {
            let _g = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads)
            .finish()
    }
}

fn worker_loop(sh: &Shared, index: usize, n: usize) {
    let mut seen = 0u64;
    loop {
        // Wait for a new epoch: spin, yield, then sleep.
        let mut backoff = Backoff::new();
        let epoch = loop {
            let e = sh.epoch.load(Acquire);
            if e != seen {
                break e;
            }
            if backoff.snooze() {
                continue;
            }
            let mut g = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.sleepers.fetch_add(1, SeqCst);
            while sh.epoch.load(SeqCst) == seen {
                g = sh.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            sh.sleepers.fetch_sub(1, SeqCst);
        };
        seen = epoch;
        if sh.shutdown.load(SeqCst) {
            return;
        }
        // SAFETY: the caller wrote the job before bumping the epoch we just observed
        // (Acquire), and keeps it alive until we decrement `pending` below.
        let job = unsafe { *sh.job.get() };
        if let Some(job) = job {
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| job(index, n))) {
                let mut slot = sh.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(p);
            }
        }
        if sh.pending.fetch_sub(1, SeqCst) == 1 && sh.caller_sleeping.load(SeqCst) {
            let _g = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.done.notify_all();
        }
    }
}

/// The part of `0..len` that `worker` of `n` handles: `len` is cut into units of `align`
/// (the last may be shorter) and the units are dealt out as evenly as possible (the first
/// `units % n` workers get one more). Ranges are contiguous, disjoint, in worker order,
/// and cover `0..len`; a worker may get an empty range.
pub fn split_range(len: usize, align: usize, worker: usize, n: usize) -> Range<usize> {
    assert!(n > 0 && worker < n, "split_range: worker {worker} of {n}");
    let align = align.max(1);
    let units = len.div_ceil(align);
    let (base, extra) = (units / n, units % n);
    let start = worker * base + worker.min(extra);
    let end = start + base + usize::from(worker < extra);
    (start * align).min(len)..(end * align).min(len)
}

/// Default worker count: the number of physical cores available to this process.
///
/// Starts from [`std::thread::available_parallelism`] (logical CPUs, honouring the affinity
/// mask and cgroup quota); on Linux, when sysfs shows SMT siblings, it is scaled by
/// cores / logical CPUs, since the memory-bound kernels gain nothing from a second
/// hyper-thread on a core. Always at least 1.
pub fn physical_cores() -> usize {
    let avail = std::thread::available_parallelism().map_or(1, |n| n.get());
    match smt_ratio() {
        Some((cores, logical)) if logical > cores && cores > 0 => {
            (avail * cores).div_ceil(logical).max(1)
        }
        _ => avail,
    }
}

/// (physical cores, logical CPUs) of the machine from Linux sysfs, if readable.
fn smt_ratio() -> Option<(usize, usize)> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu").ok()?;
    let mut logical = 0usize;
    let mut cores = std::collections::HashSet::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let name = name.to_str()?;
        let Some(num) = name.strip_prefix("cpu") else {
            continue;
        };
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let topo = entry.path().join("topology");
        let read = |f: &str| std::fs::read_to_string(topo.join(f)).ok();
        let (Some(pkg), Some(core)) = (read("physical_package_id"), read("core_id")) else {
            continue;
        };
        logical += 1;
        cores.insert((pkg.trim().to_owned(), core.trim().to_owned()));
    }
    (logical > 0).then_some((cores.len(), logical))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI64;

    #[test]
    fn split_range_covers_evenly() {
        for len in [0usize, 1, 5, 31, 32, 33, 100, 2560, 6912] {
            for align in [1usize, 4, 16, 128] {
                for n in 1..=9 {
                    let mut next = 0;
                    let units = len.div_ceil(align);
                    for w in 0..n {
                        let r = split_range(len, align, w, n);
                        assert_eq!(r.start, next, "len={len} align={align} n={n} w={w}");
                        assert!(r.end >= r.start && r.end <= len);
                        if r.end < len {
                            assert_eq!(r.end % align, 0);
                        }
                        let u = r.len().div_ceil(align);
                        assert!(u == units / n || u == units / n + 1);
                        next = r.end;
                    }
                    assert_eq!(next, len);
                }
            }
        }
    }

    #[test]
    fn runs_every_worker_once_per_call() {
        for threads in [1usize, 2, 3, 5] {
            let pool = Pool::new(threads);
            assert_eq!(pool.threads(), threads);
            for call in 0..2000u64 {
                let hits: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
                pool.run(|i, n| {
                    assert_eq!(n, threads);
                    hits[i].fetch_add(1, Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "call {call}");
            }
        }
    }

    #[test]
    fn results_correct_across_many_calls_with_sleeps() {
        let pool = Pool::new(3);
        let data: Vec<i64> = (0..10_007).map(|v| v * 7 - 3).collect();
        let want: i64 = data.iter().sum();
        for call in 0..300 {
            if call % 50 == 0 {
                // let the workers fall asleep, then wake them
                std::thread::sleep(SPIN * 3);
            }
            let total = AtomicI64::new(0);
            let mut out = vec![0i64; data.len()];
            let out_ptr = out.as_mut_ptr() as usize;
            pool.run(|i, n| {
                let r = split_range(data.len(), 16, i, n);
                let mut s = 0;
                for k in r {
                    s += data[k];
                    // SAFETY: the ranges of distinct workers are disjoint.
                    unsafe { *(out_ptr as *mut i64).add(k) = data[k] * 2 };
                }
                total.fetch_add(s, Relaxed);
            });
            assert_eq!(total.load(Relaxed), want);
            assert!(out.iter().zip(&data).all(|(o, d)| *o == d * 2));
        }
    }

    #[test]
    fn nested_and_concurrent_use_does_not_deadlock() {
        let pool = Pool::new(3);
        let count = AtomicUsize::new(0);
        pool.run(|_, _| {
            pool.run(|_, _| {
                count.fetch_add(1, Relaxed);
            });
        });
        assert_eq!(count.load(Relaxed), 9);
        // several threads sharing one pool
        let count = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..200 {
                        pool.run(|_, _| {
                            count.fetch_add(1, Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(count.load(Relaxed), 3 * 200 * 3);
    }

    #[test]
    fn panics_propagate_and_pool_survives() {
        let pool = Pool::new(3);
        for bad in 0..3 {
            let r = catch_unwind(AssertUnwindSafe(|| {
                pool.run(|i, _| {
                    if i == bad {
                        panic!("worker {i} fails");
                    }
                })
            }));
            let msg = r.expect_err("panic must propagate");
            let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
            assert_eq!(msg, format!("worker {bad} fails"));
            let count = AtomicUsize::new(0);
            pool.run(|_, _| {
                count.fetch_add(1, Relaxed);
            });
            assert_eq!(count.load(Relaxed), 3);
        }
    }

    #[test]
    fn run_chunks_covers_every_element_once() {
        for threads in [1usize, 2, 3] {
            let pool = Pool::new(threads);
            for len in [0usize, 1, 7, 100, 1001] {
                for parts in [1usize, 2, 5, 64] {
                    let mut out = vec![0usize; len];
                    let workers: Vec<AtomicUsize> = (0..threads).map(|_| 0.into()).collect();
                    pool.run_chunks(&mut out, 4, parts, |w, r, part| {
                        assert_eq!(r.len(), part.len());
                        assert!(r.is_empty() || r.start % 4 == 0, "piece {r:?} not aligned");
                        workers[w].fetch_add(1, Relaxed);
                        for (k, v) in r.zip(part.iter_mut()) {
                            *v += k * 3 + 1;
                        }
                    });
                    // Every element written exactly once, whichever worker took its piece.
                    assert!(out.iter().enumerate().all(|(k, &v)| v == k * 3 + 1));
                    let pieces: usize = workers.iter().map(|c| c.load(Relaxed)).sum();
                    assert_eq!(pieces, parts, "len {len}");
                }
            }
        }
    }

    #[test]
    fn physical_cores_is_sane() {
        let p = physical_cores();
        let a = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(p >= 1 && p <= a, "{p} vs {a}");
    }

    /// Per-call overhead; run with
    /// `cargo test -p tern-infer --release --lib pool::tests::overhead -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn overhead() {
        let p = physical_cores().max(2);
        for threads in [1, 2, p, 2 * p] {
            let pool = Pool::new(threads);
            let calls = 200_000;
            let start = Instant::now();
            for _ in 0..calls {
                pool.run(|i, _| {
                    std::hint::black_box(i);
                });
            }
            let per = start.elapsed().as_secs_f64() / calls as f64 * 1e6;
            println!("pool threads={threads}: {per:.3} us per empty run()");
        }
    }
}
