//! `coordinator bootstrap`: the Default domain, the roles admin, member and
//! reader, the admin project and user, and the catalog. Safe to run again: what
//! exists is kept (the admin password only changes with `reset_password`), and
//! the catalog is rewritten from the current configuration.

use std::sync::Arc;

use store::record::encode;
use store::{Op, Store, Txn};

use super::model::{keys, Actor, Assignment, Catalog, Domain, Project, Role, Target, User, DEFAULT_DOMAIN_ID};
use super::{catalog, db, password};
use crate::config::Config;

/// What to bootstrap.
pub struct Options {
    pub admin_password: String,
    pub admin_user: String,
    pub admin_project: String,
    pub reset_password: bool,
}

/// Creates whatever is missing; returns a summary for the operator.
pub async fn run(store: Arc<dyn Store>, config: &Config, opts: &Options) -> anyhow::Result<String> {
    anyhow::ensure!(!opts.admin_password.is_empty(), "The admin password must not be empty");
    let s = store.as_ref();
    let mut created = vec![];

    if db::get::<Domain>(s, &keys::domain(DEFAULT_DOMAIN_ID)).await?.is_none() {
        let d = Domain { id: DEFAULT_DOMAIN_ID.into(), name: "Default".into(), description: "The default domain".into(), enabled: true };
        ensure_created(db::create(s, &keys::domain(&d.id), &d, Some((&keys::name("domain", "-", &d.name), &d.id)), "domain").await)?;
        created.push("domain Default".to_string());
    }

    let mut role_ids = std::collections::BTreeMap::new();
    for name in ["admin", "member", "reader"] {
        let nk = keys::name("role", "-", name);
        let id = match db::lookup(s, &nk).await? {
            Some(id) => id,
            None => {
                let r = Role { id: super::new_id(), name: name.into(), description: String::new() };
                ensure_created(db::create(s, &keys::role(&r.id), &r, Some((&nk, &r.id)), "role").await)?;
                created.push(format!("role {name}"));
                db::lookup(s, &nk).await?.unwrap_or(r.id)
            }
        };
        role_ids.insert(name, id);
    }

    let pk = keys::name("project", DEFAULT_DOMAIN_ID, &opts.admin_project);
    let project_id = match db::lookup(s, &pk).await? {
        Some(id) => id,
        None => {
            let p = Project {
                id: super::new_id(),
                name: opts.admin_project.clone(),
                domain_id: DEFAULT_DOMAIN_ID.into(),
                description: "Bootstrap project for initializing the cloud.".into(),
                enabled: true,
                tags: vec![],
            };
            ensure_created(db::create(s, &keys::project(&p.id), &p, Some((&pk, &p.id)), "project").await)?;
            created.push(format!("project {}", opts.admin_project));
            db::lookup(s, &pk).await?.unwrap_or(p.id)
        }
    };

    let uk = keys::name("user", DEFAULT_DOMAIN_ID, &opts.admin_user);
    let user_id = match db::lookup(s, &uk).await? {
        Some(id) => {
            if opts.reset_password {
                let cur = db::get::<User>(s, &keys::user(&id)).await?.ok_or_else(|| anyhow::anyhow!("admin user record vanished"))?;
                let mut u = cur.value;
                u.password_hash = Some(password::hash_blocking(opts.admin_password.clone()).await);
                u.enabled = true;
                db::update(s, &keys::user(&id), cur.rev, &u, None, "user").await.map_err(|e| anyhow::anyhow!("{e}"))?;
                created.push(format!("password of {}", opts.admin_user));
            }
            id
        }
        None => {
            let u = User {
                id: super::new_id(),
                name: opts.admin_user.clone(),
                domain_id: DEFAULT_DOMAIN_ID.into(),
                enabled: true,
                password_hash: Some(password::hash_blocking(opts.admin_password.clone()).await),
                default_project_id: Some(project_id.clone()),
                description: String::new(),
                email: None,
            };
            ensure_created(db::create(s, &keys::user(&u.id), &u, Some((&uk, &u.id)), "user").await)?;
            created.push(format!("user {}", opts.admin_user));
            db::lookup(s, &uk).await?.unwrap_or(u.id)
        }
    };

    let a = Assignment { actor: Actor::User(user_id.clone()), target: Target::Project(project_id.clone()), role_id: role_ids["admin"].clone() };
    let ak = keys::assignment(&a.target, &a.actor, &a.role_id);
    if s.get(&ak).await?.is_none() {
        s.txn(Txn::new().and_then(Op::put(ak, encode(&a)))).await?;
        created.push("admin role assignment".into());
    }

    let c = Catalog { region: config.region.clone(), services: catalog::services(config) };
    s.put(keys::CATALOG, encode(&c)).await?;

    Ok(if created.is_empty() {
        format!("Bootstrap: everything already existed; catalog points at {}.", config.public_url)
    } else {
        format!("Bootstrap created: {}; catalog points at {}.", created.join(", "), config.public_url)
    })
}

/// A concurrent bootstrap that created the same thing first is fine.
fn ensure_created(r: Result<(), db::DbError>) -> anyhow::Result<()> {
    match r {
        Ok(()) | Err(db::DbError::Conflict(_)) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}
