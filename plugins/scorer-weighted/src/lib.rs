//! The reference scorer: ranks candidates by a weighted sum of the kernel's health score,
//! spare capacity, latency and error rate. Weights can be tuned per tenant through
//! `storage` (key `weights`: four little-endian f32 for health, load, latency, errors).

wit_bindgen::generate!({ world: "scorer", path: "../../wit" });

use exports::nops::plugin::scoring::{Candidate, Guest, Task};
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
    fn score(_task: Task, candidates: Vec<Candidate>) -> Result<Vec<f32>, String> {
        let [w_health, w_load, w_latency, w_errors] = weights();
        Ok(candidates
            .iter()
            .map(|c| {
                let load = 1.0 / (1.0 + c.in_flight as f32 / IN_FLIGHT_HALF);
                let latency = 1.0 / (1.0 + c.latency_ms.max(0.0) / LATENCY_HALF_MS);
                let errors = 1.0 - c.error_rate.clamp(0.0, 1.0);
                w_health * c.health.clamp(0.0, 1.0) + w_load * load + w_latency * latency + w_errors * errors
            })
            .collect())
    }
}

export!(Weighted);
