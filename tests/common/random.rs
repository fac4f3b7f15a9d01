//! Fresh random data whose seed is printed, so that a failure can be replayed
//! with `LS_SEED=<seed>`.

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// A fresh seed, or `LS_SEED` when it is set; printed on stderr with `test`'s
/// name so that a failing run can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("LS_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("LS_SEED={s:?} is not a u64: {e}")),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: random seed {seed} (replay with LS_SEED={seed})");
    seed
}

/// A random generator from [`seed`].
pub fn rng(test: &str) -> StdRng {
    StdRng::seed_from_u64(seed(test))
}

/// `n` random bytes.
pub fn bytes(rng: &mut impl RngCore, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}
