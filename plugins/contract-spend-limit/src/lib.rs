//! A tenant governance contract that caps spending.
//!
//! Configuration (`config::get()`, JSON): `{"limit": 1000}`, a non-negative integer; an empty
//! document means the default limit of [`DEFAULT_LIMIT`]. The running total is kept in
//! `storage` under the key `total`, as decimal text (an absent key is 0).
//!
//! | event kind | attributes                  | verdict                                             |
//! |------------|-----------------------------|-----------------------------------------------------|
//! | `spend`    | `amount`: integer ≥ 0       | accepted, and the total raised, while `total + amount ≤ limit`; rejected otherwise (the total is unchanged) |
//! | `reset`    | none                        | accepted; the total is set to 0                     |
//! | other      | any                         | accepted, nothing changes                           |
//!
//! A `spend` without an integer `amount`, or with a negative one, is rejected. An invalid
//! configuration, an unreadable total or a failed `storage` call is an `Err`: the kernel
//! discards the call's state changes, so the total never moves on a failure.
//!
//! After an accepted spend the contract publishes `{"amount", "total", "limit"}` on
//! `contract.spend` for whoever watches budgets. That notice is best effort: if the operator
//! did not grant the subject, or the bus fails, the verdict is the same.
//!
//! Contracts must be deterministic (they are metered by fuel and may be replayed): this one
//! reads no clock, draws no random numbers and iterates no hash map; its result depends only
//! on the configuration, the event and the stored total.

wit_bindgen::generate!({ world: "contract", path: "../../wit" });

use exports::nops::plugin::governance::{Event, Guest, Verdict};
use nops::plugin::types::{HostError, Value};
use nops::plugin::{bus, config, storage};
use serde::{Deserialize, Serialize};

/// The limit when no configuration is attached.
pub const DEFAULT_LIMIT: i64 = 1000;
/// The storage key of the running total.
const TOTAL_KEY: &str = "total";
/// Where accepted spends are announced.
const SPEND_SUBJECT: &str = "contract.spend";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    limit: i64,
}

/// The limit a configuration document sets.
fn parse_limit(document: &[u8]) -> Result<i64, String> {
    if document.iter().all(u8::is_ascii_whitespace) {
        return Ok(DEFAULT_LIMIT);
    }
    let config: Config = serde_json::from_slice(document)
        .map_err(|e| format!("invalid configuration (expected {{\"limit\": <integer>}}): {e}"))?;
    if config.limit < 0 {
        return Err(format!("invalid configuration: the limit {} is negative", config.limit));
    }
    Ok(config.limit)
}

/// What is published on [`SPEND_SUBJECT`] after an accepted spend.
#[derive(Serialize)]
struct SpendNotice {
    amount: i64,
    total: i64,
    limit: i64,
}

fn storage_error(error: HostError) -> String {
    match error {
        HostError::Denied(m) => format!("storage denied: {m}"),
        HostError::LimitExceeded(m) => format!("storage limit exceeded: {m}"),
        HostError::Invalid(m) => format!("storage rejected the call: {m}"),
        HostError::Unavailable(m) => format!("storage unavailable: {m}"),
    }
}

/// The running total; 0 when none is stored yet.
fn total() -> Result<i64, String> {
    match storage::get(TOTAL_KEY).map_err(storage_error)? {
        None => Ok(0),
        Some(bytes) => parse_total(&bytes),
    }
}

fn parse_total(bytes: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| text.parse::<i64>().ok())
        .ok_or_else(|| format!("the stored `{TOTAL_KEY}` is not a decimal integer"))
}

fn set_total(total: i64) -> Result<(), String> {
    storage::set(TOTAL_KEY, total.to_string().as_bytes()).map_err(storage_error)
}

fn verdict(accept: bool, reason: String) -> Verdict {
    Verdict { accept, reason }
}

/// The decision on a spend, apart from storage: the amount and the new total if it fits,
/// or why the spend is rejected.
fn check_spend(total: i64, limit: i64, amount: Option<&Value>) -> Result<(i64, i64), String> {
    let amount = match amount {
        Some(Value::Integer(amount)) if *amount >= 0 => *amount,
        Some(Value::Integer(amount)) => return Err(format!("the amount {amount} is negative")),
        _ => return Err("a spend needs an integer `amount` attribute".into()),
    };
    match total.checked_add(amount) {
        Some(sum) if sum <= limit => Ok((amount, sum)),
        _ => Err(format!("spending {amount} would bring the total from {total} over the limit of {limit}")),
    }
}

fn spend(event: &Event) -> Result<Verdict, String> {
    let limit = parse_limit(&config::get())?;
    let amount = event.attributes.iter().find(|a| a.name == "amount").map(|a| &a.value);
    let (amount, new_total) = match check_spend(total()?, limit, amount) {
        Ok(spend) => spend,
        Err(reason) => return Ok(verdict(false, reason)),
    };
    set_total(new_total)?;
    // Best effort: a denied subject or a bus failure does not change the verdict.
    if let Ok(notice) = serde_json::to_vec(&SpendNotice { amount, total: new_total, limit }) {
        let _ = bus::publish(SPEND_SUBJECT, &notice);
    }
    Ok(verdict(true, format!("spent {amount}: total {new_total} of {limit}")))
}

struct SpendLimit;

impl Guest for SpendLimit {
    fn evaluate(event: Event) -> Result<Verdict, String> {
        match event.kind.as_str() {
            "spend" => spend(&event),
            "reset" => {
                set_total(0)?;
                Ok(verdict(true, "the total is reset to 0".into()))
            }
            other => Ok(verdict(true, format!("`{other}` events are not governed by this contract"))),
        }
    }
}

export!(SpendLimit);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_from_configuration() {
        assert_eq!(parse_limit(b""), Ok(DEFAULT_LIMIT));
        assert_eq!(parse_limit(b" \n"), Ok(DEFAULT_LIMIT));
        assert_eq!(parse_limit(br#"{"limit": 250}"#), Ok(250));
        assert_eq!(parse_limit(br#"{"limit": 0}"#), Ok(0));
        assert!(parse_limit(br#"{"limit": -1}"#).unwrap_err().contains("negative"));
        assert!(parse_limit(br#"{"limit": 1.5}"#).is_err());
        assert!(parse_limit(br#"{"limit": 10, "currency": "EUR"}"#).is_err());
        assert!(parse_limit(b"{}").is_err());
    }

    #[test]
    fn stored_total() {
        assert_eq!(parse_total(b"0"), Ok(0));
        assert_eq!(parse_total(b"1234"), Ok(1234));
        assert!(parse_total(b"").is_err());
        assert!(parse_total(&42i64.to_le_bytes()).is_err());
    }

    #[test]
    fn spends_fit_under_the_limit() {
        let amount = |n: i64| Value::Integer(n);
        assert_eq!(check_spend(0, 1000, Some(&amount(1000))), Ok((1000, 1000)));
        assert_eq!(check_spend(400, 1000, Some(&amount(600))), Ok((600, 1000)));
        assert_eq!(check_spend(400, 1000, Some(&amount(0))), Ok((0, 400)));
        assert!(check_spend(401, 1000, Some(&amount(600))).unwrap_err().contains("over the limit of 1000"));
        assert!(check_spend(1, i64::MAX, Some(&amount(i64::MAX))).is_err(), "overflow is a rejection");
        assert!(check_spend(0, 1000, Some(&amount(-5))).unwrap_err().contains("negative"));
        assert!(check_spend(0, 1000, Some(&Value::Number(5.0))).is_err());
        assert!(check_spend(0, 1000, Some(&Value::Text("5".into()))).is_err());
        assert!(check_spend(0, 1000, None).is_err());
    }
}
