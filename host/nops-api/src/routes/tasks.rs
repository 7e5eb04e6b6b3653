//! `/api/v1/tasks`: submit tasks and read their status and result; and the pull side of the
//! agent protocol, `/api/v1/agents/{id}/tasks/…` (see `docs/dispatch.md`).

use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use nops_core::agent::AgentId;
use nops_core::dispatch::{Delivery, NewTask, ResultAck, TaskResult, TaskStatus, TaskView};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::AppState;
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::extract::{Json, Path, Query};
use crate::openapi::ErrorBody;

/// Page size when the client names none.
const LIST_LIMIT_DEFAULT: u32 = 50;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_tasks, create_task))
        .routes(routes!(get_task))
        .routes(routes!(next_task))
        .routes(routes!(task_result))
}

fn parse_task_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(raw).map_err(|_| ApiError::bad_request("invalid_id", "a task id is a UUID"))
}

fn parse_agent_id(raw: &str) -> Result<AgentId, ApiError> {
    raw.parse().map_err(ApiError::from)
}

/// Submit a task.
///
/// Stores the task, then runs it on the best agent that offers the capabilities: pushed to
/// the agent's endpoint, or queued for an agent that pulls. Each attempt has a timeout; a
/// failed or timed-out attempt is retried on another agent after an exponential backoff with
/// full jitter, within `attempts_max` and the deadline.
///
/// With `wait_ms`, the answer waits for the task to finish (one round trip for a caller that
/// wants the result): 200 with the finished task, or 202 with the task as it is when the wait
/// ends. Waiting shows the output, so it needs the `tasks:read` scope as well.
#[utoipa::path(
    post,
    path = "/tasks",
    operation_id = "create_task",
    tag = "tasks",
    params(CreateParams),
    request_body(content = NewTask, content_type = "application/json", description = "What the task needs and its input"),
    responses(
        (status = 200, description = "With `wait_ms`: stored, run and finished within the wait", body = TaskView,
            headers(("Location" = String, description = "The task's URL, `/api/v1/tasks/{id}`"))),
        (status = 202, description = "Stored; it runs in the background", body = TaskView,
            headers(("Location" = String, description = "The task's URL, `/api/v1/tasks/{id}`"))),
        (status = 403, description = "`insufficient_scope`: `wait_ms` without the `tasks:read` scope (nothing stored)", body = ErrorBody),
        (status = 409, description = "`limit_exceeded`: too many unfinished tasks in the tenant", body = ErrorBody),
        (status = 422, description = "`invalid_task`, `invalid_capability`, `invalid_label`, `invalid_hint`, `input_too_large`", body = ErrorBody),
    ),
    security(("bearer" = ["tasks:write"])),
)]
async fn create_task(
    State(state): State<AppState>,
    ctx: RequestContext,
    Query(params): Query<CreateParams>,
    Json(new): Json<NewTask>,
) -> Result<impl IntoResponse, ApiError> {
    let wait = Duration::from_millis(params.wait_ms.unwrap_or(0));
    if !wait.is_zero() && !ctx.principal.scopes.covers(READ_SCOPE) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            format!("waiting for a task's result requires the scope `{READ_SCOPE}`"),
        ));
    }
    let mut task = state.dispatch.submit(&ctx.tenant, new).await?;
    if !wait.is_zero() {
        task = state.dispatch.get_finished(&ctx.tenant, task.id, wait).await?;
    }
    let status = if task.status.is_final() { StatusCode::OK } else { StatusCode::ACCEPTED };
    let location = format!("/api/v1/tasks/{}", task.id);
    Ok((status, [(http::header::LOCATION, location)], axum::Json(task)))
}

/// The scope that reading a task needs.
const READ_SCOPE: &str = "tasks:read";

/// Query of `POST /tasks`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct CreateParams {
    /// Wait up to this long, in ms, for the task to finish before answering (0 answers at
    /// once; capped at the configured `wait_ms_max`, 20000 by default; needs `tasks:read`).
    wait_ms: Option<u64>,
}

/// Query of `GET /tasks/{id}`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct GetParams {
    /// Wait up to this long, in ms, for the task to finish before answering (0 answers at
    /// once; capped at the configured `wait_ms_max`, 20000 by default). The answer shows the
    /// task as it is then, finished or not.
    wait_ms: Option<u64>,
}

/// Show a task.
///
/// Its status, result or error, and every attempt (agent, times, outcome, whether a late
/// answer was discarded). With `wait_ms`, waits for the task to finish first.
#[utoipa::path(
    get,
    path = "/tasks/{id}",
    operation_id = "get_task",
    tag = "tasks",
    params(("id" = String, Path, format = Uuid, description = "The task's id"), GetParams),
    responses(
        (status = 200, description = "The task", body = TaskView),
        (status = 400, description = "`invalid_id`: the id is not a UUID", body = ErrorBody),
        (status = 404, description = "`not_found`: no such task in the tenant", body = ErrorBody),
    ),
    security(("bearer" = ["tasks:read"])),
)]
async fn get_task(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Query(params): Query<GetParams>,
) -> Result<axum::Json<TaskView>, ApiError> {
    let id = parse_task_id(&id)?;
    let wait = Duration::from_millis(params.wait_ms.unwrap_or(0));
    Ok(axum::Json(state.dispatch.get_finished(&ctx.tenant, id, wait).await?))
}

/// Query of `GET /tasks`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// Only tasks in this status.
    #[param(value_type = Option<TaskStatus>)]
    status: Option<String>,
    /// Page size (1 to the configured maximum, 500 by default; default 50).
    #[param(minimum = 1)]
    limit: Option<u32>,
    /// Cursor: the `next_after` of the previous page.
    #[param(format = Uuid)]
    after: Option<String>,
}

/// A page of tasks.
#[derive(Debug, Serialize, ToSchema)]
struct TaskPage {
    /// The tasks, by id (oldest first), without input, output and attempts.
    items: Vec<TaskView>,
    /// Pass as `after` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Uuid)]
    next_after: Option<Uuid>,
}

/// List tasks.
///
/// The tenant's tasks, ordered by id (creation order), optionally in one status, a page at a
/// time.
#[utoipa::path(
    get,
    path = "/tasks",
    operation_id = "list_tasks",
    tag = "tasks",
    params(ListParams),
    responses(
        (status = 200, description = "A page of tasks", body = TaskPage),
        (status = 400, description = "`invalid_query`, `invalid_id`", body = ErrorBody),
    ),
    security(("bearer" = ["tasks:list"])),
)]
async fn list_tasks(
    State(state): State<AppState>,
    ctx: RequestContext,
    Query(params): Query<ListParams>,
) -> Result<axum::Json<TaskPage>, ApiError> {
    let dispatch = &state.dispatch;
    let limit_max = dispatch.config().list_limit_max;
    let limit = params.limit.unwrap_or(LIST_LIMIT_DEFAULT.min(limit_max));
    if limit == 0 || limit > limit_max {
        return Err(ApiError::bad_request("invalid_query", format!("limit must be between 1 and {limit_max}")));
    }
    let status = params.status.as_deref().map(str::parse::<TaskStatus>).transpose()?;
    let after = params.after.as_deref().map(parse_task_id).transpose()?;
    let items = dispatch.list(&ctx.tenant, status, after, limit).await?;
    let next_after = (items.len() == limit as usize).then(|| items.last().map(|t| t.id)).flatten();
    Ok(axum::Json(TaskPage { items, next_after }))
}

/// Query of `GET /agents/{id}/tasks/next`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct NextParams {
    /// How long to wait for work, in ms (0 answers at once; capped at the configured
    /// `wait_ms_max`, 20000 by default).
    wait_ms: Option<u64>,
}

/// Fetch work (pull agents).
///
/// Hands the oldest attempt queued for this agent to it, waiting up to `wait_ms` for one to
/// arrive (long poll). Answer it with `POST /agents/{id}/tasks/{task_id}/result` before its
/// `deadline_ms`. An agent-role credential may fetch only its own work.
#[utoipa::path(
    get,
    path = "/agents/{id}/tasks/next",
    operation_id = "next_task",
    tag = "tasks",
    params(
        ("id" = String, Path, format = Uuid, description = "The agent's id"),
        NextParams,
    ),
    responses(
        (status = 200, description = "An attempt to run", body = Delivery),
        (status = 204, description = "No work arrived within `wait_ms`"),
        (status = 400, description = "`invalid_id`, `invalid_query`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such agent in the tenant", body = ErrorBody),
    ),
    security(("bearer" = ["tasks:pull"])),
)]
async fn next_task(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Query(params): Query<NextParams>,
) -> Result<Response, ApiError> {
    let dispatch = &state.dispatch;
    let agent = parse_agent_id(&id)?;
    // 404 for an agent the tenant does not have (and nothing to wait for).
    state.registry.get(&ctx.tenant, agent).await?;
    let wait = Duration::from_millis(params.wait_ms.unwrap_or(0));
    match dispatch.pull_next(&ctx.tenant, agent, wait).await? {
        Some(delivery) => Ok(axum::Json(delivery).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// Report a result (pull agents).
///
/// Records the agent's answer to one attempt: `{"attempt": N, "ok": true, "output": …}` or
/// `{"attempt": N, "ok": false, "error": "…"}`. The first answer of the task's current attempt
/// wins; repeating it is answered 200 with `duplicate: true`; an answer for an attempt that
/// has ended (timed out, superseded) or a finished task is discarded with 409.
#[utoipa::path(
    post,
    path = "/agents/{id}/tasks/{task_id}/result",
    operation_id = "task_result",
    tag = "tasks",
    params(
        ("id" = String, Path, format = Uuid, description = "The agent's id"),
        ("task_id" = String, Path, format = Uuid, description = "The task's id"),
    ),
    request_body(content = TaskResult, content_type = "application/json", description = "The attempt's result"),
    responses(
        (status = 200, description = "Recorded (or a duplicate of the recorded answer)", body = ResultAck),
        (status = 202, description = "The store is unavailable: the result is in the kernel's local spool (`buffered: true`) and is recorded when the store returns", body = ResultAck),
        (status = 400, description = "`invalid_id`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such attempt of this agent in the tenant", body = ErrorBody),
        (status = 409, description = "`attempt_superseded`: the attempt ended (timed out) or a later one exists; `task_finished`: the task has finished. The result was discarded", body = ErrorBody),
        (status = 422, description = "`invalid_result`, `output_too_large`", body = ErrorBody),
    ),
    security(("bearer" = ["tasks:complete"])),
)]
async fn task_result(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path((id, task_id)): Path<(String, String)>,
    Json(result): Json<TaskResult>,
) -> Result<(StatusCode, axum::Json<ResultAck>), ApiError> {
    let dispatch = &state.dispatch;
    let agent = parse_agent_id(&id)?;
    let task_id = parse_task_id(&task_id)?;
    let ack = dispatch.complete(&ctx.tenant, agent, task_id, result).await?;
    let status = if ack.buffered { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((status, axum::Json(ack)))
}
