//! A scorer that hits `unreachable` (a Rust panic with panic=abort).
wit_bindgen::generate!({ world: "scorer", path: "../../../wit" });

struct Trap;

impl exports::nops::plugin::scoring::Guest for Trap {
    fn score(
        _task: exports::nops::plugin::scoring::Task,
        candidates: Vec<exports::nops::plugin::scoring::Candidate>,
    ) -> Result<Vec<f32>, String> {
        let index = candidates.len() + 10;
        let scores = vec![0.0f32; candidates.len()];
        // Out of bounds on purpose.
        Ok(vec![scores[std::hint::black_box(index)]])
    }
}

export!(Trap);
