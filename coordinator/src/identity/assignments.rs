//! Role assignments: grants on projects and domains to users and groups, the
//! roles a user effectively holds, and `/v3/role_assignments`.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use store::record::{decode, encode};
use store::{Compare, Op, Store, Txn};

use super::model::{keys, Actor, Assignment, Domain, Group, Project, Revocation, Role, Target, User};
use super::{db, store_err, Auth, D};
use crate::error::ApiError;
use crate::state::AppState;

/// Grant and assignment routes.
pub fn routes() -> Router<AppState> {
    let mut r = Router::new();
    for (kind, actor_kind) in [("projects", "users"), ("projects", "groups"), ("domains", "users"), ("domains", "groups")] {
        let list = move |st: State<AppState>, auth: Auth, Path((t, a)): Path<(String, String)>| {
            list_grants(st, auth, Path((kind.to_string(), t, actor_kind.to_string(), a)))
        };
        let one = |f: GrantFn| {
            move |st: State<AppState>, auth: Auth, Path((t, a, role)): Path<(String, String, String)>| {
                f(st, auth, Path((kind.to_string(), t, actor_kind.to_string(), a, role)))
            }
        };
        r = r.route(&format!("/v3/{kind}/{{target}}/{actor_kind}/{{actor}}/roles"), get(list)).route(
            &format!("/v3/{kind}/{{target}}/{actor_kind}/{{actor}}/roles/{{role}}"),
            put(one(|s, a, p| Box::pin(grant(s, a, p))))
                .head(one(|s, a, p| Box::pin(check_grant(s, a, p))))
                .get(one(|s, a, p| Box::pin(check_grant(s, a, p))))
                .delete(one(|s, a, p| Box::pin(revoke_grant(s, a, p)))),
        );
    }
    r.merge(list_routes())
}

/// Routes that list assignments.
pub fn list_routes() -> Router<AppState> {
    Router::new().route("/v3/role_assignments", get(role_assignments)).route("/v3/users/{id}/projects", get(user_projects))
}

type GrantPath = Path<(String, String, String, String, String)>;
type GrantFut = std::pin::Pin<Box<dyn std::future::Future<Output = Result<StatusCode, ApiError>> + Send>>;
type GrantFn = fn(State<AppState>, Auth, GrantPath) -> GrantFut;

/// Role names implied by another, as Keystone's bootstrap sets them up.
fn implied(name: &str) -> &'static [&'static str] {
    match name {
        "admin" => &["member", "reader"],
        "member" => &["reader"],
        _ => &[],
    }
}

async fn roles_by_id(store: &dyn Store) -> Result<BTreeMap<String, Role>, ApiError> {
    let roles: Vec<Role> = db::list(store, "/identity/roles/").await.map_err(store_err)?;
    Ok(roles.into_iter().map(|r| (r.id.clone(), r)).collect())
}

/// Group ids the user belongs to.
pub async fn groups_of(store: &dyn Store, user_id: &str) -> Result<Vec<String>, ApiError> {
    let prefix = keys::groups_of_user(user_id);
    let r = store.range(&prefix).await.map_err(store_err)?;
    Ok(r.kvs.iter().map(|kv| kv.key[prefix.len()..].to_string()).collect())
}

/// Every role the user holds on `target`, directly or through a group, with implied roles added.
pub async fn effective_roles(store: &dyn Store, user_id: &str, target: &Target) -> Result<Vec<Role>, ApiError> {
    let mut ids = BTreeSet::new();
    let mut actors = vec![Actor::User(user_id.to_string())];
    actors.extend(groups_of(store, user_id).await?.into_iter().map(Actor::Group));
    for actor in &actors {
        let prefix = keys::assignments_on(target, actor);
        for kv in store.range(&prefix).await.map_err(store_err)?.kvs {
            ids.insert(kv.key[prefix.len()..].to_string());
        }
    }
    if ids.is_empty() {
        return Ok(vec![]);
    }
    let all = roles_by_id(store).await?;
    let mut names: BTreeSet<String> = ids.iter().filter_map(|id| all.get(id)).map(|r| r.name.clone()).collect();
    for n in names.clone() {
        names.extend(implied(&n).iter().map(|s| s.to_string()));
    }
    Ok(all.into_values().filter(|r| names.contains(&r.name)).collect())
}

async fn all_assignments(store: &dyn Store) -> Result<Vec<Assignment>, ApiError> {
    db::list(store, keys::ASSIGNMENTS).await.map_err(store_err)
}

/// Projects and domains on which the user holds any role, directly or through a group.
async fn targets_of_user(store: &dyn Store, user_id: &str) -> Result<BTreeSet<(bool, String)>, ApiError> {
    let groups: BTreeSet<String> = groups_of(store, user_id).await?.into_iter().collect();
    let mut out = BTreeSet::new();
    for a in all_assignments(store).await? {
        let mine = match &a.actor {
            Actor::User(u) => u == user_id,
            Actor::Group(g) => groups.contains(g),
        };
        if mine {
            out.insert(match a.target {
                Target::Project(p) => (true, p),
                Target::Domain(d) => (false, d),
            });
        }
    }
    Ok(out)
}

/// Projects on which the user holds any role.
pub async fn projects_of_user(store: &dyn Store, user_id: &str) -> Result<Vec<Project>, ApiError> {
    let mut out = vec![];
    for (_, id) in targets_of_user(store, user_id).await?.into_iter().filter(|(is_project, _)| *is_project) {
        if let Some(p) = db::get::<Project>(store, &keys::project(&id)).await.map_err(store_err)? {
            out.push(p.value);
        }
    }
    Ok(out)
}

/// Domains on which the user holds any role.
pub async fn domains_of_user(store: &dyn Store, user_id: &str) -> Result<Vec<Domain>, ApiError> {
    let mut out = vec![];
    for (_, id) in targets_of_user(store, user_id).await?.into_iter().filter(|(is_project, _)| !*is_project) {
        if let Some(d) = db::get::<Domain>(store, &keys::domain(&id)).await.map_err(store_err)? {
            out.push(d.value);
        }
    }
    Ok(out)
}

/// Resolves the path of a grant into (target key, target, actor key, actor), checking both exist.
async fn grant_parts(store: &dyn Store, kind: &str, target: &str, actor_kind: &str, actor: &str) -> Result<(String, Target, String, Actor), ApiError> {
    let (tkey, t) = match kind {
        "projects" => (keys::project(target), Target::Project(target.to_string())),
        "domains" => (keys::domain(target), Target::Domain(target.to_string())),
        _ => return Err(ApiError::not_found(D, "The resource could not be found.")),
    };
    let (akey, a) = match actor_kind {
        "users" => (keys::user(actor), Actor::User(actor.to_string())),
        "groups" => (keys::group(actor), Actor::Group(actor.to_string())),
        _ => return Err(ApiError::not_found(D, "The resource could not be found.")),
    };
    if store.get(&tkey).await.map_err(store_err)?.is_none() {
        let what = if kind == "projects" { "project" } else { "domain" };
        return Err(ApiError::not_found(D, format!("Could not find {what}: {target}.")));
    }
    if store.get(&akey).await.map_err(store_err)?.is_none() {
        let what = if actor_kind == "users" { "user" } else { "group" };
        return Err(ApiError::not_found(D, format!("Could not find {what}: {actor}.")));
    }
    Ok((tkey, t, akey, a))
}

async fn grant(
    State(state): State<AppState>,
    auth: Auth,
    Path((kind, target, actor_kind, actor, role)): Path<(String, String, String, String, String)>,
) -> Result<StatusCode, ApiError> {
    state.identity.enforce(&auth, "identity:create_grant", &[])?;
    let store = state.store.as_ref();
    for _ in 0..5 {
        let (tkey, t, akey, a) = grant_parts(store, &kind, &target, &actor_kind, &actor).await?;
        let rkey = keys::role(&role);
        let (Some(tkv), Some(akv)) = (store.get(&tkey).await.map_err(store_err)?, store.get(&akey).await.map_err(store_err)?) else {
            continue;
        };
        let Some(rkv) = store.get(&rkey).await.map_err(store_err)? else {
            return Err(ApiError::not_found(D, format!("Could not find role: {role}.")));
        };
        let rec = Assignment { actor: a.clone(), target: t.clone(), role_id: role.clone() };
        // The assignment is written only if the project, the user and the role are still there.
        let txn = Txn::new()
            .when(Compare::ModRevision(tkey, tkv.mod_revision))
            .when(Compare::ModRevision(akey, akv.mod_revision))
            .when(Compare::ModRevision(rkey, rkv.mod_revision))
            .and_then(Op::put(keys::assignment(&t, &a, &role), encode(&rec)));
        if store.txn(txn).await.map_err(store_err)?.succeeded {
            return Ok(StatusCode::NO_CONTENT);
        }
    }
    Err(ApiError::conflict(D, "The project, actor or role changed while granting; try again."))
}

async fn check_grant(
    State(state): State<AppState>,
    auth: Auth,
    Path((kind, target, actor_kind, actor, role)): Path<(String, String, String, String, String)>,
) -> Result<StatusCode, ApiError> {
    state.identity.enforce(&auth, "identity:check_grant", &[])?;
    let store = state.store.as_ref();
    let (_, t, _, a) = grant_parts(store, &kind, &target, &actor_kind, &actor).await?;
    match store.get(&keys::assignment(&t, &a, &role)).await.map_err(store_err)? {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(ApiError::not_found(D, format!("Could not find role assignment with role: {role}."))),
    }
}

async fn revoke_grant(
    State(state): State<AppState>,
    auth: Auth,
    Path((kind, target, actor_kind, actor, role)): Path<(String, String, String, String, String)>,
) -> Result<StatusCode, ApiError> {
    state.identity.enforce(&auth, "identity:revoke_grant", &[])?;
    let store = state.store.as_ref();
    let (_, t, _, a) = grant_parts(store, &kind, &target, &actor_kind, &actor).await?;
    if !store.delete(&keys::assignment(&t, &a, &role)).await.map_err(store_err)? {
        return Err(ApiError::not_found(D, format!("Could not find role assignment with role: {role}.")));
    }
    let users = match &a {
        Actor::User(u) => vec![u.clone()],
        Actor::Group(g) => members_of(store, g).await?,
    };
    for u in users {
        let mut r = Revocation { user_id: Some(u), ..Default::default() };
        match &t {
            Target::Project(p) => r.project_id = Some(p.clone()),
            Target::Domain(d) => r.domain_id = Some(d.clone()),
        }
        state.identity.revoke(r).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// User ids in a group.
pub async fn members_of(store: &dyn Store, group_id: &str) -> Result<Vec<String>, ApiError> {
    let prefix = keys::memberships_of_group(group_id);
    let r = store.range(&prefix).await.map_err(store_err)?;
    Ok(r.kvs.iter().map(|kv| kv.key[prefix.len()..].to_string()).collect())
}

async fn list_grants(
    State(state): State<AppState>,
    auth: Auth,
    Path((kind, target, actor_kind, actor)): Path<(String, String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:list_grants", &[])?;
    let store = state.store.as_ref();
    let (_, t, _, a) = grant_parts(store, &kind, &target, &actor_kind, &actor).await?;
    let prefix = keys::assignments_on(&t, &a);
    let all = roles_by_id(store).await?;
    let roles: Vec<Value> = store
        .range(&prefix)
        .await
        .map_err(store_err)?
        .kvs
        .iter()
        .filter_map(|kv| all.get(&kv.key[prefix.len()..]))
        .map(|r| super::resources::role_json(&state, r))
        .collect();
    Ok(Json(json!({"roles": roles, "links": {"self": null, "next": null, "previous": null}})))
}

async fn user_projects(State(state): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    state.identity.enforce(&auth, "identity:list_user_projects", &[("target.user.id", &id)])?;
    if db::get::<User>(state.store.as_ref(), &keys::user(&id)).await.map_err(store_err)?.is_none() {
        return Err(ApiError::not_found(D, format!("Could not find user: {id}.")));
    }
    let projects = projects_of_user(state.store.as_ref(), &id).await?;
    let list: Vec<Value> = projects.iter().map(|p| super::resources::project_json(&state, p)).collect();
    Ok(Json(json!({"projects": list, "links": {"self": null, "next": null, "previous": null}})))
}

async fn role_assignments(State(state): State<AppState>, auth: Auth, Query(q): Query<BTreeMap<String, String>>) -> Result<Json<Value>, ApiError> {
    let scope_project = q.get("scope.project.id").cloned().unwrap_or_default();
    state.identity.enforce(&auth, "identity:list_role_assignments", &[("target.project.id", &scope_project)])?;
    let store = state.store.as_ref();
    let truthy = |k: &str| q.get(k).is_some_and(|v| v.is_empty() || !matches!(v.to_ascii_lowercase().as_str(), "false" | "0" | "no"));
    let effective = truthy("effective");
    let names = truthy("include_names");
    let roles = roles_by_id(store).await?;

    // Expand group assignments into per-user ones when asked for effective assignments.
    let mut rows: Vec<(Assignment, Option<String>)> = vec![];
    for a in all_assignments(store).await? {
        match (&a.actor, effective) {
            (Actor::Group(g), true) => {
                for u in members_of(store, g).await? {
                    rows.push((Assignment { actor: Actor::User(u), target: a.target.clone(), role_id: a.role_id.clone() }, Some(g.clone())));
                }
            }
            _ => rows.push((a, None)),
        }
    }
    if effective {
        let mut extra = vec![];
        for (a, via) in &rows {
            if let Some(r) = roles.get(&a.role_id) {
                for n in implied(&r.name) {
                    if let Some(ir) = roles.values().find(|x| x.name == *n) {
                        extra.push((Assignment { role_id: ir.id.clone(), ..a.clone() }, via.clone()));
                    }
                }
            }
        }
        rows.extend(extra);
        let mut seen = BTreeSet::new();
        rows.retain(|(a, _)| seen.insert(format!("{}|{}|{}", keys::target(&a.target), keys::actor(&a.actor), a.role_id)));
    }
    let want = |k: &str| q.get(k).map(String::as_str);
    rows.retain(|(a, _)| {
        let user_ok = want("user.id").is_none_or(|u| matches!(&a.actor, Actor::User(x) if x == u));
        let group_ok = want("group.id").is_none_or(|g| matches!(&a.actor, Actor::Group(x) if x == g));
        let project_ok = want("scope.project.id").is_none_or(|p| matches!(&a.target, Target::Project(x) if x == p));
        let domain_ok = want("scope.domain.id").is_none_or(|d| matches!(&a.target, Target::Domain(x) if x == d));
        let role_ok = want("role.id").is_none_or(|r| a.role_id == r);
        user_ok && group_ok && project_ok && domain_ok && role_ok
    });

    let base = &state.config.public_url;
    let mut out = vec![];
    for (a, via) in rows {
        let mut role = json!({"id": a.role_id});
        if names {
            if let Some(r) = roles.get(&a.role_id) {
                role["name"] = json!(r.name);
            }
        }
        let (actor_key, actor_json) = match &a.actor {
            Actor::User(u) => ("user", named(store, &keys::user(u), u, names, |v: &User| (v.name.clone(), Some(v.domain_id.clone()))).await?),
            Actor::Group(g) => ("group", named(store, &keys::group(g), g, names, |v: &Group| (v.name.clone(), Some(v.domain_id.clone()))).await?),
        };
        let (scope_key, scope_json) = match &a.target {
            Target::Project(p) => ("project", named(store, &keys::project(p), p, names, |v: &Project| (v.name.clone(), Some(v.domain_id.clone()))).await?),
            Target::Domain(d) => ("domain", named(store, &keys::domain(d), d, names, |v: &Domain| (v.name.clone(), None)).await?),
        };
        let link = format!(
            "{base}/v3/{}s/{}/{}s/{}/roles/{}",
            scope_key,
            scope_json["id"].as_str().unwrap_or_default(),
            actor_key,
            actor_json["id"].as_str().unwrap_or_default(),
            a.role_id
        );
        let mut links = json!({"assignment": link});
        if let Some(g) = via {
            links["membership"] = json!(format!("{base}/v3/groups/{g}/users/{}", actor_json["id"].as_str().unwrap_or_default()));
        }
        out.push(json!({"role": role, actor_key: actor_json, "scope": {scope_key: scope_json}, "links": links}));
    }
    Ok(Json(json!({"role_assignments": out, "links": {"self": format!("{base}/v3/role_assignments"), "next": null, "previous": null}})))
}

async fn named<T: store::record::Record>(
    store: &dyn Store,
    key: &str,
    id: &str,
    names: bool,
    f: impl Fn(&T) -> (String, Option<String>),
) -> Result<Value, ApiError> {
    let mut v = json!({"id": id});
    if names {
        if let Some(kv) = store.get(key).await.map_err(store_err)? {
            let rec: T = decode(key, &kv.value).map_err(store_err)?;
            let (name, domain) = f(&rec);
            v["name"] = json!(name);
            if let Some(d) = domain {
                let dname = db::get::<Domain>(store, &keys::domain(&d)).await.map_err(store_err)?.map(|x| x.value.name).unwrap_or_default();
                v["domain"] = json!({"id": d, "name": dname});
            }
        }
    }
    Ok(v)
}
