//! Application credentials: `/v3/users/{id}/application_credentials`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth_api::iso;
use super::model::{keys, AppCred, Revocation, Role, User};
use super::{check_name, db, db_err, new_id, parse_body, password, store_err, Auth, D};
use crate::error::ApiError;
use crate::state::AppState;

/// Application credential routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v3/users/{uid}/application_credentials", get(list).post(create))
        .route("/v3/users/{uid}/application_credentials/{id}", get(show).delete(delete))
}

#[derive(Deserialize)]
struct Body {
    application_credential: Fields,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    name: Option<String>,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    roles: Option<Vec<RoleRef>>,
    #[serde(default)]
    unrestricted: Option<bool>,
    #[serde(default)]
    access_rules: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct RoleRef {
    id: Option<String>,
    name: Option<String>,
}

async fn cred_json(state: &AppState, c: &AppCred, secret: Option<&str>) -> Result<Value, ApiError> {
    let mut roles = vec![];
    for rid in &c.role_ids {
        if let Some(r) = db::get::<Role>(state.store.as_ref(), &keys::role(rid)).await.map_err(store_err)? {
            roles.push(json!({"id": r.value.id, "name": r.value.name, "domain_id": null}));
        }
    }
    let mut v = json!({
        "id": c.id, "name": c.name, "description": c.description, "project_id": c.project_id, "user_id": c.user_id,
        "roles": roles, "expires_at": c.expires_at.map(|e| iso(e as f64)), "unrestricted": c.unrestricted,
        "access_rules": [],
        "links": {"self": format!("{}/v3/users/{}/application_credentials/{}", state.config.public_url, c.user_id, c.id)}
    });
    if let Some(s) = secret {
        v["secret"] = json!(s);
    }
    Ok(v)
}

fn parse_time(s: &str) -> Result<i64, ApiError> {
    let trimmed = s.trim_end_matches('Z');
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    let base = trimmed.split('.').next().unwrap_or(trimmed);
    time::PrimitiveDateTime::parse(base, &fmt)
        .map(|t| t.assume_utc().unix_timestamp())
        .map_err(|_| ApiError::bad_request(D, format!("Invalid expires_at '{s}': use ISO 8601, e.g. 2030-01-01T00:00:00Z.")))
}

async fn create(State(state): State<AppState>, auth: Auth, Path(uid): Path<String>, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    state.identity.enforce(&auth, "identity:create_application_credential", &[("target.user.id", &uid)])?;
    let b: Body = parse_body(&body)?;
    let f = b.application_credential;
    let name = f.name.ok_or_else(|| ApiError::bad_request(D, "'name' is a required property."))?;
    check_name("application credential", &name)?;
    if f.access_rules.as_ref().is_some_and(|r| !r.is_empty()) {
        return Err(ApiError::bad_request(D, "Access rules are not supported."));
    }
    let Some(project_id) = auth.project_id.clone() else {
        return Err(ApiError::forbidden(D, "Application credentials can only be created with a project-scoped token."));
    };
    if auth.app_cred_id.is_some() {
        return Err(ApiError::forbidden(D, "An application credential cannot create another one."));
    }
    let expires_at = match &f.expires_at {
        Some(s) => {
            let t = parse_time(s)?;
            if (t as f64) <= super::tokens::now() {
                return Err(ApiError::bad_request(D, "expires_at must be in the future."));
            }
            Some(t)
        }
        None => None,
    };
    // The credential may carry only roles the creating token has.
    let token_roles = &auth.payload.r;
    // No roles (absent or an empty list, as the CLI sends) means all of the token's roles.
    let role_ids: Vec<String> = match f.roles.filter(|l| !l.is_empty()) {
        None => token_roles.iter().map(|(id, _)| id.clone()).collect(),
        Some(list) => {
            let mut out = vec![];
            for r in list {
                let found = token_roles.iter().find(|(id, n)| r.id.as_deref() == Some(id.as_str()) || r.name.as_deref() == Some(n.as_str()));
                match found {
                    Some((id, _)) => out.push(id.clone()),
                    None => {
                        let what = r.id.or(r.name).unwrap_or_default();
                        return Err(ApiError::forbidden(D, format!("You do not hold role {what} on this project.")));
                    }
                }
            }
            out
        }
    };
    let secret = f.secret.unwrap_or_else(|| {
        use base64::Engine;
        let bytes: [u8; 32] = rand::random();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    });
    if secret.is_empty() || secret.len() > 4096 {
        return Err(ApiError::bad_request(D, "Invalid secret: it must be 1 to 4096 characters."));
    }
    let c = AppCred {
        id: new_id(),
        name,
        user_id: uid.clone(),
        project_id,
        secret_hash: password::hash_blocking(secret.clone()).await,
        description: f.description.unwrap_or_default(),
        role_ids,
        expires_at,
        unrestricted: f.unrestricted.unwrap_or(false),
    };
    let store = state.store.as_ref();
    if db::get::<User>(store, &keys::user(&uid)).await.map_err(store_err)?.is_none() {
        return Err(ApiError::not_found(D, format!("Could not find user: {uid}.")));
    }
    let nk = keys::name("app-cred", &uid, &c.name);
    db::create(store, &keys::app_cred(&c.id), &c, Some((&nk, &c.id)), "application credential").await.map_err(db_err)?;
    Ok((StatusCode::CREATED, Json(json!({"application_credential": cred_json(&state, &c, Some(&secret)).await?}))))
}

async fn list(State(state): State<AppState>, auth: Auth, Path(uid): Path<String>, Query(q): Query<BTreeMap<String, String>>) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:list_application_credentials", &[("target.user.id", &uid)])?;
    let all: Vec<AppCred> = db::list(state.store.as_ref(), "/identity/app-creds/").await.map_err(store_err)?;
    let mut out = vec![];
    for c in all.iter().filter(|c| c.user_id == uid).filter(|c| q.get("name").is_none_or(|n| &c.name == n)) {
        out.push(cred_json(&state, c, None).await?);
    }
    Ok(Json(json!({"application_credentials": out, "links": {"self": null, "next": null, "previous": null}})))
}

async fn fetch(state: &AppState, uid: &str, id: &str) -> Result<db::Versioned<AppCred>, ApiError> {
    match db::get::<AppCred>(state.store.as_ref(), &keys::app_cred(id)).await.map_err(store_err)? {
        Some(c) if c.value.user_id == uid => Ok(c),
        _ => Err(ApiError::not_found(D, format!("Could not find application credential: {id}."))),
    }
}

async fn show(State(state): State<AppState>, auth: Auth, Path((uid, id)): Path<(String, String)>) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:get_application_credential", &[("target.user.id", &uid)])?;
    let c = fetch(&state, &uid, &id).await?;
    Ok(Json(json!({"application_credential": cred_json(&state, &c.value, None).await?})))
}

async fn delete(State(state): State<AppState>, auth: Auth, Path((uid, id)): Path<(String, String)>) -> Result<StatusCode, ApiError> {
    state.identity.enforce(&auth, "identity:delete_application_credential", &[("target.user.id", &uid)])?;
    if auth.app_cred_id.is_some() && !auth.is_admin() {
        return Err(ApiError::forbidden(D, "An application credential cannot delete application credentials."));
    }
    let c = fetch(&state, &uid, &id).await?;
    let extra = vec![store::Op::delete(keys::name("app-cred", &uid, &c.value.name))];
    db::delete(state.store.as_ref(), &keys::app_cred(&id), c.rev, extra).await.map_err(db_err)?;
    state.identity.revoke(Revocation { app_cred_id: Some(id), ..Default::default() }).await?;
    Ok(StatusCode::NO_CONTENT)
}
