//! `GET /metrics`: vroomd's metrics in the Prometheus text format, and the
//! middleware that counts every request by route, method and status.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::replies::HostErrors;
use crate::{ApiError, AppState};

/// Every metric as of now: instances (state, CPU, memory, network,
/// health), splices, volumes, events by kind and action, start and
/// snapshot times, migrations, API requests. A removed instance's series
/// are gone from the next scrape.
#[utoipa::path(get, path = "/metrics",
    responses(
        (status = 200, content_type = "text/plain; version=0.0.4; charset=utf-8", body = String,
            description = "The Prometheus text exposition format."),
        HostErrors))]
pub(crate) async fn metrics(State(engine): State<AppState>) -> Result<Response, ApiError> {
    // It reads /proc and sysfs for every instance.
    let text = tokio::task::spawn_blocking(move || engine.render_metrics())
        .await
        .map_err(|e| {
            ApiError(vroom_core::OpError::internal(
                "the metrics scrape failed",
                e,
            ))
        })?;
    Ok((
        [(header::CONTENT_TYPE, vroom_core::metrics::CONTENT_TYPE)],
        text,
    )
        .into_response())
}

/// Counts a routed request once its answer's head is ready.
pub(crate) async fn count_request(
    State(engine): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    engine.events().metrics().observe_request(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}
