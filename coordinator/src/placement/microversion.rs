//! Microversion negotiation: the `OpenStack-API-Version: placement X.Y`
//! header in, the same header (and `Vary`) out, 406 for versions outside
//! `MIN..=MAX`, 400 for a malformed one.

use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// A Placement microversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u16, pub u16);

impl Version {
    /// Whether this version is `1.minor` or later.
    pub fn at_least(self, minor: u16) -> bool {
        self >= Version(1, minor)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// Oldest microversion served.
pub const MIN: Version = Version(1, 0);
/// Newest microversion served.
pub const MAX: Version = Version(1, 39);

const HEADER: &str = "openstack-api-version";

/// Parses the placement entry of an `OpenStack-API-Version` header value.
/// `Ok(None)` when the header names other services only.
pub fn parse(value: &str) -> Result<Option<Version>, String> {
    for part in value.split(',') {
        let mut words = part.split_whitespace();
        let (Some(service), Some(ver), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("invalid version string: {part:?}"));
        };
        if !service.eq_ignore_ascii_case("placement") {
            continue;
        }
        if ver.eq_ignore_ascii_case("latest") {
            return Ok(Some(MAX));
        }
        let (major, minor) = ver.split_once('.').ok_or_else(|| format!("invalid version string: {ver:?}"))?;
        let parse = |s: &str| -> Result<u16, String> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0')) {
                return Err(format!("invalid version string: {ver:?}"));
            }
            s.parse().map_err(|_| format!("invalid version string: {ver:?}"))
        };
        return Ok(Some(Version(parse(major)?, parse(minor)?)));
    }
    Ok(None)
}

fn reject(status: StatusCode, detail: String) -> Response {
    let body = json!({"errors": [{
        "status": status.as_u16(),
        "title": status.canonical_reason().unwrap_or("Error"),
        "detail": detail,
        "code": "placement.undefined_code",
        "min_version": MIN.to_string(),
        "max_version": MAX.to_string(),
        "request_id": "",
    }]});
    (status, Json(body)).into_response()
}

fn http_date(t: time::OffsetDateTime) -> String {
    let f = time::macros::format_description!("[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT");
    t.format(&f).unwrap_or_default()
}

/// Middleware of every Placement route: negotiates the version and stores it
/// in the request's extensions for the handlers.
pub async fn negotiate(mut req: Request, next: Next) -> Response {
    let raw = req.headers().get(HEADER).map(|v| v.to_str().map(str::to_string));
    let version = match raw {
        None => MIN,
        Some(Err(_)) => return reject(StatusCode::BAD_REQUEST, "invalid version string in OpenStack-API-Version".into()),
        Some(Ok(v)) => match parse(&v) {
            Ok(Some(v)) => v,
            Ok(None) => MIN,
            Err(e) => return reject(StatusCode::BAD_REQUEST, e),
        },
    };
    if version < MIN || version > MAX {
        return reject(
            StatusCode::NOT_ACCEPTABLE,
            format!("Unacceptable version header: {version}. Supported versions are {MIN} to {MAX}."),
        );
    }
    let is_get = req.method() == Method::GET;
    req.extensions_mut().insert(version);
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("placement {version}")) {
        h.insert(HEADER, v);
    }
    h.insert("vary", HeaderValue::from_static(HEADER));
    if is_get && version.at_least(15) && resp.status() == StatusCode::OK {
        // Placement reports the time of the answer where it tracks no better one.
        if let Ok(v) = HeaderValue::from_str(&http_date(time::OffsetDateTime::now_utc())) {
            resp.headers_mut().insert("last-modified", v);
        }
        resp.headers_mut().insert("cache-control", HeaderValue::from_static("no-cache"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_headers() {
        assert_eq!(parse("placement 1.29"), Ok(Some(Version(1, 29))));
        assert_eq!(parse("compute 2.1, placement 1.5"), Ok(Some(Version(1, 5))));
        assert_eq!(parse("placement latest"), Ok(Some(MAX)));
        assert_eq!(parse("compute 2.1"), Ok(None));
        assert!(parse("placement 1.01").is_err());
        assert!(parse("placement one").is_err());
        assert!(Version(1, 40) > MAX);
        assert!(Version(1, 10) > Version(1, 9));
    }
}
