//! The outermost layer: each call's span, its count by method and final gRPC status code, the
//! time to its response, and the streams open. The code is read where gRPC puts it: in the
//! headers of a trailers-only answer, else in the body's trailers; a body dropped before its
//! trailers is a call the client cancelled.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http_body::{Body, Frame};
use tonic::Status;
use tonic::codegen::Bytes;
use tracing::Instrument;

use crate::telemetry;

#[derive(Clone, Default)]
pub struct MeteredLayer;

impl<S> tower::Layer<S> for MeteredLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered { inner }
    }
}

#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
}

/// The method a path names, as a label: the service's own methods, health and reflection;
/// anything else is "other" (a label never takes client input).
fn method_label(path: &str) -> &'static str {
    const METHODS: [&str; 10] = [
        "CreateIndex",
        "GetIndex",
        "ListIndexes",
        "DropIndex",
        "Ingest",
        "Query",
        "Delete",
        "Embed",
        "GetItems",
        "Backup",
    ];
    if let Some(method) = path.strip_prefix("/imagelsh.v1.ImageIndex/") {
        return METHODS.iter().find(|m| **m == method).copied().unwrap_or("other");
    }
    match path {
        p if p.starts_with("/grpc.health.v1.Health/") => "health",
        p if p.starts_with("/grpc.reflection.") => "reflection",
        _ => "other",
    }
}

/// The label of a gRPC status code as the `grpc-status` header carries it.
fn code_label(code: &[u8]) -> &'static str {
    code_name(tonic::Code::from_bytes(code))
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An open ingest or embed stream in the gauge, until dropped.
struct OpenStream(&'static str);

impl OpenStream {
    fn new(kind: &'static str) -> Self {
        metrics::gauge!(telemetry::OPEN_STREAMS, "kind" => kind).increment(1.0);
        Self(kind)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        metrics::gauge!(telemetry::OPEN_STREAMS, "kind" => self.0).decrement(1.0);
    }
}

fn count(method: &'static str, code: &'static str) {
    metrics::counter!(telemetry::CALLS, "method" => method, "code" => code).increment(1);
}

impl<S, B> tower::Service<http::Request<B>> for Metered<S>
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
        let method = method_label(request.uri().path());
        let stream = match method {
            "Ingest" => Some(OpenStream::new("ingest")),
            "Embed" => Some(OpenStream::new("embed")),
            _ => None,
        };
        let span = tracing::info_span!("call", method);
        let mut inner = super::take_ready(&mut self.inner);
        Box::pin(
            async move {
                let started = Instant::now();
                let response = inner.call(request).await?;
                metrics::histogram!(telemetry::CALL, "method" => method).record(started.elapsed().as_secs_f64());
                let (parts, body) = response.into_parts();
                let counted = match parts.headers.get("grpc-status") {
                    Some(code) => {
                        count(method, code_label(code.as_bytes()));
                        true
                    }
                    None => false,
                };
                let body = MeteredBody { inner: body, method, counted, _stream: stream };
                Ok(http::Response::from_parts(parts, tonic::body::Body::new(body)))
            }
            .instrument(span),
        )
    }
}

/// A response body that counts its call's code from the trailers.
struct MeteredBody {
    inner: tonic::body::Body,
    method: &'static str,
    counted: bool,
    _stream: Option<OpenStream>,
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        if !self.counted {
            count(self.method, "CANCELLED");
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if !self.counted {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(code) = frame.trailers_ref().and_then(|t| t.get("grpc-status")) {
                        self.counted = true;
                        count(self.method, code_label(code.as_bytes()));
                    }
                }
                Poll::Ready(Some(Err(status))) => {
                    self.counted = true;
                    count(self.method, code_name(status.code()));
                }
                Poll::Ready(None) => {
                    self.counted = true;
                    count(self.method, "UNKNOWN");
                }
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_whatever_the_path() {
        assert_eq!(method_label("/imagelsh.v1.ImageIndex/Query"), "Query");
        assert_eq!(method_label("/imagelsh.v1.ImageIndex/GetItems"), "GetItems");
        assert_eq!(method_label("/imagelsh.v1.ImageIndex/Anything-a-client-sends"), "other");
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), "health");
        assert_eq!(method_label("/x"), "other");
        assert_eq!(code_label(b"0"), "OK");
        assert_eq!(code_label(b"8"), "RESOURCE_EXHAUSTED");
        assert_eq!(code_label(b"junk"), "UNKNOWN");
    }
}
