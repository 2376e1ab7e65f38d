//! Aggregate decode speed of `Batch::decode_step` at several batch sizes, apart from any
//! server, HTTP or prefill: what continuous batching can gain on this machine.
//!
//!     cargo run --release -p tern-infer --example batch_step -- MODEL.tern [THREADS] [STEPS] [SIZES]
//!
//! Each batch size runs twice, alternating with batch 1 (the machine may be shared), after
//! a 32-token prompt per sequence; the figure is sequences × steps / time. SIZES is a
//! comma-separated list of batch sizes (default 2,4,8).

use std::time::Instant;

use tern_format::TernFile;
use tern_infer::batch::Batch;
use tern_infer::kernels::Kernels;
use tern_infer::model::{Logits, Model, State};
use tern_infer::pool::Pool;
use tern_infer::reference::NoProbe;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: batch_step MODEL.tern [THREADS] [STEPS] [SIZES]")?;
    let threads: usize = args.next().map_or(Ok(2), |a| a.parse())?;
    let steps: usize = args.next().map_or(Ok(16), |a| a.parse())?;
    let sizes: Vec<usize> = match args.next() {
        Some(a) => a.split(',').map(|n| n.parse()).collect::<Result<_, _>>()?,
        None => vec![2, 4, 8],
    };
    let file = TernFile::open(path)?;
    let model = Model::load(&file)?;
    let pool = Pool::new(threads);
    let kernels = *Kernels::best();
    let ctx = 32 + steps + 1;
    let vocab = model.config.vocab_size as u32;
    let prompt: Vec<u32> = (0..32).map(|i| (i * 7919 + 13) % vocab).collect();
    let mut batch = Batch::new(&model, kernels, &pool, ctx)?;
    let mut run = |n: usize| -> Result<f64, Box<dyn std::error::Error>> {
        let mut states = (0..n)
            .map(|_| State::new(&model, kernels, &pool, ctx))
            .collect::<Result<Vec<_>, _>>()?;
        for st in &mut states {
            model.forward(&pool, st, &prompt, Logits::Last, &mut NoProbe)?;
        }
        let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 31 + 5) % vocab).collect();
        let start = Instant::now();
        for _ in 0..steps {
            let mut seqs: Vec<&mut State> = states.iter_mut().collect();
            batch.decode_step(&model, &pool, &mut seqs, &tokens)?;
        }
        Ok((n * steps) as f64 / start.elapsed().as_secs_f64())
    };
    println!(
        "{} threads, {steps} steps after a 32-token prompt; tok/s summed over the batch",
        threads
    );
    for n in sizes {
        for round in 0..2 {
            let one = run(1)?;
            let many = run(n)?;
            println!(
                "round {round}: batch 1 {one:.2} tok/s, batch {n} {many:.2} tok/s = {:.2}x",
                many / one
            );
        }
    }
    Ok(())
}
