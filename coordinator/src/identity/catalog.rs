//! The service catalog: what the token response lists, and `/v3/services`, `/v3/endpoints`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::model::{keys, Catalog, Service};
use super::{db, store_err, Auth, D};
use crate::config::Config;
use crate::error::ApiError;
use crate::state::AppState;

/// Interfaces each endpoint is listed under.
const INTERFACES: [&str; 3] = ["public", "internal", "admin"];

/// The services this coordinator serves, with URLs under `public_url`.
pub fn services(config: &Config) -> Vec<Service> {
    let base = &config.public_url;
    [
        ("identity", "keystone", format!("{base}/v3")),
        ("placement", "placement", format!("{base}/placement")),
        ("compute", "nova", format!("{base}/compute/v2.1")),
    ]
    .into_iter()
    .map(|(kind, name, url)| Service { id: stable_id(kind), kind: kind.into(), name: name.into(), url })
    .collect()
}

/// A stable 32-hex id derived from a name, so every replica and every bootstrap agree.
pub fn stable_id(name: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("edgecloud-catalog:{name}").as_bytes());
    d[..16].iter().map(|b| format!("{b:02x}")).collect()
}

fn endpoint_id(service: &Service, iface: &str) -> String {
    stable_id(&format!("{}:{iface}", service.kind))
}

/// The catalog as the token response carries it.
pub async fn token_catalog(state: &AppState, project_id: Option<&str>) -> Result<Value, ApiError> {
    let catalog = db::get::<Catalog>(state.store.as_ref(), keys::CATALOG).await.map_err(store_err)?;
    let Some(catalog) = catalog.map(|c| c.value) else { return Ok(json!([])) };
    let list: Vec<Value> = catalog
        .services
        .iter()
        .map(|s| {
            let url = match project_id {
                Some(p) => s.url.replace("$(project_id)s", p),
                None => s.url.clone(),
            };
            let eps: Vec<Value> = INTERFACES
                .iter()
                .map(|i| json!({"id": endpoint_id(s, i), "interface": i, "region": catalog.region, "region_id": catalog.region, "url": url}))
                .collect();
            json!({"id": s.id, "type": s.kind, "name": s.name, "endpoints": eps})
        })
        .collect();
    Ok(Value::Array(list))
}

/// Catalog routes.
pub fn routes() -> Router<AppState> {
    Router::new().route("/v3/services", get(list_services)).route("/v3/endpoints", get(list_endpoints)).route("/v3/regions", get(list_regions))
}

async fn load(state: &AppState) -> Result<Catalog, ApiError> {
    db::get::<Catalog>(state.store.as_ref(), keys::CATALOG)
        .await
        .map_err(store_err)?
        .map(|c| c.value)
        .ok_or_else(|| ApiError::not_found(D, "The catalog is empty: run `coordinator bootstrap`."))
}

async fn list_services(State(state): State<AppState>, auth: Auth) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:list_services", &[])?;
    let c = load(&state).await?;
    let list: Vec<Value> = c.services.iter().map(|s| json!({"id": s.id, "type": s.kind, "name": s.name, "enabled": true, "description": "", "links": {}})).collect();
    Ok(Json(json!({"services": list, "links": {"self": null, "next": null, "previous": null}})))
}

async fn list_endpoints(State(state): State<AppState>, auth: Auth) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:list_endpoints", &[])?;
    let c = load(&state).await?;
    let mut list = vec![];
    for s in &c.services {
        for i in INTERFACES {
            list.push(json!({"id": endpoint_id(s, i), "interface": i, "region": c.region, "region_id": c.region, "service_id": s.id, "url": s.url, "enabled": true, "links": {}}));
        }
    }
    Ok(Json(json!({"endpoints": list, "links": {"self": null, "next": null, "previous": null}})))
}

async fn list_regions(State(state): State<AppState>, _auth: Auth) -> Result<Json<Value>, ApiError> {
    let c = load(&state).await?;
    Ok(Json(json!({"regions": [{"id": c.region, "description": "", "parent_region_id": null, "links": {}}], "links": {"self": null, "next": null, "previous": null}})))
}
