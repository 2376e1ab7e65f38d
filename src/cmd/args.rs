//! Options shared by the commands that run a model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tern_format::TernFile;
use tern_infer::kernels::{Isa, Kernels};
use tern_infer::pool::{physical_cores, Pool};
use tern_infer::sampling::SamplingParams;

#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// A .tern file
    pub model: PathBuf,
    /// Worker threads (default: physical cores)
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Force a kernel: scalar, avx2, avx512, neon (default: best for this CPU, or $TERN_KERNEL)
    #[arg(long)]
    pub kernel: Option<String>,
    /// Context length in tokens (default: the model's max positions)
    #[arg(long)]
    pub ctx: Option<usize>,
}

impl ModelArgs {
    pub fn open(&self) -> Result<TernFile> {
        Ok(TernFile::open(&self.model)?)
    }

    pub fn kernels(&self) -> Result<Kernels> {
        let forced = match &self.kernel {
            None => None,
            Some(name) => Some(Isa::parse(name).with_context(|| {
                format!("unknown kernel {name:?}: scalar, avx2, avx512 or neon")
            })?),
        };
        Ok(Kernels::select(forced)?)
    }

    pub fn pool(&self) -> Pool {
        Pool::new(self.threads.unwrap_or_else(physical_cores).max(1))
    }

    pub fn ctx(&self, file: &TernFile) -> usize {
        self.ctx
            .unwrap_or(file.metadata().config.max_position_embeddings as usize)
            .max(1)
    }
}

#[derive(clap::Args, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 = greedy (the default, and what checks a conversion)
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off)
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set with this much probability (1 = off)
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one (0 = off)
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalize tokens already seen (1 = off)
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Random seed, for reproducible sampling
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        };
        p.validate()?;
        Ok(p)
    }
}
