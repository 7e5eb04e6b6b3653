//! `/api/v1/slo`: the kernel's SLOs, their SLIs and burn rates per window, error budgets and
//! the multi-window burn-rate alerts firing.

use axum::extract::State;
use nops_core::slo::SloStatus;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(status))
}

/// Every SLO as this kernel measures it (since its start): the SLI and burn rate over each
/// alert window, the error budget left over the SLO window, and each alert rule's state.
#[utoipa::path(
    get,
    path = "/slo",
    operation_id = "slo_status",
    tag = "slo",
    summary = "SLOs and burn-rate alerts",
    responses((status = 200, description = "Every SLO now", body = SloStatus)),
    security(("bearer" = ["slo:read"])),
)]
async fn status(State(state): State<AppState>) -> axum::Json<SloStatus> {
    axum::Json(state.slo.status())
}
