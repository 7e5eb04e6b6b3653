//! The event bus over HTTP: `/api/v1/events` (publish, read), `/api/v1/consumers` (durable
//! consumer groups: fetch with long poll or a server-sent-event stream; ack, nack, extend,
//! terminate), `/api/v1/dlq` (the dead-letter queue) and `/api/v1/replay`. See
//! `docs/events.md`.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use nops_core::bus::ReadRange;
use nops_core::events::{
    AckRequest, AckResult, ConsumerRequest, ConsumerView, DeadLetterView, DeliveryView, EventView, NewEvent,
    PublishResult, ReplayReport, ReplayRequest,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::extract::{Json, Path, Query};
use crate::openapi::ErrorBody;

/// Page size of listings when the client names none.
const LIST_LIMIT_DEFAULT: u32 = 100;
/// Largest page of a listing.
const LIST_LIMIT_MAX: u32 = 1_000;
/// Deliveries one stream round fetches.
const STREAM_FETCH_MAX: u32 = 100;
/// How long one stream round waits for events before sending a keep-alive.
const STREAM_WAIT_MS: u64 = 15_000;
/// Pause of a stream after a failed fetch (the bus unavailable), before it tries again.
const STREAM_RETRY_MS: u64 = 1_000;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(publish_events, read_events))
        .routes(routes!(list_consumers))
        .routes(routes!(put_consumer, get_consumer, delete_consumer))
        .routes(routes!(fetch))
        .routes(routes!(stream))
        .routes(routes!(ack))
        .routes(routes!(list_dead_letters))
        .routes(routes!(get_dead_letter))
        .routes(routes!(redrive))
        .routes(routes!(purge))
        .routes(routes!(replay))
}

fn events(state: &AppState) -> Result<&nops_core::events::EventService, ApiError> {
    Ok(&state.events)
}

/// A batch to publish.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    /// 1 to 1000 events.
    events: Vec<NewEvent>,
}

/// What happened to a batch.
#[derive(Debug, Serialize, ToSchema)]
struct PublishResponse {
    /// One entry per event, in order.
    results: Vec<PublishResult>,
    /// Events stored now.
    accepted: usize,
    /// Events whose id was seen within the dedupe window; not stored again.
    duplicates: usize,
    /// Events kept in the kernel's outbox because the bus is unreachable; published (and
    /// deduplicated by id) when it is back.
    buffered: usize,
}

/// Publish events.
///
/// Stores a batch durably in the tenant's event log (in one transaction on the embedded bus;
/// acknowledged by JetStream on NATS) and answers once it is durable. Each event's `id` is
/// its deduplication id: a retry within the dedupe window is answered `duplicate`, never
/// stored twice. One invalid event refuses the whole batch, naming its index.
#[utoipa::path(
    post,
    path = "/events",
    operation_id = "publish_events",
    tag = "events",
    request_body(content = PublishRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Stored (or recognised as duplicates)", body = PublishResponse),
        (status = 202, description = "The bus is unreachable: kept in the kernel's outbox (durable) and published when it is back", body = PublishResponse),
        (status = 422, description = "`invalid_batch`, `invalid_event_id`, `invalid_subject`, `payload_too_large`", body = ErrorBody),
        (status = 503, description = "`bus_unavailable`: the bus cannot be reached; nothing was stored", body = ErrorBody),
    ),
    security(("bearer" = ["events:publish"])),
)]
async fn publish_events(
    State(state): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<PublishRequest>,
) -> Result<Response, ApiError> {
    let source = format!("api/{}", ctx.principal.subject);
    let results = events(&state)?.publish(&ctx.tenant, &source, req.events).await?;
    let count = |status: &str| results.iter().filter(|r| r.status == status).count();
    let (accepted, duplicates, buffered) = (count("accepted"), count("duplicate"), count("buffered"));
    let status = if buffered > 0 { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((status, axum::Json(PublishResponse { results, accepted, duplicates, buffered })).into_response())
}

/// Query of `GET /events`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ReadParams {
    /// Subject filter (`*` one token, final `>` the rest).
    filter: Option<String>,
    /// First sequence (inclusive).
    from_seq: Option<u64>,
    /// Last sequence (inclusive).
    to_seq: Option<u64>,
    /// Earliest publish time, ms since the Unix epoch (inclusive).
    from_ms: Option<i64>,
    /// Latest publish time, ms since the Unix epoch (inclusive).
    to_ms: Option<i64>,
    /// Page size (1 to 1000; default 100).
    limit: Option<u32>,
}

/// A page of events.
#[derive(Debug, Serialize, ToSchema)]
struct EventPage {
    /// The events, by sequence.
    items: Vec<EventView>,
    /// Pass as `from_seq` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_from_seq: Option<u64>,
}

/// Read events.
///
/// The tenant's stored events in a sequence or time range, oldest first.
#[utoipa::path(
    get,
    path = "/events",
    operation_id = "read_events",
    tag = "events",
    params(ReadParams),
    responses(
        (status = 200, description = "A page of events", body = EventPage),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 422, description = "`invalid_range`, `invalid_subject`", body = ErrorBody),
    ),
    security(("bearer" = ["events:read"])),
)]
async fn read_events(
    State(state): State<AppState>,
    ctx: RequestContext,
    Query(p): Query<ReadParams>,
) -> Result<axum::Json<EventPage>, ApiError> {
    let limit = p.limit.unwrap_or(LIST_LIMIT_DEFAULT);
    if limit == 0 || limit > LIST_LIMIT_MAX {
        return Err(ApiError::bad_request("invalid_query", format!("limit must be between 1 and {LIST_LIMIT_MAX}")));
    }
    let range = ReadRange {
        filter: p.filter,
        from_seq: p.from_seq,
        to_seq: p.to_seq,
        from_ms: p.from_ms,
        to_ms: p.to_ms,
        limit,
    };
    let items = events(&state)?.read(&ctx.tenant, range).await?;
    let next_from_seq = (items.len() == limit as usize).then(|| items.last().map(|e| e.seq + 1)).flatten();
    Ok(axum::Json(EventPage { items, next_from_seq }))
}

/// The tenant's consumer groups.
#[derive(Debug, Serialize, ToSchema)]
struct ConsumerList {
    /// By name.
    items: Vec<ConsumerView>,
}

/// List consumer groups.
#[utoipa::path(
    get,
    path = "/consumers",
    operation_id = "list_consumers",
    tag = "events",
    responses((status = 200, description = "The tenant's consumer groups", body = ConsumerList)),
    security(("bearer" = ["consumers:read"])),
)]
async fn list_consumers(
    State(state): State<AppState>,
    ctx: RequestContext,
) -> Result<axum::Json<ConsumerList>, ApiError> {
    Ok(axum::Json(ConsumerList { items: events(&state)?.list_consumers(&ctx.tenant).await? }))
}

/// Create or update a consumer group.
///
/// A durable, named group with a subject filter. Each event matching the filter is delivered
/// to one fetch of the group at a time; unacked deliveries come back after their ack deadline
/// (`ack_wait_ms`, or the `backoff_ms` schedule), and after `deliveries_max` deliveries the
/// event moves to the group's dead-letter queue. Updating keeps the filter (changing it is a
/// 409: delete the group first).
#[utoipa::path(
    put,
    path = "/consumers/{name}",
    operation_id = "put_consumer",
    tag = "events",
    params(("name" = String, Path, description = "1 to 64 of letters, digits, '-' or '_'")),
    request_body(content = ConsumerRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Updated", body = ConsumerView),
        (status = 201, description = "Created", body = ConsumerView),
        (status = 409, description = "`consumer_conflict`: the filter differs; `limit_exceeded`: too many groups", body = ErrorBody),
        (status = 422, description = "`invalid_consumer`, `invalid_subject`", body = ErrorBody),
    ),
    security(("bearer" = ["consumers:write"])),
)]
async fn put_consumer(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(name): Path<String>,
    Json(req): Json<ConsumerRequest>,
) -> Result<Response, ApiError> {
    let (view, created) = events(&state)?.put_consumer(&ctx.tenant, &name, req).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, axum::Json(view)).into_response())
}

/// Show a consumer group.
#[utoipa::path(
    get,
    path = "/consumers/{name}",
    operation_id = "get_consumer",
    tag = "events",
    params(("name" = String, Path, description = "The group's name")),
    responses(
        (status = 200, description = "The group, with its pending, backlog and dead-letter counts", body = ConsumerView),
        (status = 404, description = "`not_found`", body = ErrorBody),
    ),
    security(("bearer" = ["consumers:read"])),
)]
async fn get_consumer(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(name): Path<String>,
) -> Result<axum::Json<ConsumerView>, ApiError> {
    Ok(axum::Json(events(&state)?.get_consumer(&ctx.tenant, &name).await?))
}

/// Delete a consumer group.
///
/// With its pending deliveries and its dead letters. Events stay in the log.
#[utoipa::path(
    delete,
    path = "/consumers/{name}",
    operation_id = "delete_consumer",
    tag = "events",
    params(("name" = String, Path, description = "The group's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`not_found`", body = ErrorBody),
    ),
    security(("bearer" = ["consumers:write"])),
)]
async fn delete_consumer(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    events(&state)?.delete_consumer(&ctx.tenant, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /consumers/{name}/fetch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct FetchRequest {
    /// Most deliveries (1 to 1000; default 10).
    #[serde(default = "fetch_max_default")]
    max: u32,
    /// Wait up to this long, in ms, for the first delivery (long poll; 0 answers at once;
    /// capped at `fetch_wait_ms_max`, 20000 by default).
    #[serde(default)]
    wait_ms: u64,
}

fn fetch_max_default() -> u32 {
    10
}

/// Deliveries of one fetch.
#[derive(Debug, Serialize, ToSchema)]
struct FetchResponse {
    /// Due redeliveries first, then new events in sequence order; empty when none arrived
    /// within `wait_ms`.
    deliveries: Vec<DeliveryView>,
}

/// Fetch deliveries (long poll).
///
/// Hands out up to `max` deliveries to this caller, waiting up to `wait_ms` for the first.
/// Answer each with `POST /consumers/{name}/ack` before its `ack_deadline_ms`, or it is
/// delivered again (to any fetch of the group).
#[utoipa::path(
    post,
    path = "/consumers/{name}/fetch",
    operation_id = "fetch_deliveries",
    tag = "events",
    params(("name" = String, Path, description = "The group's name")),
    request_body(content = FetchRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Deliveries (possibly none)", body = FetchResponse),
        (status = 404, description = "`not_found`: no such group", body = ErrorBody),
        (status = 422, description = "`invalid_fetch`", body = ErrorBody),
    ),
    security(("bearer" = ["events:consume"])),
)]
async fn fetch(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(name): Path<String>,
    Json(req): Json<FetchRequest>,
) -> Result<axum::Json<FetchResponse>, ApiError> {
    let deliveries = events(&state)?.fetch(&ctx.tenant, &name, req.max, req.wait_ms).await?;
    Ok(axum::Json(FetchResponse { deliveries }))
}

/// Stream deliveries (server-sent events).
///
/// Keeps the connection open and sends each delivery as an SSE event named `delivery` whose
/// data is the delivery's JSON, with a keep-alive comment every 15 s. Ack as for a fetch; the
/// group's `pending_max` bounds how many unacked deliveries the stream holds.
#[utoipa::path(
    get,
    path = "/consumers/{name}/stream",
    operation_id = "stream_deliveries",
    tag = "events",
    params(("name" = String, Path, description = "The group's name")),
    responses(
        (status = 200, description = "`text/event-stream` of `delivery` events", content_type = "text/event-stream", body = String),
        (status = 404, description = "`not_found`: no such group", body = ErrorBody),
    ),
    security(("bearer" = ["events:consume"])),
)]
async fn stream(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    // Refuse an unknown group now, while the client can still get a status code.
    events(&state)?.get_consumer(&ctx.tenant, &name).await?;
    let tenant = ctx.tenant;
    let rounds = futures_util::stream::unfold(state, move |state| {
        let (tenant, name) = (tenant.clone(), name.clone());
        async move {
            let Ok(service) = events(&state) else { return None };
            let batch: Vec<Result<SseEvent, Infallible>> =
                match service.fetch(&tenant, &name, STREAM_FETCH_MAX, STREAM_WAIT_MS).await {
                    Ok(deliveries) => deliveries
                        .iter()
                        .filter_map(|d| SseEvent::default().event("delivery").json_data(d).ok())
                        .map(Ok)
                        .collect(),
                    Err(nops_core::CoreError::NotFound { .. }) => return None,
                    Err(err) => {
                        tracing::warn!(error = %err, consumer = %name, "stream fetch failed; retrying");
                        tokio::time::sleep(Duration::from_millis(STREAM_RETRY_MS)).await;
                        Vec::new()
                    }
                };
            Some((futures_util::stream::iter(batch), state))
        }
    });
    let events = futures_util::StreamExt::flatten(rounds);
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}

/// Body of `POST /consumers/{name}/ack`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AckBody {
    /// 1 to 1000 acks.
    acks: Vec<AckRequest>,
}

/// Results of an ack request.
#[derive(Debug, Serialize, ToSchema)]
struct AckResponse {
    /// One per ack, in order.
    results: Vec<AckResult>,
}

/// Ack, nack, extend or terminate deliveries.
///
/// `ack`: done. `nack`: failed, deliver again after `delay_ms` (or move to the dead-letter
/// queue if that was the last allowed delivery). `in_progress`: still working, the ack
/// deadline starts again. `term`: never deliver again; moves to the dead-letter queue now. A
/// token whose delivery is no longer current (already acked, redelivered, dead-lettered) is
/// answered `stale`.
#[utoipa::path(
    post,
    path = "/consumers/{name}/ack",
    operation_id = "ack_deliveries",
    tag = "events",
    params(("name" = String, Path, description = "The group's name")),
    request_body(content = AckBody, content_type = "application/json"),
    responses(
        (status = 200, description = "One result per ack", body = AckResponse),
        (status = 404, description = "`not_found`: no such group", body = ErrorBody),
        (status = 422, description = "`invalid_ack`", body = ErrorBody),
    ),
    security(("bearer" = ["events:consume"])),
)]
async fn ack(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(name): Path<String>,
    Json(body): Json<AckBody>,
) -> Result<axum::Json<AckResponse>, ApiError> {
    let results = events(&state)?.ack(&ctx.tenant, &name, body.acks).await?;
    Ok(axum::Json(AckResponse { results }))
}

/// Query of `GET /dlq`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DlqParams {
    /// Only this group's dead letters.
    consumer: Option<String>,
    /// Cursor: the `next_after` of the previous page.
    after: Option<u64>,
    /// Page size (1 to 1000; default 100).
    limit: Option<u32>,
}

/// A page of dead letters.
#[derive(Debug, Serialize, ToSchema)]
struct DeadLetterPage {
    /// By id.
    items: Vec<DeadLetterView>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<u64>,
}

/// List dead letters.
#[utoipa::path(
    get,
    path = "/dlq",
    operation_id = "list_dead_letters",
    tag = "events",
    params(DlqParams),
    responses(
        (status = 200, description = "A page of dead letters", body = DeadLetterPage),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
    ),
    security(("bearer" = ["dlq:read"])),
)]
async fn list_dead_letters(
    State(state): State<AppState>,
    ctx: RequestContext,
    Query(p): Query<DlqParams>,
) -> Result<axum::Json<DeadLetterPage>, ApiError> {
    let limit = p.limit.unwrap_or(LIST_LIMIT_DEFAULT);
    if limit == 0 || limit > LIST_LIMIT_MAX {
        return Err(ApiError::bad_request("invalid_query", format!("limit must be between 1 and {LIST_LIMIT_MAX}")));
    }
    let items = events(&state)?.dead_letters(&ctx.tenant, p.consumer.as_deref(), p.after.unwrap_or(0), limit).await?;
    let next_after = (items.len() == limit as usize).then(|| items.last().map(|d| d.id)).flatten();
    Ok(axum::Json(DeadLetterPage { items, next_after }))
}

/// Show a dead letter.
#[utoipa::path(
    get,
    path = "/dlq/{id}",
    operation_id = "get_dead_letter",
    tag = "events",
    params(("id" = u64, Path, description = "The dead letter's id")),
    responses(
        (status = 200, description = "The dead letter with its event", body = DeadLetterView),
        (status = 400, description = "`invalid_id`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    ),
    security(("bearer" = ["dlq:read"])),
)]
async fn get_dead_letter(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> Result<axum::Json<DeadLetterView>, ApiError> {
    let id: u64 = id.parse().map_err(|_| ApiError::bad_request("invalid_id", "a dead letter id is a number"))?;
    Ok(axum::Json(events(&state)?.dead_letter(&ctx.tenant, id).await?))
}

/// Body of `POST /dlq/redrive`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RedriveRequest {
    /// Dead letters to deliver again (to the group that gave up on each).
    ids: Vec<u64>,
}

/// Body of `POST /dlq/purge`: `ids`, or every dead letter of `consumer`, or (neither) every
/// dead letter of the tenant.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    /// Dead letters to delete.
    ids: Option<Vec<u64>>,
    /// Delete every dead letter of this group.
    consumer: Option<String>,
}

/// How many dead letters an operation touched.
#[derive(Debug, Serialize, ToSchema)]
struct Count {
    /// How many.
    count: u64,
}

/// Re-drive dead letters.
///
/// Delivers each again to the consumer group that gave up on it (that group only; its
/// delivery count starts again) and removes it from the queue. Unknown ids are skipped.
#[utoipa::path(
    post,
    path = "/dlq/redrive",
    operation_id = "redrive_dead_letters",
    tag = "events",
    request_body(content = RedriveRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "How many were re-driven", body = Count),
        (status = 422, description = "`invalid_ids`", body = ErrorBody),
    ),
    security(("bearer" = ["dlq:write"])),
)]
async fn redrive(
    State(state): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<RedriveRequest>,
) -> Result<axum::Json<Count>, ApiError> {
    let count = events(&state)?.redrive(&ctx.tenant, &req.ids).await?;
    tracing::info!(target: "nops::audit", tenant = %ctx.tenant, actor = %ctx.principal.subject, count, "dead letters re-driven");
    Ok(axum::Json(Count { count }))
}

/// Purge dead letters.
#[utoipa::path(
    post,
    path = "/dlq/purge",
    operation_id = "purge_dead_letters",
    tag = "events",
    request_body(content = PurgeRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "How many were deleted", body = Count),
        (status = 422, description = "`invalid_ids`, `invalid_consumer`", body = ErrorBody),
    ),
    security(("bearer" = ["dlq:write"])),
)]
async fn purge(
    State(state): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<PurgeRequest>,
) -> Result<axum::Json<Count>, ApiError> {
    let count = events(&state)?.purge(&ctx.tenant, req.consumer.as_deref(), req.ids.as_deref()).await?;
    tracing::info!(target: "nops::audit", tenant = %ctx.tenant, actor = %ctx.principal.subject, count, "dead letters purged");
    Ok(axum::Json(Count { count }))
}

/// Replay events.
///
/// Takes the tenant's events in a sequence or time range (optionally one subject filter) and
/// delivers them again to one consumer group (`consumer`; other groups are not affected),
/// and/or runs each event's payload through a plugin's active version and a `candidate`
/// version (what-if: how many decisions would differ; payloads are the plugin's input, an
/// access request for a policy, `{"task", "candidates"}` for a scorer).
#[utoipa::path(
    post,
    path = "/replay",
    operation_id = "replay_events",
    tag = "events",
    request_body(content = ReplayRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "What the replay did", body = ReplayReport),
        (status = 404, description = "`not_found`: no such group, plugin or version", body = ErrorBody),
        (status = 422, description = "`invalid_replay`, `invalid_range`, `invalid_version`", body = ErrorBody),
    ),
    security(("bearer" = ["events:replay"])),
)]
async fn replay(
    State(state): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<ReplayRequest>,
) -> Result<axum::Json<ReplayReport>, ApiError> {
    Ok(axum::Json(events(&state)?.replay(&ctx.tenant, req).await?))
}
