//! The reference scorer: ranks candidates by a weighted sum of the kernel's health score,
//! spare capacity, latency and error rate. Weights can be tuned per tenant through
//! `storage` (key `weights`: four little-endian f32 for health, load, latency, errors).
//!
//! It exports the `scorer-columns` world: the kernel passes each candidate field as one list,
//! which costs the host several times less to copy in than a list of records.

wit_bindgen::generate!({ world: "scorer-columns", path: "../../wit" });

use exports::nops::plugin::scoring_columns::{Candidates, Guest, Task};
use nops::plugin::storage;

/// Default weights: health, spare capacity, latency, errors.
const DEFAULT_WEIGHTS: [f32; 4] = [0.4, 0.3, 0.2, 0.1];
/// Latency at which the latency term halves, in milliseconds.
const LATENCY_HALF_MS: f32 = 100.0;
/// In-flight tasks at which the load term halves.
const IN_FLIGHT_HALF: f32 = 4.0;

struct Weighted;

fn weights() -> [f32; 4] {
    match storage::get("weights") {
        Ok(Some(bytes)) if bytes.len() == 16 => {
            let mut w = [0f32; 4];
            for (i, chunk) in bytes.chunks_exact(4).enumerate() {
                w[i] = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            w
        }
        _ => DEFAULT_WEIGHTS,
    }
}

impl Guest for Weighted {
    fn score(_task: Task, c: Candidates) -> Result<Vec<f32>, String> {
        let n = c.health.len();
        if [c.in_flight.len(), c.latency_ms.len(), c.error_rate.len()].iter().any(|&len| len != n) {
            return Err("candidate columns of different lengths".into());
        }
        let [w_health, w_load, w_latency, w_errors] = weights();
        Ok((0..n)
            .map(|i| {
                let load = 1.0 / (1.0 + c.in_flight[i] as f32 / IN_FLIGHT_HALF);
                let latency = 1.0 / (1.0 + c.latency_ms[i].max(0.0) / LATENCY_HALF_MS);
                let errors = 1.0 - c.error_rate[i].clamp(0.0, 1.0);
                w_health * c.health[i].clamp(0.0, 1.0) + w_load * load + w_latency * latency + w_errors * errors
            })
            .collect())
    }
}

export!(Weighted);
