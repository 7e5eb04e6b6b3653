//! An MCP tool whose `call` uses `storage` and `bus`, which a test leaves ungranted, and
//! reports what the host returned instead of trapping:
//! `{"storage":"denied: <message>","bus":"denied: <message>"}`, each value being `ok` or the
//! `host-error` case name followed by its message.
wit_bindgen::generate!({ world: "mcp-tool", path: "../../../wit" });

use exports::nops::plugin::tool::{Description, Guest};
use nops::plugin::types::HostError;
use nops::plugin::{bus, storage};

struct Ungranted;

/// `ok`, or `<case>: <message>`.
fn outcome<T>(result: Result<T, HostError>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(HostError::Denied(m)) => format!("denied: {m}"),
        Err(HostError::LimitExceeded(m)) => format!("limit-exceeded: {m}"),
        Err(HostError::Invalid(m)) => format!("invalid: {m}"),
        Err(HostError::Unavailable(m)) => format!("unavailable: {m}"),
    }
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Guest for Ungranted {
    fn describe() -> Description {
        Description {
            name: "ungranted".into(),
            description: "Calls storage and bus and reports the results.".into(),
            input_schema: r#"{"type":"object"}"#.into(),
        }
    }

    fn call(_arguments: String) -> Result<String, String> {
        let storage = outcome(storage::set("k", b"v"));
        let bus = outcome(bus::publish("anything", b"payload"));
        Ok(format!("{{\"storage\":{},\"bus\":{}}}", json_string(&storage), json_string(&bus)))
    }
}

export!(Ungranted);
