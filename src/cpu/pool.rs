//! The worker threads of the CPU share: a rayon pool whose threads are pinned
//! one per CPU, leaving out the CPUs the stage threads run on.

use rayon::prelude::*;

use super::{kernels, HostMatrix, Isa};
use crate::error::{Error, Result};

/// How a [`CpuPool`] is built.
#[derive(Debug, Clone)]
pub struct CpuPoolOptions {
    /// Worker threads; `None`: one per CPU this process may run on, less
    /// `exclude`.
    pub threads: Option<usize>,
    /// CPUs the workers keep off (those the reader, pin and transfer threads
    /// are pinned to).
    pub exclude: Vec<usize>,
    /// Pin each worker to one CPU of the remaining set (cyclically when there
    /// are more workers than CPUs).
    pub pin: bool,
}

impl Default for CpuPoolOptions {
    fn default() -> Self {
        CpuPoolOptions {
            threads: None,
            exclude: Vec::new(),
            pin: true,
        }
    }
}

/// Threads that compute `y = x · Wᵀ` from host weights, rows split between
/// them; see the [module docs](super).
pub struct CpuPool {
    pool: rayon::ThreadPool,
    cpus: Vec<usize>,
    threads: usize,
    isa: Isa,
}

impl std::fmt::Debug for CpuPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuPool")
            .field("threads", &self.threads)
            .field("cpus", &self.cpus)
            .field("isa", &self.isa)
            .finish()
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map_err(|e| Error::Config(format!("cpu pool: sched_getaffinity failed: {e}")))?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        // A refused pin (a cgroup that shrank since) leaves the worker
        // unpinned, which is only slower.
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

impl CpuPool {
    /// Starts the workers, on the widest instruction set this CPU has.
    pub fn new(opts: &CpuPoolOptions) -> Result<CpuPool> {
        let allowed = allowed_cpus()?;
        let cpus: Vec<usize> = allowed
            .iter()
            .copied()
            .filter(|c| !opts.exclude.contains(c))
            .collect();
        if cpus.is_empty() {
            return Err(Error::Config(format!(
                "cpu pool: every CPU this process may use ({allowed:?}) is excluded ({:?})",
                opts.exclude
            )));
        }
        let threads = opts.threads.unwrap_or(cpus.len());
        if threads == 0 {
            return Err(Error::Config("cpu pool: threads is 0".into()));
        }
        let pin = opts.pin.then(|| cpus.clone());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ls-cpu-{i}"))
            .start_handler(move |i| {
                if let Some(c) = &pin {
                    pin_to(c[i % c.len()]);
                }
            })
            .build()
            .map_err(|e| Error::Config(format!("cpu pool: starting {threads} threads: {e}")))?;
        Ok(CpuPool {
            pool,
            cpus,
            threads,
            isa: Isa::best(),
        })
    }

    /// The same pool on `isa`: an error when this CPU lacks it.
    pub fn with_isa(mut self, isa: Isa) -> Result<CpuPool> {
        if !isa.is_available() {
            return Err(Error::Config(format!(
                "cpu pool: this CPU lacks the features of the {isa} kernels"
            )));
        }
        self.isa = isa;
        Ok(self)
    }

    /// The instruction set the kernels run on.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The CPUs the workers may be pinned to.
    pub fn cpus(&self) -> &[usize] {
        &self.cpus
    }

    /// Runs `f` on the pool's threads (rayon's `install`): parallel
    /// iterators inside it use the pool.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// `y[t, r] = Σ_i x[t, i] · w[r, i]` for `tokens` rows of `x` (each
    /// `w.cols()` floats) into `y` (`tokens × w.rows()`), the rows of `w` split
    /// between the workers.
    pub fn matmul(
        &self,
        w: &HostMatrix<'_>,
        x: &[f32],
        tokens: usize,
        y: &mut [f32],
    ) -> Result<()> {
        let (rows, k) = (w.rows(), w.cols());
        if tokens.checked_mul(k) != Some(x.len()) {
            return Err(Error::Input(format!(
                "cpu matmul: {tokens} tokens of {k} inputs, x has {} floats",
                x.len()
            )));
        }
        if tokens.checked_mul(rows) != Some(y.len()) {
            return Err(Error::Input(format!(
                "cpu matmul: {tokens} tokens of {rows} outputs, y has room for {}",
                y.len()
            )));
        }
        if rows == 0 || tokens == 0 {
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        if self.isa.activation_bits(w.ty()).is_some() && self.rounded_rows(w, x, tokens, y) {
            return Ok(());
        }
        self.split_rows(w, &kernels::F32Rows { x, k }, tokens, y);
        Ok(())
    }

    /// [`CpuPool::matmul`] on activations rounded to 16 bits, in this
    /// thread's buffer (a fresh one when a product on this thread already
    /// holds it); `false`, nothing done, when they are too small to round
    /// (`x86_vnni::TINY`).
    #[cfg(target_arch = "x86_64")]
    fn rounded_rows(&self, w: &HostMatrix<'_>, x: &[f32], tokens: usize, y: &mut [f32]) -> bool {
        use super::x86_vnni::Q16;
        thread_local! {
            static ROUNDED: std::cell::RefCell<Q16> = std::cell::RefCell::default();
        }
        let run = |q: &mut Q16, y: &mut [f32]| {
            let ok = q.fill(x, tokens, w.cols());
            if ok {
                self.split_rows(w, &*q, tokens, y);
            }
            ok
        };
        ROUNDED.with(|cell| match cell.try_borrow_mut() {
            Ok(mut q) => run(&mut q, y),
            Err(_) => run(&mut Q16::default(), y),
        })
    }

    /// [`CpuPool::matmul`] on checked shapes, its activations as the kernels
    /// take them.
    fn split_rows<A: kernels::Activations>(
        &self,
        w: &HostMatrix<'_>,
        x: &A,
        tokens: usize,
        y: &mut [f32],
    ) {
        let rows = w.rows();
        // A few tasks per thread balance uneven progress; at least 8 rows
        // each keep the scheduling cost small next to the reads.
        let chunk = rows.div_ceil(self.threads * 4).max(8);
        let out = OutRows(y.as_mut_ptr());
        let isa = self.isa;
        self.pool.install(|| {
            (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
                let r = c * chunk..((c + 1) * chunk).min(rows);
                kernels::rows_into(isa, w, x, tokens, r, |t, r, v, add| {
                    let p = out.at(t * rows + r);
                    // SAFETY: t < tokens and r < rows, so the index is inside
                    // `y` (tokens × rows floats, checked by `matmul`), which
                    // outlives `install`. Task `c` reads and writes only
                    // rows of its own range, so no two tasks touch the same
                    // element, and `add` comes only after a first write.
                    unsafe { p.write(if add { p.read() + v } else { v }) }
                });
            })
        });
    }
}

/// The output of [`CpuPool::matmul`], shared by tasks that own disjoint rows.
#[derive(Clone, Copy)]
struct OutRows(*mut f32);

impl OutRows {
    /// The element at `i` (a method, so closures capture the whole `Sync`
    /// wrapper rather than its raw pointer field).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

// SAFETY: the pointer is only used at indices that the tasks of one
// `matmul` partition between them (see the access's SAFETY comment).
unsafe impl Send for OutRows {}
// SAFETY: as for Send: no element is touched by two threads, and the caller
// reads `y` only after every task is done.
unsafe impl Sync for OutRows {}
