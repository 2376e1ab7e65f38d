use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use serde_json::json;
use tern_format::{Layout, TernFile};

#[derive(clap::Args)]
pub struct Args {
    /// A .tern file
    file: PathBuf,
    /// Verify every tensor's checksum, every ternary code and every float value
    #[arg(long)]
    check: bool,
    /// List every tensor
    #[arg(long)]
    tensors: bool,
    /// Print one JSON document
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Kind {
    tensors: usize,
    bytes: u64,
    values: u64,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let file = TernFile::open(&args.file)?;
    let parsed = file.parsed();
    let meta = file.metadata();
    let (mut ternary, mut embed, mut norms) = (Kind::default(), Kind::default(), Kind::default());
    for t in file.tensors() {
        let kind = match t.layout {
            Some(l) if l.is_ternary() => &mut ternary,
            _ if t.shape.len() == 2 => &mut embed,
            _ => &mut norms,
        };
        kind.tensors += 1;
        kind.bytes += t.byte_len;
        kind.values += t.elements();
    }
    let bits_per_trit = ternary.bytes as f64 * 8.0 / ternary.values.max(1) as f64;

    let mut check_seconds = 0.0;
    let (damaged, trit_error) = if args.check {
        let start = std::time::Instant::now();
        let damaged =
            file.verify_checksums(std::thread::available_parallelism().map_or(1, |n| n.get()));
        check_seconds = start.elapsed().as_secs_f64();
        let trits = if damaged.is_empty() {
            file.verify_trits()
                .and_then(|()| file.verify_floats())
                .err()
        } else {
            None
        };
        (Some(damaged), trits)
    } else {
        (None, None)
    };
    let ok = damaged.as_ref().is_none_or(|d| d.is_empty()) && trit_error.is_none();

    if args.json {
        let tensors: Vec<_> = file
            .tensors()
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "layout": t.layout.map_or(format!("id {}", t.layout_id), |l| l.name().to_string()),
                    "shape": t.shape,
                    "offset": t.offset,
                    "bytes": t.byte_len,
                    "scale": t.scale,
                    "checksum": format!("{:016x}", t.checksum),
                })
            })
            .collect();
        let doc = json!({
            "file": args.file,
            "bytes": file.len(),
            "version": format!("{}.{}", parsed.major, parsed.minor),
            "alignment": parsed.alignment,
            "metadata": serde_json::from_str::<serde_json::Value>(&parsed.metadata_json)?,
            "tokenizer_bytes": file.tokenizer_json().len(),
            "summary": {
                "tensors": file.tensors().len(),
                "ternary": { "tensors": ternary.tensors, "bytes": ternary.bytes, "weights": ternary.values, "bits_per_weight": bits_per_trit },
                "embeddings_and_head": { "tensors": embed.tensors, "bytes": embed.bytes, "values": embed.values },
                "norms": { "tensors": norms.tensors, "bytes": norms.bytes, "values": norms.values },
            },
            "tensors": tensors,
            "check": damaged.as_ref().map(|d| json!({
                "ok": ok,
                "checksum_seconds": check_seconds,
                "checksum_gb_per_s": file.len() as f64 / check_seconds.max(1e-9) / 1e9,
                "damaged": d.iter().map(|m| json!({"name": m.name, "stored": format!("{:016x}", m.stored), "computed": format!("{:016x}", m.computed)})).collect::<Vec<_>>(),
                "invalid_trits": trit_error.as_ref().map(|e| e.to_string()),
            })),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let c = &meta.config;
        let p = &meta.provenance;
        println!(
            "{}: .tern {}.{}, {}",
            args.file.display(),
            parsed.major,
            parsed.minor,
            super::human_bytes(file.len())
        );
        println!(
            "model: {:?}, {} layers, hidden {}, heads {} (kv {}, head_dim {}), intermediate {}, vocab {}",
            c.architecture, c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.intermediate_size, c.vocab_size
        );
        println!(
            "       {:?} MLP, sub-norms attn {} ffn {}, RoPE {:?} theta {}, eps {:e}, {} head, context {}",
            c.activation, c.attn_sub_norm, c.ffn_sub_norm, c.rope_style, c.rope_theta,
            c.rms_norm_eps, if c.tie_word_embeddings { "tied" } else { "untied" }, c.max_position_embeddings
        );
        println!(
            "tokens: bos {:?}, eos {:?}, add_bos {}; tokenizer {}; chat template {}",
            c.bos_token_id,
            c.eos_token_ids,
            c.add_bos_token,
            super::human_bytes(file.tokenizer_json().len() as u64),
            if meta.chat_template.is_some() {
                "yes"
            } else {
                "no"
            }
        );
        println!(
            "source: {} ({:?} scales), {} files, by {}",
            p.source_family,
            p.scale_convention,
            p.source_files.len(),
            p.converter
        );
        println!("tensors: {}", file.tensors().len());
        println!(
            "  ternary    {:>4} tensors {:>12}  {} weights, {bits_per_trit:.3} bits/weight",
            ternary.tensors,
            super::human_bytes(ternary.bytes),
            ternary.values
        );
        println!(
            "  embed/head {:>4} tensors {:>12}  {:.2} bits/value",
            embed.tensors,
            super::human_bytes(embed.bytes),
            embed.bytes as f64 * 8.0 / embed.values.max(1) as f64
        );
        println!(
            "  norms      {:>4} tensors {:>12}",
            norms.tensors,
            super::human_bytes(norms.bytes)
        );
        if args.tensors {
            println!(
                "\n{:<56} {:>6} {:>16} {:>12} {:>12}",
                "name", "layout", "shape", "bytes", "scale"
            );
            for t in file.tensors() {
                let layout = t.layout.map_or("?", Layout::name);
                println!(
                    "{:<56} {:>6} {:>16} {:>12} {:>12.6}",
                    t.name,
                    layout,
                    format!("{:?}", t.shape),
                    t.byte_len,
                    t.scale
                );
            }
        }
        if let Some(d) = &damaged {
            if ok {
                println!(
                    "check: all {} checksums, ternary codes and float values are valid (checksums at {:.1} GB/s)",
                    file.tensors().len(),
                    file.len() as f64 / check_seconds.max(1e-9) / 1e9
                );
            } else {
                for m in d {
                    println!(
                        "check: tensor {:?} is DAMAGED (checksum {:016x}, stored {:016x})",
                        m.name, m.computed, m.stored
                    );
                }
                if let Some(e) = &trit_error {
                    println!("check: {e}");
                }
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
