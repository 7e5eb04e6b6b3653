//! Who is calling and in which tenant: set by the authentication middleware, read by handlers.

use axum::extract::FromRequestParts;
use http::request::Parts;
use nops_core::auth::Principal;
use nops_core::tenant::TenantId;

use crate::error::ApiError;

/// The header that selects the tenant a request acts in.
pub const TENANT_HEADER: &str = "x-nops-tenant";

/// The authenticated principal and the tenant the request acts in.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Who is calling.
    pub principal: Principal,
    /// The tenant the request acts in: the `X-Nops-Tenant` header, else the principal's own
    /// tenant, else `default`.
    pub tenant: TenantId,
    /// What the policy asked of the response, e.g. `("mask", "labels.secret")`.
    pub obligations: Vec<(String, String)>,
}

impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<RequestContext>()
            .cloned()
            .ok_or_else(|| ApiError::internal("request context missing: route not behind authentication"))
    }
}
