//! Assembles a coordinator replica: store, identity, routes, background loops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use store::Store;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};

use crate::config::Config;
use crate::error::{ApiError, Dialect};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::state::AppState;

/// Errors starting a replica.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("Cannot open the store: {0}")]
    Store(#[from] store::StoreError),
    #[error("Cannot start identity: {0}")]
    Identity(String),
    #[error("Cannot listen on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("Cannot load TLS certificate or key: {0}")]
    Tls(std::io::Error),
}

/// Opens the store the configuration names.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, store::StoreError> {
    Ok(match config.store.backend.as_str() {
        "etcd" => Arc::new(store::etcd::EtcdStore::connect(&config.store.endpoints).await?),
        _ => {
            if let Some(dir) = config.store.path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    store::StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
            Arc::new(store::embedded::EmbeddedStore::open(&config.store.path)?)
        }
    })
}

/// Builds the shared state of a replica over an open store.
pub async fn build_state(config: Config, store: Arc<dyn Store>) -> Result<AppState, StartError> {
    let config = Arc::new(config);
    let identity = Identity::new(store.clone(), config.clone()).await.map_err(|e| StartError::Identity(e.to_string()))?;
    let hosts = crate::hosts::cache::ReplicaCache::start(store.clone());
    Ok(AppState { store, config, identity: Arc::new(identity), metrics: Arc::new(Metrics::default()), shutdown: tokio_util_shutdown(), hosts })
}

/// Every route of the public and agent APIs.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.max_body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(crate::identity::routes())
        .nest("/placement", crate::placement::routes())
        .merge(crate::placement::root_routes())
        .nest("/compute", crate::compute::routes())
        .nest("/agent/v1", crate::hosts::agent_routes())
        .nest("/edge/v1", crate::hosts::admin_routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(middleware::from_fn_with_state(state.clone(), limit_body))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

async fn healthz(State(state): State<AppState>) -> Response {
    match state.store.revision().await {
        Ok(rev) => (StatusCode::OK, axum::Json(serde_json::json!({"status": "ok", "store_revision": rev}))).into_response(),
        Err(e) => ApiError::unavailable(Dialect::Plain, format!("Store unavailable: {e}")).into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([("content-type", "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found(Dialect::Plain, "The resource could not be found.")
}

/// Refuses bodies whose declared length exceeds the limit with 413 before
/// reading them, and gives axum's own 413 (for streamed bodies) our JSON shape.
async fn limit_body(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.config.max_body_bytes;
    let declared = req.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return too_large(limit);
    }
    let resp = next.run(req).await;
    let is_json = resp.headers().get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if resp.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_json {
        return too_large(limit);
    }
    resp
}

fn too_large(limit: usize) -> Response {
    ApiError::new(Dialect::Keystone, StatusCode::PAYLOAD_TOO_LARGE, format!("Request body is larger than the limit of {limit} bytes."))
        .into_response()
}

/// Logs each request with its id and counts it in the metrics.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    // This layer runs before routing, so the label comes from the path itself.
    let route = route_label(&path);
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .and_then(|r| r.header_value().to_str().ok())
        .unwrap_or("-")
        .to_string();
    let mut resp = next.run(req).await;
    let status = resp.status().as_u16();
    state.metrics.observe(&method, &route, status);
    tracing::info!(request_id = %request_id, method = %method, path = %path, status, elapsed_ms = start.elapsed().as_secs_f64() * 1000.0, "request");
    if let Ok(v) = HeaderValue::from_str(&format!("req-{request_id}")) {
        resp.headers_mut().insert("openstack-request-id", v);
    }
    resp
}

/// A low-cardinality label for a path: its first two segments (ids come later).
fn route_label(path: &str) -> String {
    let mut segs = path.split('/').filter(|s| !s.is_empty());
    match (segs.next(), segs.next()) {
        (Some(a), Some(b)) => format!("/{a}/{b}"),
        (Some(a), None) => format!("/{a}"),
        _ => "/".into(),
    }
}

/// Runs a replica until SIGTERM or Ctrl-C, then drains requests and stops.
pub async fn serve(config: Config) -> Result<(), StartError> {
    let store = open_store(&config).await?;
    let state = build_state(config.clone(), store).await?;
    let shutdown = state.shutdown.clone();
    crate::hosts::spawn_monitor(state.clone(), shutdown.clone());
    crate::identity::spawn_key_refresh(state.clone(), shutdown.clone());
    let app = router(state);
    let handle = axum_server::Handle::new();
    {
        let handle = handle.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down: draining requests");
            shutdown.send_replace(true);
            handle.graceful_shutdown(Some(Duration::from_secs(10)));
        });
    }
    let addr = config.listen;
    tracing::info!(%addr, public_url = %config.public_url, backend = %config.store.backend, "coordinator listening");
    let result = match &config.tls {
        Some(tls) => {
            // rustls needs a process-wide crypto provider: ring.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let rustls = axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key).await.map_err(StartError::Tls)?;
            axum_server::bind_rustls(addr, rustls).handle(handle).serve(app.into_make_service()).await
        }
        None => axum_server::bind(addr).handle(handle).serve(app.into_make_service()).await,
    };
    result.map_err(|source| StartError::Listen { addr, source })
}

/// A watch channel that flips to `true` when the replica shuts down.
pub type Shutdown = tokio::sync::watch::Sender<bool>;

fn tokio_util_shutdown() -> Arc<Shutdown> {
    Arc::new(tokio::sync::watch::channel(false).0)
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
