//! The CPU share's products, in GB/s of stored weights, next to the memory
//! read bandwidth of the same threads measured in the same run (a streaming
//! sum over a buffer far larger than the caches): the kernels' ceiling.
//!
//! For each stored type, one matrix of `LS_BENCH_MIB` MiB (default 512) with
//! rows of 4096 elements is multiplied by 1 token (decode) and by 8 (a small
//! batch: each row read once per 4 tokens), on every worker of a pool pinned
//! one thread per CPU, with the widest instruction set this CPU has.
//! `LS_BENCH_THREADS` sets the workers. Under `cargo test --benches` (no
//! `--bench` argument) the matrices are 4 MiB and each case runs once.
//!
//! ```text
//! cargo bench --bench cpu_gemv
//! LS_BENCH_MIB=1024 LS_BENCH_THREADS=16 cargo bench --bench cpu_gemv
//! ```

use layer_streamer::cpu::calibrate::{measure_read, measure_type};
use layer_streamer::cpu::{CpuPool, CpuPoolOptions};
use layer_streamer::quant::QuantType;

const TYPES: [QuantType; 9] = [
    QuantType::BF16,
    QuantType::F16,
    QuantType::F32,
    QuantType::Q8_0,
    QuantType::Q4_0,
    QuantType::Q4_1,
    QuantType::Q4_K,
    QuantType::Q5_K,
    QuantType::Q6_K,
];

fn env_usize(name: &str) -> Option<usize> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(e) => panic!("{name}={v:?} is not a count: {e}"),
    }
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let mib = if benching {
        env_usize("LS_BENCH_MIB").unwrap_or(512)
    } else {
        4
    };
    let reps = if benching { 5 } else { 1 };
    let pool = CpuPool::new(&CpuPoolOptions {
        threads: env_usize("LS_BENCH_THREADS"),
        ..Default::default()
    })
    .expect("cpu pool");
    let read = measure_read(&pool, mib << 21, reps) / 1e9;
    println!(
        "cpu_gemv: {} threads on CPUs {:?}, {} kernels, {mib} MiB per matrix, rows of 4096",
        pool.threads(),
        pool.cpus(),
        pool.isa()
    );
    println!("memory read (streaming sum, same threads): {read:.1} GB/s");
    println!(
        "{:<6} {:>13} {:>8} {:>13} {:>8}",
        "type", "1 token GB/s", "of read", "8 tokens GB/s", "of read"
    );
    for ty in TYPES {
        let cells: Vec<String> = [1, 8]
            .into_iter()
            .map(|tokens| {
                let gbps = measure_type(&pool, ty, mib << 20, tokens, reps).expect("matmul") / 1e9;
                format!("{gbps:>13.1} {:>7.0}%", 100.0 * gbps / read)
            })
            .collect();
        println!("{:<6} {} {}", ty.name(), cells[0], cells[1]);
    }
}
