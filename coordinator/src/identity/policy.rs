//! Policy: Keystone's default rules in oslo.policy's rule language, overridable
//! by a JSON file mapping rule names to rules.
//!
//! The language: `role:NAME`, `rule:NAME`, `@` (always), `!` (never), `KEY:VALUE`
//! where VALUE is a literal or `%(target.field)s`, combined with `and`, `or`,
//! `not` and parentheses. An empty rule always passes.

use std::collections::HashMap;
use std::path::Path;

/// Keystone's default rules.
const DEFAULTS: &[(&str, &str)] = &[
    ("admin_required", "role:admin"),
    ("owner", "user_id:%(target.user.id)s"),
    ("admin_or_owner", "rule:admin_required or rule:owner"),
    ("project_reader", "role:reader and project_id:%(target.project.id)s"),
    ("identity:get_domain", "rule:admin_required or domain_id:%(target.domain.id)s or project_domain_id:%(target.domain.id)s"),
    ("identity:list_domains", "rule:admin_required"),
    ("identity:create_domain", "rule:admin_required"),
    ("identity:update_domain", "rule:admin_required"),
    ("identity:delete_domain", "rule:admin_required"),
    ("identity:get_project", "rule:admin_required or project_id:%(target.project.id)s"),
    ("identity:list_projects", "rule:admin_required"),
    ("identity:list_user_projects", "rule:admin_or_owner"),
    ("identity:create_project", "rule:admin_required"),
    ("identity:update_project", "rule:admin_required"),
    ("identity:delete_project", "rule:admin_required"),
    ("identity:get_user", "rule:admin_or_owner"),
    ("identity:list_users", "rule:admin_required"),
    ("identity:create_user", "rule:admin_required"),
    ("identity:update_user", "rule:admin_required"),
    ("identity:delete_user", "rule:admin_required"),
    ("identity:change_password", "rule:owner"),
    ("identity:get_group", "rule:admin_required"),
    ("identity:list_groups", "rule:admin_required"),
    ("identity:list_groups_for_user", "rule:admin_or_owner"),
    ("identity:create_group", "rule:admin_required"),
    ("identity:update_group", "rule:admin_required"),
    ("identity:delete_group", "rule:admin_required"),
    ("identity:list_users_in_group", "rule:admin_required"),
    ("identity:add_user_to_group", "rule:admin_required"),
    ("identity:remove_user_from_group", "rule:admin_required"),
    ("identity:check_user_in_group", "rule:admin_required"),
    ("identity:get_role", "rule:admin_required"),
    ("identity:list_roles", "rule:admin_required"),
    ("identity:create_role", "rule:admin_required"),
    ("identity:update_role", "rule:admin_required"),
    ("identity:delete_role", "rule:admin_required"),
    ("identity:check_grant", "rule:admin_required"),
    ("identity:list_grants", "rule:admin_required"),
    ("identity:create_grant", "rule:admin_required"),
    ("identity:revoke_grant", "rule:admin_required"),
    ("identity:list_role_assignments", "rule:admin_required or rule:project_reader"),
    ("identity:create_application_credential", "rule:owner"),
    ("identity:get_application_credential", "rule:admin_or_owner"),
    ("identity:list_application_credentials", "rule:admin_or_owner"),
    ("identity:delete_application_credential", "rule:admin_or_owner"),
    ("identity:validate_token", "rule:admin_required or user_id:%(target.token.user_id)s"),
    ("identity:revoke_token", "rule:admin_required or user_id:%(target.token.user_id)s"),
    ("identity:list_services", "rule:admin_required"),
    ("identity:list_endpoints", "rule:admin_required"),
    ("identity:create_join_token", "rule:admin_required"),
];

/// A parsed rule.
#[derive(Clone, Debug)]
enum Rule {
    Always,
    Never,
    Role(String),
    Named(String),
    Match(String, String),
    Not(Box<Rule>),
    And(Vec<Rule>),
    Or(Vec<Rule>),
}

/// Errors loading policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("Cannot read policy file {0}: {1}")]
    Read(String, std::io::Error),
    #[error("Policy file {0} is not a JSON object of rule strings: {1}")]
    Format(String, serde_json::Error),
    #[error("Cannot parse rule {name}: {reason}")]
    Parse { name: String, reason: String },
}

/// What is known about the caller.
pub struct Creds<'a> {
    pub user_id: &'a str,
    pub project_id: Option<&'a str>,
    pub project_domain_id: Option<&'a str>,
    pub domain_id: Option<&'a str>,
    pub roles: &'a [String],
}

/// A compiled set of rules.
pub struct Policy {
    rules: HashMap<String, Rule>,
}

impl Policy {
    /// Keystone's defaults, with the overrides of `file` (JSON) if given.
    pub fn load(file: Option<&Path>) -> Result<Policy, PolicyError> {
        let mut texts: HashMap<String, String> = DEFAULTS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if let Some(path) = file {
            let p = path.display().to_string();
            let raw = std::fs::read_to_string(path).map_err(|e| PolicyError::Read(p.clone(), e))?;
            let overrides: HashMap<String, String> = serde_json::from_str(&raw).map_err(|e| PolicyError::Format(p, e))?;
            texts.extend(overrides);
        }
        let mut rules = HashMap::new();
        for (name, text) in texts {
            let rule = parse(&text).map_err(|reason| PolicyError::Parse { name: name.clone(), reason })?;
            rules.insert(name, rule);
        }
        Ok(Policy { rules })
    }

    /// Whether `creds` may do `action` on a target described by `target` (key, value) pairs.
    pub fn allows(&self, action: &str, creds: &Creds<'_>, target: &[(&str, &str)]) -> bool {
        match self.rules.get(action) {
            Some(rule) => self.eval(rule, creds, target, 0),
            // An action with no rule is refused rather than silently allowed.
            None => false,
        }
    }

    fn eval(&self, rule: &Rule, creds: &Creds<'_>, target: &[(&str, &str)], depth: usize) -> bool {
        if depth > 32 {
            return false;
        }
        match rule {
            Rule::Always => true,
            Rule::Never => false,
            Rule::Role(r) => creds.roles.iter().any(|x| x.eq_ignore_ascii_case(r)),
            Rule::Named(n) => self.rules.get(n).is_some_and(|r| self.eval(r, creds, target, depth + 1)),
            Rule::Not(r) => !self.eval(r, creds, target, depth + 1),
            Rule::And(rs) => rs.iter().all(|r| self.eval(r, creds, target, depth + 1)),
            Rule::Or(rs) => rs.iter().any(|r| self.eval(r, creds, target, depth + 1)),
            Rule::Match(key, value) => {
                let have = match key.as_str() {
                    "user_id" => Some(creds.user_id),
                    "project_id" => creds.project_id,
                    "project_domain_id" => creds.project_domain_id,
                    "domain_id" => creds.domain_id,
                    _ => None,
                };
                let Some(have) = have else { return false };
                let want = match value.strip_prefix("%(").and_then(|v| v.strip_suffix(")s")) {
                    Some(field) => target.iter().find(|(k, _)| *k == field).map(|(_, v)| *v),
                    None => Some(value.as_str()),
                };
                want.is_some_and(|w| w == have)
            }
        }
    }
}

fn parse(text: &str) -> Result<Rule, String> {
    let tokens = tokenize(text);
    if tokens.is_empty() {
        return Ok(Rule::Always);
    }
    let mut pos = 0;
    let rule = parse_or(&tokens, &mut pos)?;
    if pos != tokens.len() {
        return Err(format!("unexpected '{}'", tokens[pos]));
    }
    Ok(rule)
}

fn tokenize(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    // Inside "%(...)s" parentheses belong to the check, not to the grouping.
    let mut in_subst = false;
    for c in text.chars() {
        if in_subst {
            cur.push(c);
            if c == ')' {
                in_subst = false;
            }
            continue;
        }
        match c {
            '(' if cur.ends_with('%') => {
                cur.push(c);
                in_subst = true;
            }
            '(' | ')' => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                out.push(c.to_string());
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn parse_or(t: &[String], pos: &mut usize) -> Result<Rule, String> {
    let mut parts = vec![parse_and(t, pos)?];
    while *pos < t.len() && t[*pos] == "or" {
        *pos += 1;
        parts.push(parse_and(t, pos)?);
    }
    Ok(if parts.len() == 1 { parts.pop().unwrap() } else { Rule::Or(parts) })
}

fn parse_and(t: &[String], pos: &mut usize) -> Result<Rule, String> {
    let mut parts = vec![parse_not(t, pos)?];
    while *pos < t.len() && t[*pos] == "and" {
        *pos += 1;
        parts.push(parse_not(t, pos)?);
    }
    Ok(if parts.len() == 1 { parts.pop().unwrap() } else { Rule::And(parts) })
}

fn parse_not(t: &[String], pos: &mut usize) -> Result<Rule, String> {
    if *pos < t.len() && t[*pos] == "not" {
        *pos += 1;
        return Ok(Rule::Not(Box::new(parse_not(t, pos)?)));
    }
    parse_atom(t, pos)
}

fn parse_atom(t: &[String], pos: &mut usize) -> Result<Rule, String> {
    let Some(tok) = t.get(*pos) else { return Err("rule ends too early".into()) };
    *pos += 1;
    match tok.as_str() {
        "(" => {
            let r = parse_or(t, pos)?;
            if t.get(*pos).map(String::as_str) != Some(")") {
                return Err("missing ')'".into());
            }
            *pos += 1;
            Ok(r)
        }
        "@" => Ok(Rule::Always),
        "!" => Ok(Rule::Never),
        other => {
            let (k, v) = other.split_once(':').ok_or_else(|| format!("'{other}' is not a check"))?;
            Ok(match k {
                "role" => Rule::Role(v.to_string()),
                "rule" => Rule::Named(v.to_string()),
                _ => Rule::Match(k.to_string(), v.to_string()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds<'a>(user: &'a str, project: Option<&'a str>, roles: &'a [String]) -> Creds<'a> {
        Creds { user_id: user, project_id: project, project_domain_id: Some("default"), domain_id: None, roles }
    }

    #[test]
    fn defaults_behave_like_keystone() {
        let p = Policy::load(None).unwrap();
        let admin = vec!["admin".to_string(), "member".into(), "reader".into()];
        let member = vec!["member".to_string(), "reader".into()];
        assert!(p.allows("identity:create_project", &creds("u1", Some("p1"), &admin), &[]));
        assert!(!p.allows("identity:create_project", &creds("u1", Some("p1"), &member), &[]));
        assert!(p.allows("identity:get_project", &creds("u1", Some("p1"), &member), &[("target.project.id", "p1")]));
        assert!(!p.allows("identity:get_project", &creds("u1", Some("p1"), &member), &[("target.project.id", "p2")]));
        assert!(p.allows("identity:change_password", &creds("u1", None, &[]), &[("target.user.id", "u1")]));
        assert!(!p.allows("identity:change_password", &creds("u1", None, &admin), &[("target.user.id", "u2")]));
        assert!(!p.allows("identity:no_such_action", &creds("u1", None, &admin), &[]));
    }

    #[test]
    fn overrides_and_grammar() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("policy.json");
        std::fs::write(&f, r#"{"identity:list_projects": "(role:reader and not role:banned) or @", "x": "!"}"#).unwrap();
        let p = Policy::load(Some(&f)).unwrap();
        assert!(p.allows("identity:list_projects", &creds("u", None, &[]), &[]));
        assert!(!p.allows("x", &creds("u", None, &[]), &[]));
        std::fs::write(&f, r#"{"bad": "role:a and (role:b"}"#).unwrap();
        assert!(Policy::load(Some(&f)).is_err());
    }
}
