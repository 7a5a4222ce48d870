//! `/`, `/healthz`, `/readyz`, `/openapi.json` and `/v1/stats`.

use std::sync::Arc;

use serde_json::json;
use warp::http::{Method, StatusCode};
use warp::reply::Response;

use super::{auth, finish, json_response, route, Req, State};
use crate::error::ApiError;

/// The OpenAPI document, kept in the repository and served as is.
pub const OPENAPI: &str = include_str!("../../openapi.json");

const ALLOW_READ: &str = "GET, HEAD";

fn read_only(req: &Req) -> Result<(), ApiError> {
    match req.method {
        Method::GET | Method::HEAD => req.query_params(&[]).map(|_| ()),
        _ => Err(ApiError::MethodNotAllowed {
            method: req.method.to_string(),
            allow: ALLOW_READ,
        }),
    }
}

/// Liveness: the process serves HTTP. Never touches the database.
pub async fn healthz(req: Req, state: Arc<State>) -> Response {
    let r = read_only(&req).map(|_| json_response(StatusCode::OK, &b"{\"status\":\"ok\"}"[..]));
    finish(&state, &req, route::HEALTHZ, r)
}

/// Readiness: migrated, database reachable (background ping), not shutting down.
pub async fn readyz(req: Req, state: Arc<State>) -> Response {
    let r = read_only(&req).and_then(|_| match state.health.not_ready_reason() {
        None => Ok(json_response(
            StatusCode::OK,
            &b"{\"status\":\"ready\"}"[..],
        )),
        Some(reason) => Err(ApiError::Unavailable(format!("not ready: {reason}"))),
    });
    finish(&state, &req, route::READYZ, r)
}

/// Service name, version, and whether the database answers right now.
pub async fn root(req: Req, state: Arc<State>) -> Response {
    let r = async {
        read_only(&req)?;
        let reachable = state.store.ping().await.is_ok();
        let doc = json!({
            "service": "kvstore",
            "version": state.version,
            "revision": state.revision,
            "database": { "reachable": reachable },
        });
        Ok(json_response(
            StatusCode::OK,
            serde_json::to_vec(&doc).expect("json"),
        ))
    }
    .await;
    finish(&state, &req, route::ROOT, r)
}

pub async fn openapi(req: Req, state: Arc<State>) -> Response {
    let r = read_only(&req).map(|_| json_response(StatusCode::OK, OPENAPI.as_bytes()));
    finish(&state, &req, route::OPENAPI, r)
}

/// `{"keys": N, "writes_total": W, "instance": {...}}`: deployment-wide figures from the
/// database, plus this instance's cache figures.
pub async fn stats(req: Req, state: Arc<State>) -> Response {
    let r = async {
        read_only(&req)?;
        auth::check_read(&state.config, &req)?;
        let (keys, writes_total) = state.store.stats().await?;
        state.cache.run_pending_tasks().await;
        let m = &state.metrics;
        let doc = json!({
            "keys": keys,
            "writes_total": writes_total,
            "instance": {
                "cache_hits": m.cache_hits.get(),
                "cache_misses": m.cache_misses.get(),
                "cache_entries": state.cache.entry_count(),
                "cache_bytes": state.cache.weighted_size(),
            },
        });
        Ok(json_response(
            StatusCode::OK,
            serde_json::to_vec(&doc).expect("json"),
        ))
    }
    .await;
    finish(&state, &req, route::STATS, r)
}
