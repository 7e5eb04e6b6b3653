//! A scorer that spins forever without calling the host: only epoch interruption stops it.
wit_bindgen::generate!({ world: "scorer", path: "../../../wit" });

struct Spin;

impl exports::nops::plugin::scoring::Guest for Spin {
    fn score(
        _task: exports::nops::plugin::scoring::Task,
        candidates: Vec<exports::nops::plugin::scoring::Candidate>,
    ) -> Result<Vec<f32>, String> {
        let mut x: u64 = candidates.len() as u64;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

export!(Spin);
