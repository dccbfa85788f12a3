//! `/v3/auth/*`: issuing, validating and revoking tokens; what a token may see.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use store::record::encode;
use store::{Compare, Op, Txn};

use super::model::{keys, AppCred, Domain, LoginFailures, Project, Revocation, Role, Target, User, DEFAULT_DOMAIN_ID};
use super::tokens::{now, TokenPayload};
use super::{assignments, catalog, db, parse_body, password, store_err, Auth, D};
use crate::error::ApiError;
use crate::state::AppState;

/// The `/v3/auth` routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v3/auth/tokens", get(validate).head(check).post(issue).delete(revoke))
        .route("/v3/auth/projects", get(my_projects))
        .route("/v3/auth/domains", get(my_domains))
        .route("/v3/auth/catalog", get(my_catalog))
}

#[derive(Deserialize)]
struct AuthRequest {
    auth: AuthBody,
}

#[derive(Deserialize)]
struct AuthBody {
    identity: IdentityBody,
    #[serde(default)]
    scope: Option<Value>,
}

#[derive(Deserialize)]
struct IdentityBody {
    methods: Vec<String>,
    #[serde(default)]
    password: Option<PasswordMethod>,
    #[serde(default)]
    token: Option<TokenMethod>,
    #[serde(default)]
    application_credential: Option<AppCredMethod>,
}

#[derive(Deserialize)]
struct PasswordMethod {
    user: UserRef,
}

#[derive(Deserialize)]
struct UserRef {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    domain: Option<NamedRef>,
    #[serde(default)]
    password: Option<String>,
}

#[derive(Deserialize, Clone)]
struct NamedRef {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    domain: Option<Box<NamedRef>>,
}

#[derive(Deserialize)]
struct TokenMethod {
    id: String,
}

#[derive(Deserialize)]
struct AppCredMethod {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    user: Option<UserRef>,
    secret: String,
}

/// What a token will be scoped to.
enum Scope {
    Unscoped,
    Project(Project),
    Domain(Domain),
}

fn unauthorized() -> ApiError {
    ApiError::unauthorized(D, "The request you have made requires authentication.")
}

/// Resolves a domain given by id or name.
async fn resolve_domain(state: &AppState, r: &NamedRef) -> Result<Option<Domain>, ApiError> {
    let store = state.store.as_ref();
    let id = match (&r.id, &r.name) {
        (Some(id), _) => Some(id.clone()),
        (None, Some(name)) => db::lookup(store, &keys::name("domain", "-", name)).await.map_err(store_err)?,
        (None, None) => return Err(ApiError::bad_request(D, "A domain must be given by id or name.")),
    };
    match id {
        Some(id) => Ok(db::get::<Domain>(store, &keys::domain(&id)).await.map_err(store_err)?.map(|v| v.value)),
        None => Ok(None),
    }
}

async fn resolve_user(state: &AppState, u: &UserRef) -> Result<Option<User>, ApiError> {
    let store = state.store.as_ref();
    let id = match (&u.id, &u.name) {
        (Some(id), _) => Some(id.clone()),
        (None, Some(name)) => {
            let dom = u.domain.as_ref().ok_or_else(|| ApiError::bad_request(D, "A user given by name needs a domain."))?;
            match resolve_domain(state, dom).await? {
                Some(d) => db::lookup(store, &keys::name("user", &d.id, name)).await.map_err(store_err)?,
                None => None,
            }
        }
        (None, None) => return Err(ApiError::bad_request(D, "A user must be given by id or name.")),
    };
    match id {
        Some(id) => Ok(db::get::<User>(store, &keys::user(&id)).await.map_err(store_err)?.map(|v| v.value)),
        None => Ok(None),
    }
}

async fn resolve_scope(state: &AppState, scope: &Option<Value>, user: &User) -> Result<Scope, ApiError> {
    let store = state.store.as_ref();
    let Some(scope) = scope else {
        // Keystone scopes to the default project when none is asked for and the user has one.
        if let Some(pid) = &user.default_project_id {
            if let Some(p) = db::get::<Project>(store, &keys::project(pid)).await.map_err(store_err)? {
                if p.value.enabled && !assignments::effective_roles(store, &user.id, &Target::Project(pid.clone())).await?.is_empty() {
                    return Ok(Scope::Project(p.value));
                }
            }
        }
        return Ok(Scope::Unscoped);
    };
    if scope.as_str() == Some("unscoped") || scope.get("unscoped").is_some() {
        return Ok(Scope::Unscoped);
    }
    if let Some(p) = scope.get("project") {
        let r: NamedRef = serde_json::from_value(p.clone()).map_err(|e| ApiError::bad_request(D, format!("Invalid project scope: {e}.")))?;
        let id = match (&r.id, &r.name) {
            (Some(id), _) => Some(id.clone()),
            (None, Some(name)) => {
                let dom = r.domain.as_deref().ok_or_else(|| ApiError::bad_request(D, "A project given by name needs a domain."))?;
                match resolve_domain(state, dom).await? {
                    Some(d) => db::lookup(store, &keys::name("project", &d.id, name)).await.map_err(store_err)?,
                    None => None,
                }
            }
            _ => return Err(ApiError::bad_request(D, "A project scope needs an id or a name.")),
        };
        let project = match id {
            Some(id) => db::get::<Project>(store, &keys::project(&id)).await.map_err(store_err)?.map(|v| v.value),
            None => None,
        };
        let Some(project) = project else {
            return Err(ApiError::unauthorized(D, "The project to scope to could not be found or you have no role on it."));
        };
        if !project.enabled {
            return Err(ApiError::unauthorized(D, "The project to scope to is disabled."));
        }
        return Ok(Scope::Project(project));
    }
    if let Some(d) = scope.get("domain") {
        let r: NamedRef = serde_json::from_value(d.clone()).map_err(|e| ApiError::bad_request(D, format!("Invalid domain scope: {e}.")))?;
        let Some(domain) = resolve_domain(state, &r).await? else {
            return Err(ApiError::unauthorized(D, "The domain to scope to could not be found or you have no role on it."));
        };
        if !domain.enabled {
            return Err(ApiError::unauthorized(D, "The domain to scope to is disabled."));
        }
        return Ok(Scope::Domain(domain));
    }
    if scope.get("system").is_some() {
        return Err(ApiError::bad_request(D, "System scope is not supported; scope to the admin project instead."));
    }
    Err(ApiError::bad_request(D, "The scope must name a project or a domain."))
}

/// Checks the failed-login throttle; true when the user may try.
async fn may_try(state: &AppState, user_id: &str) -> Result<bool, ApiError> {
    let f = db::get::<LoginFailures>(state.store.as_ref(), &keys::login_failures(user_id)).await.map_err(store_err)?;
    Ok(match f {
        Some(f) => f.value.count < state.config.identity.max_failed_logins,
        None => true,
    })
}

async fn record_failure(state: &AppState, user_id: &str) {
    state.metrics.failed_logins.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let store = state.store.as_ref();
    let key = keys::login_failures(user_id);
    for _ in 0..5 {
        let Ok(cur) = db::get::<LoginFailures>(store, &key).await else { return };
        let Ok(lease) = store.lease_grant(state.config.identity.lockout_secs.max(1) as i64).await else { return };
        let (count, cmp) = match &cur {
            Some(v) => (v.value.count + 1, Compare::ModRevision(key.clone(), v.rev)),
            None => (1, Compare::Absent(key.clone())),
        };
        let rec = LoginFailures { count, last: now() as i64 };
        let txn = Txn::new().when(cmp).and_then(Op::put_with_lease(key.clone(), encode(&rec), lease));
        match store.txn(txn).await {
            Ok(r) if r.succeeded => return,
            Ok(_) => continue,
            Err(_) => return,
        }
    }
}

async fn clear_failures(state: &AppState, user_id: &str) {
    let _ = state.store.delete(&keys::login_failures(user_id)).await;
}

async fn issue(State(state): State<AppState>, query: Query<NoCatalog>, body: Bytes) -> Result<Response, ApiError> {
    let req: AuthRequest = parse_body(&body)?;
    let methods = req.auth.identity.methods.clone();
    if methods.is_empty() {
        return Err(ApiError::bad_request(D, "At least one authentication method is required."));
    }
    let store = state.store.as_ref();
    let (user, app_cred, methods, inherited_expiry): (User, Option<AppCred>, Vec<String>, Option<f64>) = if methods.iter().any(|m| m == "password") {
        let pw = req.auth.identity.password.as_ref().ok_or_else(|| ApiError::bad_request(D, "The password method needs a 'password' object."))?;
        let secret = pw.user.password.clone().ok_or_else(|| ApiError::bad_request(D, "The password method needs user.password."))?;
        let user = resolve_user(&state, &pw.user).await?;
        let Some(user) = user else {
            // Same work and same answer as for a wrong password.
            password::verify_blocking(secret, state.identity.dummy_hash().to_string()).await;
            state.metrics.failed_logins.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(unauthorized());
        };
        if !may_try(&state, &user.id).await? {
            password::verify_blocking(secret, state.identity.dummy_hash().to_string()).await;
            tracing::warn!(user_id = %user.id, "login refused: too many failed attempts");
            state.metrics.failed_logins.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(unauthorized());
        }
        let ok = match &user.password_hash {
            Some(h) => password::verify_blocking(secret, h.clone()).await,
            None => {
                password::verify_blocking(secret, state.identity.dummy_hash().to_string()).await;
                false
            }
        };
        if !ok {
            record_failure(&state, &user.id).await;
            return Err(unauthorized());
        }
        clear_failures(&state, &user.id).await;
        (user, None, vec!["password".to_string()], None)
    } else if methods.iter().any(|m| m == "application_credential") {
        let ac = req
            .auth
            .identity
            .application_credential
            .as_ref()
            .ok_or_else(|| ApiError::bad_request(D, "The application_credential method needs an 'application_credential' object."))?;
        let cred = match (&ac.id, &ac.name) {
            (Some(id), _) => db::get::<AppCred>(store, &keys::app_cred(id)).await.map_err(store_err)?.map(|v| v.value),
            (None, Some(name)) => {
                let u = ac.user.as_ref().ok_or_else(|| ApiError::bad_request(D, "An application credential given by name needs its user."))?;
                match resolve_user(&state, u).await? {
                    Some(u) => match db::lookup(store, &keys::name("app-cred", &u.id, name)).await.map_err(store_err)? {
                        Some(id) => db::get::<AppCred>(store, &keys::app_cred(&id)).await.map_err(store_err)?.map(|v| v.value),
                        None => None,
                    },
                    None => None,
                }
            }
            (None, None) => return Err(ApiError::bad_request(D, "An application credential must be given by id or name.")),
        };
        let Some(cred) = cred else {
            password::verify_blocking(ac.secret.clone(), state.identity.dummy_hash().to_string()).await;
            return Err(unauthorized());
        };
        if !password::verify_blocking(ac.secret.clone(), cred.secret_hash.clone()).await {
            return Err(unauthorized());
        }
        if cred.expires_at.is_some_and(|e| (e as f64) <= now()) {
            return Err(ApiError::unauthorized(D, "The application credential has expired."));
        }
        let user = db::get::<User>(store, &keys::user(&cred.user_id)).await.map_err(store_err)?.map(|v| v.value).ok_or_else(unauthorized)?;
        let exp = cred.expires_at.map(|e| e as f64);
        (user, Some(cred), vec!["application_credential".to_string()], exp)
    } else if methods.iter().any(|m| m == "token") {
        let t = req.auth.identity.token.as_ref().ok_or_else(|| ApiError::bad_request(D, "The token method needs a 'token' object."))?;
        let old = state.identity.validate(&t.id).await?;
        if old.app_cred_id.is_some() {
            return Err(ApiError::forbidden(D, "A token from an application credential cannot be rescoped."));
        }
        let user = db::get::<User>(store, &keys::user(&old.user_id)).await.map_err(store_err)?.map(|v| v.value).ok_or_else(unauthorized)?;
        let mut m = old.payload.m.clone();
        if !m.contains(&"token".to_string()) {
            m.push("token".into());
        }
        // A rescoped token never outlives the one it came from.
        (user, None, m, Some(old.payload.e))
    } else {
        return Err(ApiError::unauthorized(D, format!("Unsupported authentication method: {}.", methods.join(", "))));
    };

    if !user.enabled {
        return Err(unauthorized());
    }
    let user_domain = db::get::<Domain>(store, &keys::domain(&user.domain_id)).await.map_err(store_err)?.map(|v| v.value);
    if !user_domain.as_ref().is_some_and(|d| d.enabled) {
        return Err(unauthorized());
    }

    let scope = match &app_cred {
        // An application credential is always scoped to its project.
        Some(c) => match db::get::<Project>(store, &keys::project(&c.project_id)).await.map_err(store_err)? {
            Some(p) if p.value.enabled => Scope::Project(p.value),
            _ => return Err(ApiError::unauthorized(D, "The application credential's project is gone or disabled.")),
        },
        None => resolve_scope(&state, &req.auth.scope, &user).await?,
    };

    let (project_id, project_domain_id, domain_id, target) = match &scope {
        Scope::Unscoped => (None, None, None, None),
        Scope::Project(p) => {
            let dom = db::get::<Domain>(store, &keys::domain(&p.domain_id)).await.map_err(store_err)?;
            if !dom.is_some_and(|d| d.value.enabled) {
                return Err(ApiError::unauthorized(D, "The project's domain is disabled."));
            }
            (Some(p.id.clone()), Some(p.domain_id.clone()), None, Some(Target::Project(p.id.clone())))
        }
        Scope::Domain(d) => (None, None, Some(d.id.clone()), Some(Target::Domain(d.id.clone()))),
    };
    let mut roles: Vec<Role> = match &target {
        Some(t) => assignments::effective_roles(store, &user.id, t).await?,
        None => vec![],
    };
    if let Some(c) = &app_cred {
        // Only the roles the credential carries that the user still holds.
        roles.retain(|r| c.role_ids.contains(&r.id));
    }
    if target.is_some() && roles.is_empty() {
        return Err(ApiError::unauthorized(D, "You have no role on the requested scope."));
    }

    let issued = now();
    let mut expires = issued + state.config.identity.token_ttl_secs as f64;
    if let Some(e) = inherited_expiry {
        expires = expires.min(e);
    }
    let payload = TokenPayload {
        u: user.id.clone(),
        un: user.name.clone(),
        ud: user.domain_id.clone(),
        m: methods,
        p: project_id,
        pd: project_domain_id,
        d: domain_id,
        r: roles.iter().map(|r| (r.id.clone(), r.name.clone())).collect(),
        c: app_cred.as_ref().map(|c| c.id.clone()),
        i: issued,
        e: expires,
        a: audit_id(),
    };
    let token = state.identity.tokens.issue(&payload);
    state.metrics.tokens_issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let body = token_body(&state, &payload, !query.no_catalog()).await?;
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    resp.headers_mut().insert("x-subject-token", HeaderValue::from_str(&token).expect("tokens are ASCII"));
    Ok(resp)
}

fn audit_id() -> String {
    use base64::Engine;
    let bytes: [u8; 16] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)[..22].to_string()
}

/// Formats a unix time as Keystone does (`2026-01-01T00:00:00.000000Z`).
pub fn iso(t: f64) -> String {
    let dt = time::OffsetDateTime::from_unix_timestamp_nanos((t * 1e9) as i128).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
    dt.format(&fmt).unwrap_or_default()
}

/// Renders the `{"token": ...}` document for a payload.
async fn token_body(state: &AppState, p: &TokenPayload, with_catalog: bool) -> Result<Value, ApiError> {
    let store = state.store.as_ref();
    let domain_name = |id: String| async move {
        db::get::<Domain>(store, &keys::domain(&id)).await.map(|d| d.map(|d| d.value.name).unwrap_or_else(|| id.clone()))
    };
    let mut token = json!({
        "methods": p.m,
        "user": {
            "id": p.u,
            "name": p.un,
            "domain": {"id": p.ud, "name": domain_name(p.ud.clone()).await.map_err(store_err)?},
            "password_expires_at": null,
        },
        "audit_ids": [p.a],
        "issued_at": iso(p.i),
        "expires_at": iso(p.e),
    });
    if let Some(pid) = &p.p {
        let project = db::get::<Project>(store, &keys::project(pid)).await.map_err(store_err)?;
        let name = project.map(|v| v.value.name).unwrap_or_default();
        let pd = p.pd.clone().unwrap_or_else(|| DEFAULT_DOMAIN_ID.into());
        token["project"] = json!({"id": pid, "name": name, "domain": {"id": pd, "name": domain_name(pd.clone()).await.map_err(store_err)?}});
        token["is_domain"] = json!(false);
    }
    if let Some(did) = &p.d {
        token["domain"] = json!({"id": did, "name": domain_name(did.clone()).await.map_err(store_err)?});
    }
    if p.p.is_some() || p.d.is_some() {
        token["roles"] = json!(p.r.iter().map(|(id, name)| json!({"id": id, "name": name})).collect::<Vec<_>>());
    }
    if let Some(c) = &p.c {
        token["application_credential"] = json!({"id": c, "restricted": true});
    }
    if with_catalog {
        token["catalog"] = catalog::token_catalog(state, p.p.as_deref()).await?;
    }
    Ok(json!({"token": token}))
}

#[derive(Deserialize)]
struct NoCatalog {
    #[serde(default)]
    nocatalog: Option<String>,
}

impl NoCatalog {
    fn no_catalog(&self) -> bool {
        self.nocatalog.as_deref().is_some_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "false" | "0" | "no"))
    }
}

async fn subject(state: &AppState, caller: &Auth, headers: &HeaderMap, action: &str) -> Result<(String, TokenPayload), ApiError> {
    let Some(subject) = headers.get("x-subject-token").and_then(|v| v.to_str().ok()) else {
        return Err(ApiError::bad_request(D, "The X-Subject-Token header is required."));
    };
    let checked = state.identity.validate(subject).await;
    // Policy first, on what the subject claims, so an unauthorized caller learns nothing.
    let target_user = checked.as_ref().map(|a| a.user_id.clone()).unwrap_or_default();
    state.identity.enforce(caller, action, &[("target.token.user_id", &target_user)])?;
    match checked {
        Ok(a) => Ok((subject.to_string(), a.payload)),
        Err(_) => Err(ApiError::not_found(D, "Could not find token: the token is invalid, expired or revoked.")),
    }
}

async fn validate(State(state): State<AppState>, caller: Auth, query: Query<NoCatalog>, headers: HeaderMap) -> Result<Response, ApiError> {
    let (token, p) = subject(&state, &caller, &headers, "identity:validate_token").await?;
    let body = token_body(&state, &p, !query.no_catalog()).await?;
    let mut resp = Json(body).into_response();
    resp.headers_mut().insert("x-subject-token", HeaderValue::from_str(&token).expect("tokens are ASCII"));
    Ok(resp)
}

async fn check(State(state): State<AppState>, caller: Auth, headers: HeaderMap) -> Result<StatusCode, ApiError> {
    subject(&state, &caller, &headers, "identity:validate_token").await?;
    Ok(StatusCode::OK)
}

async fn revoke(State(state): State<AppState>, caller: Auth, headers: HeaderMap) -> Result<StatusCode, ApiError> {
    let (_, p) = subject(&state, &caller, &headers, "identity:revoke_token").await?;
    state.identity.revoke(Revocation { audit_id: Some(p.a), issued_before: 0.0, ..Default::default() }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn my_projects(State(state): State<AppState>, caller: Auth) -> Result<Json<Value>, ApiError> {
    let projects = assignments::projects_of_user(state.store.as_ref(), &caller.user_id).await?;
    let list: Vec<Value> = projects.iter().filter(|p| p.enabled).map(|p| super::resources::project_json(&state, p)).collect();
    Ok(Json(json!({"projects": list, "links": {"self": format!("{}/v3/auth/projects", state.config.public_url), "next": null, "previous": null}})))
}

async fn my_domains(State(state): State<AppState>, caller: Auth) -> Result<Json<Value>, ApiError> {
    let domains = assignments::domains_of_user(state.store.as_ref(), &caller.user_id).await?;
    let list: Vec<Value> = domains.iter().filter(|d| d.enabled).map(|d| super::resources::domain_json(&state, d)).collect();
    Ok(Json(json!({"domains": list, "links": {"self": format!("{}/v3/auth/domains", state.config.public_url), "next": null, "previous": null}})))
}

async fn my_catalog(State(state): State<AppState>, caller: Auth) -> Result<Json<Value>, ApiError> {
    let catalog = catalog::token_catalog(&state, caller.project_id.as_deref()).await?;
    Ok(Json(json!({"catalog": catalog, "links": {"self": format!("{}/v3/auth/catalog", state.config.public_url), "next": null, "previous": null}})))
}
