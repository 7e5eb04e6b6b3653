//! How the bus is laid out on NATS: stream names, subjects, consumer names, headers and the
//! ack token. Everything an outside client needs to read the events (see
//! `docs/events-nats.md`) is decided here.

use async_nats::HeaderMap;
use nops_core::bus::{BusError, ConsumerSpec, StartAt, StoredEvent};
use nops_core::tenant::TenantId;

/// Longest stream prefix, in bytes (stream names stay well inside NATS limits).
pub const PREFIX_BYTES_MAX: usize = 32;

/// JetStream's deduplication header: `<tenant>/<event id>` on the events stream.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// The event id as published.
pub const HEADER_EVENT_ID: &str = "Nops-Event-Id";
/// Who published the event.
pub const HEADER_SOURCE: &str = "Nops-Source";
/// When the event was published (ms since the Unix epoch).
pub const HEADER_TIME_MS: &str = "Nops-Time-Ms";
/// The original event's sequence in the events stream (copies in the redeliver and
/// dead-letter streams).
pub const HEADER_EVENT_SEQ: &str = "Nops-Event-Seq";
/// The original event's subject without the stream prefix (copies only).
pub const HEADER_SUBJECT: &str = "Nops-Subject";
/// The consumer group a dead letter belongs to.
pub const HEADER_CONSUMER: &str = "Nops-Consumer";
/// How many times a dead letter was delivered.
pub const HEADER_DELIVERIES: &str = "Nops-Deliveries";
/// Why an event was dead-lettered: `deliveries_max` or `terminated`.
pub const HEADER_REASON: &str = "Nops-Reason";
/// When an event was dead-lettered (ms since the Unix epoch).
pub const HEADER_AT_MS: &str = "Nops-At-Ms";

/// Separates the tenant from the group in a NATS consumer name. Neither a tenant id nor a
/// group name can contain it, so `<tenant>~<group>` is unambiguous.
const CONSUMER_SEPARATOR: char = '~';

/// The streams and subjects of one prefix.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `<prefix>_EVENTS`: every event of every tenant.
    pub events: String,
    /// `<prefix>_REDELIVER`: copies of events queued again for one group (replay, re-drive).
    pub redeliver: String,
    /// `<prefix>_DLQ`: dead letters.
    pub dlq: String,
    /// The subject prefix, the stream prefix in lowercase.
    lower: String,
}

impl Layout {
    /// The layout of `prefix`: 1 to [`PREFIX_BYTES_MAX`] of ASCII letters, digits, `-`, `_`.
    pub fn new(prefix: &str) -> Result<Self, BusError> {
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if prefix.is_empty() || prefix.len() > PREFIX_BYTES_MAX || !prefix.chars().all(ok) {
            return Err(BusError::Backend(format!(
                "the NATS stream prefix is 1 to {PREFIX_BYTES_MAX} of letters, digits, '-' or '_'"
            )));
        }
        Ok(Self {
            events: format!("{prefix}_EVENTS"),
            redeliver: format!("{prefix}_REDELIVER"),
            dlq: format!("{prefix}_DLQ"),
            lower: prefix.to_ascii_lowercase(),
        })
    }

    /// Every subject of the events stream.
    pub fn events_all(&self) -> String {
        format!("{}.ev.>", self.lower)
    }
    /// Every subject of the redeliver stream.
    pub fn redeliver_all(&self) -> String {
        format!("{}.rd.>", self.lower)
    }
    /// Every subject of the dead-letter stream.
    pub fn dlq_all(&self) -> String {
        format!("{}.dlq.>", self.lower)
    }

    /// `<prefix>.ev.<tenant>.<subject>`: where an event (or a filter over events) lives.
    pub fn event_subject(&self, tenant: &TenantId, subject: &str) -> String {
        format!("{}.ev.{tenant}.{subject}", self.lower)
    }
    /// `<prefix>.rd.<tenant>.<group>`: redeliveries for one group.
    pub fn redeliver_subject(&self, tenant: &TenantId, group: &str) -> String {
        format!("{}.rd.{tenant}.{group}", self.lower)
    }
    /// `<prefix>.dlq.<tenant>.<group>`, or every group of the tenant when `group` is `None`.
    pub fn dlq_subject(&self, tenant: &TenantId, group: Option<&str>) -> String {
        format!("{}.dlq.{tenant}.{}", self.lower, group.unwrap_or("*"))
    }

    /// The tenant and the rest of a subject of one of this layout's streams (`kind` is `ev`,
    /// `rd` or `dlq`), or `None` when the subject is not of that kind.
    pub fn split<'a>(&self, kind: &str, subject: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = subject.strip_prefix(self.lower.as_str())?.strip_prefix('.')?;
        let rest = rest.strip_prefix(kind)?.strip_prefix('.')?;
        rest.split_once('.')
    }
}

/// The NATS consumer name of a group (the same on the events and the redeliver stream).
pub fn consumer_name(tenant: &TenantId, group: &str) -> String {
    format!("{tenant}{CONSUMER_SEPARATOR}{group}")
}

/// The tenant part of the consumer names of `tenant` (`<tenant>~`).
pub fn consumer_name_prefix(tenant: &TenantId) -> String {
    format!("{tenant}{CONSUMER_SEPARATOR}")
}

/// A group's settings as kept in its NATS consumer's description (`v` is the format).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StoredSpec {
    /// Format version.
    pub v: u32,
    /// Subject filter without the stream prefix.
    pub filter: String,
    /// Ack deadline when `backoff_ms` is empty.
    pub ack_wait_ms: u64,
    /// Deliveries before dead-lettering.
    pub deliveries_max: u32,
    /// Per-delivery ack deadlines.
    pub backoff_ms: Vec<u64>,
    /// Where the group started.
    pub start: StartAt,
    /// Most outstanding deliveries.
    pub pending_max: u32,
}

impl StoredSpec {
    /// What to keep of `spec`.
    pub fn of(spec: &ConsumerSpec) -> Self {
        Self {
            v: 1,
            filter: spec.filter.clone(),
            ack_wait_ms: spec.ack_wait_ms,
            deliveries_max: spec.deliveries_max,
            backoff_ms: spec.backoff_ms.clone(),
            start: spec.start,
            pending_max: spec.pending_max,
        }
    }

    /// The group's settings back.
    pub fn spec(self, tenant: &TenantId, name: &str) -> ConsumerSpec {
        ConsumerSpec {
            tenant: tenant.clone(),
            name: name.to_owned(),
            filter: self.filter,
            ack_wait_ms: self.ack_wait_ms,
            deliveries_max: self.deliveries_max,
            backoff_ms: self.backoff_ms,
            start: self.start,
            pending_max: self.pending_max,
        }
    }

    /// Parses a consumer description written by [`StoredSpec::to_description`].
    pub fn from_description(description: Option<&str>) -> Result<Self, BusError> {
        let text = description.ok_or_else(|| BusError::Backend("consumer without a stored spec".into()))?;
        serde_json::from_str(text).map_err(|err| BusError::Backend(format!("consumer spec unreadable: {err}")))
    }

    /// The description to store.
    pub fn to_description(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A header's value as a string, if present.
pub fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|value| value.as_str())
}

fn header_num<T: std::str::FromStr>(headers: Option<&HeaderMap>, name: &str) -> Result<T, BusError> {
    header(headers, name)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| BusError::Backend(format!("stored message without a valid {name} header")))
}

fn header_text(headers: Option<&HeaderMap>, name: &str) -> Result<String, BusError> {
    header(headers, name)
        .map(str::to_owned)
        .ok_or_else(|| BusError::Backend(format!("stored message without a {name} header")))
}

/// Headers of an event in the events stream.
pub fn event_headers(tenant: &TenantId, id: &str, source: &str, time_ms: i64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_MSG_ID, format!("{tenant}/{id}").as_str());
    headers.insert(HEADER_EVENT_ID, id);
    headers.insert(HEADER_SOURCE, source);
    headers.insert(HEADER_TIME_MS, time_ms.to_string().as_str());
    headers
}

/// Headers of a copy of `event` (redeliver and dead-letter streams): the original's metadata.
pub fn copy_headers(event: &StoredEvent) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_EVENT_SEQ, event.seq.to_string().as_str());
    headers.insert(HEADER_EVENT_ID, event.id.as_str());
    headers.insert(HEADER_SUBJECT, event.subject.as_str());
    headers.insert(HEADER_SOURCE, event.source.as_str());
    headers.insert(HEADER_TIME_MS, event.time_ms.to_string().as_str());
    headers
}

/// An event of the events stream, from its NATS subject, sequence, headers and payload.
pub fn event_from_stream(
    layout: &Layout,
    subject: &str,
    seq: u64,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<StoredEvent, BusError> {
    let (tenant, rest) =
        layout.split("ev", subject).ok_or_else(|| BusError::Backend(format!("unexpected subject {subject}")))?;
    Ok(StoredEvent {
        seq,
        id: header_text(headers, HEADER_EVENT_ID)?,
        tenant: tenant.parse().map_err(|_| BusError::Backend(format!("unexpected subject {subject}")))?,
        subject: rest.to_owned(),
        payload: payload.to_vec(),
        source: header(headers, HEADER_SOURCE).unwrap_or_default().to_owned(),
        time_ms: header_num(headers, HEADER_TIME_MS)?,
    })
}

/// The original event carried by a copy (redeliver or dead-letter stream) of `tenant`.
pub fn event_from_copy(
    tenant: &TenantId,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<StoredEvent, BusError> {
    Ok(StoredEvent {
        seq: header_num(headers, HEADER_EVENT_SEQ)?,
        id: header_text(headers, HEADER_EVENT_ID)?,
        tenant: tenant.clone(),
        subject: header_text(headers, HEADER_SUBJECT)?,
        payload: payload.to_vec(),
        source: header(headers, HEADER_SOURCE).unwrap_or_default().to_owned(),
        time_ms: header_num(headers, HEADER_TIME_MS)?,
    })
}

/// The parts of a JetStream ack subject (`$JS.ACK.[<domain>.<account hash>.]<stream>.<consumer>.
/// <delivered>.<stream seq>.<consumer seq>.<time>.<pending>[.<token>]`) the bus checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckToken<'a> {
    /// The stream the delivery came from.
    pub stream: &'a str,
    /// The NATS consumer.
    pub consumer: &'a str,
    /// Which delivery this is, from 1.
    pub delivered: u32,
    /// The message's sequence in `stream`.
    pub stream_seq: u64,
}

/// Parses an ack token; `None` when it is not a JetStream ack subject.
pub fn parse_token(token: &str) -> Option<AckToken<'_>> {
    let rest = token.strip_prefix("$JS.ACK.")?;
    if rest.chars().any(|c| c.is_whitespace() || c == '*' || c == '>') {
        return None;
    }
    let tokens: Vec<&str> = rest.split('.').collect();
    // The 7-token form of older servers, or the 9+-token form with domain and account hash.
    let at = match tokens.len() {
        7 => 0,
        n if n >= 9 => 2,
        _ => return None,
    };
    let numbers_ok = tokens[at + 2..at + 7].iter().all(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()));
    if !numbers_ok || tokens[at].is_empty() || tokens[at + 1].is_empty() {
        return None;
    }
    Some(AckToken {
        stream: tokens[at],
        consumer: tokens[at + 1],
        delivered: tokens[at + 2].parse().ok()?,
        stream_seq: tokens[at + 3].parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_tokens_of_both_formats_parse_and_garbage_does_not() {
        let v1 = parse_token("$JS.ACK.P_EVENTS.t~g.3.100.7.1790230470084404000.42").expect("v1");
        assert_eq!(v1, AckToken { stream: "P_EVENTS", consumer: "t~g", delivered: 3, stream_seq: 100 });
        let v2 = parse_token("$JS.ACK._.ACCHASH.P_EVENTS.t~g.1.5.5.1790230470084404000.0.tok").expect("v2");
        assert_eq!(v2, AckToken { stream: "P_EVENTS", consumer: "t~g", delivered: 1, stream_seq: 5 });
        for bad in ["", "x", "$JS.ACK.a.b.c", "$JS.ACK.P.c.x.1.1.1.1", "$JS.ACK.P.>.1.1.1.1.1", "$JS.ACK..c.1.1.1.1.1"]
        {
            assert_eq!(parse_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn subjects_split_back_into_tenant_and_rest() {
        let layout = Layout::new("Test_1").expect("layout");
        let tenant: TenantId = "acme".parse().expect("tenant");
        let subject = layout.event_subject(&tenant, "billing.invoice.paid");
        assert_eq!(subject, "test_1.ev.acme.billing.invoice.paid");
        assert_eq!(layout.split("ev", &subject), Some(("acme", "billing.invoice.paid")));
        assert_eq!(layout.split("dlq", &subject), None);
        assert_eq!(layout.split("ev", "other.ev.acme.x"), None);
        assert!(Layout::new("").is_err());
        assert!(Layout::new("a.b").is_err());
    }

    #[test]
    fn consumer_names_of_different_tenants_and_groups_never_collide() {
        let a: TenantId = "a__b".parse().expect("tenant");
        let b: TenantId = "a".parse().expect("tenant");
        assert_ne!(consumer_name(&a, "c"), consumer_name(&b, "b__c"));
    }
}
