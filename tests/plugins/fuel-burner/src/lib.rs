//! A contract whose `evaluate` computes forever without calling the host: only fuel
//! exhaustion (or the deadline) stops it.
wit_bindgen::generate!({ world: "contract", path: "../../../wit" });

use exports::nops::plugin::governance::{Event, Guest, Verdict};

struct Burner;

impl Guest for Burner {
    fn evaluate(event: Event) -> Result<Verdict, String> {
        let mut x: u64 = event.kind.len() as u64;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407));
        }
    }
}

export!(Burner);
