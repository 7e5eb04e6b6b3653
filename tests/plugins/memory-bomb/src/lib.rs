//! A scorer that allocates 1 MiB at a time, touching every page, until the memory cap stops it.
wit_bindgen::generate!({ world: "scorer", path: "../../../wit" });

struct Bomb;

impl exports::nops::plugin::scoring::Guest for Bomb {
    fn score(
        _task: exports::nops::plugin::scoring::Task,
        _candidates: Vec<exports::nops::plugin::scoring::Candidate>,
    ) -> Result<Vec<f32>, String> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![0xA5; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

export!(Bomb);
