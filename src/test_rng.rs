//! The random data of the crate's unit tests: a fresh seed every run,
//! printed so that `LS_SEED=<seed>` replays a failure.

use rand::SeedableRng;

/// The seed of this run: `LS_SEED` when set, else a fresh one; printed.
pub(crate) fn seed() -> u64 {
    let seed = std::env::var("LS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (LS_SEED replays)");
    seed
}

/// A generator seeded by [`seed`].
pub(crate) fn rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed())
}
