//! One error type for every route: a JSON body `{"code": <status>,
//! "message": "..."}` (what E2B's SDKs read; the JS SDK decides "not found"
//! from `code`), including for routes that do not exist, wrong methods and
//! bodies that do not parse, which axum would otherwise answer in text.

use crate::service::ServiceError;
use crate::service::api::ErrorBody;
use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug)]
pub struct ApiError(pub ServiceError);

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        Self(error)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self(ServiceError::InvalidInput(format!(
            "the request body is not what this route takes: {}",
            rejection.body_text()
        )))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self(ServiceError::InvalidInput(format!(
            "the query string is not what this route takes: {}",
            rejection.body_text()
        )))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        let body = ErrorBody {
            code: status,
            message: self.0.to_string(),
        };
        let mut response = (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Json(body),
        )
            .into_response();
        // E2B's Python SDK retries 429 and 5xx (creates included) unless
        // told not to: only a busy home is worth asking again.
        if !matches!(self.0, ServiceError::Busy(_)) {
            response
                .headers_mut()
                .insert("should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}

/// A route that does not exist.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    let path = uri.path();
    // An E2B route this server does not implement (pause, metrics, ...): 501,
    // since a 404 would make the SDKs report a live sandbox as missing.
    if path.starts_with("/sandboxes")
        || path.starts_with("/v2/sandboxes")
        || path.starts_with("/v1/")
        || path.starts_with("/templates")
    {
        return ApiError(ServiceError::NotImplemented(format!(
            "{path} is not implemented by sandboxer-host (see docs/server.md for the E2B routes it serves)"
        )));
    }
    ApiError(ServiceError::NotFound(format!("no route {path}")))
}

/// A route that exists, with another method.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(ServiceError::MethodNotAllowed(format!(
        "{} does not take {method}",
        uri.path()
    )))
}
