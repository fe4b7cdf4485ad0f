//! A Tower layer that bounds what calls in progress may take: how many run at once (all calls,
//! and the streaming ones apart), and for how long. A call over a bound is refused at once with
//! RESOURCE_EXHAUSTED (a client retries with backoff; queueing would hide the overload). A
//! call past its deadline ends with DEADLINE_EXCEEDED. Permits and deadlines travel with the
//! response body, so a stream holds its place until its last message.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http_body::{Body, Frame};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tonic::codegen::Bytes;

/// How a call is bounded, by its gRPC path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallKind {
    /// Health checks: never refused or cut (an overloaded server is still alive), and they
    /// take no permit (they need no token, so they must not use up what callers need).
    Health,
    /// Ingest or Embed streams: a stream permit of their own pool, and only their client's
    /// deadline (a bulk ingest may run for hours).
    Stream(StreamPool),
    /// Other streams (reflection): a call permit, the client's deadline only.
    OtherStream,
    Unary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamPool {
    Ingest,
    Embed,
}

fn kind(path: &str) -> CallKind {
    match path {
        "/imagelsh.v1.ImageIndex/Ingest" => CallKind::Stream(StreamPool::Ingest),
        "/imagelsh.v1.ImageIndex/Embed" => CallKind::Stream(StreamPool::Embed),
        p if p.starts_with("/grpc.health.v1.Health/") => CallKind::Health,
        p if p.starts_with("/grpc.reflection.") => CallKind::OtherStream,
        // A backup streams for as long as the data directory takes to send.
        "/imagelsh.v1.ImageIndex/Backup" => CallKind::OtherStream,
        _ => CallKind::Unary,
    }
}

/// Before the client's own deadline by this much: tonic's server answers CANCELLED when its
/// timer for the same `grpc-timeout` fires first, and the contract says DEADLINE_EXCEEDED.
const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// `grpc-timeout`: an integer of at most 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[derive(Debug, Clone)]
pub struct GuardLimits {
    pub max_calls: usize,
    pub max_streams: usize,
    /// Unary calls end by then at the latest; streams only by their client's deadline.
    pub max_unary: Duration,
}

impl Default for GuardLimits {
    fn default() -> Self {
        Self { max_calls: 1024, max_streams: 256, max_unary: Duration::from_secs(60) }
    }
}

#[derive(Clone)]
pub struct GuardLayer {
    calls: Arc<Semaphore>,
    /// Ingest and embed streams apart: idle embed streams of a reader cannot keep writers out.
    ingest_streams: Arc<Semaphore>,
    embed_streams: Arc<Semaphore>,
    limits: GuardLimits,
}

impl GuardLayer {
    pub fn new(limits: GuardLimits) -> Self {
        let permits = |n: usize| Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS)));
        Self {
            calls: permits(limits.max_calls),
            ingest_streams: permits(limits.max_streams),
            embed_streams: permits(limits.max_streams),
            limits,
        }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guard { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    layer: GuardLayer,
}

/// What a call holds until its response body ends.
struct Held {
    _call: Option<OwnedSemaphorePermit>,
    _stream: Option<OwnedSemaphorePermit>,
}

impl<S, B> tower::Service<http::Request<B>> for Guard<S>
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
        let refuse = |status: Status| -> Self::Future { Box::pin(async move { Ok(status.into_http()) }) };
        let kind = kind(request.uri().path());
        let limits = &self.layer.limits;
        let call = match kind {
            CallKind::Health => None,
            _ => match self.layer.calls.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    return refuse(super::status::busy(format!(
                        "{} calls are in progress, the limit (--max-calls); retry with backoff",
                        limits.max_calls
                    )));
                }
            },
        };
        let stream = match kind {
            CallKind::Stream(pool) => {
                let (semaphore, what) = match pool {
                    StreamPool::Ingest => (&self.layer.ingest_streams, "ingest"),
                    StreamPool::Embed => (&self.layer.embed_streams, "embed"),
                };
                match semaphore.clone().try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => {
                        return refuse(super::status::busy(format!(
                            "{} {what} streams are open, the limit (--max-streams); retry with backoff",
                            limits.max_streams
                        )));
                    }
                }
            }
            _ => None,
        };
        let client = request.headers().get("grpc-timeout").and_then(|v| parse_grpc_timeout(v.as_bytes()));
        let budget = match (kind, client) {
            (CallKind::Unary, Some(client)) => Some(client.min(limits.max_unary)),
            (CallKind::Unary, None) => Some(limits.max_unary),
            (_, client) => client,
        };
        let deadline = budget.map(|b| Instant::now() + b.saturating_sub(DEADLINE_MARGIN));
        let held = Held { _call: call, _stream: stream };
        let mut inner = super::take_ready(&mut self.inner);
        let response = inner.call(request);
        Box::pin(async move {
            let mut response = Box::pin(response);
            let response = match deadline {
                None => response.await?,
                Some(at) => match tokio::time::timeout_at(at, &mut response).await {
                    Ok(response) => response?,
                    Err(_) => {
                        // The work a handler started runs on (a blocking task cannot be
                        // cancelled): it keeps its permits until it ends, so that calls past
                        // their deadline still count against the limits.
                        tokio::spawn(async move {
                            let _ = response.await;
                            drop(held);
                        });
                        return Ok(expired().into_http());
                    }
                },
            };
            let held = Arc::new(std::sync::Mutex::new(Some(held)));
            // A client that stops reading (no HTTP/2 window) never lets the body be polled
            // again: the permits go at the deadline all the same. The timer ends with the body.
            let timer = deadline.map(|at| {
                let held = Arc::downgrade(&held);
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    if let Some(held) = held.upgrade() {
                        held.lock().unwrap_or_else(|e| e.into_inner()).take();
                    }
                })
                .abort_handle()
            });
            Ok(response.map(|body| {
                tonic::body::Body::new(GuardedBody {
                    inner: body,
                    deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
                    _held: held,
                    timer,
                    ended: false,
                })
            }))
        })
    }
}

fn expired() -> Status {
    Status::deadline_exceeded("the call ran past its deadline")
}

/// A response body that keeps its call's permits and ends the call at its deadline.
struct GuardedBody {
    inner: tonic::body::Body,
    deadline: Option<Pin<Box<Sleep>>>,
    /// Taken by the deadline's timer, or dropped with the body, whichever comes first.
    _held: Arc<std::sync::Mutex<Option<Held>>>,
    timer: Option<tokio::task::AbortHandle>,
    ended: bool,
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        // No sleeping task per finished call (a unary call's maximum is a minute).
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        if polled.is_pending()
            && let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.ended = true;
            let mut trailers = http::HeaderMap::new();
            if expired().add_header(&mut trailers).is_err() {
                return Poll::Ready(Some(Err(expired())));
            }
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service that answers after `delay`.
    fn slow(
        delay: Duration,
    ) -> impl tower::Service<
        http::Request<()>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future = impl Future<Output = Result<http::Response<tonic::body::Body>, std::convert::Infallible>> + Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |_: http::Request<()>| async move {
            tokio::time::sleep(delay).await;
            Ok(http::Response::new(tonic::body::Body::empty()))
        })
    }

    fn request(path: &str, timeout: Option<&str>) -> http::Request<()> {
        let mut r = http::Request::builder().uri(path);
        if let Some(t) = timeout {
            r = r.header("grpc-timeout", t);
        }
        r.body(()).unwrap()
    }

    fn status_of(response: &http::Response<tonic::body::Body>) -> Option<&[u8]> {
        response.headers().get("grpc-status").map(|v| v.as_bytes())
    }

    #[tokio::test]
    async fn unary_calls_end_at_the_shorter_deadline_and_streams_at_their_clients() {
        use tower::{Layer, ServiceExt};
        let limits = GuardLimits { max_calls: 4, max_streams: 1, max_unary: Duration::from_millis(300) };
        let layer = GuardLayer::new(limits);
        let guard = layer.layer(slow(Duration::from_secs(2)));
        // The client's 50 ms, then the server's 300 ms maximum: DEADLINE_EXCEEDED (4) either way.
        for timeout in [Some("50m"), None] {
            let started = tokio::time::Instant::now();
            let response = guard.clone().oneshot(request("/imagelsh.v1.ImageIndex/Query", timeout)).await.unwrap();
            assert_eq!(status_of(&response), Some(&b"4"[..]), "{timeout:?}");
            assert!(started.elapsed() < Duration::from_millis(1000));
        }
        // A stream has no server maximum: it gets its answer.
        let guard = layer.layer(slow(Duration::from_millis(400)));
        let response = guard.clone().oneshot(request("/imagelsh.v1.ImageIndex/Ingest", None)).await.unwrap();
        assert_eq!(status_of(&response), None);
        // Health needs no permit, even with every call permit taken.
        // (The two calls past their deadline still hold theirs: their work runs on.)
        let mut held = Vec::new();
        while let Ok(permit) = layer.calls.clone().try_acquire_owned() {
            held.push(permit);
        }
        assert_eq!(held.len(), 2);
        let refused = guard.clone().oneshot(request("/imagelsh.v1.ImageIndex/GetIndex", None)).await.unwrap();
        assert_eq!(status_of(&refused), Some(&b"8"[..]));
        let health = guard.oneshot(request("/grpc.health.v1.Health/Check", None)).await.unwrap();
        assert_eq!(status_of(&health), None);
        drop(held);
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_keeps_its_permit_while_its_work_runs() {
        use tower::{Layer, ServiceExt};
        let limits = GuardLimits { max_calls: 1, max_streams: 1, max_unary: Duration::from_secs(10) };
        let guard = GuardLayer::new(limits).layer(slow(Duration::from_millis(400)));
        let expired = guard.clone().oneshot(request("/imagelsh.v1.ImageIndex/Query", Some("50m"))).await.unwrap();
        assert_eq!(status_of(&expired), Some(&b"4"[..]));
        // Its work still runs: the one permit is taken.
        let refused = guard.clone().oneshot(request("/imagelsh.v1.ImageIndex/Query", None)).await.unwrap();
        assert_eq!(status_of(&refused), Some(&b"8"[..]));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let served = guard.oneshot(request("/imagelsh.v1.ImageIndex/Query", None)).await.unwrap();
        assert_eq!(status_of(&served), None);
    }

    #[test]
    fn grpc_timeouts_parse_and_bad_ones_are_ignored() {
        assert_eq!(parse_grpc_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"5u"), Some(Duration::from_micros(5)));
        for bad in [&b""[..], b"m", b"123456789S", b"12x", b"-1S", b"1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
