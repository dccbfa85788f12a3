//! Domains, projects, users, groups and roles: `/v3/{domains,projects,users,groups,roles}`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use store::{Op, Store};

use super::model::{keys, Actor, Assignment, Domain, Group, Project, Revocation, Role, User, DEFAULT_DOMAIN_ID};
use super::{assignments, check_name, db, db_err, new_id, parse_body, password, store_err, Auth, D};
use crate::error::ApiError;
use crate::state::AppState;

/// Resource routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v3/domains", get(list_domains).post(create_domain))
        .route("/v3/domains/{id}", get(get_domain).patch(update_domain).delete(delete_domain))
        .route("/v3/projects", get(list_projects).post(create_project))
        .route("/v3/projects/{id}", get(get_project).patch(update_project).delete(delete_project))
        .route("/v3/users", get(list_users).post(create_user))
        .route("/v3/users/{id}", get(get_user).patch(update_user).delete(delete_user))
        .route("/v3/users/{id}/password", post(change_password))
        .route("/v3/users/{id}/groups", get(user_groups))
        .route("/v3/groups", get(list_groups).post(create_group))
        .route("/v3/groups/{id}", get(get_group).patch(update_group).delete(delete_group))
        .route("/v3/groups/{id}/users", get(group_users))
        .route("/v3/groups/{gid}/users/{uid}", put(add_member).head(check_member).get(check_member).delete(remove_member))
        .route("/v3/roles", get(list_roles).post(create_role))
        .route("/v3/roles/{id}", get(get_role).patch(update_role).delete(delete_role))
}

type Filters = Query<BTreeMap<String, String>>;

fn links(state: &AppState, path: &str) -> Value {
    json!({"self": format!("{}/v3/{path}", state.config.public_url)})
}

fn list_links(state: &AppState, path: &str) -> Value {
    json!({"self": format!("{}/v3/{path}", state.config.public_url), "next": null, "previous": null})
}

/// A domain as the API shows it.
pub fn domain_json(state: &AppState, d: &Domain) -> Value {
    json!({"id": d.id, "name": d.name, "description": d.description, "enabled": d.enabled, "tags": [], "options": {}, "links": links(state, &format!("domains/{}", d.id))})
}

/// A project as the API shows it.
pub fn project_json(state: &AppState, p: &Project) -> Value {
    json!({
        "id": p.id, "name": p.name, "domain_id": p.domain_id, "description": p.description, "enabled": p.enabled,
        "parent_id": p.domain_id, "is_domain": false, "tags": p.tags, "options": {},
        "links": links(state, &format!("projects/{}", p.id))
    })
}

/// A user as the API shows it (never the password hash).
pub fn user_json(state: &AppState, u: &User) -> Value {
    let mut v = json!({
        "id": u.id, "name": u.name, "domain_id": u.domain_id, "enabled": u.enabled, "description": u.description,
        "password_expires_at": null, "options": {}, "links": links(state, &format!("users/{}", u.id))
    });
    if let Some(p) = &u.default_project_id {
        v["default_project_id"] = json!(p);
    }
    if let Some(e) = &u.email {
        v["email"] = json!(e);
    }
    v
}

/// A group as the API shows it.
pub fn group_json(state: &AppState, g: &Group) -> Value {
    json!({"id": g.id, "name": g.name, "domain_id": g.domain_id, "description": g.description, "links": links(state, &format!("groups/{}", g.id))})
}

/// A role as the API shows it.
pub fn role_json(state: &AppState, r: &Role) -> Value {
    json!({"id": r.id, "name": r.name, "domain_id": null, "description": r.description, "options": {}, "links": links(state, &format!("roles/{}", r.id))})
}

fn truthy(v: &str) -> bool {
    !matches!(v.to_ascii_lowercase().as_str(), "false" | "0" | "no" | "off")
}

async fn must_get<T: store::record::Record>(store: &dyn Store, key: &str, what: &str, id: &str) -> Result<db::Versioned<T>, ApiError> {
    db::get::<T>(store, key).await.map_err(store_err)?.ok_or_else(|| ApiError::not_found(D, format!("Could not find {what}: {id}.")))
}

async fn domain_exists(store: &dyn Store, id: &str) -> Result<(), ApiError> {
    must_get::<Domain>(store, &keys::domain(id), "domain", id).await.map(|_| ())
}

// ---------------------------------------------------------------- domains

#[derive(Deserialize)]
struct DomainBody {
    domain: DomainFields,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainFields {
    name: Option<String>,
    description: Option<String>,
    enabled: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    #[allow(dead_code)]
    options: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    explicit_domain_id: Option<String>,
}

async fn list_domains(State(state): State<AppState>, auth: Auth, Query(q): Filters) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:list_domains", &[])?;
    let all: Vec<Domain> = db::list(state.store.as_ref(), "/identity/domains/").await.map_err(store_err)?;
    let list: Vec<Value> = all
        .iter()
        .filter(|d| q.get("name").is_none_or(|n| &d.name == n))
        .filter(|d| q.get("enabled").is_none_or(|e| d.enabled == truthy(e)))
        .map(|d| domain_json(&state, d))
        .collect();
    Ok(Json(json!({"domains": list, "links": list_links(&state, "domains")})))
}

async fn create_domain(State(state): State<AppState>, auth: Auth, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    state.identity.enforce(&auth, "identity:create_domain", &[])?;
    let b: DomainBody = parse_body(&body)?;
    let name = b.domain.name.ok_or_else(|| ApiError::bad_request(D, "'name' is a required property."))?;
    check_name("domain", &name)?;
    let d = Domain { id: new_id(), name, description: b.domain.description.unwrap_or_default(), enabled: b.domain.enabled.unwrap_or(true) };
    let nk = keys::name("domain", "-", &d.name);
    db::create(state.store.as_ref(), &keys::domain(&d.id), &d, Some((&nk, &d.id)), "domain").await.map_err(db_err)?;
    Ok((StatusCode::CREATED, Json(json!({"domain": domain_json(&state, &d)}))))
}

async fn get_domain(State(state): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:get_domain", &[("target.domain.id", &id)])?;
    let d = must_get::<Domain>(state.store.as_ref(), &keys::domain(&id), "domain", &id).await?;
    Ok(Json(json!({"domain": domain_json(&state, &d.value)})))
}

async fn update_domain(State(state): State<AppState>, auth: Auth, Path(id): Path<String>, body: Bytes) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:update_domain", &[("target.domain.id", &id)])?;
    let b: DomainBody = parse_body(&body)?;
    let store = state.store.as_ref();
    let cur = must_get::<Domain>(store, &keys::domain(&id), "domain", &id).await?;
    let mut d = cur.value.clone();
    if let Some(n) = b.domain.name {
        check_name("domain", &n)?;
        d.name = n;
    }
    if let Some(x) = b.domain.description {
        d.description = x;
    }
    if let Some(e) = b.domain.enabled {
        d.enabled = e;
    }
    let (old, new) = (keys::name("domain", "-", &cur.value.name), keys::name("domain", "-", &d.name));
    db::update(store, &keys::domain(&id), cur.rev, &d, Some((&old, &new, &id)), "domain").await.map_err(db_err)?;
    if cur.value.enabled && !d.enabled {
        state.identity.revoke(Revocation { domain_id: Some(id.clone()), ..Default::default() }).await?;
    }
    Ok(Json(json!({"domain": domain_json(&state, &d)})))
}

async fn delete_domain(State(state): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    state.identity.enforce(&auth, "identity:delete_domain", &[("target.domain.id", &id)])?;
    let store = state.store.as_ref();
    let cur = must_get::<Domain>(store, &keys::domain(&id), "domain", &id).await?;
    if id == DEFAULT_DOMAIN_ID {
        return Err(ApiError::forbidden(D, "The Default domain cannot be deleted."));
    }
    if cur.value.enabled {
        return Err(ApiError::forbidden(D, "Cannot delete a domain that is enabled, please disable it first."));
    }
    let projects: Vec<Project> = db::list(store, "/identity/projects/").await.map_err(store_err)?;
    let users: Vec<User> = db::list(store, "/identity/users/").await.map_err(store_err)?;
    let groups: Vec<Group> = db::list(store, "/identity/groups/").await.map_err(store_err)?;
    if projects.iter().any(|p| p.domain_id == id) || users.iter().any(|u| u.domain_id == id) || groups.iter().any(|g| g.domain_id == id) {
        return Err(ApiError::conflict(D, "The domain still holds projects, users or groups; delete them first."));
    }
    let extra = vec![Op::delete(keys::name("domain", "-", &cur.value.name)), Op::DeletePrefix { prefix: format!("/identity/assignments/domain:{id}/") }];
    db::delete(store, &keys::domain(&id), cur.rev, extra).await.map_err(db_err)?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------- projects

#[derive(Deserialize)]
struct ProjectBody {
    project: ProjectFields,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectFields {
    name: Option<String>,
    domain_id: Option<String>,
    description: Option<String>,
    enabled: Option<bool>,
    tags: Option<Vec<String>>,
    parent_id: Option<String>,
    #[serde(default)]
    is_domain: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    options: Option<Value>,
}

async fn list_projects(State(state): State<AppState>, auth: Auth, Query(q): Filters) -> Result<Json<Value>, ApiError> {
    // Callers not allowed to list every project see the projects they hold a role on,
    // which is what /v3/auth/projects shows them anyway.
    let all: Vec<Project> = match state.identity.enforce(&auth, "identity:list_projects", &[]) {
        Ok(()) => db::list(state.store.as_ref(), "/identity/projects/").await.map_err(store_err)?,
        Err(_) => assignments::projects_of_user(state.store.as_ref(), &auth.user_id).await?,
    };
    let list: Vec<Value> = all
        .iter()
        .filter(|p| q.get("name").is_none_or(|n| &p.name == n))
        .filter(|p| q.get("domain_id").is_none_or(|d| &p.domain_id == d))
        .filter(|p| q.get("enabled").is_none_or(|e| p.enabled == truthy(e)))
        .map(|p| project_json(&state, p))
        .collect();
    Ok(Json(json!({"projects": list, "links": list_links(&state, "projects")})))
}

async fn create_project(State(state): State<AppState>, auth: Auth, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    state.identity.enforce(&auth, "identity:create_project", &[])?;
    let b: ProjectBody = parse_body(&body)?;
    let f = b.project;
    let name = f.name.ok_or_else(|| ApiError::bad_request(D, "'name' is a required property."))?;
    check_name("project", &name)?;
    if f.is_domain == Some(true) {
        return Err(ApiError::bad_request(D, "Projects acting as domains are not supported; create a domain instead."));
    }
    let domain_id = f.domain_id.or_else(|| f.parent_id.clone()).unwrap_or_else(|| auth.project_domain_id.clone().unwrap_or_else(|| DEFAULT_DOMAIN_ID.into()));
    if let Some(parent) = &f.parent_id {
        if parent != &domain_id {
            return Err(ApiError::bad_request(D, "Nested projects are not supported: parent_id must be the project's domain."));
        }
    }
    let store = state.store.as_ref();
    domain_exists(store, &domain_id).await.map_err(|_| ApiError::bad_request(D, format!("Domain {domain_id} does not exist.")))?;
    let p = Project { id: new_id(), name, domain_id, description: f.description.unwrap_or_default(), enabled: f.enabled.unwrap_or(true), tags: f.tags.unwrap_or_default() };
    let nk = keys::name("project", &p.domain_id, &p.name);
    db::create(store, &keys::project(&p.id), &p, Some((&nk, &p.id)), "project").await.map_err(db_err)?;
    Ok((StatusCode::CREATED, Json(json!({"project": project_json(&state, &p)}))))
}

async fn get_project(State(state): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:get_project", &[("target.project.id", &id)])?;
    let p = must_get::<Project>(state.store.as_ref(), &keys::project(&id), "project", &id).await?;
    Ok(Json(json!({"project": project_json(&state, &p.value)})))
}

async fn update_project(State(state): State<AppState>, auth: Auth, Path(id): Path<String>, body: Bytes) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:update_project", &[("target.project.id", &id)])?;
    let b: ProjectBody = parse_body(&body)?;
    let store = state.store.as_ref();
    let cur = must_get::<Project>(store, &keys::project(&id), "project", &id).await?;
    let mut p = cur.value.clone();
    if b.project.domain_id.as_ref().is_some_and(|d| d != &p.domain_id) {
        return Err(ApiError::bad_request(D, "A project cannot move to another domain."));
    }
    if let Some(n) = b.project.name {
        check_name("project", &n)?;
        p.name = n;
    }
    if let Some(x) = b.project.description {
        p.description = x;
    }
    if let Some(e) = b.project.enabled {
        p.enabled = e;
    }
    if let Some(t) = b.project.tags {
        p.tags = t;
    }
    let (old, new) = (keys::name("project", &p.domain_id, &cur.value.name), keys::name("project", &p.domain_id, &p.name));
    db::update(store, &keys::project(&id), cur.rev, &p, Some((&old, &new, &id)), "project").await.map_err(db_err)?;
    if cur.value.enabled && !p.enabled {
        state.identity.revoke(Revocation { project_id: Some(id.clone()), ..Default::default() }).await?;
    }
    Ok(Json(json!({"project": project_json(&state, &p)})))
}

async fn delete_project(State(state): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    state.identity.enforce(&auth, "identity:delete_project", &[("target.project.id", &id)])?;
    let store = state.store.as_ref();
    let cur = must_get::<Project>(store, &keys::project(&id), "project", &id).await?;
    let extra = vec![
        Op::delete(keys::name("project", &cur.value.domain_id, &cur.value.name)),
        Op::DeletePrefix { prefix: format!("/identity/assignments/project:{id}/") },
    ];
    db::delete(store, &keys::project(&id), cur.rev, extra).await.map_err(db_err)?;
    state.identity.revoke(Revocation { project_id: Some(id), ..Default::default() }).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------- users

#[derive(Deserialize)]
struct UserBody {
    user: UserFields,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserFields {
    name: Option<String>,
    domain_id: Option<String>,
    password: Option<String>,
    enabled: Option<bool>,
    default_project_id: Option<String>,
    description: Option<String>,
    email: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    options: Option<Value>,
}

fn check_password(p: &str) -> Result<(), ApiError> {
    if p.is_empty() || p.len() > 4096 {
        return Err(ApiError::bad_request(D, "Invalid password: it must be 1 to 4096 characters."));
    }
    Ok(())
}

async fn list_users(State(state): State<AppState>, auth: Auth, Query(q): Filters) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:list_users", &[])?;
    let all: Vec<User> = db::list(state.store.as_ref(), "/identity/users/").await.map_err(store_err)?;
    let list: Vec<Value> = all
        .iter()
        .filter(|u| q.get("name").is_none_or(|n| &u.name == n))
        .filter(|u| q.get("domain_id").is_none_or(|d| &u.domain_id == d))
        .filter(|u| q.get("enabled").is_none_or(|e| u.enabled == truthy(e)))
        .map(|u| user_json(&state, u))
        .collect();
    Ok(Json(json!({"users": list, "links": list_links(&state, "users")})))
}

async fn create_user(State(state): State<AppState>, auth: Auth, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    state.identity.enforce(&auth, "identity:create_user", &[])?;
    let b: UserBody = parse_body(&body)?;
    let f = b.user;
    let name = f.name.ok_or_else(|| ApiError::bad_request(D, "'name' is a required property."))?;
    check_name("user", &name)?;
    let domain_id = f.domain_id.unwrap_or_else(|| auth.project_domain_id.clone().unwrap_or_else(|| DEFAULT_DOMAIN_ID.into()));
    let store = state.store.as_ref();
    domain_exists(store, &domain_id).await.map_err(|_| ApiError::bad_request(D, format!("Domain {domain_id} does not exist.")))?;
    if let Some(p) = &f.password {
        check_password(p)?;
    }
    if let Some(pid) = &f.default_project_id {
        must_get::<Project>(store, &keys::project(pid), "project", pid).await.map_err(|_| ApiError::bad_request(D, format!("Default project {pid} does not exist.")))?;
    }
    let password_hash = match f.password {
        Some(p) => Some(password::hash_blocking(p).await),
        None => None,
    };
    let u = User {
        id: new_id(),
        name,
        domain_id,
        enabled: f.enabled.unwrap_or(true),
        password_hash,
        default_project_id: f.default_project_id,
        description: f.description.unwrap_or_default(),
        email: f.email,
    };
    let nk = keys::name("user", &u.domain_id, &u.name);
    db::create(store, &keys::user(&u.id), &u, Some((&nk, &u.id)), "user").await.map_err(db_err)?;
    Ok((StatusCode::CREATED, Json(json!({"user": user_json(&state, &u)}))))
}

async fn get_user(State(state): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:get_user", &[("target.user.id", &id)])?;
    let u = must_get::<User>(state.store.as_ref(), &keys::user(&id), "user", &id).await?;
    Ok(Json(json!({"user": user_json(&state, &u.value)})))
}

async fn update_user(State(state): State<AppState>, auth: Auth, Path(id): Path<String>, body: Bytes) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:update_user", &[("target.user.id", &id)])?;
    let b: UserBody = parse_body(&body)?;
    let store = state.store.as_ref();
    let f = b.user;
    if let Some(p) = &f.password {
        check_password(p)?;
    }
    let new_hash = match &f.password {
        Some(p) => Some(password::hash_blocking(p.clone()).await),
        None => None,
    };
    let cur = must_get::<User>(store, &keys::user(&id), "user", &id).await?;
    let mut u = cur.value.clone();
    if f.domain_id.as_ref().is_some_and(|d| d != &u.domain_id) {
        return Err(ApiError::bad_request(D, "A user cannot move to another domain."));
    }
    if let Some(n) = f.name {
        check_name("user", &n)?;
        u.name = n;
    }
    if let Some(e) = f.enabled {
        u.enabled = e;
    }
    if let Some(pid) = f.default_project_id {
        must_get::<Project>(store, &keys::project(&pid), "project", &pid).await.map_err(|_| ApiError::bad_request(D, format!("Default project {pid} does not exist.")))?;
        u.default_project_id = Some(pid);
    }
    if let Some(x) = f.description {
        u.description = x;
    }
    if let Some(x) = f.email {
        u.email = Some(x);
    }
    if new_hash.is_some() {
        u.password_hash = new_hash.clone();
    }
    let (old, new) = (keys::name("user", &u.domain_id, &cur.value.name), keys::name("user", &u.domain_id, &u.name));
    db::update(store, &keys::user(&id), cur.rev, &u, Some((&old, &new, &id)), "user").await.map_err(db_err)?;
    if (cur.value.enabled && !u.enabled) || new_hash.is_some() {
        state.identity.revoke(Revocation { user_id: Some(id.clone()), ..Default::default() }).await?;
    }
    Ok(Json(json!({"user": user_json(&state, &u)})))
}

#[derive(Deserialize)]
struct PasswordBody {
    user: PasswordFields,
}

#[derive(Deserialize)]
struct PasswordFields {
    password: String,
    original_password: String,
}

async fn change_password(State(state): State<AppState>, auth: Auth, Path(id): Path<String>, body: Bytes) -> Result<StatusCode, ApiError> {
    state.identity.enforce(&auth, "identity:change_password", &[("target.user.id", &id)])?;
    let b: PasswordBody = parse_body(&body)?;
    check_password(&b.user.password)?;
    let store = state.store.as_ref();
    let cur = must_get::<User>(store, &keys::user(&id), "user", &id).await?;
    let ok = match &cur.value.password_hash {
        Some(h) => password::verify_blocking(b.user.original_password, h.clone()).await,
        None => false,
    };
    if !ok {
        return Err(ApiError::unauthorized(D, "The original password is not correct."));
    }
    let mut u = cur.value.clone();
    u.password_hash = Some(password::hash_blocking(b.user.password).await);
    db::update(store, &keys::user(&id), cur.rev, &u, None, "user").await.map_err(db_err)?;
    state.identity.revoke(Revocation { user_id: Some(id), ..Default::default() }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_user(State(state): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    state.identity.enforce(&auth, "identity:delete_user", &[("target.user.id", &id)])?;
    let store = state.store.as_ref();
    let cur = must_get::<User>(store, &keys::user(&id), "user", &id).await?;
    let mut extra = vec![Op::delete(keys::name("user", &cur.value.domain_id, &cur.value.name)), Op::DeletePrefix { prefix: keys::groups_of_user(&id) }];
    for g in assignments::groups_of(store, &id).await? {
        extra.push(Op::delete(keys::membership(&g, &id)));
    }
    let assigned: Vec<Assignment> = db::list(store, keys::ASSIGNMENTS).await.map_err(store_err)?;
    for a in assigned.iter().filter(|a| a.actor == Actor::User(id.clone())) {
        extra.push(Op::delete(keys::assignment(&a.target, &a.actor, &a.role_id)));
    }
    for c in db::list::<super::model::AppCred>(store, "/identity/app-creds/").await.map_err(store_err)?.into_iter().filter(|c| c.user_id == id) {
        extra.push(Op::delete(keys::app_cred(&c.id)));
        extra.push(Op::delete(keys::name("app-cred", &id, &c.name)));
    }
    db::delete(store, &keys::user(&id), cur.rev, extra).await.map_err(db_err)?;
    state.identity.revoke(Revocation { user_id: Some(id), ..Default::default() }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn user_groups(State(state): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:list_groups_for_user", &[("target.user.id", &id)])?;
    let store = state.store.as_ref();
    must_get::<User>(store, &keys::user(&id), "user", &id).await?;
    let mut list = vec![];
    for g in assignments::groups_of(store, &id).await? {
        if let Some(g) = db::get::<Group>(store, &keys::group(&g)).await.map_err(store_err)? {
            list.push(group_json(&state, &g.value));
        }
    }
    Ok(Json(json!({"groups": list, "links": list_links(&state, &format!("users/{id}/groups"))})))
}

// ---------------------------------------------------------------- groups

#[derive(Deserialize)]
struct GroupBody {
    group: GroupFields,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupFields {
    name: Option<String>,
    domain_id: Option<String>,
    description: Option<String>,
}

async fn list_groups(State(state): State<AppState>, auth: Auth, Query(q): Filters) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:list_groups", &[])?;
    let all: Vec<Group> = db::list(state.store.as_ref(), "/identity/groups/").await.map_err(store_err)?;
    let list: Vec<Value> = all
        .iter()
        .filter(|g| q.get("name").is_none_or(|n| &g.name == n))
        .filter(|g| q.get("domain_id").is_none_or(|d| &g.domain_id == d))
        .map(|g| group_json(&state, g))
        .collect();
    Ok(Json(json!({"groups": list, "links": list_links(&state, "groups")})))
}

async fn create_group(State(state): State<AppState>, auth: Auth, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    state.identity.enforce(&auth, "identity:create_group", &[])?;
    let b: GroupBody = parse_body(&body)?;
    let name = b.group.name.ok_or_else(|| ApiError::bad_request(D, "'name' is a required property."))?;
    check_name("group", &name)?;
    let domain_id = b.group.domain_id.unwrap_or_else(|| DEFAULT_DOMAIN_ID.into());
    let store = state.store.as_ref();
    domain_exists(store, &domain_id).await.map_err(|_| ApiError::bad_request(D, format!("Domain {domain_id} does not exist.")))?;
    let g = Group { id: new_id(), name, domain_id, description: b.group.description.unwrap_or_default() };
    let nk = keys::name("group", &g.domain_id, &g.name);
    db::create(store, &keys::group(&g.id), &g, Some((&nk, &g.id)), "group").await.map_err(db_err)?;
    Ok((StatusCode::CREATED, Json(json!({"group": group_json(&state, &g)}))))
}

async fn get_group(State(state): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:get_group", &[])?;
    let g = must_get::<Group>(state.store.as_ref(), &keys::group(&id), "group", &id).await?;
    Ok(Json(json!({"group": group_json(&state, &g.value)})))
}

async fn update_group(State(state): State<AppState>, auth: Auth, Path(id): Path<String>, body: Bytes) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:update_group", &[])?;
    let b: GroupBody = parse_body(&body)?;
    let store = state.store.as_ref();
    let cur = must_get::<Group>(store, &keys::group(&id), "group", &id).await?;
    let mut g = cur.value.clone();
    if let Some(n) = b.group.name {
        check_name("group", &n)?;
        g.name = n;
    }
    if let Some(x) = b.group.description {
        g.description = x;
    }
    let (old, new) = (keys::name("group", &g.domain_id, &cur.value.name), keys::name("group", &g.domain_id, &g.name));
    db::update(store, &keys::group(&id), cur.rev, &g, Some((&old, &new, &id)), "group").await.map_err(db_err)?;
    Ok(Json(json!({"group": group_json(&state, &g)})))
}

async fn delete_group(State(state): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    state.identity.enforce(&auth, "identity:delete_group", &[])?;
    let store = state.store.as_ref();
    let cur = must_get::<Group>(store, &keys::group(&id), "group", &id).await?;
    let members = assignments::members_of(store, &id).await?;
    let mut extra = vec![Op::delete(keys::name("group", &cur.value.domain_id, &cur.value.name)), Op::DeletePrefix { prefix: keys::memberships_of_group(&id) }];
    for u in &members {
        extra.push(Op::delete(keys::user_group(u, &id)));
    }
    let assigned: Vec<Assignment> = db::list(store, keys::ASSIGNMENTS).await.map_err(store_err)?;
    for a in assigned.iter().filter(|a| a.actor == Actor::Group(id.clone())) {
        extra.push(Op::delete(keys::assignment(&a.target, &a.actor, &a.role_id)));
    }
    db::delete(store, &keys::group(&id), cur.rev, extra).await.map_err(db_err)?;
    for u in members {
        state.identity.revoke(Revocation { user_id: Some(u), ..Default::default() }).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn group_users(State(state): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:list_users_in_group", &[])?;
    let store = state.store.as_ref();
    must_get::<Group>(store, &keys::group(&id), "group", &id).await?;
    let mut list = vec![];
    for u in assignments::members_of(store, &id).await? {
        if let Some(u) = db::get::<User>(store, &keys::user(&u)).await.map_err(store_err)? {
            list.push(user_json(&state, &u.value));
        }
    }
    Ok(Json(json!({"users": list, "links": list_links(&state, &format!("groups/{id}/users"))})))
}

async fn add_member(State(state): State<AppState>, auth: Auth, Path((gid, uid)): Path<(String, String)>) -> Result<StatusCode, ApiError> {
    state.identity.enforce(&auth, "identity:add_user_to_group", &[])?;
    let store = state.store.as_ref();
    let g = must_get::<Group>(store, &keys::group(&gid), "group", &gid).await?;
    let u = must_get::<User>(store, &keys::user(&uid), "user", &uid).await?;
    let txn = store::Txn::new()
        .when(store::Compare::ModRevision(keys::group(&gid), g.rev))
        .when(store::Compare::ModRevision(keys::user(&uid), u.rev))
        .and_then(Op::put(keys::membership(&gid, &uid), Vec::new()))
        .and_then(Op::put(keys::user_group(&uid, &gid), Vec::new()));
    if !store.txn(txn).await.map_err(store_err)?.succeeded {
        return Err(ApiError::conflict(D, "The group or user changed while adding; try again."));
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn check_member(State(state): State<AppState>, auth: Auth, Path((gid, uid)): Path<(String, String)>) -> Result<StatusCode, ApiError> {
    state.identity.enforce(&auth, "identity:check_user_in_group", &[])?;
    let store = state.store.as_ref();
    must_get::<Group>(store, &keys::group(&gid), "group", &gid).await?;
    must_get::<User>(store, &keys::user(&uid), "user", &uid).await?;
    match store.get(&keys::membership(&gid, &uid)).await.map_err(store_err)? {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(ApiError::not_found(D, format!("User {uid} is not a member of group {gid}."))),
    }
}

async fn remove_member(State(state): State<AppState>, auth: Auth, Path((gid, uid)): Path<(String, String)>) -> Result<StatusCode, ApiError> {
    state.identity.enforce(&auth, "identity:remove_user_from_group", &[])?;
    let store = state.store.as_ref();
    must_get::<Group>(store, &keys::group(&gid), "group", &gid).await?;
    must_get::<User>(store, &keys::user(&uid), "user", &uid).await?;
    let txn = store::Txn::new()
        .when(store::Compare::Exists(keys::membership(&gid, &uid)))
        .and_then(Op::delete(keys::membership(&gid, &uid)))
        .and_then(Op::delete(keys::user_group(&uid, &gid)));
    if !store.txn(txn).await.map_err(store_err)?.succeeded {
        return Err(ApiError::not_found(D, format!("User {uid} is not a member of group {gid}.")));
    }
    state.identity.revoke(Revocation { user_id: Some(uid), ..Default::default() }).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------- roles

#[derive(Deserialize)]
struct RoleBody {
    role: RoleFields,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleFields {
    name: Option<String>,
    description: Option<String>,
    #[serde(default)]
    domain_id: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    options: Option<Value>,
}

async fn list_roles(State(state): State<AppState>, auth: Auth, Query(q): Filters) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:list_roles", &[])?;
    let all: Vec<Role> = db::list(state.store.as_ref(), "/identity/roles/").await.map_err(store_err)?;
    let list: Vec<Value> = all.iter().filter(|r| q.get("name").is_none_or(|n| &r.name == n)).map(|r| role_json(&state, r)).collect();
    Ok(Json(json!({"roles": list, "links": list_links(&state, "roles")})))
}

async fn create_role(State(state): State<AppState>, auth: Auth, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    state.identity.enforce(&auth, "identity:create_role", &[])?;
    let b: RoleBody = parse_body(&body)?;
    if b.role.domain_id.is_some() {
        return Err(ApiError::bad_request(D, "Domain-specific roles are not supported."));
    }
    let name = b.role.name.ok_or_else(|| ApiError::bad_request(D, "'name' is a required property."))?;
    check_name("role", &name)?;
    let r = Role { id: new_id(), name, description: b.role.description.unwrap_or_default() };
    let nk = keys::name("role", "-", &r.name.to_lowercase());
    db::create(state.store.as_ref(), &keys::role(&r.id), &r, Some((&nk, &r.id)), "role").await.map_err(db_err)?;
    Ok((StatusCode::CREATED, Json(json!({"role": role_json(&state, &r)}))))
}

async fn get_role(State(state): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:get_role", &[])?;
    let r = must_get::<Role>(state.store.as_ref(), &keys::role(&id), "role", &id).await?;
    Ok(Json(json!({"role": role_json(&state, &r.value)})))
}

async fn update_role(State(state): State<AppState>, auth: Auth, Path(id): Path<String>, body: Bytes) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:update_role", &[])?;
    let b: RoleBody = parse_body(&body)?;
    let store = state.store.as_ref();
    let cur = must_get::<Role>(store, &keys::role(&id), "role", &id).await?;
    let mut r = cur.value.clone();
    if let Some(n) = b.role.name {
        check_name("role", &n)?;
        r.name = n;
    }
    if let Some(x) = b.role.description {
        r.description = x;
    }
    let (old, new) = (keys::name("role", "-", &cur.value.name.to_lowercase()), keys::name("role", "-", &r.name.to_lowercase()));
    db::update(store, &keys::role(&id), cur.rev, &r, Some((&old, &new, &id)), "role").await.map_err(db_err)?;
    if cur.value.name != r.name {
        // Tokens carry role names; make holders fetch new ones.
        state.identity.revoke(Revocation { role_id: Some(id), ..Default::default() }).await?;
    }
    Ok(Json(json!({"role": role_json(&state, &r)})))
}

async fn delete_role(State(state): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    state.identity.enforce(&auth, "identity:delete_role", &[])?;
    let store = state.store.as_ref();
    let cur = must_get::<Role>(store, &keys::role(&id), "role", &id).await?;
    let mut extra = vec![Op::delete(keys::name("role", "-", &cur.value.name.to_lowercase()))];
    let assigned: Vec<Assignment> = db::list(store, keys::ASSIGNMENTS).await.map_err(store_err)?;
    for a in assigned.iter().filter(|a| a.role_id == id) {
        extra.push(Op::delete(keys::assignment(&a.target, &a.actor, &a.role_id)));
    }
    db::delete(store, &keys::role(&id), cur.rev, extra).await.map_err(db_err)?;
    state.identity.revoke(Revocation { role_id: Some(id), ..Default::default() }).await?;
    Ok(StatusCode::NO_CONTENT)
}
