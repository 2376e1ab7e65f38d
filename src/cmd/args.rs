//! Options shared by several commands: the model a command runs, sampling, and the
//! named choices (`--layout`, `--head`, `--kernel`, ...) as clap value enums mapped to
//! the libraries' types, which know no command line.

use std::path::PathBuf;

use anyhow::Result;
use clap::ValueEnum;
use tern_format::TernFile;
use tern_infer::kernels::{Isa, Kernels};
use tern_infer::pool::{physical_cores, Pool};
use tern_infer::sampling::SamplingParams;

#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// A .tern file
    pub model: PathBuf,
    /// Worker threads (default: physical cores; at most 4 × the CPUs, 1024)
    #[arg(short = 't', long, value_parser = parse_threads)]
    pub threads: Option<usize>,
    /// Force a kernel (default: best for this CPU, or $TERN_KERNEL)
    #[arg(long, ignore_case = true)]
    pub kernel: Option<KernelArg>,
    /// Context length in tokens (default and maximum: the model's max positions)
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub ctx: Option<usize>,
}

impl ModelArgs {
    pub fn open(&self) -> Result<TernFile> {
        Ok(TernFile::open(&self.model)?)
    }

    pub fn kernels(&self) -> Result<Kernels> {
        Ok(Kernels::select(self.kernel.map(Isa::from))?)
    }

    pub fn pool(&self) -> Pool {
        Pool::new(self.threads.unwrap_or_else(physical_cores).max(1))
    }

    /// `--ctx`, or the model's positions; checked against the model and the machine's
    /// memory before any cache is allocated.
    pub fn ctx(&self, file: &TernFile) -> Result<usize> {
        let config = &file.metadata().config;
        let threads = self.threads.unwrap_or_else(physical_cores);
        let ctx = self.ctx.unwrap_or_else(|| {
            usize::try_from(config.max_position_embeddings).unwrap_or(usize::MAX)
        });
        Ok(tern_infer::limits::check_ctx(
            config, ctx, threads, "--ctx",
        )?)
    }
}

/// `--threads`: a count this machine allows (see `tern_infer::limits::check_threads`).
pub fn parse_threads(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    tern_infer::limits::check_threads(n).map_err(|e| e.to_string())
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

/// `--kernel`: an instruction set.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KernelArg {
    #[value(name = "scalar")]
    Scalar,
    #[value(name = "avx2")]
    Avx2,
    #[value(name = "avx512")]
    Avx512,
    #[value(name = "neon")]
    Neon,
}

impl From<KernelArg> for Isa {
    fn from(k: KernelArg) -> Isa {
        match k {
            KernelArg::Scalar => Isa::Scalar,
            KernelArg::Avx2 => Isa::Avx2,
            KernelArg::Avx512 => Isa::Avx512,
            KernelArg::Neon => Isa::Neon,
        }
    }
}

/// `--layout`: how ternary weights are stored.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LayoutArg {
    /// 2 bits per weight, the fastest kernels
    #[value(name = "tq2")]
    Tq2,
    /// 1.6 bits per weight
    #[value(name = "tq1")]
    Tq1,
}

impl From<LayoutArg> for tern_convert::TernaryFormat {
    fn from(l: LayoutArg) -> Self {
        match l {
            LayoutArg::Tq2 => Self::Tq2,
            LayoutArg::Tq1 => Self::Tq1,
        }
    }
}

/// `--head`: how the embeddings and the output head are stored.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum HeadArg {
    /// The source's floats, bit for bit
    #[value(name = "exact")]
    Exact,
    /// int8 with one f32 scale per row: about half of bf16, lossy
    #[value(name = "q8")]
    Q8,
}

impl From<HeadArg> for tern_convert::HeadFormat {
    fn from(h: HeadArg) -> Self {
        match h {
            HeadArg::Exact => Self::Exact,
            HeadArg::Q8 => Self::Q8,
        }
    }
}
