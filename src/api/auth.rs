//! Bearer tokens with roles, checked by a Tower layer in front of every service: `read` may
//! query and look, `write` may also ingest and delete, `admin` may also create and drop
//! indexes. Health checks stay open. Tokens come from a file (`ROLE TOKEN` per line, reloaded
//! on SIGHUP) and from `IMAGELSH_TOKENS` (`ROLE:TOKEN,ROLE:TOKEN`); none at all means every
//! call is allowed (the server warns when it listens beyond loopback so).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use subtle::ConstantTimeEq;
use tonic::Status;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Read,
    Write,
    Admin,
}

impl Role {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("reading tokens file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{source_name} line {line}: expected `ROLE TOKEN` with ROLE read, write or admin")]
    Syntax { source_name: String, line: usize },
    #[error("{source_name} line {line}: a token must be at least {MIN_TOKEN_BYTES} bytes")]
    Short { source_name: String, line: usize },
    /// Tokens were configured and none were found: serving would let everyone in.
    #[error("{0} holds no tokens; remove the setting to serve without authentication")]
    Empty(String),
}

/// Shorter tokens are refused at load: a guessable token is no token.
pub const MIN_TOKEN_BYTES: usize = 16;

/// The tokens a server accepts, each with its role.
#[derive(Debug, Default, Clone)]
pub struct Tokens {
    entries: Vec<(Role, Vec<u8>)>,
}

impl Tokens {
    /// `ROLE TOKEN` lines; `#` at the start of a line or after a space starts a comment (a `#`
    /// inside a token is part of it); blank lines are skipped.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, TokensError> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let comment = line
                .char_indices()
                .find(|&(i, c)| c == '#' && (i == 0 || line[..i].ends_with(char::is_whitespace)))
                .map_or(line.len(), |(i, _)| i);
            let line = line[..comment].trim();
            if line.is_empty() {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(role), Some(token), None) = (fields.next(), fields.next(), fields.next()) else {
                return Err(TokensError::Syntax { source_name: source_name.into(), line: n + 1 });
            };
            let role = Role::parse(role).ok_or(TokensError::Syntax { source_name: source_name.into(), line: n + 1 })?;
            if token.len() < MIN_TOKEN_BYTES {
                return Err(TokensError::Short { source_name: source_name.into(), line: n + 1 });
            }
            entries.push((role, token.as_bytes().to_vec()));
        }
        Ok(Self { entries })
    }

    /// The file's tokens and the variable's (`ROLE:TOKEN` separated by commas). A source that
    /// is given must hold a token: an empty or half-written file is an error, never "no auth".
    pub fn load(file: Option<&Path>, variable: Option<&str>) -> Result<Self, TokensError> {
        let mut tokens = Tokens::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|source| TokensError::Read { path: path.to_path_buf(), source })?;
            let name = path.display().to_string();
            let parsed = Self::parse(&text, &name)?;
            if parsed.is_empty() {
                return Err(TokensError::Empty(name));
            }
            tokens.entries.extend(parsed.entries);
        }
        if let Some(variable) = variable.filter(|v| !v.trim().is_empty()) {
            let text = variable.split(',').map(|pair| pair.trim().replacen(':', " ", 1)).collect::<Vec<_>>().join("\n");
            let parsed = Self::parse(&text, "IMAGELSH_TOKENS")?;
            if parsed.is_empty() {
                return Err(TokensError::Empty("IMAGELSH_TOKENS".into()));
            }
            tokens.entries.extend(parsed.entries);
        }
        Ok(tokens)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The highest role of a token equal to `presented`. Every entry is compared, each in
    /// constant time, so the answer's timing tells nothing of which token came close.
    pub fn role_of(&self, presented: &[u8]) -> Option<Role> {
        let mut best = None;
        for (role, token) in &self.entries {
            let equal: bool = token.as_slice().ct_eq(presented).into();
            if equal {
                best = best.max(Some(*role));
            }
        }
        best
    }
}

/// The tokens in force, swapped whole on reload.
#[derive(Debug, Clone, Default)]
pub struct TokenSource {
    current: Arc<RwLock<Arc<Tokens>>>,
    file: Option<PathBuf>,
    variable: Option<String>,
}

impl TokenSource {
    pub fn load(file: Option<PathBuf>, variable: Option<String>) -> Result<Self, TokensError> {
        let tokens = Tokens::load(file.as_deref(), variable.as_deref())?;
        Ok(Self { current: Arc::new(RwLock::new(Arc::new(tokens))), file, variable })
    }

    pub fn tokens(&self) -> Arc<Tokens> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the sources again; on an error the tokens in force stay.
    pub fn reload(&self) -> Result<usize, TokensError> {
        let tokens = Tokens::load(self.file.as_deref(), self.variable.as_deref())?;
        let count = tokens.len();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
        Ok(count)
    }
}

/// The role a call needs, by its gRPC path; `None`: open to all (health checks).
pub fn required_role(path: &str) -> Option<Role> {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    match service {
        "grpc.health.v1.Health" => None,
        "imagelsh.v1.ImageIndex" => Some(match method {
            "Query" | "Embed" | "GetIndex" | "ListIndexes" | "GetItems" => Role::Read,
            "Ingest" | "Delete" => Role::Write,
            // CreateIndex, DropIndex, and any method added later until it is classified.
            _ => Role::Admin,
        }),
        // Reflection lists the API: anyone who may read may see it.
        "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection" => Some(Role::Read),
        _ => Some(Role::Admin),
    }
}

/// The bearer token of a request, if it carries one.
fn bearer(headers: &http::HeaderMap) -> Option<&[u8]> {
    let value = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let scheme = value.get(..7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| &value[7..])
}

/// What a call presenting `headers` to `path` may do under `tokens`.
pub fn authorize(tokens: &Tokens, path: &str, headers: &http::HeaderMap) -> Result<(), Status> {
    let Some(required) = required_role(path) else { return Ok(()) };
    authorize_role(tokens, required, headers)
}

/// Whether `headers` carry a token with at least the `required` role (any call passes when
/// there are no tokens). The HTTP port's pages and metrics ask this too.
pub fn authorize_role(tokens: &Tokens, required: Role, headers: &http::HeaderMap) -> Result<(), Status> {
    if tokens.is_empty() {
        return Ok(());
    }
    let Some(presented) = bearer(headers) else {
        return Err(Status::unauthenticated("this call needs `authorization: Bearer TOKEN`"));
    };
    match tokens.role_of(presented) {
        None => Err(Status::unauthenticated("the bearer token is not valid")),
        Some(role) if role < required => {
            Err(Status::permission_denied(format!("this call needs the {required:?} role; the token has {role:?}")))
        }
        Some(_) => Ok(()),
    }
}

#[derive(Clone)]
pub struct AuthLayer {
    tokens: TokenSource,
}

impl AuthLayer {
    pub fn new(tokens: TokenSource) -> Self {
        Self { tokens }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth { inner, tokens: self.tokens.clone() }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: TokenSource,
}

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Err(status) = authorize(&self.tokens.tokens(), request.uri().path(), request.headers()) {
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let mut inner = super::take_ready(&mut self.inner);
        Box::pin(inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    const READ: &str = "read-token-0123456789";
    const WRITE: &str = "write-token-0123456789";
    const ADMIN: &str = "admin-token-0123456789";

    fn tokens() -> Tokens {
        Tokens::parse(&format!("# roles\nread {READ}\n\nwrite {WRITE}  # the job\nadmin {ADMIN}\n"), "test").unwrap()
    }

    fn headers(token: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(t) = token {
            h.insert(http::header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        }
        h
    }

    #[test]
    fn each_role_may_call_what_it_should_and_no_more() {
        let t = tokens();
        let rpcs = [
            ("Query", Role::Read),
            ("Embed", Role::Read),
            ("GetIndex", Role::Read),
            ("ListIndexes", Role::Read),
            ("Ingest", Role::Write),
            ("Delete", Role::Write),
            ("CreateIndex", Role::Admin),
            ("DropIndex", Role::Admin),
        ];
        for (rpc, needed) in rpcs {
            let path = format!("/imagelsh.v1.ImageIndex/{rpc}");
            for (token, role) in [(READ, Role::Read), (WRITE, Role::Write), (ADMIN, Role::Admin)] {
                let result = authorize(&t, &path, &headers(Some(token)));
                if role >= needed {
                    assert!(result.is_ok(), "{rpc} with {role:?}");
                } else {
                    assert_eq!(result.unwrap_err().code(), Code::PermissionDenied, "{rpc} with {role:?}");
                }
            }
            assert_eq!(authorize(&t, &path, &headers(None)).unwrap_err().code(), Code::Unauthenticated);
            let wrong = authorize(&t, &path, &headers(Some("not-a-token-at-all-xx")));
            assert_eq!(wrong.unwrap_err().code(), Code::Unauthenticated);
        }
        assert!(authorize(&t, "/grpc.health.v1.Health/Check", &headers(None)).is_ok());
        assert_eq!(
            authorize(&t, "/other.Service/Do", &headers(Some(WRITE))).unwrap_err().code(),
            Code::PermissionDenied
        );
    }

    #[test]
    fn no_tokens_allows_everything_and_bad_lines_are_refused() {
        assert!(authorize(&Tokens::default(), "/imagelsh.v1.ImageIndex/DropIndex", &headers(None)).is_ok());
        assert!(matches!(Tokens::parse("superuser abcdefghijklmnopqrstuvwxyz", "t"), Err(TokensError::Syntax { .. })));
        assert!(matches!(Tokens::parse("read short", "t"), Err(TokensError::Short { .. })));
        assert!(matches!(Tokens::parse("read a b", "t"), Err(TokensError::Syntax { line: 1, .. })));
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("tokens");
        std::fs::write(&empty, "# nothing yet\n").unwrap();
        assert!(matches!(Tokens::load(Some(&empty), None), Err(TokensError::Empty(_))));
        assert!(Tokens::load(None, Some("")).unwrap().is_empty());
        let hashed = Tokens::parse("read abc#defghijklmnopq # a comment", "t").unwrap();
        assert_eq!(hashed.role_of(b"abc#defghijklmnopq"), Some(Role::Read));
        let env = Tokens::load(None, Some(&format!("read:{READ},admin:{ADMIN}"))).unwrap();
        assert_eq!(env.role_of(ADMIN.as_bytes()), Some(Role::Admin));
        assert_eq!(env.role_of(READ.as_bytes()), Some(Role::Read));
        assert_eq!(env.role_of(b"read"), None);
    }
}
