//! Medians and percentiles of timed samples, and the report files.

use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Times `body` `iterations` times after `warmup` untimed runs; returns the
/// samples in nanoseconds, sorted.
pub fn sample(warmup: usize, iterations: usize, mut body: impl FnMut()) -> Vec<f64> {
    for _ in 0..warmup {
        body();
    }
    let mut samples: Vec<f64> = (0..iterations)
        .map(|_| {
            let started = Instant::now();
            body();
            started.elapsed().as_nanos() as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples
}

/// The `p`th percentile (0..=100) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub fn median(sorted: &[f64]) -> f64 {
    percentile(sorted, 50.0)
}

/// Human form of a duration in nanoseconds.
pub fn show_ns(nanos: f64) -> String {
    let duration = Duration::from_nanos(nanos as u64);
    if nanos < 1_000.0 {
        format!("{nanos:.0} ns")
    } else if nanos < 1_000_000.0 {
        format!("{:.1} µs", nanos / 1_000.0)
    } else {
        format!("{:.2} ms", duration.as_secs_f64() * 1_000.0)
    }
}

pub fn write_report(suite: &str, report: &impl Serialize) -> anyhow::Result<PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is in the workspace");
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{suite}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(report)?)?;
    Ok(path)
}

pub fn print_rows(title: &str, rows: &[(String, String, String)]) {
    println!("\n{title}");
    let width = rows.iter().map(|row| row.0.len()).max().unwrap_or(0);
    let value_width = rows.iter().map(|row| row.1.len()).max().unwrap_or(0);
    for (name, value, note) in rows {
        println!("  {name:<width$}  {value:>value_width$}  {note}");
    }
}
