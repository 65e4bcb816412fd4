//! Per-connection pool of O_DIRECT-aligned buffers, by power-of-two size class, so the data
//! path allocates nothing per request once warm.
//!
//! A bounded pool ([`BufPool::bounded`]) also caps memory (DESIGN invariant 6): the bytes it
//! has handed out and not got back (a connection's bytes in flight) stay within the
//! connection's budget, and with every other bounded pool of the agent within the agent's
//! [`Budget`]. A request that does not fit gets no buffer ([`BufPool::try_take`] returns
//! None) and the caller waits for buffers to come back: back-pressure, never an allocation
//! beyond the bound and never a failed request.
//!
//! Invariants:
//! - Every buffer handed out has a length that is a multiple of [`ferry_sys::DIRECT_ALIGN`]
//!   and at least what was asked.
//! - Bounded: handed out + kept ≤ the connection's budget, except that a connection holding
//!   nothing may always take one buffer (a single request larger than the budget must not
//!   wait forever); the agent's handed-out total ≤ its budget with the same exception for an
//!   agent holding nothing; the agent's kept total ≤ its keep limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use ferry_sys::{AlignedBuf, DIRECT_ALIGN};

/// Size classes from 4 KiB (2^12) to 64 MiB (2^26).
const CLASS_MIN_SHIFT: u32 = 12;
const CLASS_COUNT: usize = 15;

/// Buffers kept per class: many small ones (deep queues of 4 KiB I/O), few large ones.
fn keep_per_class(class: usize) -> usize {
    match class {
        0..=4 => 256, // up to 64 KiB
        5..=8 => 16,  // up to 1 MiB
        _ => 2,
    }
}

/// The agent-wide bytes budget shared by every bounded pool. Counted with atomics, so the
/// data path takes no lock per buffer; only a connection waiting for the budget sleeps.
#[derive(Debug)]
pub struct Budget {
    /// Bytes handed out by all pools at once.
    limit_bytes: usize,
    /// Bytes kept in all pools' free lists at once.
    keep_limit_bytes: usize,
    out_bytes: AtomicUsize,
    kept_bytes: AtomicUsize,
    /// Connections in [`Budget::wait_freed`]: givers notify only when someone waits.
    waiters: AtomicUsize,
    sleep: Mutex<()>,
    freed: Condvar,
}

impl Budget {
    /// A budget of `limit_bytes` handed out; pools keep at most a quarter of it in reserve.
    pub fn new(limit_bytes: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit_bytes,
            keep_limit_bytes: limit_bytes / 4,
            out_bytes: AtomicUsize::new(0),
            kept_bytes: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            freed: Condvar::new(),
        })
    }

    /// Bytes handed out now, by all pools.
    pub fn out_bytes(&self) -> usize {
        self.out_bytes.load(Ordering::Relaxed)
    }

    fn try_hand_out(&self, bytes: usize) -> bool {
        // Relaxed: a count, not a guard of other memory.
        self.out_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |out| {
                (out == 0 || out + bytes <= self.limit_bytes).then_some(out + bytes)
            })
            .is_ok()
    }

    /// A handed-out buffer of `bytes` comes back: true if the pool, which `wants` to, may
    /// keep it.
    fn back_kept(&self, bytes: usize, wants: bool) -> bool {
        let keep = wants
            && self
                .kept_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |kept| {
                    (kept + bytes <= self.keep_limit_bytes).then_some(kept + bytes)
                })
                .is_ok();
        let _ = self
            .out_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |out| {
                Some(out.saturating_sub(bytes))
            });
        // SeqCst with the waiter's increment: either the waiter sees the bytes back, or
        // this sees the waiter (and then its timed wait bounds a missed wake-up anyway).
        if bytes > 0 && self.waiters.load(Ordering::SeqCst) > 0 {
            let _guard = self.sleep.lock().unwrap_or_else(PoisonError::into_inner);
            self.freed.notify_all();
        }
        keep
    }

    /// A kept buffer of `bytes` is handed out again, whatever the limit.
    fn kept_out(&self, bytes: usize) {
        self.kept_freed(bytes);
        self.force_out(bytes);
    }

    /// A new buffer of `bytes` is handed out, whatever the limit.
    fn force_out(&self, bytes: usize) {
        self.out_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn kept_freed(&self, bytes: usize) {
        let _ = self
            .kept_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |kept| {
                Some(kept.saturating_sub(bytes))
            });
    }

    /// Waits up to `timeout` for some pool to give bytes back.
    pub fn wait_freed(&self, timeout: Duration) {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let guard = self.sleep.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = self
            .freed
            .wait_timeout(guard, timeout)
            .unwrap_or_else(PoisonError::into_inner);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The bound of a bounded pool.
#[derive(Debug)]
struct Bound {
    /// The connection's budget: handed out + kept.
    limit_bytes: usize,
    out_bytes: usize,
    kept_bytes: usize,
    budget: Arc<Budget>,
}

/// A free list per size class.
#[derive(Debug)]
pub struct BufPool {
    classes: Vec<Vec<AlignedBuf>>,
    bound: Option<Bound>,
}

impl Default for BufPool {
    fn default() -> Self {
        Self::new()
    }
}

impl BufPool {
    /// An empty pool without a bound (peer streams, whose depth bounds them).
    pub fn new() -> Self {
        BufPool {
            classes: (0..CLASS_COUNT).map(|_| Vec::new()).collect(),
            bound: None,
        }
    }

    /// An empty pool holding at most `limit_bytes` (handed out + kept), its handed-out bytes
    /// counted in the agent's `budget`.
    pub fn bounded(limit_bytes: usize, budget: Arc<Budget>) -> Self {
        BufPool {
            classes: (0..CLASS_COUNT).map(|_| Vec::new()).collect(),
            bound: Some(Bound {
                limit_bytes,
                out_bytes: 0,
                kept_bytes: 0,
                budget,
            }),
        }
    }

    fn class_of(len_bytes: usize) -> usize {
        let rounded = len_bytes.max(DIRECT_ALIGN).next_power_of_two();
        let class = (rounded.trailing_zeros() - CLASS_MIN_SHIFT) as usize;
        assert!(
            class < CLASS_COUNT,
            "buffer of {len_bytes} bytes is beyond the largest class"
        );
        class
    }

    fn class_bytes(class: usize) -> usize {
        1 << (class as u32 + CLASS_MIN_SHIFT)
    }

    /// A buffer of at least `len_bytes` (contents unspecified), whatever the bound: for
    /// unbounded pools.
    pub fn take(&mut self, len_bytes: usize) -> AlignedBuf {
        let class = Self::class_of(len_bytes);
        if let Some(buf) = self.classes[class].pop() {
            if let Some(bound) = &mut self.bound {
                bound.kept_bytes -= buf.len();
                bound.out_bytes += buf.len();
                bound.budget.kept_out(buf.len());
            }
            return buf;
        }
        let bytes = Self::class_bytes(class);
        if let Some(bound) = &mut self.bound {
            bound.out_bytes += bytes;
            bound.budget.force_out(bytes);
        }
        AlignedBuf::zeroed(bytes, DIRECT_ALIGN)
    }

    /// A buffer of at least `len_bytes` if the bounds allow it now; None: wait for buffers
    /// to come back (this pool's, or the agent's: [`BufPool::wait_budget`]).
    pub fn try_take(&mut self, len_bytes: usize) -> Option<AlignedBuf> {
        let class = Self::class_of(len_bytes);
        let Some(bound) = &mut self.bound else {
            return Some(self.take(len_bytes));
        };
        let bytes = Self::class_bytes(class);
        if let Some(buf) = self.classes[class].pop() {
            // Already allocated and counted in this pool's bound; only the agent's
            // handed-out total must allow it.
            if !bound.budget.try_hand_out(buf.len()) {
                self.classes[class].push(buf);
                return None;
            }
            bound.budget.kept_freed(buf.len());
            bound.kept_bytes -= buf.len();
            bound.out_bytes += buf.len();
            return Some(buf);
        }
        if bound.out_bytes > 0 && bound.out_bytes + bytes > bound.limit_bytes {
            return None;
        }
        // Make room: free kept buffers of other classes, largest first.
        let mut class_freed = CLASS_COUNT;
        while bound.out_bytes + bound.kept_bytes + bytes > bound.limit_bytes && class_freed > 0 {
            class_freed -= 1;
            for buf in self.classes[class_freed].drain(..) {
                bound.kept_bytes -= buf.len();
                bound.budget.kept_freed(buf.len());
            }
        }
        if !bound.budget.try_hand_out(bytes) {
            return None;
        }
        bound.out_bytes += bytes;
        Some(AlignedBuf::zeroed(bytes, DIRECT_ALIGN))
    }

    /// Waits up to `timeout` for the agent's budget to free bytes (a connection that holds
    /// nothing and still got no buffer waits here).
    pub fn wait_budget(&self, timeout: Duration) {
        if let Some(bound) = &self.bound {
            bound.budget.wait_freed(timeout);
        }
    }

    /// Bytes handed out and not given back yet.
    pub fn out_bytes(&self) -> usize {
        self.bound.as_ref().map_or(0, |bound| bound.out_bytes)
    }

    /// Returns a buffer; beyond the class's quota (or the bounds on kept bytes) it is freed.
    pub fn give(&mut self, buf: AlignedBuf) {
        let len = buf.len();
        let ours = len.is_power_of_two() && len >= DIRECT_ALIGN;
        let class = ours.then(|| Self::class_of(len));
        let room = class.is_some_and(|class| self.classes[class].len() < keep_per_class(class));
        let Some(bound) = &mut self.bound else {
            if let (Some(class), true) = (class, room) {
                self.classes[class].push(buf);
            }
            return;
        };
        bound.out_bytes = bound.out_bytes.saturating_sub(len);
        let fits = bound.out_bytes + bound.kept_bytes + len <= bound.limit_bytes;
        if bound.budget.back_kept(len, room && fits) {
            if let Some(class) = class {
                bound.kept_bytes += len;
                self.classes[class].push(buf);
            }
        }
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        if let Some(bound) = &self.bound {
            // Buffers never given back (a failed engine kept them) are freed with their owner.
            bound.budget.back_kept(bound.out_bytes, false);
            bound.budget.kept_freed(bound.kept_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: sizes round up to an aligned class and buffers are reused; method: take/give.
    #[test]
    fn classes_and_reuse() {
        let mut pool = BufPool::new();
        let a = pool.take(1);
        assert_eq!(a.len(), 4096);
        let b = pool.take(4097);
        assert_eq!(b.len(), 8192);
        let big = pool.take(32 * 1024 * 1024 + 8192);
        assert_eq!(big.len(), 64 * 1024 * 1024);
        pool.give(a);
        assert_eq!(pool.classes[0].len(), 1);
        let again = pool.take(100);
        assert_eq!(again.len(), 4096);
        assert!(pool.classes[0].is_empty());
    }

    const MIB: usize = 1 << 20;

    // Goal: a bounded pool hands out at most its budget, except one buffer when it holds
    // nothing, and gives room back when buffers return. Method: 64 MiB budget, 32 MiB+4 KiB
    // reads (64 MiB buffers, the unaligned 32 MiB READ of the amplification report).
    #[test]
    fn bounded_pool_backpressures() {
        let budget = Budget::new(1024 * MIB);
        let mut pool = BufPool::bounded(64 * MIB, budget.clone());
        let first = pool
            .try_take(32 * MIB + 4096)
            .expect("alone: always one buffer");
        assert_eq!(first.len(), 64 * MIB);
        assert!(pool.try_take(32 * MIB + 4096).is_none(), "over the budget");
        assert!(pool.try_take(4096).is_none(), "the budget is full");
        assert_eq!(budget.out_bytes(), 64 * MIB);
        pool.give(first);
        assert_eq!(pool.out_bytes(), 0);
        assert_eq!(budget.out_bytes(), 0);
        let again = pool.try_take(40 * MIB).expect("room again");
        assert_eq!(again.len(), 64 * MIB);
        pool.give(again);
        // Small buffers fit beside each other until the budget.
        let smalls: Vec<_> = (0..16).map_while(|_| pool.try_take(4 * MIB)).collect();
        assert_eq!(smalls.len(), 16, "kept buffers are freed to make room");
        assert!(pool.try_take(4 * MIB).is_none());
        for buf in smalls {
            pool.give(buf);
        }
        drop(pool);
        assert_eq!(budget.out_bytes(), 0);
    }

    // Goal: the agent's budget bounds all pools together; a pool holding nothing still waits
    // when other pools hold the agent's budget, and proceeds when they give back. Method: a
    // 128 MiB agent budget and three pools of 64 MiB.
    #[test]
    fn agent_budget_spans_pools() {
        let budget = Budget::new(128 * MIB);
        let mut a = BufPool::bounded(64 * MIB, budget.clone());
        let mut b = BufPool::bounded(64 * MIB, budget.clone());
        let mut c = BufPool::bounded(64 * MIB, budget.clone());
        let a_buf = a.try_take(64 * MIB).unwrap();
        let b_buf = b.try_take(64 * MIB).unwrap();
        assert!(c.try_take(4096).is_none(), "the agent's budget is spent");
        c.wait_budget(Duration::from_millis(1));
        a.give(a_buf);
        // a kept its buffer (within the keep limit of 32 MiB? no: 64 MiB is beyond it).
        assert_eq!(budget.out_bytes(), 64 * MIB);
        let c_buf = c.try_take(4096).expect("room after a gave back");
        drop(c_buf); // lost, never given back: the pool's drop returns its count
        drop(c);
        b.give(b_buf);
        drop(b);
        assert_eq!(budget.out_bytes(), 0);
    }

    // Goal: a connection waiting for the agent's budget wakes when another gives back, not
    // at its timeout. Method: a waiter with a 5 s timeout; a give-back 50 ms later.
    #[test]
    fn waiting_for_the_budget_wakes_on_give_back() {
        let budget = Budget::new(64 * MIB);
        let mut holder = BufPool::bounded(64 * MIB, budget.clone());
        let held = holder.try_take(64 * MIB).unwrap();
        let waiter = {
            let budget = budget.clone();
            std::thread::spawn(move || {
                let mut pool = BufPool::bounded(64 * MIB, budget);
                let started = std::time::Instant::now();
                while pool.try_take(4096).is_none() {
                    pool.wait_budget(Duration::from_secs(5));
                }
                started.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        holder.give(held);
        let waited = waiter.join().unwrap();
        assert!(waited < Duration::from_secs(4), "woke after {waited:?}");
    }

    // Goal: unbounded pools behave as before and never count against a budget.
    #[test]
    fn unbounded_try_take_always_succeeds() {
        let mut pool = BufPool::new();
        let bufs: Vec<_> = (0..4).map(|_| pool.try_take(64 * MIB).unwrap()).collect();
        assert_eq!(pool.out_bytes(), 0);
        drop(bufs);
    }
}
