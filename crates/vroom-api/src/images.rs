//! Routes for images: list, build, import, prune, inspect, remove.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use vroom_types::{ApiErrorBody, BuildEvent, BuildImageRequest, ImageSummary, ImportImageRequest};

use crate::audit::AuditCaller;
use crate::replies::{BodyErrors, HostErrors, PathErrors};
use crate::{bad_request, body, status_for, ApiError, ApiResult, AppState};

#[utoipa::path(get, path = "/v1/images", responses((status = 200, body = Vec<ImageSummary>), HostErrors))]
pub(crate) async fn list_images(State(engine): State<AppState>) -> ApiResult<Vec<ImageSummary>> {
    Ok(Json(engine.list_images()?))
}

/// Builds an image from a recipe on the daemon's host. The answer is a stream
/// of JSON lines (`application/x-ndjson`): a `progress` line per stage, then
/// one `done` line with the report or one `error` line.
#[utoipa::path(post, path = "/v1/images/build", request_body = BuildImageRequest,
    responses((status = 200, content_type = "application/x-ndjson", body = BuildEvent), BodyErrors))]
pub(crate) async fn build_image(
    State(engine): State<AppState>,
    AuditCaller(caller): AuditCaller,
    req: Result<Json<BuildImageRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = body(req)?;
    let recipe = std::path::PathBuf::from(&req.recipe);
    // As the document's pattern says: an absolute path, or a catalog name.
    let catalog_name = req.recipe.starts_with(|c: char| c.is_ascii_lowercase())
        && req
            .recipe
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !recipe.is_absolute() && !catalog_name {
        return Err(bad_request(format!(
            "recipe path {} must be absolute (or the name of a catalog recipe)",
            recipe.display()
        )));
    }
    check_kernel_choice(req.kernel.as_deref())?;
    Ok(stream_build(move |progress| async move {
        engine
            .build_image(recipe, req.update, req.kernel, caller.uid, progress)
            .await
    }))
}

/// Imports an OCI image (an OCI layout, an OCI or docker archive on the
/// daemon's host, or a registry's) as an appliance image. The answer
/// streams like a build's: `progress` lines, then `done` or `error`; an
/// `error`'s code says whose the fault is (`upstream_error`: the registry
/// is unreachable or failed; `not_found`: it lacks the image;
/// `invalid_reference`: it denies access; `invalid_argument`: the image).
#[utoipa::path(post, path = "/v1/images/import", request_body = ImportImageRequest,
    responses((status = 200, content_type = "application/x-ndjson", body = BuildEvent), BodyErrors,
        (status = 422, body = ApiErrorBody, description = "The reference does not parse: an unknown transport, a bad repository name, tag or digest (code `invalid_reference`).")))]
pub(crate) async fn import_image(
    State(engine): State<AppState>,
    AuditCaller(caller): AuditCaller,
    req: Result<Json<ImportImageRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = body(req)?;
    // Parsed here too, so a bad reference is a 422 before the answer streams.
    if let Err(e) = req.reference.parse::<vroom_types::ImportReference>() {
        return Err(vroom_core::OpError::new(
            vroom_types::ErrorCode::InvalidReference,
            e.to_string(),
        )
        .into());
    }
    check_kernel_choice(req.kernel.as_deref())?;
    Ok(stream_build(move |progress| async move {
        engine.import_oci_image(req, caller.uid, progress).await
    }))
}

/// As the document's pattern says, before the answer starts to stream.
fn check_kernel_choice(kernel: Option<&str>) -> Result<(), ApiError> {
    if let Some(kernel) = kernel {
        let id = kernel.len() == 16
            && kernel
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !(id || kernel == "debian" || kernel == "vroom") {
            return Err(bad_request(format!(
                "unknown kernel {kernel:?}: debian, vroom, or a kernel id from `vroom kernel ls`"
            )));
        }
    }
    Ok(())
}

/// Runs a build or import, streaming its progress as JSON lines and its
/// outcome as the last line.
fn stream_build<F, Fut>(run: F) -> Response
where
    F: FnOnce(Box<dyn FnMut(&str, &str) + Send>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<vroom_types::BuildReport, vroom_core::OpError>> + Send,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<BuildEvent>();
    let progress = tx.clone();
    tokio::spawn(async move {
        let result = run(Box::new(move |stage: &str, detail: &str| {
            let _ = progress.send(BuildEvent::Progress {
                stage: stage.to_string(),
                detail: detail.to_string(),
            });
        }))
        .await;
        let last = match result {
            Ok(report) => BuildEvent::Done {
                report: Box::new(report),
            },
            Err(e) => {
                if status_for(e.code).is_server_error() {
                    tracing::error!(code = ?e.code, error = %e.message, "build failed");
                }
                BuildEvent::Error {
                    error: ApiErrorBody {
                        code: e.code,
                        message: e.message,
                    },
                }
            }
        };
        let _ = tx.send(last);
    });
    let lines = futures::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_vec(&event).expect("invariant: events serialize");
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(line), rx))
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}

/// Removes the older builds that no name points to and no instance uses; returns them.
#[utoipa::path(post, path = "/v1/images/prune", responses((status = 200, body = Vec<ImageSummary>)))]
pub(crate) async fn prune_images(State(engine): State<AppState>) -> ApiResult<Vec<ImageSummary>> {
    Ok(Json(engine.prune_images().await?))
}

/// Removes an image; refused while an instance uses it.
#[utoipa::path(delete, path = "/v1/images/{reference}", params(("reference" = String, Path, description = "name or id")),
    responses((status = 204), PathErrors, HostErrors,
        (status = 409, body = ApiErrorBody, description = "An instance uses the image.")))]
pub(crate) async fn remove_image(
    State(engine): State<AppState>,
    Path(reference): Path<String>,
) -> Result<StatusCode, ApiError> {
    engine.remove_image(&reference).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/images/{reference}", params(("reference" = String, Path, description = "name or id")),
    responses((status = 200, body = ImageSummary), PathErrors, HostErrors))]
pub(crate) async fn get_image(
    State(engine): State<AppState>,
    Path(reference): Path<String>,
) -> ApiResult<ImageSummary> {
    Ok(Json(engine.get_image(&reference)?))
}
