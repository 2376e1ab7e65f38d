//! Hostile input to the format crate: NaN/Inf in float tensors (checksums intact), FIFOs
//! and devices given as files, and writers racing to one output.

use std::path::Path;

use tern_format::*;

fn metadata() -> Metadata {
    Metadata {
        config: ModelConfig {
            hidden_size: 8,
            num_attention_heads: 2,
            head_dim: 4,
            intermediate_size: 12,
            vocab_size: 16,
            max_position_embeddings: 32,
            rope_theta: 10000.0,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            add_bos_token: true,
            ..ModelConfig::bitnet_b158()
        },
        chat_template: None,
        provenance: Provenance {
            source_family: "test".into(),
            scale_convention: ScaleConvention::Multiply,
            source_files: Vec::new(),
            converter: "test".into(),
            decisions: Vec::new(),
        },
    }
}

/// Bytes of one float of `layout` (1.0 unless `bad` gives other bits).
fn one(layout: Layout) -> Vec<u8> {
    match layout {
        Layout::F32 => 1.0f32.to_le_bytes().to_vec(),
        Layout::F16 => 0x3c00u16.to_le_bytes().to_vec(),
        Layout::Bf16 => 0x3f80u16.to_le_bytes().to_vec(),
        _ => unreachable!(),
    }
}

/// A valid model whose float tensors use `float` (the embedding `embed`), every float
/// value 1.0; `poison(name, bytes)` may then change a tensor's bytes before writing.
fn write(
    path: &Path,
    float: Layout,
    embed: Layout,
    poison: impl Fn(&str, &mut Vec<u8>),
) -> Result<(), Error> {
    let meta = metadata();
    let specs: Vec<TensorSpec> = expected_tensors(&meta.config)
        .into_iter()
        .map(|(name, shape, role)| TensorSpec {
            name,
            layout: match role {
                TensorRole::Ternary => Layout::Tq2,
                TensorRole::Embedding => embed,
                TensorRole::Norm | TensorRole::Bias | TensorRole::DenseLinear => float,
            },
            shape,
        })
        .collect();
    let mut w = Writer::create(path, &meta, b"", specs.clone())?.replace_existing(false);
    for s in &specs {
        let n = s.layout.byte_len(&s.shape).unwrap() as usize;
        let mut bytes = match s.layout {
            Layout::Tq2 => vec![0x55; n], // every trit 0
            Layout::Q8Row => {
                let cols = s.shape[1] as usize;
                let stride = q8row::row_stride(cols as u64) as usize;
                let mut out = vec![0u8; n];
                for rec in out.chunks_exact_mut(stride) {
                    q8row::quantize_row(&vec![1.0; cols], rec);
                }
                out
            }
            l => one(l).repeat(n / one(l).len()),
        };
        poison(&s.name, &mut bytes);
        let scale = if s.layout.is_ternary() { 0.5 } else { 1.0 };
        w.write_tensor(&s.name, scale, &bytes)?;
    }
    w.finish()
}

#[test]
fn verify_floats_names_the_tensor_and_element() {
    let dir = tempfile::tempdir().unwrap();
    let layouts = [
        (Layout::F32, Layout::F32),
        (Layout::F16, Layout::F16),
        (Layout::Bf16, Layout::Bf16),
        (Layout::Bf16, Layout::Q8Row),
    ];
    for (i, (float, embed)) in layouts.into_iter().enumerate() {
        let clean = dir.path().join(format!("clean{i}.tern"));
        write(&clean, float, embed, |_, _| {}).unwrap();
        let f = TernFile::open(&clean).unwrap();
        f.verify_floats().unwrap();
        assert!(f.verify_checksums(1).is_empty());

        for (name, at, nan) in [
            ("model.norm.weight", 5usize, true),
            ("model.embed_tokens.weight", 3, false),
        ] {
            let path = dir.path().join(format!("bad{i}-{name}.tern"));
            write(&path, float, embed, |n, bytes| {
                if n != name {
                    return;
                }
                let layout = if n.contains("embed") { embed } else { float };
                let (value, width) = match layout {
                    Layout::F32 => (
                        if nan { f32::NAN } else { f32::INFINITY }
                            .to_le_bytes()
                            .to_vec(),
                        4,
                    ),
                    Layout::F16 => (
                        (if nan { 0x7e01u16 } else { 0xfc00 })
                            .to_le_bytes()
                            .to_vec(),
                        2,
                    ),
                    Layout::Bf16 => (
                        (if nan { 0xffc1u16 } else { 0x7f80 })
                            .to_le_bytes()
                            .to_vec(),
                        2,
                    ),
                    // Q8_ROW: element = row; the row's scale is its first 4 bytes.
                    Layout::Q8Row => {
                        let stride = q8row::row_stride(8) as usize;
                        let v = if nan { f32::NAN } else { f32::NEG_INFINITY };
                        bytes[at * stride..at * stride + 4].copy_from_slice(&v.to_le_bytes());
                        return;
                    }
                    _ => unreachable!(),
                };
                bytes[at * width..(at + 1) * width].copy_from_slice(&value);
            })
            .unwrap();
            let f = TernFile::open(&path).unwrap();
            assert!(f.verify_checksums(1).is_empty(), "checksums stay valid");
            let e = f.verify_floats().unwrap_err().to_string();
            assert!(
                e.contains(name) && e.contains(&format!("element {at} is NaN or infinite")),
                "{float} {embed}: {e}"
            );
        }
    }
}

#[test]
fn fifos_and_devices_are_refused_without_opening() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("f.tern");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // Opening a FIFO for reading blocks until a writer comes: this must return at once.
    let e = TernFile::open(&fifo).err().unwrap().to_string();
    assert!(e.contains("FIFO"), "{e}");
    let e = TernFile::open("/dev/zero").err().unwrap().to_string();
    assert!(e.contains("character device"), "{e}");
    let e = TernFile::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("directory"), "{e}");
}

#[test]
fn racing_writers_without_replace_leave_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..20 {
        let path = dir.path().join(format!("race{round}.tern"));
        let results: Vec<Result<(), Error>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| write(&path, Layout::F32, Layout::F32, |_, _| {})))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let wins = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "round {round}: {results:?}");
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(matches!(r, Error::Exists { .. }), "{r}");
        }
        TernFile::open(&path).unwrap().verify_floats().unwrap();
    }
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 20, "temporary files left: {names:?}");
}

#[test]
fn a_writer_replaces_only_when_told() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.tern");
    std::fs::write(&path, b"precious").unwrap();
    let e = write(&path, Layout::F32, Layout::F32, |_, _| {}).unwrap_err();
    assert!(matches!(e, Error::Exists { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}
