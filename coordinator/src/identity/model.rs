//! Identity records as kept in the store, and their keys.

use serde::{Deserialize, Serialize};
use store::record::Record;

/// The id of the Default domain, as Keystone names it.
pub const DEFAULT_DOMAIN_ID: &str = "default";

/// A domain: a namespace for projects, users and groups.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Domain {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub enabled: bool,
}

/// A project (tenant): owner of resources.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Project {
    pub id: String,
    pub name: String,
    pub domain_id: String,
    #[serde(default)]
    pub description: String,
    pub enabled: bool,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// A user; the password is kept only as an argon2 hash.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub name: String,
    pub domain_id: String,
    pub enabled: bool,
    #[serde(default)]
    pub password_hash: Option<String>,
    #[serde(default)]
    pub default_project_id: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub email: Option<String>,
}

/// A group of users; role assignments to a group apply to its members.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Group {
    pub id: String,
    pub name: String,
    pub domain_id: String,
    #[serde(default)]
    pub description: String,
}

/// A role.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Role {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// An application credential: a secret bound to one user, one project and a subset of roles.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppCred {
    pub id: String,
    pub name: String,
    pub user_id: String,
    pub project_id: String,
    pub secret_hash: String,
    #[serde(default)]
    pub description: String,
    /// Role ids the credential carries.
    pub role_ids: Vec<String>,
    /// Unix seconds, or None for no expiry.
    pub expires_at: Option<i64>,
    pub unrestricted: bool,
}

/// The service catalog: one record for the whole site.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Catalog {
    pub region: String,
    pub services: Vec<Service>,
}

/// One service of the catalog and its endpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Service {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub url: String,
}

/// A role assignment: a user or group holds a role on a project or domain.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Assignment {
    pub actor: Actor,
    pub target: Target,
    pub role_id: String,
}

/// Who holds an assignment.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", content = "id", rename_all = "lowercase")]
pub enum Actor {
    User(String),
    Group(String),
}

/// What an assignment is on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", content = "id", rename_all = "lowercase")]
pub enum Target {
    Project(String),
    Domain(String),
}

/// Failed logins of one user, kept under a lease so the count forgets itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoginFailures {
    pub count: u32,
    /// Unix seconds of the last failure.
    pub last: i64,
}

/// An event that revokes every token issued before `issued_before` matching all set fields.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Revocation {
    #[serde(default)]
    pub audit_id: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub project_id: Option<String>,
    #[serde(default)]
    pub domain_id: Option<String>,
    #[serde(default)]
    pub role_id: Option<String>,
    #[serde(default)]
    pub app_cred_id: Option<String>,
    /// Unix seconds (fractional) before which matching tokens are void.
    pub issued_before: f64,
}

/// The token keys, newest (primary) first, each a url-safe base64 Fernet key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenKeys {
    pub keys: Vec<String>,
}

macro_rules! record {
    ($($t:ty),*) => { $(impl Record for $t { const VERSION: u32 = 1; })* };
}
record!(Domain, Project, User, Group, Role, AppCred, Catalog, Assignment, LoginFailures, Revocation, TokenKeys);

/// Store keys of identity records.
pub mod keys {
    use super::{Actor, Target};

    pub const ROOT: &str = "/identity/";
    pub const TOKEN_KEYS: &str = "/identity/token-keys";
    pub const CATALOG: &str = "/identity/catalog";
    pub const REVOKED: &str = "/identity/revoked/";

    pub fn domain(id: &str) -> String {
        format!("/identity/domains/{id}")
    }
    pub fn project(id: &str) -> String {
        format!("/identity/projects/{id}")
    }
    pub fn user(id: &str) -> String {
        format!("/identity/users/{id}")
    }
    pub fn group(id: &str) -> String {
        format!("/identity/groups/{id}")
    }
    pub fn role(id: &str) -> String {
        format!("/identity/roles/{id}")
    }
    pub fn app_cred(id: &str) -> String {
        format!("/identity/app-creds/{id}")
    }
    pub fn membership(group_id: &str, user_id: &str) -> String {
        format!("/identity/members/{group_id}/{user_id}")
    }
    pub fn memberships_of_group(group_id: &str) -> String {
        format!("/identity/members/{group_id}/")
    }
    pub fn user_group(user_id: &str, group_id: &str) -> String {
        format!("/identity/user-groups/{user_id}/{group_id}")
    }
    pub fn groups_of_user(user_id: &str) -> String {
        format!("/identity/user-groups/{user_id}/")
    }
    pub fn login_failures(user_id: &str) -> String {
        format!("/identity/login-failures/{user_id}")
    }
    pub fn revoked(id: &str) -> String {
        format!("/identity/revoked/{id}")
    }
    /// Unique-name index: `kind` is domain, project, user, group, role or app-cred; `scope` the namespace.
    pub fn name(kind: &str, scope: &str, name: &str) -> String {
        format!("/identity/names/{kind}/{scope}/{}", escape(name))
    }
    fn escape(name: &str) -> String {
        name.replace('%', "%25").replace('/', "%2F")
    }
    pub fn target(t: &Target) -> String {
        match t {
            Target::Project(id) => format!("project:{id}"),
            Target::Domain(id) => format!("domain:{id}"),
        }
    }
    pub fn actor(a: &Actor) -> String {
        match a {
            Actor::User(id) => format!("user:{id}"),
            Actor::Group(id) => format!("group:{id}"),
        }
    }
    pub const ASSIGNMENTS: &str = "/identity/assignments/";
    pub fn assignment(t: &Target, a: &Actor, role_id: &str) -> String {
        format!("/identity/assignments/{}/{}/{role_id}", target(t), actor(a))
    }
    pub fn assignments_on(t: &Target, a: &Actor) -> String {
        format!("/identity/assignments/{}/{}/", target(t), actor(a))
    }
}
