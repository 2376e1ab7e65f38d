//! `tern bench`: the report a script reads (`--json`), on a small fixture, with a small
//! bandwidth probe. The statistics and the context clamp are unit-tested in
//! tern-infer's `bench` module; this checks the command puts them together.

use crate::common::{convert, tern};

#[test]
fn bench_json_reports_every_measurement_and_fits_contexts_to_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert("bitnet-2b4t-h64", dir.path());
    let out = tern(&[
        "bench",
        model.to_str().unwrap(),
        "-p",
        "5",
        "-n",
        "2",
        "-t",
        "1,2",
        "--contexts",
        "8,100000",
        "--repeat",
        "2",
        "--probe-mib",
        "4",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 4096 positions, 2 decoded tokens: the longest context that fits is 4093.
    assert!(
        stderr.contains("context 100000 measured at 4093"),
        "{stderr}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let weights = v["weight_bytes_per_token"].as_u64().unwrap();
    assert!(weights > 0);
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(
        runs.iter()
            .map(|r| r["threads"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2]
    );
    for run in runs {
        assert!(run["read_bandwidth_gb_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(run["prefill_tokens"], 5);
        let p = &run["prefill_tokens_per_second"];
        let (min, med, max) = (
            p["min"].as_f64().unwrap(),
            p["median"].as_f64().unwrap(),
            p["max"].as_f64().unwrap(),
        );
        assert!(0.0 < min && min <= med && med <= max, "{p}");
        assert!(run["prefill_over_decode"].as_f64().unwrap() > 0.0);
        let decode = run["decode"].as_array().unwrap();
        let contexts: Vec<u64> = decode
            .iter()
            .map(|d| d["context"].as_u64().unwrap())
            .collect();
        assert_eq!(contexts, [8, 4093]);
        for d in decode {
            // Weights plus the KV cache read at that context.
            assert!(d["bytes_per_token"].as_u64().unwrap() > weights);
            assert!(d["tokens_per_second"]["median"].as_f64().unwrap() > 0.0);
            assert!(d["fraction_of_bandwidth_bound"].as_f64().unwrap() > 0.0);
        }
    }
}
