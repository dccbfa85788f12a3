//! Keystone API behaviour, end to end over HTTP against an in-process replica
//! on the embedded store.

use std::sync::Arc;

use coordinator::testing::{TestSite, ADMIN_PASSWORD};
use serde_json::json;
use store::embedded::EmbeddedStore;

async fn site(dir: &tempfile::TempDir, tweak: impl FnOnce(&mut coordinator::Config)) -> TestSite {
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    TestSite::start(store, tweak).await
}

#[tokio::test]
async fn discovery_token_catalog_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir, |_| {}).await;
    let (code, v) = s.call("GET", "/", None, None).await;
    assert_eq!(code, 300);
    assert_eq!(v["versions"]["values"][0]["id"], "v3.14");
    let (code, v) = s.call("GET", "/v3", None, None).await;
    assert_eq!(code, 200);
    assert_eq!(v["version"]["status"], "stable");

    let t = s.admin_token().await;
    let (code, v) = s.call("GET", "/v3/auth/catalog", Some(&t), None).await;
    assert_eq!(code, 200);
    let types: Vec<&str> = v["catalog"].as_array().unwrap().iter().map(|x| x["type"].as_str().unwrap()).collect();
    assert!(types.contains(&"identity") && types.contains(&"placement") && types.contains(&"compute"), "{types:?}");

    // Validate: GET with X-Subject-Token shows the token; a garbage token gets 404; no token 401.
    let r = reqwest::Client::new().get(format!("{}/v3/auth/tokens", s.url)).header("x-auth-token", &t).header("x-subject-token", &t).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["token"]["user"]["name"], "admin");
    assert_eq!(v["token"]["project"]["name"], "admin");
    let roles: Vec<&str> = v["token"]["roles"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert!(roles.contains(&"admin") && roles.contains(&"member") && roles.contains(&"reader"), "implied roles: {roles:?}");
    let r = reqwest::Client::new().get(format!("{}/v3/auth/tokens", s.url)).header("x-auth-token", &t).header("x-subject-token", "nope").send().await.unwrap();
    assert_eq!(r.status(), 404);
    let (code, v) = s.call("GET", "/v3/projects", None, None).await;
    assert_eq!(code, 401);
    assert_eq!(v["error"]["code"], 401);

    // Revoke: the token stops working.
    let t2 = s.admin_token().await;
    let r = reqwest::Client::new().delete(format!("{}/v3/auth/tokens", s.url)).header("x-auth-token", &t).header("x-subject-token", &t2).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let (code, _) = s.call("GET", "/v3/projects", Some(&t2), None).await;
    assert_eq!(code, 401);
    let (code, _) = s.call("GET", "/v3/projects", Some(&t), None).await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn bad_credentials_look_the_same_and_are_throttled() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir, |c| c.identity.max_failed_logins = 3).await;
    let login = |user: &str, pw: &str| {
        json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {"name": user, "domain": {"id": "default"}, "password": pw}}}}})
    };
    let (c1, v1) = s.call("POST", "/v3/auth/tokens", None, Some(login("admin", "wrong"))).await;
    let (c2, v2) = s.call("POST", "/v3/auth/tokens", None, Some(login("nobody", "wrong"))).await;
    assert_eq!((c1, c2), (401, 401));
    assert_eq!(v1, v2, "an unknown user and a wrong password get the same answer");
    // Malformed requests are 400.
    let (c, v) = s.call("POST", "/v3/auth/tokens", None, Some(json!({"auth": {}}))).await;
    assert_eq!(c, 400, "{v}");
    let (c, _) = s.call("POST", "/v3/auth/tokens", None, Some(json!({"auth": {"identity": {"methods": ["password"]}}}))).await;
    assert_eq!(c, 400);
    // Two more failures lock the account: even the right password is refused for a while.
    s.call("POST", "/v3/auth/tokens", None, Some(login("admin", "wrong"))).await;
    s.call("POST", "/v3/auth/tokens", None, Some(login("admin", "wrong"))).await;
    let (c, _) = s.call("POST", "/v3/auth/tokens", None, Some(login("admin", ADMIN_PASSWORD))).await;
    assert_eq!(c, 401, "a throttled user is refused even with the right password");
}

#[tokio::test]
async fn projects_users_roles_and_isolation() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir, |_| {}).await;
    let admin = s.admin_token().await;
    let (c, a) = s.call("POST", "/v3/projects", Some(&admin), Some(json!({"project": {"name": "alpha"}}))).await;
    assert_eq!(c, 201);
    let (c, _) = s.call("POST", "/v3/projects", Some(&admin), Some(json!({"project": {"name": "alpha"}}))).await;
    assert_eq!(c, 409, "duplicate project names in one domain conflict");
    let (_, b) = s.call("POST", "/v3/projects", Some(&admin), Some(json!({"project": {"name": "beta"}}))).await;
    let (c, u) = s.call("POST", "/v3/users", Some(&admin), Some(json!({"user": {"name": "alice", "password": "pw-alice"}}))).await;
    assert_eq!(c, 201);
    assert!(u["user"].get("password_hash").is_none() && u["user"].get("password").is_none());
    let (c, _) = s.call("POST", "/v3/users", Some(&admin), Some(json!({"user": {"name": ""}}))).await;
    assert_eq!(c, 400);
    let (_, roles) = s.call("GET", "/v3/roles?name=member", Some(&admin), None).await;
    let member = roles["roles"][0]["id"].as_str().unwrap().to_string();
    let (pa, pb, uid) = (a["project"]["id"].as_str().unwrap(), b["project"]["id"].as_str().unwrap(), u["user"]["id"].as_str().unwrap());

    // Without a role alice cannot scope to alpha.
    let body = json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {"id": uid, "password": "pw-alice"}}}, "scope": {"project": {"id": pa}}}});
    let (c, _) = s.call("POST", "/v3/auth/tokens", None, Some(body.clone())).await;
    assert_eq!(c, 401);
    let (c, _) = s.call("PUT", &format!("/v3/projects/{pa}/users/{uid}/roles/{member}"), Some(&admin), None).await;
    assert_eq!(c, 204);
    let alice = s.token("alice", "pw-alice", "alpha").await;

    // A member sees her project, not another, and cannot create projects.
    assert_eq!(s.call("GET", &format!("/v3/projects/{pa}"), Some(&alice), None).await.0, 200);
    assert_eq!(s.call("GET", &format!("/v3/projects/{pb}"), Some(&alice), None).await.0, 403);
    let (c, v) = s.call("POST", "/v3/projects", Some(&alice), Some(json!({"project": {"name": "mine"}}))).await;
    assert_eq!(c, 403);
    assert_eq!(v["error"]["code"], 403);
    let (c, v) = s.call("GET", "/v3/auth/projects", Some(&alice), None).await;
    assert_eq!(c, 200);
    assert_eq!(v["projects"].as_array().unwrap().len(), 1);

    // Role assignment list shows the grant with names.
    let (c, v) = s.call("GET", &format!("/v3/role_assignments?user.id={uid}&include_names=1"), Some(&admin), None).await;
    assert_eq!(c, 200);
    assert_eq!(v["role_assignments"][0]["role"]["name"], "member");
    assert_eq!(v["role_assignments"][0]["scope"]["project"]["name"], "alpha");

    // Alice changes her own password; her old token stops working; the new password works.
    let (c, _) = s.call("POST", &format!("/v3/users/{uid}/password"), Some(&alice), Some(json!({"user": {"password": "pw2", "original_password": "wrong"}}))).await;
    assert_eq!(c, 401);
    let (c, _) = s.call("POST", &format!("/v3/users/{uid}/password"), Some(&alice), Some(json!({"user": {"password": "pw2", "original_password": "pw-alice"}}))).await;
    assert_eq!(c, 204);
    assert_eq!(s.call("GET", &format!("/v3/projects/{pa}"), Some(&alice), None).await.0, 401);
    let alice = s.token("alice", "pw2", "alpha").await;

    // Revoking the grant revokes her token.
    let (c, _) = s.call("DELETE", &format!("/v3/projects/{pa}/users/{uid}/roles/{member}"), Some(&admin), None).await;
    assert_eq!(c, 204);
    assert_eq!(s.call("GET", &format!("/v3/projects/{pa}"), Some(&alice), None).await.0, 401);

    // Deleting a project removes its assignments; deleting again is 404.
    assert_eq!(s.call("DELETE", &format!("/v3/projects/{pb}"), Some(&admin), None).await.0, 204);
    let (c, v) = s.call("DELETE", &format!("/v3/projects/{pb}"), Some(&admin), None).await;
    assert_eq!(c, 404);
    assert!(v["error"]["message"].as_str().unwrap().contains(pb));
}

#[tokio::test]
async fn application_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir, |_| {}).await;
    let admin = s.admin_token().await;
    let (_, v) = s.call("GET", "/v3/users?name=admin", Some(&admin), None).await;
    let uid = v["users"][0]["id"].as_str().unwrap().to_string();
    let (c, v) = s.call("POST", &format!("/v3/users/{uid}/application_credentials"), Some(&admin), Some(json!({"application_credential": {"name": "ci"}}))).await;
    assert_eq!(c, 201, "{v}");
    let id = v["application_credential"]["id"].as_str().unwrap().to_string();
    let secret = v["application_credential"]["secret"].as_str().unwrap().to_string();
    let login = json!({"auth": {"identity": {"methods": ["application_credential"], "application_credential": {"id": id, "secret": secret}}}});
    let r = reqwest::Client::new().post(format!("{}/v3/auth/tokens", s.url)).json(&login).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let t = r.headers()["x-subject-token"].to_str().unwrap().to_string();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["token"]["project"]["name"], "admin");
    assert_eq!(v["token"]["methods"][0], "application_credential");
    // A restricted credential cannot make another.
    let (c, _) = s.call("POST", &format!("/v3/users/{uid}/application_credentials"), Some(&t), Some(json!({"application_credential": {"name": "x"}}))).await;
    assert_eq!(c, 403);
    // The secret is never shown again, and a wrong secret fails.
    let (_, v) = s.call("GET", &format!("/v3/users/{uid}/application_credentials/{id}"), Some(&admin), None).await;
    assert!(v["application_credential"].get("secret").is_none());
    let bad = json!({"auth": {"identity": {"methods": ["application_credential"], "application_credential": {"id": id, "secret": "nope"}}}});
    assert_eq!(s.call("POST", "/v3/auth/tokens", None, Some(bad)).await.0, 401);
    // Deleting it revokes tokens made from it.
    assert_eq!(s.call("DELETE", &format!("/v3/users/{uid}/application_credentials/{id}"), Some(&admin), None).await.0, 204);
    assert_eq!(s.call("GET", "/v3/auth/catalog", Some(&t), None).await.0, 401);
}

#[tokio::test]
async fn oversize_bodies_are_refused_with_413() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir, |c| c.max_body_bytes = 4096).await;
    let admin = s.admin_token().await;
    let big = "x".repeat(10_000);
    let (c, v) = s.call("POST", "/v3/projects", Some(&admin), Some(json!({"project": {"name": "p", "description": big}}))).await;
    assert_eq!(c, 413);
    assert_eq!(v["error"]["code"], 413);
    let (_, v) = s.call("GET", "/v3/projects?name=p", Some(&admin), None).await;
    assert!(v["projects"].as_array().unwrap().is_empty(), "nothing was written");
}

#[tokio::test]
async fn key_rotation_keeps_tokens_valid() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir, |_| {}).await;
    let t = s.admin_token().await;
    coordinator::identity::tokens::rotate_keys(s.state.store.as_ref()).await.unwrap();
    assert_eq!(s.call("GET", "/v3/projects", Some(&t), None).await.0, 200, "a token signed with the previous key stays valid");
    let t2 = s.admin_token().await;
    assert_eq!(s.call("GET", "/v3/projects", Some(&t2), None).await.0, 200);
}
