//! A bounded, lock-free, single-producer single-consumer ring.
//!
//! The stages of the pipeline hand slot tokens to each other through these
//! rings. The ring is allocated once; each pass borrows a [`Producer`] and a
//! [`Consumer`] from it with [`Ring::split`], hands them to two threads, and
//! the ring is [cleared](Ring::clear) once both threads are joined.
//!
//! The design follows rtrb: `head` (next item to pop) and `tail` (next place
//! to push) live in separate cache lines; each side keeps a cached copy of the
//! other side's index and only reads the shared one when the cached copy says
//! the ring is full (producer) or empty (consumer). Indices run freely and wrap
//! at `usize::MAX`; `tail - head` (wrapping) is the number of items in the ring.
//!
//! Pushes can be *deferred*: [`Producer::write`] stores an item without making
//! it visible, and [`Producer::publish`] makes every written item visible with
//! one release store. A stage that hands over `batch` items at a time publishes
//! once per batch.

use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use crossbeam_utils::{Backoff, CachePadded};

#[cfg(loom)]
use loom::sync::atomic::{AtomicUsize, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicUsize, Ordering};

#[cfg(loom)]
use loom::cell::UnsafeCell;
#[cfg(not(loom))]
use std::cell::UnsafeCell;

/// A fixed-capacity SPSC ring of `T`.
pub struct Ring<T> {
    /// Index of the next item to pop. Written only by the consumer.
    head: CachePadded<AtomicUsize>,
    /// Index of the next place to push; items in `head..tail` are readable.
    /// Written only by the producer.
    tail: CachePadded<AtomicUsize>,
    /// `capacity` cells; item `i` lives in `cells[i % capacity]`.
    cells: Box<[UnsafeCell<MaybeUninit<T>>]>,
}

// SAFETY: the ring moves `T`s between threads (so `T: Send`), and a cell is
// only ever accessed by the side that owns it according to `head`/`tail`,
// whose updates are published with release/acquire ordering.
unsafe impl<T: Send> Send for Ring<T> {}
// SAFETY: shared access only happens through `Producer`/`Consumer`, of which
// `split` hands out exactly one each (it takes `&mut self`).
unsafe impl<T: Send> Sync for Ring<T> {}

impl<T> Ring<T> {
    /// A ring that holds up to `capacity` items (at least 1).
    pub fn new(capacity: usize) -> Ring<T> {
        let capacity = capacity.max(1);
        let cells = (0..capacity)
            .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
            .collect();
        Ring {
            head: CachePadded::new(AtomicUsize::new(0)),
            tail: CachePadded::new(AtomicUsize::new(0)),
            cells,
        }
    }

    /// How many items the ring holds when full.
    pub fn capacity(&self) -> usize {
        self.cells.len()
    }

    /// The number of items in the ring (exact when no thread is using it).
    pub fn len(&mut self) -> usize {
        let head = self.head.load(Ordering::Acquire);
        let tail = self.tail.load(Ordering::Acquire);
        tail.wrapping_sub(head)
    }

    /// Whether the ring is empty (exact when no thread is using it).
    pub fn is_empty(&mut self) -> bool {
        self.len() == 0
    }

    /// Drops every item in the ring and resets it to empty.
    pub fn clear(&mut self) {
        let (_, mut c) = self.split();
        while c.pop().is_some() {}
    }

    /// Splits the ring into its two ends for the duration of a borrow.
    ///
    /// Items written but not published by a previous producer are lost (they
    /// were never visible); since the item type of the pipeline's rings is
    /// `Copy`, nothing leaks.
    pub fn split(&mut self) -> (Producer<'_, T>, Consumer<'_, T>) {
        let head = self.head.load(Ordering::Acquire);
        let tail = self.tail.load(Ordering::Acquire);
        let ring: &Ring<T> = self;
        (
            Producer {
                ring,
                head_cache: head,
                written: tail,
                _not_sync: PhantomData,
            },
            Consumer {
                ring,
                tail_cache: tail,
                _not_sync: PhantomData,
            },
        )
    }

    fn cell(&self, index: usize) -> &UnsafeCell<MaybeUninit<T>> {
        // `index % len` is always in bounds: `cells` is never empty.
        &self.cells[index % self.cells.len()]
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The producing end of a [`Ring`]. Not `Sync`: one thread pushes.
pub struct Producer<'a, T> {
    ring: &'a Ring<T>,
    /// The last `head` this producer read; the true head is at or after it.
    head_cache: usize,
    /// One past the last item written (published or not). `ring.tail` lags
    /// behind it by the items written but not yet published.
    written: usize,
    _not_sync: PhantomData<std::cell::Cell<()>>,
}

impl<T> Producer<'_, T> {
    /// Stores `item` without making it visible to the consumer.
    ///
    /// Returns the item back if the ring is full (counting unpublished items).
    pub fn write(&mut self, item: T) -> Result<(), T> {
        let cap = self.ring.capacity();
        if self.written.wrapping_sub(self.head_cache) >= cap {
            // Acquire: the consumer's reads of the cells it released must
            // happen before we overwrite them.
            self.head_cache = self.ring.head.load(Ordering::Acquire);
            if self.written.wrapping_sub(self.head_cache) >= cap {
                return Err(item);
            }
        }
        let cell = self.ring.cell(self.written);
        #[cfg(not(loom))]
        // SAFETY: cell `written` is outside `head..written`, so the consumer
        // does not access it; only this (single) producer writes cells.
        unsafe {
            (*cell.get()).write(item);
        }
        #[cfg(loom)]
        cell.with_mut(|p| {
            // SAFETY: as above.
            unsafe { (*p).write(item) };
        });
        self.written = self.written.wrapping_add(1);
        Ok(())
    }

    /// Makes every written item visible to the consumer.
    pub fn publish(&mut self) {
        // Release: the cell writes above happen before the consumer sees the
        // new tail.
        self.ring.tail.store(self.written, Ordering::Release);
    }

    /// Writes and publishes `item`; returns it back if the ring is full.
    pub fn push(&mut self, item: T) -> Result<(), T> {
        self.write(item)?;
        self.publish();
        Ok(())
    }

    /// Items written but not yet published.
    pub fn unpublished(&self) -> usize {
        self.written
            .wrapping_sub(self.ring.tail.load(Ordering::Relaxed))
    }

    /// Free places, as far as this producer knows (a lower bound).
    pub fn free_slots(&mut self) -> usize {
        self.head_cache = self.ring.head.load(Ordering::Acquire);
        self.ring.capacity() - self.written.wrapping_sub(self.head_cache)
    }
}

/// The consuming end of a [`Ring`]. Not `Sync`: one thread pops.
pub struct Consumer<'a, T> {
    ring: &'a Ring<T>,
    /// The last `tail` this consumer read; the true tail is at or after it.
    tail_cache: usize,
    _not_sync: PhantomData<std::cell::Cell<()>>,
}

impl<T> Consumer<'_, T> {
    /// Pops the oldest published item, if any.
    pub fn pop(&mut self) -> Option<T> {
        let head = self.ring.head.load(Ordering::Relaxed);
        if head == self.tail_cache {
            // Acquire: pairs with the producer's release in `publish`, so the
            // cell's contents are visible.
            self.tail_cache = self.ring.tail.load(Ordering::Acquire);
            if head == self.tail_cache {
                return None;
            }
        }
        let cell = self.ring.cell(head);
        #[cfg(not(loom))]
        // SAFETY: `head` is in `head..tail`, so the producer finished writing
        // this cell (published with release, observed with acquire) and will
        // not touch it until we advance `head` past it.
        let item = unsafe { (*cell.get()).assume_init_read() };
        #[cfg(loom)]
        // SAFETY: as above.
        let item = cell.with(|p| unsafe { (*p).assume_init_read() });
        // Release: our read of the cell happens before the producer reuses it.
        self.ring
            .head
            .store(head.wrapping_add(1), Ordering::Release);
        Some(item)
    }

    /// The number of published items waiting (a lower bound).
    pub fn available(&mut self) -> usize {
        self.tail_cache = self.ring.tail.load(Ordering::Acquire);
        self.tail_cache
            .wrapping_sub(self.ring.head.load(Ordering::Relaxed))
    }
}

/// Why a blocking ring operation gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitError {
    /// The stop flag was raised.
    Stopped,
}

/// Waits for a condition the way the pipeline's stages wait on each other:
/// spin briefly, then yield for up to [`YIELD_FOR`], then sleep in naps of up
/// to [`MAX_NAP`], checking a stop flag.
///
/// Sleeping naps instead of parking keeps the ring free of any registration
/// between the two sides; a nap is at most `max_nap`, far below the
/// millisecond scale of a layer's transfer.
// The waiter is not part of the ring's synchronisation, so it keeps std's
// atomics under loom too.
pub struct Waiter<'a> {
    stop: &'a std::sync::atomic::AtomicBool,
    backoff: Backoff,
    nap: Duration,
    waited: Option<Instant>,
}

/// How long a [`Waiter`] yields before it starts to nap.
pub const YIELD_FOR: Duration = Duration::from_micros(100);

/// The longest nap of a [`Waiter`].
pub const MAX_NAP: Duration = Duration::from_micros(200);

impl<'a> Waiter<'a> {
    /// A waiter that gives up when `stop` is raised.
    pub fn new(stop: &'a std::sync::atomic::AtomicBool) -> Waiter<'a> {
        Waiter {
            stop,
            backoff: Backoff::new(),
            nap: Duration::from_micros(5),
            waited: None,
        }
    }

    /// Waits a little more; `Err` once the stop flag is raised.
    pub fn wait(&mut self) -> Result<(), WaitError> {
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(WaitError::Stopped);
        }
        if self.waited.is_none() {
            self.waited = Some(Instant::now());
        }
        if !self.backoff.is_completed() {
            self.backoff.snooze();
        } else if self.waited() < YIELD_FOR {
            // The other side usually answers within microseconds: yielding
            // keeps the hand-over fast without burning a core for long.
            std::thread::yield_now();
        } else {
            std::thread::sleep(self.nap);
            self.nap = (self.nap * 2).min(MAX_NAP);
        }
        Ok(())
    }

    /// How long this waiter has waited so far.
    pub fn waited(&self) -> Duration {
        self.waited.map(|t| t.elapsed()).unwrap_or_default()
    }

    /// Calls `f` until it returns `Some`, waiting between calls.
    pub fn until<R>(&mut self, mut f: impl FnMut() -> Option<R>) -> Result<R, WaitError> {
        loop {
            if let Some(r) = f() {
                return Ok(r);
            }
            self.wait()?;
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use rand::Rng;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn push_pop_in_order_and_full_empty() {
        let mut ring = Ring::new(3);
        let (mut p, mut c) = ring.split();
        assert_eq!(c.pop(), None);
        for i in 0..3 {
            p.push(i).unwrap();
        }
        assert_eq!(p.push(9), Err(9));
        assert_eq!(c.pop(), Some(0));
        p.push(3).unwrap();
        assert_eq!(c.available(), 3);
        assert_eq!(
            (c.pop(), c.pop(), c.pop(), c.pop()),
            (Some(1), Some(2), Some(3), None)
        );
    }

    #[test]
    fn deferred_writes_are_invisible_until_published() {
        let mut ring = Ring::new(4);
        let (mut p, mut c) = ring.split();
        p.write(1).unwrap();
        p.write(2).unwrap();
        assert_eq!(p.unpublished(), 2);
        assert_eq!(c.pop(), None);
        p.publish();
        assert_eq!(c.pop(), Some(1));
        assert_eq!(c.pop(), Some(2));
    }

    #[test]
    fn unpublished_items_count_against_capacity() {
        let mut ring = Ring::new(2);
        let (mut p, _c) = ring.split();
        p.write(1).unwrap();
        p.write(2).unwrap();
        assert_eq!(p.write(3), Err(3));
    }

    #[test]
    fn clear_drops_items_and_split_resumes() {
        use std::sync::Arc;
        let token = Arc::new(());
        let mut ring = Ring::new(4);
        {
            let (mut p, _) = ring.split();
            p.push(token.clone()).unwrap();
            p.push(token.clone()).unwrap();
        }
        assert_eq!(ring.len(), 2);
        ring.clear();
        assert_eq!(Arc::strong_count(&token), 1);
        let (mut p, mut c) = ring.split();
        p.push(token.clone()).unwrap();
        assert!(c.pop().is_some());
        drop(ring);
        assert_eq!(Arc::strong_count(&token), 1);
    }

    #[test]
    fn wraps_around_many_times() {
        let mut ring = Ring::new(5);
        let (mut p, mut c) = ring.split();
        let mut next_out = 0u64;
        let mut rng = rand::thread_rng();
        for i in 0..10_000u64 {
            p.push(i).unwrap_or_else(|_| {
                assert_eq!(c.pop(), Some(next_out));
                next_out += 1;
                p.push(i).unwrap();
            });
            if rng.gen_bool(0.4) {
                if let Some(v) = c.pop() {
                    assert_eq!(v, next_out);
                    next_out += 1;
                }
            }
        }
    }

    #[test]
    fn two_threads_transfer_every_item_in_order() {
        const N: u64 = 50_000;
        let mut ring = Ring::new(7);
        let stop = AtomicBool::new(false);
        let (mut p, mut c) = ring.split();
        let seed: u64 = rand::random();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut w = Waiter::new(&stop);
                let mut batch = 0;
                for i in 0..N {
                    let v = i ^ seed;
                    let mut item = v;
                    loop {
                        match p.write(item) {
                            Ok(()) => break,
                            Err(back) => {
                                item = back;
                                p.publish();
                                w.wait().unwrap();
                            }
                        }
                    }
                    batch += 1;
                    if batch == 3 {
                        p.publish();
                        batch = 0;
                    }
                }
                p.publish();
            });
            s.spawn(|| {
                let mut w = Waiter::new(&stop);
                for i in 0..N {
                    let v = w.until(|| c.pop()).unwrap();
                    assert_eq!(v, i ^ seed);
                }
            });
        });
    }

    #[test]
    fn waiter_stops() {
        let stop = AtomicBool::new(false);
        let mut w = Waiter::new(&stop);
        assert!(w.wait().is_ok());
        stop.store(true, Ordering::Relaxed);
        assert_eq!(w.until(|| None::<()>), Err(WaitError::Stopped));
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;

    /// Every interleaving of one push/pop pair through a ring of one cell.
    #[test]
    fn loom_items_cross_threads_in_order() {
        loom::model(|| {
            // The ends borrow the ring; leak one ring per explored execution.
            let ring: &'static mut Ring<u32> = Box::leak(Box::new(Ring::new(1)));
            let (mut p, mut c) = ring.split();
            let t = loom::thread::spawn(move || {
                let mut sent = 0;
                while sent < 2 {
                    if p.push(sent + 10).is_ok() {
                        sent += 1;
                    } else {
                        loom::thread::yield_now();
                    }
                }
            });
            let mut got = Vec::new();
            while got.len() < 2 {
                match c.pop() {
                    Some(v) => got.push(v),
                    None => loom::thread::yield_now(),
                }
            }
            t.join().unwrap();
            assert_eq!(got, vec![10, 11]);
        });
    }
}
