//! Bearer-token authentication: clients and workers send
//! `authorization: Bearer <token>`; the server checks it per service
//! (separate client and worker tokens; health checks stay open).

use nt_proto::tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use nt_proto::tonic::service::Interceptor;
use nt_proto::tonic::{Request, Status};

/// Adds a bearer token to every request (none when the token is empty).
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        match token.filter(|t| !t.is_empty()) {
            None => Ok(BearerToken(None)),
            Some(t) => Ok(BearerToken(Some(format!("Bearer {t}").parse().map_err(
                |_| anyhow::anyhow!("the token contains characters not allowed in a header"),
            )?))),
        }
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// Checks a request's bearer token against `expected` (no token expected:
/// everything passes). The comparison takes the same time wherever the
/// tokens differ.
pub fn check(metadata: &MetadataMap, expected: Option<&str>, who: &str) -> Result<(), Status> {
    let Some(expected) = expected.filter(|t| !t.is_empty()) else {
        return Ok(());
    };
    let given = metadata
        .get("authorization")
        .ok_or_else(|| {
            Status::unauthenticated(format!(
                "missing bearer token: this service needs the {who} token"
            ))
        })?
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
    let token = given.strip_prefix("Bearer ").ok_or_else(|| {
        Status::unauthenticated("the authorization header must be `Bearer <token>`")
    })?;
    let (a, b) = (token.as_bytes(), expected.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    if diff == 0 {
        Ok(())
    } else {
        Err(Status::unauthenticated(format!("invalid {who} token")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked() {
        let mut req = Request::new(());
        BearerToken::new(Some("s3cret"))
            .unwrap()
            .call(Request::new(()))
            .unwrap();
        assert!(check(req.metadata(), None, "client").is_ok());
        let e = check(req.metadata(), Some("s3cret"), "client").unwrap_err();
        assert!(e.message().contains("missing bearer token"));
        req = BearerToken::new(Some("s3cret")).unwrap().call(req).unwrap();
        assert!(check(req.metadata(), Some("s3cret"), "client").is_ok());
        let e = check(req.metadata(), Some("other"), "worker").unwrap_err();
        assert_eq!(e.code(), nt_proto::tonic::Code::Unauthenticated);
        assert!(e.message().contains("invalid worker token"));
    }
}
