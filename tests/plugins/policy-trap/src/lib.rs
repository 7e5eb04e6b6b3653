//! A policy whose `evaluate` panics, which with `panic = "abort"` is a trap: the host must
//! deny the request (fail closed) and keep serving.
wit_bindgen::generate!({ world: "policy", path: "../../../wit" });

use exports::nops::plugin::authorization::{AccessRequest, Decision, Guest};

struct Trap;

impl Guest for Trap {
    fn evaluate(request: AccessRequest) -> Decision {
        panic!("policy-trap fixture: refusing to decide {:?}", request.action);
    }
}

export!(Trap);
