//! Hostile input (issue 15): option values that once panicked or aborted, containers the
//! safetensors crate refuses, broken tokenizers, non-regular files, NaN/Inf in float
//! tensors, and outputs that must never be clobbered. Every case must end in a clear error
//! (exit 2, or 1 for a failed check), never a panic, an abort or a hang.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use super::common::{convert, fixture, tern, tern_fails, tern_ok};

const MODEL: &str = "bitnet-2b4t-h64";

fn copy_fixture(name: &str, to: &Path) -> PathBuf {
    let dst = to.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `tern` with a deadline: a command that blocks (e.g. opening a FIFO) fails the test
/// instead of hanging it. Returns (exit code, stderr).
fn tern_within(args: &[&str], deadline: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tern {args:?} still running after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {path:?}");
}

#[test]
fn option_values_are_bounded_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let m = convert(MODEL, dir.path());
    let m = s(&m);
    let gen = |extra: &[&str]| {
        let mut a = vec!["generate", m, "-p", "My lord", "-n", "2"];
        a.extend_from_slice(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let fails = |args: Vec<String>, says: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = tern_fails(&args, 2);
        assert!(err.contains(says), "tern {args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    // The fixture has 4096 positions.
    fails(gen(&["--ctx", "1099511627776"]), "4096 positions");
    fails(gen(&["--ctx", "18446744073709551615"]), "4096 positions");
    fails(gen(&["--ctx", "4097"]), "4096 positions");
    fails(gen(&["--ctx", "0"]), "--ctx");
    fails(gen(&["--threads", "100000"]), "threads");
    fails(gen(&["--threads", "0"]), "threads");
    tern_ok(
        &gen(&["--ctx", "4096", "--threads", "1"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );

    let text = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/default/heldout.txt");
    let eval = |window: &str| {
        vec!["eval", m, "--ppl", s(&text), "--window", window, "-q"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    fails(eval("18446744073709551615"), "4096 positions");
    fails(eval("1"), "--window");

    let bench = |extra: &[&str]| {
        let mut a = vec!["bench", m, "--repeat", "1", "--contexts", "8", "-q"];
        a.extend_from_slice(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    fails(bench(&["-t", "0"]), "threads");
    fails(bench(&["-t", "1,100000"]), "threads");
    fails(bench(&["-n", "0"]), "--decode");
    fails(bench(&["-p", "0"]), "--prompt");
    fails(bench(&["-p", "5000"]), "4096 positions");
    fails(bench(&["-n", "18446744073709551615"]), "4096 positions");

    let serve = ["serve", m, "--port", "0", "--ctx", "5000"].map(String::from);
    fails(serve.to_vec(), "4096 positions");

    // A context that comes from data: a --prompts line longer than the model's positions.
    let long = dir.path().join("long.txt");
    std::fs::write(&long, "word ".repeat(6000)).unwrap();
    let args = ["verify", m, "--prompts", s(&long), "-q"].map(String::from);
    fails(args.to_vec(), "4096 positions");
}

/// A checkpoint folder whose model.safetensors is `bytes` (config and tokenizer from the
/// fixture, so the container is the first thing that can fail).
fn checkpoint_with(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let src = dir.join(name);
    std::fs::create_dir_all(&src).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture(MODEL).join(f), src.join(f)).unwrap();
    }
    std::fs::write(src.join("model.safetensors"), bytes).unwrap();
    src
}

fn safetensors(header: &str, data_len: usize) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    bytes
}

#[test]
fn convert_refuses_containers_the_safetensors_crate_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let two = |a: (u32, u32), b: (u32, u32)| {
        format!(
            r#"{{"a":{{"dtype":"F32","shape":[2],"data_offsets":[{},{}]}},"b":{{"dtype":"F32","shape":[2],"data_offsets":[{},{}]}}}}"#,
            a.0, a.1, b.0, b.1
        )
    };
    let cases = [
        (
            "overlap",
            safetensors(&two((0, 8), (0, 8)), 8),
            "contiguous",
        ),
        (
            "gap-first",
            safetensors(&two((4, 12), (12, 20)), 20),
            "contiguous",
        ),
        (
            "gap-between",
            safetensors(&two((0, 8), (12, 20)), 20),
            "contiguous",
        ),
        (
            "trailing",
            safetensors(&two((0, 8), (8, 16)), 24),
            "trailing",
        ),
    ];
    for (name, bytes, says) in cases {
        assert!(safetensors::SafeTensors::deserialize(&bytes).is_err());
        let src = checkpoint_with(dir.path(), name, &bytes);
        let out = dir.path().join(format!("{name}.tern"));
        let err = tern_fails(&["convert", s(&src), "-o", s(&out), "-q"], 2);
        assert!(
            err.contains("model.safetensors") && err.contains(says),
            "{name}: {err}"
        );
        assert!(!out.exists());
    }

    // The real fixture with a sparse 1 TiB tail: refused from the header, before any
    // hashing (which would read the terabyte).
    let src = copy_fixture(MODEL, dir.path());
    let st = src.join("model.safetensors");
    let f = std::fs::OpenOptions::new().write(true).open(&st).unwrap();
    f.set_len(f.metadata().unwrap().len() + (1 << 40)).unwrap();
    drop(f);
    let (code, err) = tern_within(
        &[
            "convert",
            s(&src),
            "-o",
            s(&dir.path().join("tail.tern")),
            "-q",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("1099511627776 trailing bytes"), "{err}");
}

#[test]
fn convert_refuses_broken_tokenizers() {
    let dir = tempfile::tempdir().unwrap();
    let src = copy_fixture(MODEL, dir.path());
    let good = std::fs::read(src.join("tokenizer.json")).unwrap();
    let mut noise = vec![0u8; 4096];
    SmallRng::seed_from_u64(0).fill_bytes(&mut noise);
    let broken: [(&str, Vec<u8>); 5] = [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("not a tokenizer", br#"{"hello":1}"#.to_vec()),
        ("random bytes", noise),
        ("empty", Vec::new()),
        // Found by fuzz/convert_config: tokenizers 0.22 panics on its decoder.
        (
            "a decoder tokenizers panics on",
            std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("fixtures/hostile/tokenizer-decoder-panic.json"),
            )
            .unwrap(),
        ),
    ];
    let out = dir.path().join("out.tern");
    for (what, bytes) in broken {
        std::fs::write(src.join("tokenizer.json"), bytes).unwrap();
        let err = tern_fails(&["convert", s(&src), "-o", s(&out), "-q"], 2);
        assert!(err.contains("tokenizer.json"), "{what}: {err}");
        assert!(!out.exists(), "{what}");
    }
}

#[test]
fn non_regular_files_are_refused_without_blocking_or_reading_forever() {
    let dir = tempfile::tempdir().unwrap();
    let deadline = Duration::from_secs(30);
    let out = dir.path().join("out.tern");

    // A FIFO as the safetensors shard and as a .tern: opening would block.
    let src = copy_fixture(MODEL, dir.path());
    std::fs::remove_file(src.join("model.safetensors")).unwrap();
    mkfifo(&src.join("model.safetensors"));
    let (code, err) = tern_within(&["convert", s(&src), "-o", s(&out), "-q"], deadline);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("model.safetensors") && err.contains("FIFO"),
        "{err}"
    );
    let fifo = dir.path().join("fifo.tern");
    mkfifo(&fifo);
    for cmd in ["inspect", "generate", "verify", "eval", "bench"] {
        let mut args = vec![cmd, s(&fifo)];
        match cmd {
            "generate" => args.extend(["-p", "x"]),
            "eval" => args.extend(["--ppl", "Cargo.toml"]),
            _ => {}
        }
        let (code, err) = tern_within(&args, deadline);
        assert_eq!(code, Some(2), "{cmd}: {err}");
        assert!(err.contains("FIFO"), "{cmd}: {err}");
    }

    // /dev/zero linked as config.json, tokenizer.json and the --ppl text: never ends.
    for name in ["config.json", "tokenizer.json"] {
        let src = copy_fixture(MODEL, &dir.path().join(name));
        std::fs::remove_file(src.join(name)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", src.join(name)).unwrap();
        let (code, err) = tern_within(&["convert", s(&src), "-o", s(&out), "-q"], deadline);
        assert_eq!(code, Some(2), "{name}: {err}");
        assert!(
            err.contains(name) && err.contains("not a regular file"),
            "{err}"
        );
    }
    let m = convert(MODEL, dir.path());
    let (code, err) = tern_within(&["eval", s(&m), "--ppl", "/dev/zero", "-q"], deadline);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("/dev/zero") && err.contains("not a regular file"));
}

/// Sets element `at` of the float tensor `name` (any float layout) to `bits` of its width.
fn poison(path: &Path, name: &str, at: usize, nan: bool) {
    super::common::rewrite(path, |_, tensors| {
        let t = tensors.iter_mut().find(|t| t.spec.name == name).unwrap();
        let bytes: Vec<u8> = match t.spec.layout {
            tern_format::Layout::F32 => (if nan { f32::NAN } else { f32::INFINITY })
                .to_le_bytes()
                .to_vec(),
            tern_format::Layout::F16 => (if nan { 0x7e00u16 } else { 0x7c00 })
                .to_le_bytes()
                .to_vec(),
            tern_format::Layout::Bf16 => (if nan { 0x7fc0u16 } else { 0x7f80 })
                .to_le_bytes()
                .to_vec(),
            other => panic!("{name} is {other}"),
        };
        let w = bytes.len();
        t.data[at * w..(at + 1) * w].copy_from_slice(&bytes);
    });
}

#[test]
fn check_finds_nan_and_inf_in_float_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let m = convert(MODEL, dir.path());
    assert!(tern_ok(&["inspect", s(&m), "--check"]).contains("float values are valid"));
    poison(&m, "model.embed_tokens.weight", 1234, true);
    let out = tern(&["inspect", s(&m), "--check"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("model.embed_tokens.weight") && text.contains("element 1234 is NaN"),
        "{text}"
    );
    assert!(tern_format::TernFile::open(&m)
        .unwrap()
        .verify_floats()
        .is_err());

    let m = super::common::convert_with(MODEL, dir.path(), &[], Some("inf"));
    poison(&m, "model.norm.weight", 7, false);
    let out = tern(&["inspect", s(&m), "--check", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("model.norm.weight") && text.contains("element 7"),
        "{text}"
    );
}

#[test]
fn concurrent_converts_leave_one_winner_and_one_clean_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture(MODEL);
    for round in 0..3 {
        let out = dir.path().join(format!("race{round}.tern"));
        let children: Vec<_> = (0..2)
            .map(|_| {
                Command::new(env!("CARGO_BIN_EXE_tern"))
                    .args(["convert", s(&src), "-o", s(&out), "-q"])
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs: Vec<_> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        let wins = outs.iter().filter(|o| o.status.success()).count();
        let errors: Vec<String> = outs
            .iter()
            .filter(|o| !o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .collect();
        assert_eq!(wins, 1, "round {round}: {errors:?}");
        assert!(
            errors[0].contains("already exists") && errors[0].contains("--force"),
            "{}",
            errors[0]
        );
        assert!(tern_format::TernFile::open(&out).is_ok());
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn output_never_replaces_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let src = copy_fixture(MODEL, dir.path());
    let before = std::fs::read(src.join("model.safetensors")).unwrap();
    for target in ["model.safetensors", "config.json", "tokenizer.json"] {
        let out = src.join(target);
        let err = tern_fails(&["convert", s(&src), "-o", s(&out), "--force", "-q"], 2);
        assert!(err.contains("input"), "{err}");
    }
    // Also through a symlink to the source.
    let link = dir.path().join("link.tern");
    std::os::unix::fs::symlink(src.join("model.safetensors"), &link).unwrap();
    tern_fails(&["convert", s(&src), "-o", s(&link), "--force", "-q"], 2);
    assert_eq!(
        std::fs::read(src.join("model.safetensors")).unwrap(),
        before
    );
}

#[test]
fn temp_files_of_dead_processes_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    // A PID that is certainly gone: a child that has exited and been reaped.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = dir.path().join(format!(".m.tern.{dead}.tmp"));
    std::fs::write(&stale, b"left by kill -9").unwrap();
    // Files written in the last minute may belong to a writer in another PID namespace.
    let recent = dir.path().join(format!(".m.tern.{dead}.1.tmp"));
    std::fs::write(&recent, b"maybe still being written").unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(old)
        .unwrap();
    // One of a live process (this one) stays.
    let live = dir
        .path()
        .join(format!(".m.tern.{}.0.tmp", std::process::id()));
    std::fs::write(&live, b"still being written").unwrap();
    let out = dir.path().join("m.tern");
    let o = tern(&["convert", s(&fixture(MODEL)), "-o", s(&out)]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!stale.exists(), "{err}");
    assert!(live.exists() && recent.exists());
    assert!(
        err.contains("removed") && err.contains(&format!(".m.tern.{dead}.tmp")),
        "{err}"
    );
}

#[test]
fn io_errors_name_their_cause_once() {
    let e = tern_format::Error::Io {
        path: "out.tern".into(),
        source: std::io::Error::from_raw_os_error(28),
    };
    let shown = format!("{:#}", anyhow::Error::from(e));
    assert_eq!(
        shown.matches("No space left on device").count(),
        1,
        "{shown}"
    );
    assert!(shown.starts_with("out.tern: "), "{shown}");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("absent/m.tern");
    let err = tern_fails(&["convert", s(&fixture(MODEL)), "-o", s(&out), "-q"], 2);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}
