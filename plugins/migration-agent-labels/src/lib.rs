//! Migration of agent records from schema 1 to schema 2: labels change from a JSON object to
//! a list of key/value pairs, and the record gains `"schema": 2`.
//!
//! ```text
//! v1: {"name": "gpu-1", "labels": {"zone": "eu-1", "gpu": "a100"}}
//! v2: {"name": "gpu-1", "labels": [{"key": "zone", "value": "eu-1"}, {"key": "gpu", "value": "a100"}], "schema": 2}
//! ```
//!
//! `up` and `down` are exact inverses. `down(up(r))` is `r`: the same fields in the same
//! order, labels in the same order, only whitespace dropped. `up(down(r))` is `r` as well,
//! once `r` is written the way `up` writes it (`schema` last, each pair `key` first). Other
//! fields of the record pass through untouched, in place. To keep that promise both
//! directions refuse, with an error instead of a lossy result, any record they could not
//! restore:
//!
//! - not a JSON object, without a string `name`, or with an object that repeats a key;
//! - `up`: `labels` missing or not an object of strings, or a `schema` field already present;
//! - `down`: `schema` other than the integer 2, `labels` missing or not a list of
//!   `{"key": string, "value": string}` objects, or a label key that occurs twice.
//!
//! Migrations have no storage: the kernel hands each record in and stores what comes back,
//! and an error stops the migration with the message.

wit_bindgen::generate!({ world: "migration", path: "../../wit" });

mod json;

use exports::nops::plugin::migrating::Guest;
use json::Json;

/// The version this migration starts from; `up` produces version 2.
const FROM_VERSION: u32 = 1;
/// The `schema` value of migrated records.
const TO_SCHEMA: u64 = FROM_VERSION as u64 + 1;

struct AgentLabels;

/// Parses `data` as a JSON object with a string `name`; returns its entries, in order.
fn record(data: &[u8]) -> Result<Vec<(String, Json)>, String> {
    let value: Json = serde_json::from_slice(data).map_err(|e| format!("the record is not valid JSON: {e}"))?;
    if !matches!(value.get("name"), Some(Json::String(_))) {
        return Err("the record is not a JSON object with a string `name`".into());
    }
    let Json::Object(entries) = value else {
        return Err("the record is not a JSON object".into());
    };
    Ok(entries)
}

fn to_bytes(record: Vec<(String, Json)>) -> Result<Vec<u8>, String> {
    serde_json::to_vec(&Json::Object(record)).map_err(|e| format!("cannot serialise the record: {e}"))
}

/// The value of the entry `key`, to be replaced in place.
fn field<'a>(record: &'a mut [(String, Json)], key: &str) -> Option<&'a mut Json> {
    record.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// Schema 1 → 2.
fn up(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut record = record(data)?;
    if record.iter().any(|(k, _)| k == "schema") {
        return Err("the record already has a `schema` field; it is not a version 1 record".into());
    }
    let Some(slot) = field(&mut record, "labels") else {
        return Err("the record has no `labels`".into());
    };
    let Json::Object(labels) = std::mem::replace(slot, Json::Null) else {
        return Err("`labels` must be an object of strings in a version 1 record".into());
    };
    let mut pairs = Vec::with_capacity(labels.len());
    for (key, value) in labels {
        let Json::String(value) = value else {
            return Err(format!("label {key:?} is not a string"));
        };
        pairs.push(Json::Object(vec![("key".into(), Json::String(key)), ("value".into(), Json::String(value))]));
    }
    *slot = Json::Array(pairs);
    record.push(("schema".into(), Json::Number(TO_SCHEMA.into())));
    to_bytes(record)
}

/// Schema 2 → 1.
fn down(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut record = record(data)?;
    let Some(schema) = record.iter().position(|(k, _)| k == "schema") else {
        return Err(format!("the record has no `schema` field; it is not a version {TO_SCHEMA} record"));
    };
    match &record[schema].1 {
        Json::Number(n) if n.as_u64() == Some(TO_SCHEMA) => {}
        _ => return Err(format!("`schema` must be {TO_SCHEMA}")),
    }
    record.remove(schema);
    let Some(slot) = field(&mut record, "labels") else {
        return Err("the record has no `labels`".into());
    };
    let Json::Array(pairs) = std::mem::replace(slot, Json::Null) else {
        return Err(format!("`labels` must be a list of key/value pairs in a version {TO_SCHEMA} record"));
    };
    let mut labels: Vec<(String, Json)> = Vec::with_capacity(pairs.len());
    for (index, pair) in pairs.into_iter().enumerate() {
        let Json::Object(entries) = pair else {
            return Err(format!("label {index} is not an object"));
        };
        let (key, value) = match <[(String, Json); 2]>::try_from(entries) {
            Ok([(k, Json::String(key)), (v, Json::String(value))]) if k == "key" && v == "value" => (key, value),
            Ok([(v, Json::String(value)), (k, Json::String(key))]) if k == "key" && v == "value" => (key, value),
            _ => return Err(format!("label {index} must be exactly {{\"key\": string, \"value\": string}}")),
        };
        if labels.iter().any(|(k, _)| *k == key) {
            return Err(format!("label key {key:?} occurs twice"));
        }
        labels.push((key, Json::String(value)));
    }
    *slot = Json::Object(labels);
    to_bytes(record)
}

impl Guest for AgentLabels {
    fn from_version() -> u32 {
        FROM_VERSION
    }

    fn up(data: Vec<u8>) -> Result<Vec<u8>, String> {
        up(&data)
    }

    fn down(data: Vec<u8>) -> Result<Vec<u8>, String> {
        down(&data)
    }
}

export!(AgentLabels);

#[cfg(test)]
mod tests {
    use super::*;

    /// `bytes` reformatted without whitespace, keys in order.
    fn compact(bytes: &[u8]) -> String {
        serde_json::to_string(&serde_json::from_slice::<Json>(bytes).unwrap()).unwrap()
    }

    #[test]
    fn up_and_down_are_inverse() {
        let v1 = br#"{"id": 7, "name": "gpu-1", "labels": {"zone": "eu-1", "gpu": "a100", "a": ""}, "endpoint": "http://x"}"#;
        let v2 = up(v1).unwrap();
        assert_eq!(
            String::from_utf8(v2.clone()).unwrap(),
            r#"{"id":7,"name":"gpu-1","labels":[{"key":"zone","value":"eu-1"},{"key":"gpu","value":"a100"},{"key":"a","value":""}],"endpoint":"http://x","schema":2}"#
        );
        let back = down(&v2).unwrap();
        assert_eq!(String::from_utf8(back.clone()).unwrap(), compact(v1));
        assert_eq!(up(&back).unwrap(), v2);

        // Nested objects keep their key order too.
        let nested = br#"{"name":"n","z":{"b":1,"a":[{"y":null,"x":1.5}]},"labels":{"b":"1","a":"2"}}"#;
        assert_eq!(down(&up(nested).unwrap()).unwrap(), nested);

        let empty = br#"{"name":"n","labels":{}}"#;
        assert_eq!(up(empty).unwrap(), br#"{"name":"n","labels":[],"schema":2}"#);
        assert_eq!(down(&up(empty).unwrap()).unwrap(), empty);
    }

    #[test]
    fn malformed_records_are_errors() {
        for bad in [&b"not json"[..], b"[]", br#"{"labels":{}}"#, br#"{"name":1,"labels":{}}"#] {
            assert!(up(bad).is_err());
            assert!(down(bad).is_err());
        }
        assert!(up(br#"{"name":"n"}"#).is_err());
        assert!(up(br#"{"name":"n","labels":[]}"#).is_err());
        assert!(up(br#"{"name":"n","labels":{"k":1}}"#).is_err());
        assert!(up(br#"{"name":"n","labels":{},"schema":1}"#).is_err());
        assert!(down(br#"{"name":"n","labels":[]}"#).is_err());
        assert!(down(br#"{"name":"n","labels":[],"schema":3}"#).is_err());
        assert!(down(br#"{"name":"n","labels":[],"schema":"2"}"#).is_err());
        assert!(down(br#"{"name":"n","labels":{},"schema":2}"#).is_err());
        assert!(down(br#"{"name":"n","labels":[{"key":"k"}],"schema":2}"#).is_err());
        assert!(down(br#"{"name":"n","labels":[{"key":"k","value":"v","x":1}],"schema":2}"#).is_err());
        assert!(down(br#"{"name":"n","labels":[{"key":"k","value":1}],"schema":2}"#).is_err());
        assert!(up(br#"{"name":"n","labels":{"k":"a","k":"b"}}"#).unwrap_err().contains("occurs twice"));
        let twice = down(br#"{"name":"n","labels":[{"key":"k","value":"a"},{"key":"k","value":"b"}],"schema":2}"#);
        assert_eq!(twice.unwrap_err(), r#"label key "k" occurs twice"#);
    }
}
