//! A valid policy component; uploaded as a scorer it must be refused (world mismatch).
wit_bindgen::generate!({ world: "policy", path: "../../../wit" });

use exports::nops::plugin::authorization::{AccessRequest, Decision, Guest};

struct AllowAll;

impl Guest for AllowAll {
    fn evaluate(_request: AccessRequest) -> Decision {
        Decision { allow: true, reasons: vec!["fixture".into()], obligations: Vec::new() }
    }
}

export!(AllowAll);
