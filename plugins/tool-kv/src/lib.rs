//! `kv`: an MCP tool that lets an AI agent keep notes in the plugin's storage. The kernel
//! scopes that storage to this plugin and the tenant the call runs for, so two tenants using
//! the tool never see each other's keys.
//!
//! Arguments (JSON): `{"op": "get" | "set" | "delete" | "list", "key": string, "value": string}`.
//!
//! | op       | needs          | returns                                                    |
//! |----------|----------------|------------------------------------------------------------|
//! | `get`    | `key`          | `{"key": k, "value": v}`, `value` null when absent          |
//! | `set`    | `key`, `value` | `{"key": k, "stored": true}`                                |
//! | `delete` | `key`          | `{"key": k, "deleted": bool}` (false when it did not exist) |
//! | `list`   | (`key`)        | `{"prefix": p, "keys": [..], "truncated": bool}`: keys starting with `key` (all when omitted), in order, at most [`LIST_LIMIT`] |
//!
//! Errors are returned as `Err(message)`, which the kernel shows to the caller as an MCP
//! error result: malformed arguments, a non-text value, and failed storage calls. When the
//! operator did not grant `storage`, the host's `denied` message is returned as it is; the
//! other host errors are prefixed with their case (`limit-exceeded: `, `invalid: `,
//! `unavailable: `).

wit_bindgen::generate!({ world: "mcp-tool", path: "../../wit" });

use exports::nops::plugin::tool::{Description, Guest};
use nops::plugin::storage;
use nops::plugin::types::HostError;
use serde::Deserialize;
use serde_json::json;

/// Most keys a `list` returns.
pub const LIST_LIMIT: u32 = 100;

/// The JSON Schema of the arguments, as MCP clients expect it.
const INPUT_SCHEMA: &str = r#"{
  "type": "object",
  "properties": {
    "op": { "type": "string", "enum": ["get", "set", "delete", "list"], "description": "What to do." },
    "key": { "type": "string", "minLength": 1, "maxLength": 256, "description": "The key; for list, an optional prefix." },
    "value": { "type": "string", "description": "The text to store (set only)." }
  },
  "required": ["op"],
  "additionalProperties": false,
  "allOf": [
    { "if": { "properties": { "op": { "const": "set" } } }, "then": { "required": ["key", "value"] } },
    { "if": { "properties": { "op": { "enum": ["get", "delete"] } } }, "then": { "required": ["key"] } }
  ]
}"#;

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Op {
    Get,
    Set,
    Delete,
    List,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Arguments {
    op: Op,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    value: Option<String>,
}

/// A host error as the message the caller sees.
fn host_error(error: HostError) -> String {
    match error {
        HostError::Denied(message) => message,
        HostError::LimitExceeded(message) => format!("limit-exceeded: {message}"),
        HostError::Invalid(message) => format!("invalid: {message}"),
        HostError::Unavailable(message) => format!("unavailable: {message}"),
    }
}

/// One operation, with the arguments it needs.
#[derive(Debug, PartialEq)]
enum Command {
    Get { key: String },
    Set { key: String, value: String },
    Delete { key: String },
    List { prefix: String },
}

fn required(field: Option<String>, op: &str, name: &str) -> Result<String, String> {
    field.ok_or_else(|| format!("`{op}` needs a `{name}` argument"))
}

/// Parses and checks the JSON arguments.
fn parse(arguments: &str) -> Result<Command, String> {
    let Arguments { op, key, value } =
        serde_json::from_str(arguments).map_err(|e| format!("invalid arguments: {e}"))?;
    if value.is_some() && !matches!(op, Op::Set) {
        return Err("`value` is only for `set`".into());
    }
    Ok(match op {
        Op::Get => Command::Get { key: required(key, "get", "key")? },
        Op::Set => Command::Set { key: required(key, "set", "key")?, value: required(value, "set", "value")? },
        Op::Delete => Command::Delete { key: required(key, "delete", "key")? },
        Op::List => Command::List { prefix: key.unwrap_or_default() },
    })
}

/// Runs `command` against storage; returns the JSON content.
fn run(command: Command) -> Result<serde_json::Value, String> {
    Ok(match command {
        Command::Get { key } => {
            let value = match storage::get(&key).map_err(host_error)? {
                Some(bytes) => Some(String::from_utf8(bytes).map_err(|_| format!("the value of {key:?} is not text"))?),
                None => None,
            };
            json!({ "key": key, "value": value })
        }
        Command::Set { key, value } => {
            storage::set(&key, value.as_bytes()).map_err(host_error)?;
            json!({ "key": key, "stored": true })
        }
        Command::Delete { key } => {
            let deleted = storage::delete(&key).map_err(host_error)?;
            json!({ "key": key, "deleted": deleted })
        }
        Command::List { prefix } => {
            // One more than shown, to tell whether the list was cut.
            let mut keys = storage::list_keys(&prefix, LIST_LIMIT + 1).map_err(host_error)?;
            let truncated = keys.len() > LIST_LIMIT as usize;
            keys.truncate(LIST_LIMIT as usize);
            json!({ "prefix": prefix, "keys": keys, "truncated": truncated })
        }
    })
}

struct Kv;

impl Guest for Kv {
    fn describe() -> Description {
        Description {
            name: "kv".into(),
            description: "A small key-value store private to your tenant: get, set, delete or list text values by key."
                .into(),
            input_schema: INPUT_SCHEMA.into(),
        }
    }

    fn call(arguments: String) -> Result<String, String> {
        run(parse(&arguments)?).map(|content| content.to_string())
    }
}

export!(Kv);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_is_json() {
        let schema: serde_json::Value = serde_json::from_str(INPUT_SCHEMA).unwrap();
        assert_eq!(schema["properties"]["op"]["enum"], json!(["get", "set", "delete", "list"]));
    }

    #[test]
    fn parses_arguments() {
        let key = || "k".to_string();
        assert_eq!(parse(r#"{"op":"get","key":"k"}"#), Ok(Command::Get { key: key() }));
        assert_eq!(parse(r#"{"op":"set","key":"k","value":""}"#), Ok(Command::Set { key: key(), value: "".into() }));
        assert_eq!(parse(r#"{"op":"delete","key":"k"}"#), Ok(Command::Delete { key: key() }));
        assert_eq!(parse(r#"{"op":"list"}"#), Ok(Command::List { prefix: "".into() }));
        assert_eq!(parse(r#"{"op":"list","key":"notes/"}"#), Ok(Command::List { prefix: "notes/".into() }));
    }

    #[test]
    fn rejects_bad_arguments() {
        for (arguments, expected) in [
            ("", "invalid arguments"),
            ("[]", "invalid arguments"),
            (r#"{"key":"k"}"#, "missing field `op`"),
            (r#"{"op":"put","key":"k"}"#, "unknown variant `put`"),
            (r#"{"op":"get","key":"k","ttl":3}"#, "unknown field `ttl`"),
            (r#"{"op":"get","key":7}"#, "invalid type"),
            (r#"{"op":"get"}"#, "`get` needs a `key`"),
            (r#"{"op":"set","key":"k"}"#, "`set` needs a `value`"),
            (r#"{"op":"set","value":"v"}"#, "`set` needs a `key`"),
            (r#"{"op":"delete","key":"k","value":"v"}"#, "only for `set`"),
        ] {
            let error = parse(arguments).unwrap_err();
            assert!(error.contains(expected), "{arguments}: {error}");
        }
    }
}
