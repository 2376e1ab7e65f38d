//! One module per subcommand: argument parsing and presentation only; the work is done by
//! the library crates.

pub mod bench;
pub mod chat;
pub mod convert;
pub mod eval;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod run;
pub mod serve;
pub mod synth;
pub mod verify;

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-counting progress bar on stderr, hidden when quiet or when stderr is not a terminal.
pub fn byte_bar(quiet: bool, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    if quiet || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// A step-counting progress bar on stderr, hidden when quiet or not a terminal.
pub fn count_bar(quiet: bool, message: &str, steps: u64) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    if quiet || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// Human-readable byte count.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// Parses `--layout` (tq2, tq1) and `--head` (exact, q8).
pub fn compact_options(
    layout: &str,
    head: &str,
) -> anyhow::Result<(tern_convert::TernaryFormat, tern_convert::HeadFormat)> {
    use tern_convert::{HeadFormat, TernaryFormat};
    let ternary = match layout.to_ascii_lowercase().as_str() {
        "tq2" => TernaryFormat::Tq2,
        "tq1" => TernaryFormat::Tq1,
        other => anyhow::bail!("--layout {other:?}: tq2 or tq1"),
    };
    let head = match head.to_ascii_lowercase().as_str() {
        "exact" => HeadFormat::Exact,
        "q8" => HeadFormat::Q8,
        other => anyhow::bail!("--head {other:?}: exact or q8"),
    };
    Ok((ternary, head))
}
