//! Shared helpers: fixture paths, running the binary, reading reference outputs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Every fixture checkpoint, by folder name.
pub const FIXTURES: [&str; 14] = [
    "bitnet-2b4t-h64",
    "bitnet-2b4t-h64-bf16",
    "bitnet-2b4t-h64-sharded",
    "bitnet-2b4t-h128",
    "llama-bitlinear",
    "1bitllm",
    "bitnet-bitlinear",
    "bitnet-bias",
    "llama-autobitlinear",
    "llama-autobitlinear-masters",
    "llama-rope-llama3",
    "llama-ternary-f16",
    "llama-bias",
    "llama-dense-linears",
];

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/models")
        .join(name)
}

/// Runs `tern` with `args`.
pub fn tern(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .expect("run tern")
}

/// Runs `tern` and requires success; returns stdout.
pub fn tern_ok(args: &[&str]) -> String {
    let out = tern(args);
    assert!(
        out.status.success(),
        "tern {args:?} failed ({:?}):\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs `tern` and requires failure with exit code `code`; returns stderr.
pub fn tern_fails(args: &[&str], code: i32) -> String {
    let out = tern(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "tern {args:?}: expected exit {code}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `tern` with its stdout a pipe whose reader has gone away (as `tern … | head -c 1`
/// after `head` exits): a closed stdout is a normal end, exit 0, nothing on stderr.
pub fn tern_into_closed_pipe(args: &[&str]) {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tern");
    // Close the read end before tern writes anything (it has a file to open first).
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait for tern");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("error") && !stderr.contains("panicked"),
        "tern {args:?} into a closed pipe: {:?}\n{stderr}",
        out.status
    );
}

/// Converts a fixture into `dir` and returns the .tern path.
pub fn convert(name: &str, dir: &Path) -> PathBuf {
    convert_with(name, dir, &[], None)
}

/// Converts a fixture with extra `tern convert` flags into `dir/NAME[-SUFFIX].tern`.
pub fn convert_with(name: &str, dir: &Path, extra: &[&str], suffix: Option<&str>) -> PathBuf {
    let out = dir.join(match suffix {
        Some(s) => format!("{name}-{s}.tern"),
        None => format!("{name}.tern"),
    });
    let src = fixture(name);
    let mut args = vec![
        "convert",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    tern_ok(&args);
    out
}

/// Reference outputs of transformers for one fixture (fixtures/README.md).
pub struct Reference {
    bytes: Vec<u8>,
}

pub struct RefTensor {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i64: Vec<i64>,
}

impl Reference {
    pub fn load(name: &str) -> Reference {
        let bytes = std::fs::read(fixture(name).join("reference.safetensors")).expect("reference");
        Reference { bytes }
    }

    pub fn prompts(&self) -> usize {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        (0..)
            .take_while(|i| st.tensor(&format!("prompt.{i}.ids")).is_ok())
            .count()
    }

    pub fn get(&self, name: &str) -> RefTensor {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("reference has no {name}"));
        let data = t.data();
        let (mut f32, mut i64) = (Vec::new(), Vec::new());
        match t.dtype() {
            safetensors::Dtype::F32 => {
                f32 = data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect()
            }
            safetensors::Dtype::I64 => {
                i64 = data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                    .collect()
            }
            other => panic!("{name}: unexpected dtype {other:?}"),
        }
        RefTensor {
            shape: t.shape().to_vec(),
            f32,
            i64,
        }
    }

    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.get(name).i64.iter().map(|&v| v as u32).collect()
    }
}

/// One tensor of a file being rewritten by a test.
pub struct Rewritten {
    pub spec: tern_format::TensorSpec,
    pub scale: f32,
    pub data: Vec<u8>,
}

/// Rewrites a valid .tern file through the real writer (so checksums stay valid) after
/// `edit` changed its metadata or tensors: damage only `verify` can see.
pub fn rewrite(path: &Path, edit: impl FnOnce(&mut tern_format::Metadata, &mut Vec<Rewritten>)) {
    let file = tern_format::TernFile::open(path).unwrap();
    let mut meta = file.metadata().clone();
    let tokenizer = file.tokenizer_json().to_vec();
    let mut tensors: Vec<Rewritten> = file
        .tensors()
        .iter()
        .map(|t| Rewritten {
            spec: tern_format::TensorSpec {
                name: t.name.clone(),
                layout: t.layout.unwrap(),
                shape: t.shape.clone(),
            },
            scale: t.scale,
            data: file.data(t).to_vec(),
        })
        .collect();
    drop(file);
    edit(&mut meta, &mut tensors);
    let specs = tensors.iter().map(|t| t.spec.clone()).collect();
    let mut w = tern_format::Writer::create(path, &meta, &tokenizer, specs).unwrap();
    for t in &tensors {
        w.write_tensor(&t.spec.name, t.scale, &t.data).unwrap();
    }
    w.finish().unwrap();
}

/// The shipped default model (fixtures/default/bitnet-tiny) converted into `dir`.
pub fn default_model(dir: &Path) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/default/bitnet-tiny");
    let out = dir.join("default.tern");
    tern_ok(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-q",
    ]);
    out
}
