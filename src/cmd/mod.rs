//! One module per subcommand: argument parsing and presentation only; the work is done by
//! the library crates.

pub mod args;
pub mod bench;
pub mod chat;
pub mod convert;
pub mod eval;
pub mod export;
pub mod generate;
pub mod inspect;
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
