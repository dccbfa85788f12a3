//! Compute API microversions: `OpenStack-API-Version: compute 2.X` (or the older
//! `X-OpenStack-Nova-API-Version: 2.X`) picks the behaviour of a request.
//!
//! No header means the minimum (2.1); `latest` means the maximum; a version outside
//! the range is refused with 406, as Nova does. Every answer names the version it was
//! served at.

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, Dialect};

/// Lowest microversion served: 2.1.
pub const MIN: Microversion = Microversion(1);
/// Highest microversion served. Raise it only when every compute endpoint honours
/// the versions up to the new one.
pub const MAX: Microversion = Microversion(79);

/// A compute microversion 2.N, stored as N.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Microversion(pub u32);

impl Microversion {
    /// Whether this request's version is at least 2.`minor`.
    pub fn at_least(self, minor: u32) -> bool {
        self.0 >= minor
    }
}

impl std::fmt::Display for Microversion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "2.{}", self.0)
    }
}

/// Why a requested version was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MicroversionError {
    #[error("Invalid microversion format: {0:?}")]
    Malformed(String),
    #[error("Version {0} is not supported by the API. Minimum is {MIN} and maximum is {MAX}.")]
    Unsupported(String),
}

/// Reads the requested version from the headers.
pub fn negotiate(headers: &HeaderMap) -> Result<Microversion, MicroversionError> {
    let mut requested = None;
    for value in headers.get_all("openstack-api-version") {
        let Ok(text) = value.to_str() else { continue };
        for part in text.split(',') {
            let mut words = part.split_whitespace();
            if let (Some(service), Some(version)) = (words.next(), words.next()) {
                if service.eq_ignore_ascii_case("compute") {
                    requested = Some(version.to_string());
                }
            }
        }
    }
    if requested.is_none() {
        requested = headers.get("x-openstack-nova-api-version").and_then(|v| v.to_str().ok()).map(|s| s.trim().to_string());
    }
    let Some(text) = requested else { return Ok(MIN) };
    if text.eq_ignore_ascii_case("latest") {
        return Ok(MAX);
    }
    let (major, minor) = text.split_once('.').ok_or_else(|| MicroversionError::Malformed(text.clone()))?;
    let (Ok(major), Ok(minor)) = (major.parse::<u32>(), minor.parse::<u32>()) else {
        return Err(MicroversionError::Malformed(text));
    };
    let v = Microversion(minor);
    if major != 2 || v < MIN || v > MAX {
        return Err(MicroversionError::Unsupported(text));
    }
    Ok(v)
}

/// Middleware: negotiates the version, hands it to the handler as an extension and
/// names it in the answer.
pub async fn layer(mut req: Request, next: Next) -> Response {
    let version = match negotiate(req.headers()) {
        Ok(v) => v,
        Err(e @ MicroversionError::Malformed(_)) => return ApiError::bad_request(Dialect::Nova, e.to_string()).into_response(),
        Err(e) => return ApiError::new(Dialect::Nova, StatusCode::NOT_ACCEPTABLE, e.to_string()).into_response(),
    };
    req.extensions_mut().insert(version);
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("compute {version}")) {
        h.insert("openstack-api-version", v);
    }
    if let Ok(v) = HeaderValue::from_str(&version.to_string()) {
        h.insert("x-openstack-nova-api-version", v);
    }
    h.insert("vary", HeaderValue::from_static("OpenStack-API-Version, X-OpenStack-Nova-API-Version"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn negotiates_like_nova() {
        assert_eq!(negotiate(&headers(&[])), Ok(MIN));
        assert_eq!(negotiate(&headers(&[("openstack-api-version", "compute 2.53")])), Ok(Microversion(53)));
        assert_eq!(negotiate(&headers(&[("openstack-api-version", "volume 3.1, compute 2.11")])), Ok(Microversion(11)));
        assert_eq!(negotiate(&headers(&[("x-openstack-nova-api-version", "2.60")])), Ok(Microversion(60)));
        assert_eq!(negotiate(&headers(&[("openstack-api-version", "compute latest")])), Ok(MAX));
        assert!(matches!(negotiate(&headers(&[("openstack-api-version", "compute 2.999")])), Err(MicroversionError::Unsupported(_))));
        assert!(matches!(negotiate(&headers(&[("openstack-api-version", "compute 3.0")])), Err(MicroversionError::Unsupported(_))));
        assert!(matches!(negotiate(&headers(&[("openstack-api-version", "compute two")])), Err(MicroversionError::Malformed(_))));
        // The newer header wins over the older one.
        assert_eq!(
            negotiate(&headers(&[("openstack-api-version", "compute 2.20"), ("x-openstack-nova-api-version", "2.30")])),
            Ok(Microversion(20))
        );
    }
}
