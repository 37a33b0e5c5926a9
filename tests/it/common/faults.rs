//! A fault-injecting HTTP proxy in front of the test S3 server: storage that
//! misbehaves the way real stores and networks do, by schedule or at random
//! from a seed (printed, so a failing run can be replayed).
//!
//! Faults: `500 InternalError`, `503 SlowDown`, a delay before forwarding, a
//! connection reset before the request reaches the store, a response cut off
//! mid-body, and a request applied by the store whose response is lost (the
//! client sees a reset). The Host header is kept, so signatures still verify.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Bytes;
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// How often each fault happens, as a fraction of requests (checked in this
/// order; what is left is forwarded untouched).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Plan {
    pub error_500: f64,
    pub slow_down: f64,
    pub delay: f64,
    pub delay_for: Duration,
    /// Only requests whose path or query holds this are delayed (one
    /// database's, or `partNumber=` for multipart parts).
    pub delay_only: Option<&'static str>,
    /// A delayed request reaches the store even when its sender has gone
    /// meanwhile (killed): the late landing of a dead writer's request.
    pub late: bool,
    pub reset: f64,
    pub cut_body: f64,
    /// Only requests that change something (PUT, POST, DELETE): applied,
    /// then the connection is reset instead of answering.
    pub lost_response: f64,
    /// Every request is reset: the store is unreachable.
    pub outage: bool,
    /// A create-only PUT the store refuses (`If-None-Match: *`, 412) is
    /// answered as written, as stores that ignore the header answer.
    pub overwrites: bool,
}

impl Plan {
    pub fn healthy() -> Self {
        Self::default()
    }
}

/// What the proxy did, by kind.
#[derive(Debug, Default)]
pub struct Counts {
    pub requests: AtomicU64,
    pub forwarded: AtomicU64,
    pub error_500: AtomicU64,
    pub slow_down: AtomicU64,
    pub delayed: AtomicU64,
    pub reset: AtomicU64,
    pub cut_body: AtomicU64,
    pub lost_response: AtomicU64,
    /// Refused create-only PUTs answered as written (`Plan::overwrites`).
    pub overwrite_accepted: AtomicU64,
    /// GETs of one object (listings not counted).
    pub object_gets: AtomicU64,
    /// GETs of a byte range of one object.
    pub ranged_gets: AtomicU64,
    /// Listings (each page counts).
    pub lists: AtomicU64,
    /// PUTs (and multipart parts).
    pub puts: AtomicU64,
    /// Requests that delete: DELETEs and DeleteObjects POSTs.
    pub deletes: AtomicU64,
    /// Requests carrying `X-Tigris-Consistent: true` among their signed
    /// headers (a header added after signing would not count).
    pub tigris_consistent: AtomicU64,
    /// Multipart uploads the store began (`CreateMultipartUpload` answered).
    pub uploads_begun: AtomicU64,
    /// Multipart uploads the store completed or aborted (answered 2xx).
    pub uploads_ended: AtomicU64,
    /// Requests held under `Plan::late` that the store has answered
    /// (whether or not their sender was still there to hear it).
    pub landed_late: AtomicU64,
    /// Requests being handled now, and the most there ever were at once.
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
}

/// Counts a request out of `in_flight` however its handling ends.
struct InFlight<'a>(&'a Counts);

impl<'a> InFlight<'a> {
    fn enter(counts: &'a Counts) -> Self {
        let now = counts.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        counts.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(counts)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Counts {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Multipart uploads begun through the proxy and neither completed nor
    /// aborted: parts a bucket keeps, billed.
    pub fn uploads_open(&self) -> u64 {
        Self::get(&self.uploads_begun) - Self::get(&self.uploads_ended)
    }
}

/// What a request does to a multipart upload.
#[derive(Clone, Copy)]
enum Multipart {
    Begin,
    End,
}

fn multipart_of(req: &Request<Incoming>) -> Option<Multipart> {
    let query = req.uri().query().unwrap_or("");
    let has = |name: &str| {
        query
            .split('&')
            .any(|q| q == name || q.starts_with(&format!("{name}=")))
    };
    match req.method().as_str() {
        "POST" if has("uploads") => Some(Multipart::Begin),
        "POST" | "DELETE" if has("uploadId") && !has("partNumber") => Some(Multipart::End),
        _ => None,
    }
}

struct State {
    upstream: String,
    plan: Mutex<Plan>,
    rng: Mutex<u64>,
    counts: Counts,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A running proxy; it stops with the runtime it was started on.
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`: give it to walsync as the S3 endpoint.
    pub endpoint: String,
    state: Arc<State>,
}

enum Fault {
    None,
    Error500,
    SlowDown,
    Delay(Duration),
    Reset,
    CutBody,
    LostResponse,
}

type ProxyBody = BoxBody<Bytes, std::io::Error>;

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://host:port`); the seed comes from
    /// `WALSYNC_FAULT_SEED` when set, else from the clock, and is printed.
    pub async fn start(upstream: &str) -> Self {
        let seed = std::env::var("WALSYNC_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            })
            | 1;
        eprintln!("fault proxy: seed {seed} (replay with WALSYNC_FAULT_SEED={seed})");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_string(),
            plan: Mutex::new(Plan::healthy()),
            rng: Mutex::new(seed),
            counts: Counts::default(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        let serving = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = socket.set_nodelay(true);
                let state = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { handle(state, req).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Self {
            endpoint: format!("http://{addr}"),
            state,
        }
    }

    /// A fresh bucket on the test S3 server, and a healthy proxy in front of
    /// it (point walsync at `endpoint` through `AWS_ENDPOINT_URL_S3`).
    pub async fn before_s3_store() -> (super::TestStore, Self) {
        let store = super::s3_store().await;
        let upstream = store
            .env
            .iter()
            .find(|(k, _)| k == "AWS_ENDPOINT_URL_S3")
            .map(|(_, v)| v.clone())
            .unwrap();
        let proxy = Self::start(&upstream).await;
        (store, proxy)
    }

    pub fn set_plan(&self, plan: Plan) {
        *self.state.plan.lock().unwrap() = plan;
    }

    pub fn counts(&self) -> &Counts {
        &self.state.counts
    }
}

impl State {
    fn roll(&self) -> f64 {
        // xorshift64*: enough randomness for a schedule, and replayable.
        let mut x = self.rng.lock().unwrap();
        *x ^= *x >> 12;
        *x ^= *x << 25;
        *x ^= *x >> 27;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn plan(&self) -> Plan {
        *self.plan.lock().unwrap()
    }

    fn choose(&self, changes: bool) -> Fault {
        let plan = self.plan();
        if plan.outage {
            return Fault::Reset;
        }
        let mut r = self.roll();
        for (p, fault) in [
            (plan.error_500, 1),
            (plan.slow_down, 2),
            (plan.delay, 3),
            (plan.reset, 4),
            (plan.cut_body, 5),
            (if changes { plan.lost_response } else { 0.0 }, 6),
        ] {
            if r < p {
                return match fault {
                    1 => Fault::Error500,
                    2 => Fault::SlowDown,
                    3 => Fault::Delay(plan.delay_for),
                    4 => Fault::Reset,
                    5 => Fault::CutBody,
                    _ => Fault::LostResponse,
                };
            }
            r -= p;
        }
        Fault::None
    }
}

fn s3_error(status: StatusCode, code: &str) -> Response<ProxyBody> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
         <Message>injected by the fault proxy</Message></Error>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never: Infallible| match never {})
                .boxed(),
        )
        .unwrap()
}

/// An error from the service makes hyper drop the connection unanswered.
fn reset() -> Result<Response<ProxyBody>, std::io::Error> {
    Err(std::io::Error::other("connection reset by the fault proxy"))
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, std::io::Error> {
    let counts = &state.counts;
    counts.requests.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight::enter(counts);
    if req.method() == hyper::Method::GET
        && req.uri().path().trim_matches('/').contains('/')
        && !req.uri().query().unwrap_or("").contains("list-type")
    {
        counts.object_gets.fetch_add(1, Ordering::Relaxed);
        if req.headers().contains_key(hyper::header::RANGE) {
            counts.ranged_gets.fetch_add(1, Ordering::Relaxed);
        }
    }
    if req.method() == hyper::Method::GET && req.uri().query().unwrap_or("").contains("list-type") {
        counts.lists.fetch_add(1, Ordering::Relaxed);
    }
    if req.method() == hyper::Method::PUT {
        counts.puts.fetch_add(1, Ordering::Relaxed);
    }
    let signed = |name: &str| {
        req.headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|auth| auth.split("SignedHeaders=").nth(1))
            .and_then(|rest| rest.split(',').next())
            .is_some_and(|list| list.split(';').any(|h| h == name))
    };
    if req
        .headers()
        .get("x-tigris-consistent")
        .is_some_and(|v| v == "true")
        && signed("x-tigris-consistent")
    {
        counts.tigris_consistent.fetch_add(1, Ordering::Relaxed);
    }
    if req.method() == hyper::Method::DELETE
        || (req.method() == hyper::Method::POST
            && req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .any(|q| q == "delete" || q.starts_with("delete=")))
    {
        counts.deletes.fetch_add(1, Ordering::Relaxed);
    }
    let multipart = multipart_of(&req);
    let changes = matches!(req.method().as_str(), "PUT" | "POST" | "DELETE");
    let fault = state.choose(changes);
    let mut held = None;
    match fault {
        Fault::Error500 => {
            counts.error_500.fetch_add(1, Ordering::Relaxed);
            return Ok(s3_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError"));
        }
        Fault::SlowDown => {
            counts.slow_down.fetch_add(1, Ordering::Relaxed);
            return Ok(s3_error(StatusCode::SERVICE_UNAVAILABLE, "SlowDown"));
        }
        Fault::Reset => {
            counts.reset.fetch_add(1, Ordering::Relaxed);
            return reset();
        }
        Fault::Delay(d) => {
            let only = state.plan().delay_only;
            let target = req.uri().path_and_query().map_or("", |pq| pq.as_str());
            if only.is_none_or(|part| target.contains(part)) {
                counts.delayed.fetch_add(1, Ordering::Relaxed);
                held = Some(d);
            }
        }
        Fault::None | Fault::CutBody | Fault::LostResponse => {}
    }
    let late = held.filter(|_| state.plan().late);
    if let Some(d) = held.filter(|_| late.is_none()) {
        tokio::time::sleep(d).await;
    }
    let (parts, body) = req.into_parts();
    let create_only = parts.method == hyper::Method::PUT
        && parts.headers.contains_key(hyper::header::IF_NONE_MATCH);
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut forward = Request::builder()
        .method(parts.method.clone())
        .uri(format!("{}{path}", state.upstream));
    for (name, value) in &parts.headers {
        forward = forward.header(name, value);
    }
    let forward = forward
        .body(Full::new(body))
        .map_err(std::io::Error::other)?;
    let response = match late {
        // Its own task: hyper drops this handler with the sender's connection.
        Some(d) => {
            let state = state.clone();
            tokio::spawn(async move {
                tokio::time::sleep(d).await;
                let response = state.client.request(forward).await;
                state.counts.landed_late.fetch_add(1, Ordering::SeqCst);
                response
            })
            .await
            .map_err(std::io::Error::other)?
        }
        None => state.client.request(forward).await,
    }
    .map_err(std::io::Error::other)?;
    counts.forwarded.fetch_add(1, Ordering::Relaxed);
    if response.status().is_success() {
        match multipart {
            Some(Multipart::Begin) => counts.uploads_begun.fetch_add(1, Ordering::Relaxed),
            Some(Multipart::End) => counts.uploads_ended.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
    }
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    match fault {
        Fault::LostResponse => {
            counts.lost_response.fetch_add(1, Ordering::Relaxed);
            return reset();
        }
        Fault::CutBody if body.len() > 1 => {
            counts.cut_body.fetch_add(1, Ordering::Relaxed);
            let half = body.slice(..body.len() / 2);
            return Ok(Response::from_parts(
                parts,
                BodyExt::boxed(Cut(Some(half), None, false)),
            ));
        }
        Fault::CutBody => {
            counts.reset.fetch_add(1, Ordering::Relaxed);
            return reset();
        }
        _ => {}
    }
    if create_only && parts.status == StatusCode::PRECONDITION_FAILED && state.plan().overwrites {
        counts.overwrite_accepted.fetch_add(1, Ordering::Relaxed);
        let written = Response::builder()
            .status(StatusCode::OK)
            .header(hyper::header::ETAG, "\"0123456789abcdef0123456789abcdef\"")
            .body(
                Full::new(Bytes::new())
                    .map_err(|never: Infallible| match never {})
                    .boxed(),
            )
            .map_err(std::io::Error::other)?;
        return Ok(written);
    }
    Ok(Response::from_parts(
        parts,
        Full::new(body)
            .map_err(|never: Infallible| match never {})
            .boxed(),
    ))
}

/// Half a body, then (once that half has surely left) an error: hyper
/// aborts the connection mid-body, and the content-length the store sent
/// promised more. (An error right after the half would abort before even
/// the head was flushed: a reset, not a cut.)
struct Cut(
    Option<Bytes>,
    Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    bool,
);

impl hyper::body::Body for Cut {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Some(half) = self.0.take() {
            self.1 = Some(Box::pin(tokio::time::sleep(Duration::from_millis(50))));
            return std::task::Poll::Ready(Some(Ok(Frame::data(half))));
        }
        if let Some(sleep) = self.1.as_mut() {
            std::task::ready!(sleep.as_mut().poll(cx));
            self.1 = None;
        }
        if !self.2 {
            self.2 = true;
            return std::task::Poll::Ready(Some(Err(std::io::Error::other(
                "body cut by the fault proxy",
            ))));
        }
        std::task::Poll::Ready(None)
    }
}
