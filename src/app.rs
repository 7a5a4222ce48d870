//! Start-up, background tasks and shutdown.
//!
//! Start: bind both listeners (port 0 works; the bound addresses are logged) → pool →
//! serve (liveness is up, readiness waits) → migrate under the lock, retrying until the
//! database answers → ready. Background: a database ping every second (readiness and
//! `kvstore_db_up`), the expiry purge, the change-log poll that invalidates keys other
//! replicas wrote. Shutdown on SIGTERM/SIGINT: not ready → `KV_SHUTDOWN_DELAY` (endpoints
//! drop the pod) → stop accepting and drain within `KV_SHUTDOWN_TIMEOUT` → close the pool →
//! flush logs. A second signal exits at once.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use slog::{error, info, warn, Logger};
use tokio::net::TcpListener;
use tokio::sync::watch;
use warp::http::{header, HeaderValue, Request};
use warp::reply::Response;

use crate::api::{self, Health, State};
use crate::cache::Cache;
use crate::config::Config;
use crate::error::ApiError;
use crate::logging::AccessLog;
use crate::metrics::{self, Metrics};
use crate::refusal::{Phase, Recorder, RefusalIo, RequestClock};
use crate::stall::StallGuard;
use crate::store::Store;

/// Version and revision baked in by `build.rs`.
pub const VERSION: &str = env!("KVSTORE_BUILD_VERSION");
pub const REVISION: &str = env!("KVSTORE_BUILD_REVISION");

/// How long change-log rows are kept (replicas poll far more often than this).
const KEEP_CHANGES: Duration = Duration::from_secs(600);
/// A change-log id missing below the newest one seen is re-polled this long (its
/// transaction may still commit), or four poll intervals if that is longer; after that it is
/// taken as rolled back. A poll out of action that long clears the cache.
const GAP_PATIENCE: Duration = Duration::from_secs(15);
/// Most skipped change-log ids re-polled at once (one SQL parameter each).
const MAX_GAPS: usize = 10_000;
/// Connections the metrics port serves at once (a scraper or two, and someone's curl).
const METRICS_MAX_CONNECTIONS: usize = 64;
/// At the connection limit, idle connections closed at once to make room (nginx: 32).
const EVICT_BATCH: usize = 32;
/// At the connection limit with no idle connection, how often to look for one again.
const FULL_RECHECK: Duration = Duration::from_millis(100);
/// At the connection limit, the warning is repeated at most this often.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);
/// At start, ids this far below the newest are checked for ones still uncommitted.
const START_WINDOW: u64 = 1000;

/// A running instance: its bound addresses and the handle to stop it.
pub struct Running {
    pub http_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub state: Arc<State>,
    shutdown: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Starts the shutdown sequence (as SIGTERM does) and waits for it to finish.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.done.await;
    }

    /// Waits until the instance has stopped.
    pub async fn stopped(self) {
        let _ = self.done.await;
    }

    pub fn trigger_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }
}

/// Binds, starts every task and returns at once; shutdown is triggered through the
/// returned handle (see `run_until_signal` for the process's own signal handling).
pub async fn start(config: Config, log: Logger, access: AccessLog) -> std::io::Result<Running> {
    let http = TcpListener::bind(config.listen_addr).await?;
    let metrics_listener = TcpListener::bind(config.metrics_addr).await?;
    let http_addr = http.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;

    let metrics = Arc::new(Metrics::new(VERSION, REVISION));
    let store = Store::new(&config, metrics.clone());
    let cache = Cache::new(
        config.cache_max_bytes,
        config.cache_ttl,
        config.cache_negative_ttl,
        config.db_acquire_timeout + config.db_query_timeout,
        metrics.clone(),
    );
    let access = if config.access_log {
        access
    } else {
        AccessLog::off()
    };
    let body_memory = tokio::sync::Semaphore::new(config.body_memory_bytes.div_ceil(1024));
    let state = Arc::new(State {
        body_memory,
        config,
        store,
        cache,
        metrics,
        health: Health::default(),
        log: log.clone(),
        access,
        version: VERSION,
        revision: REVISION,
    });
    log_startup(&state, http_addr, metrics_addr);
    let open_files = raise_open_files_limit();
    let api_max_connections = connection_limit(&state.config, open_files);
    if api_max_connections < state.config.max_connections {
        warn!(log, "the open-files limit is too low for KV_MAX_CONNECTIONS: serving fewer connections at once";
            "open_files_limit" => open_files, "max_connections" => api_max_connections,
            "configured" => state.config.max_connections);
    } else {
        info!(log, "open-files limit"; "open_files_limit" => open_files);
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (stop_accepting_tx, stop_accepting_rx) = watch::channel(false);
    let graceful = Arc::new(GracefulShutdown::new());

    let api_svc = warp::service(api::routes());
    let api_state = state.clone();
    let api_handler = move |req: Request<Incoming>| {
        let state = api_state.clone();
        let svc = api_svc.clone();
        async move { Ok::<_, Infallible>(api::handle(state, svc, req).await) }
    };
    let metrics_state = state.clone();
    let metrics_handler = move |req: Request<Incoming>| {
        let state = metrics_state.clone();
        async move { Ok::<_, Infallible>(metrics_endpoint(&state, req).await) }
    };
    let api_loop = tokio::spawn(accept_loop(
        Listener {
            tcp: http,
            name: "api",
            max_connections: api_max_connections,
        },
        api_handler,
        graceful.clone(),
        stop_accepting_rx.clone(),
        state.clone(),
    ));
    let metrics_loop = tokio::spawn(accept_loop(
        Listener {
            tcp: metrics_listener,
            name: "metrics",
            max_connections: METRICS_MAX_CONNECTIONS,
        },
        metrics_handler,
        graceful.clone(),
        stop_accepting_rx,
        state.clone(),
    ));

    let background = vec![
        tokio::spawn(migrate_until_done(state.clone())),
        tokio::spawn(health_loop(state.clone())),
        tokio::spawn(purge_loop(state.clone())),
        tokio::spawn(invalidation_loop(state.clone())),
    ];

    let st = state.clone();
    let done = tokio::spawn(async move {
        let mut rx = shutdown_rx;
        let _ = rx.wait_for(|stop| *stop).await.map(|_| ());
        let log = &st.log;
        st.health.shutting_down.store(true, Ordering::SeqCst);
        st.metrics.ready.set(0);
        info!(log, "shutdown: not ready any more; waiting before closing listeners";
            "delay_ms" => st.config.shutdown_delay.as_millis() as u64);
        tokio::time::sleep(st.config.shutdown_delay).await;
        let _ = stop_accepting_tx.send(true);
        let _ = api_loop.await;
        let _ = metrics_loop.await;
        let started = Instant::now();
        let graceful = Arc::try_unwrap(graceful).unwrap_or_else(|_| GracefulShutdown::new());
        match tokio::time::timeout(st.config.shutdown_timeout, graceful.shutdown()).await {
            Ok(()) => info!(log, "shutdown: in-flight requests drained";
                "drain_ms" => started.elapsed().as_millis() as u64),
            Err(_) => warn!(log, "shutdown: drain timed out; closing remaining connections";
                "timeout_ms" => st.config.shutdown_timeout.as_millis() as u64),
        }
        for task in background {
            task.abort();
        }
        st.store.clone().close(Duration::from_secs(5)).await;
        info!(log, "shutdown: database pool closed; exiting");
    });

    Ok(Running {
        http_addr,
        metrics_addr,
        state,
        shutdown: shutdown_tx,
        done,
    })
}

/// Runs until SIGTERM or SIGINT, then shuts down in order. A second signal exits at once.
pub async fn run_until_signal(
    config: Config,
    log: Logger,
    access: AccessLog,
) -> std::io::Result<()> {
    let running = start(config, log.clone(), access).await?;
    wait_for_signal().await;
    info!(
        log,
        "signal received: shutting down gracefully (send it again to exit at once)"
    );
    running.trigger_shutdown();
    let second = tokio::spawn({
        let log = log.clone();
        async move {
            wait_for_signal().await;
            warn!(log, "second signal: exiting immediately");
            // Give the async log writer a moment to print that line.
            tokio::time::sleep(Duration::from_millis(50)).await;
            std::process::exit(1);
        }
    });
    running.stopped().await;
    second.abort();
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn log_startup(state: &State, http: SocketAddr, metrics: SocketAddr) {
    let c = &state.config;
    let log = &state.log;
    info!(log, "starting";
        "version" => VERSION,
        "revision" => REVISION,
        "database" => &c.database.display_url,
        "database_tls" => c.database.tls(),
        "db_pool_max" => c.db_pool_max,
        "cache_max_bytes" => c.cache_max_bytes,
        "cache_ttl_ms" => c.cache_ttl.as_millis() as u64,
        "max_value_bytes" => c.max_value_bytes,
        "auth" => c.auth_enabled(),
        "auth_reads" => c.auth_reads,
        "log_level" => format!("{:?}", c.log_level).to_lowercase(),
    );
    if !c.auth_enabled() {
        warn!(log, "no API token configured (KV_API_TOKENS / KV_API_TOKENS_FILE): writes are open to anyone who can reach the port");
    }
    info!(log, "listening"; "http_addr" => http.to_string(), "metrics_addr" => metrics.to_string());
}

/// Raises the soft limit on open files to the hard limit and returns it. Rust, unlike Go's
/// runtime, leaves the soft limit as it finds it, and containerd 2.x starts containers at
/// 1024: a few hundred client connections short of `KV_MAX_CONNECTIONS`, the process would
/// fail to accept ("too many open files") and to open database connections.
/// (Up to 2^20, Linux's default `fs.nr_open`: a hard limit of "unlimited" cannot be set.)
fn raise_open_files_limit() -> u64 {
    let _ = rlimit::increase_nofile_limit(1 << 20);
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
}

/// Files kept open besides the API port's connections: the metrics port's, the database
/// pools', the listeners, the runtime's and the log's.
const OTHER_FILES: u64 = METRICS_MAX_CONNECTIONS as u64 + 64;

/// The API port's connection limit: `KV_MAX_CONNECTIONS`, or less if the open-files limit
/// would not leave room for the other files (`OTHER_FILES` plus the database pools).
fn connection_limit(config: &Config, open_files: u64) -> usize {
    let others = OTHER_FILES + config.db_pool_max as u64 + 2;
    let room = open_files.saturating_sub(others).max(1);
    config
        .max_connections
        .min(usize::try_from(room).unwrap_or(usize::MAX))
}

/// A listening socket and the connections it may have open at once.
struct Listener {
    tcp: TcpListener,
    /// The `listener` label of the connection gauges.
    name: &'static str,
    max_connections: usize,
}

/// Accepts connections until told to stop, at most `max_connections` open at once; each is
/// served over HTTP/1.1 with header and idle timeouts (timed by its own [`ConnectionTimer`]),
/// hyper's own refusals rewritten as problem documents ([`RefusalIo`]), writes that make no
/// progress for `KV_REQUEST_TIMEOUT` failed ([`StallGuard`]), and watched by the
/// graceful-shutdown handle.
///
/// At the limit, a connection accepted is held until there is room: idle keep-alive
/// connections are closed to make it, up to a sixteenth of the limit (at most
/// `EVICT_BATCH`) at a time, oldest first, as nginx does when it runs out of connections. An
/// idle connection costs its client only a reconnect, and probes (kubelet opens a new
/// connection for each) keep getting through. When every open connection is busy, the loop
/// accepts nothing more until one goes idle or closes, as Go's `netutil.LimitListener`
/// does: new connections wait in the kernel's listen backlog (and beyond it, the client's
/// SYN retries), so a flood of connections costs the process no memory and no file
/// descriptors, and the connections already open keep being served.
async fn accept_loop<H, F>(
    listener: Listener,
    handler: H,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
    state: Arc<State>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Response, Infallible>> + Send + 'static,
{
    let log = &state.log;
    let open = state
        .metrics
        .http_connections
        .with_label_values(&[listener.name]);
    state
        .metrics
        .http_connections_max
        .with_label_values(&[listener.name])
        .set(listener.max_connections as i64);
    let permits = Arc::new(tokio::sync::Semaphore::new(listener.max_connections));
    let mut last_full_warning: Option<Instant> = None;
    // Every connection's clock, oldest first (the dead ones pruned as it grows).
    let mut clocks: Vec<std::sync::Weak<RequestClock>> = Vec::new();
    let recorder = Arc::new(Recorder {
        metrics: state.metrics.clone(),
        access: state.access.clone(),
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .header_read_timeout(state.config.header_read_timeout)
        .keep_alive(true);
    loop {
        let stream = tokio::select! {
            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => break,
            accepted = listener.tcp.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(log, "accept failed"; "error" => e.to_string());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // At the limit: close idle connections to make room, and wait for one to end (with
        // no idle connection, until a busy one goes idle or closes).
        let permit = loop {
            if let Ok(permit) = permits.clone().try_acquire_owned() {
                break Some(permit);
            }
            let batch = (listener.max_connections / 16).clamp(1, EVICT_BATCH);
            if close_idle(&mut clocks, batch) == 0
                && last_full_warning.is_none_or(|t| t.elapsed() >= FULL_WARNING_EVERY)
            {
                warn!(log, "connection limit reached and no connection idle: new connections wait until one closes";
                    "listener" => listener.name, "max_connections" => listener.max_connections);
                last_full_warning = Some(Instant::now());
            }
            tokio::select! {
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => break None,
                permit = permits.clone().acquire_owned() => break permit.ok(),
                _ = tokio::time::sleep(FULL_RECHECK) => {}
            }
        };
        let Some(permit) = permit else { break };
        let _ = stream.set_nodelay(true);
        let mut builder = builder.clone();
        let clock = Arc::new(RequestClock::new());
        if clocks.len() >= 2 * listener.max_connections {
            clocks.retain(|c| c.strong_count() > 0);
        }
        clocks.push(Arc::downgrade(&clock));
        builder.timer(ConnectionTimer::new(clock.clone(), &state.config));
        let conn = builder.serve_connection(
            TokioIo::new(RefusalIo::new(
                StallGuard::new(stream, state.config.request_timeout),
                recorder.clone(),
                clock,
            )),
            hyper::service::service_fn(handler.clone()),
        );
        let watched = graceful.watch(conn);
        let open = open.clone();
        tokio::spawn(async move {
            // Held by the task, so that a panic in a handler still gives both back.
            let _open = metrics::GaugeGuard::hold(&open);
            let _permit = permit;
            let _ = watched.await;
        });
    }
}

/// Asks up to `max` idle connections, oldest first, to close (see [`accept_loop`]); forgets
/// the clocks of connections that have ended. Returns how many were asked.
fn close_idle(clocks: &mut Vec<std::sync::Weak<RequestClock>>, max: usize) -> usize {
    let mut closed = 0;
    clocks.retain(|c| match c.upgrade() {
        None => false,
        Some(clock) => {
            if closed < max && clock.close_if_idle() {
                closed += 1;
            }
            true
        }
    });
    closed
}

/// hyper's timer for one connection, which uses it only for the header read timeout, and
/// which makes of it two timeouts:
/// - **idle**: a keep-alive connection that has been answered may wait `KV_IDLE_TIMEOUT` for
///   its next request. hyper itself starts the header timeout as soon as it waits for a head,
///   so it would close idle connections after `KV_HEADER_READ_TIMEOUT` (5 s), and a proxy in
///   front that keeps idle upstream connections longer (ingress-nginx and AWS ALB: 60 s)
///   would now and then send a request down a connection being closed: a 502 for the client.
/// - **header**: once the first bytes of a request come (or from accept, for a new
///   connection), the head must be complete within `KV_HEADER_READ_TIMEOUT`.
///
/// The connection's stream ([`RefusalIo`]) tells which applies ([`RequestClock`]); each poll
/// of hyper's sleep, which comes with every read while a head is incomplete, moves the one
/// deadline accordingly.
///
/// hyper asks for a new sleep each time it starts waiting for a request head, and drops it
/// once the head is read: with hyper-util's `TokioTimer` that is a timer-wheel entry made,
/// registered and removed per request. Here the connection keeps one tokio `Sleep`, and each
/// of hyper's sleeps moves its deadline: later deadlines, the usual case, only extend the
/// registered entry (one atomic operation in tokio; the wheel re-files it when the old time
/// comes).
struct ConnectionTimer(Arc<TimerState>);

struct TimerState {
    /// The connection's one `Sleep`, made when hyper first waits on it.
    sleep: Mutex<Option<Pin<Box<tokio::time::Sleep>>>>,
    clock: Arc<RequestClock>,
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl ConnectionTimer {
    fn new(clock: Arc<RequestClock>, config: &Config) -> ConnectionTimer {
        ConnectionTimer::with(clock, config.header_read_timeout, config.idle_timeout)
    }

    fn with(clock: Arc<RequestClock>, header: Duration, idle: Duration) -> ConnectionTimer {
        ConnectionTimer(Arc::new(TimerState {
            sleep: Mutex::new(None),
            clock,
            header_timeout: header,
            idle_timeout: idle,
        }))
    }
}

/// One of hyper's sleeps: hyper's deadline (the header timeout from when it began to wait),
/// applied to its connection's `Sleep` as the connection's phase says.
struct HeadSleep {
    deadline: tokio::time::Instant,
    state: Arc<TimerState>,
}

impl hyper::rt::Timer for ConnectionTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        // hyper asks for this sleep when it begins to wait for a request head.
        self.0.clock.head_wait_began();
        Box::pin(HeadSleep {
            deadline: deadline.into(),
            state: self.0.clone(),
        })
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into()
    }
}

impl HeadSleep {
    /// When the connection is to be closed if the head has not come.
    fn effective_deadline(&self) -> tokio::time::Instant {
        let s = &self.state;
        match s.clock.phase() {
            Phase::New => self.deadline,
            // hyper began waiting `header_timeout` before its deadline.
            Phase::Idle => {
                let waiting_since = self.deadline.checked_sub(s.header_timeout);
                waiting_since.unwrap_or(self.deadline) + s.idle_timeout
            }
            Phase::Began(at) => self
                .deadline
                .max(tokio::time::Instant::from_std(at) + s.header_timeout),
        }
    }
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.effective_deadline();
        let mut slot = self
            .state
            .sleep
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let sleep = slot.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        sleep.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for HeadSleep {}

/// The metrics port: `/metrics` only (GET or HEAD). Its responses carry a request id and an
/// access line like the API's; they are not counted in the HTTP metrics, whose `route`
/// label names the API's routes.
async fn metrics_endpoint(state: &State, req: Request<Incoming>) -> Response {
    let start = Instant::now();
    let id = api::request_id(req.headers());
    let method = metrics::method_label(req.method());
    let (route, refusal) = if req.uri().path() != "/metrics" {
        let e = ApiError::NotFound("this port serves /metrics only".into());
        (api::route::UNMATCHED, Some(e))
    } else if !matches!(method, "GET" | "HEAD") {
        let e = ApiError::MethodNotAllowed {
            method: req.method().to_string(),
            allow: "GET, HEAD",
        };
        (api::route::METRICS, Some(e))
    } else if req.uri().query().is_some_and(|q| !q.is_empty()) {
        // As on the API port: an unknown query parameter is refused, not ignored.
        let e = ApiError::InvalidRequest("/metrics takes no query parameters".into());
        (api::route::METRICS, Some(e))
    } else {
        (api::route::METRICS, None)
    };
    let mut resp = match refusal {
        Some(e) => e.into_response(id.to_str().unwrap_or_default()),
        None => {
            state.cache.update_gauges().await;
            let mut r = Response::new(state.metrics.render().into());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
    };
    api::stamp(
        &state.access,
        &mut resp,
        &id,
        req.method(),
        route,
        start.elapsed(),
    );
    resp
}

async fn migrate_until_done(state: Arc<State>) {
    let mut delay = Duration::from_millis(200);
    loop {
        match state.store.migrate().await {
            Ok(applied) => {
                info!(state.log, "database schema is up to date"; "applied" => format!("{applied:?}"));
                state.health.migrated.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => {
                error!(state.log, "migrations failed; retrying"; "error" => e.to_string(),
                    "retry_in_ms" => delay.as_millis() as u64);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn health_loop(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_up: Option<bool> = None;
    loop {
        tick.tick().await;
        let up = state.store.ping().await.is_ok();
        state.health.db_up.store(up, Ordering::SeqCst);
        state.metrics.db_up.set(i64::from(up));
        state
            .metrics
            .ready
            .set(i64::from(state.health.not_ready_reason().is_none()));
        if was_up != Some(up) {
            if up {
                info!(state.log, "database is reachable");
            } else {
                warn!(state.log, "database is unreachable");
            }
            was_up = Some(up);
        }
    }
}

async fn purge_loop(state: Arc<State>) {
    let mut tick = tokio::time::interval(state.config.purge_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !state.health.migrated.load(Ordering::Relaxed) {
            continue;
        }
        match state.store.purge(KEEP_CHANGES).await {
            Ok(n) => {
                state.metrics.expired_purged.inc_by(n);
                if n > 0 {
                    info!(state.log, "purged expired entries"; "count" => n);
                }
            }
            Err(e) => warn!(state.log, "purge failed"; "error" => e.to_string()),
        }
    }
}

/// Polls the change log and drops cached entries older than a change. Ids can commit out of
/// order, so ids skipped below the newest one seen are re-polled for a while.
///
/// This instance's own changes are applied too. A write updates the cache itself once it has
/// committed, but a request cancelled after the commit (its client gone, its time budget
/// spent) never gets there; the poll then drops the entry it left stale within an interval.
/// For every other own write the cached entry is the change's revision already, and nothing
/// happens.
async fn invalidation_loop(state: Arc<State>) {
    while !state.health.migrated.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Where the change log stands, and which recent ids are not committed yet (they may
    // commit later): only then may this instance cache anything.
    let (mut last, mut gaps) = loop {
        let start = async {
            let last = state.store.last_change_id().await?;
            let from = last.saturating_sub(START_WINDOW);
            let present = state.store.changes_since(from, &[]).await?;
            let now = Instant::now();
            let gaps: Vec<(u64, Instant)> = (from + 1..last)
                .filter(|id| !present.iter().any(|c| c.id == *id))
                .map(|id| (id, now))
                .collect();
            Ok::<_, crate::error::DbError>((last, gaps))
        };
        match start.await {
            Ok(found) => break found,
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    state.cache.arm();
    state.health.cache_armed.store(true, Ordering::SeqCst);
    let mut tick = tokio::time::interval(state.config.invalidation_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let mut last_ok = Instant::now();
    // How long skipped ids are watched: at least a few polls, however long the interval.
    let patience = GAP_PATIENCE.max(state.config.invalidation_interval * 4);
    loop {
        tick.tick().await;
        // Skipped ids are given up after a while, and beyond MAX_GAPS (oldest first), also
        // while polls fail: an auto-increment step above 1 (Galera, group replication) leaves
        // gaps on every write, and an id list without bound would make every poll fail.
        let now = Instant::now();
        gaps.retain(|(_, seen)| now.duration_since(*seen) < patience);
        gaps.drain(..gaps.len().saturating_sub(MAX_GAPS));
        let gap_ids: Vec<u64> = gaps.iter().map(|(id, _)| *id).collect();
        let changes = match state.store.changes_since(last, &gap_ids).await {
            Ok(c) => c,
            Err(e) => {
                if !failing {
                    warn!(state.log, "change-log poll failed: until it works again, other replicas' writes reach this cache only when entries expire (KV_CACHE_TTL)";
                        "error" => e.to_string());
                    failing = true;
                }
                continue;
            }
        };
        if failing {
            info!(state.log, "change-log poll works again");
            failing = false;
        }
        // A poll that did not work (or run: a frozen process) for longer than skipped ids are
        // watched cannot tell what it missed: ids that committed late, or rows the purge
        // trimmed meanwhile. Nothing cached before then is trusted.
        if now.duration_since(last_ok) >= patience {
            state.cache.clear();
            warn!(state.log, "the change-log poll was out of action: cache cleared";
                "seconds" => now.duration_since(last_ok).as_secs());
        }
        last_ok = now;
        for c in &changes {
            if c.id > last {
                note_skipped(&mut gaps, last, c.id, now);
                last = c.id;
            }
            gaps.retain(|(id, _)| *id != c.id);
            state.cache.invalidate(&c.key, c.id).await;
        }
    }
}

/// Remembers the ids skipped between `last` and a newly seen `id`, the highest `MAX_GAPS` of
/// them: those are the ones that may still commit. (After an idle deployment's change log is
/// purged empty, `last` starts at 0 while ids are in the millions: the lowest ids of such a
/// range are long gone, and remembering them instead would miss the writes in flight.)
fn note_skipped(gaps: &mut Vec<(u64, Instant)>, last: u64, id: u64, now: Instant) {
    let from = (last + 1).max(id.saturating_sub(MAX_GAPS as u64));
    gaps.extend((from..id).map(|skipped| (skipped, now)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    #[test]
    fn skipped_change_ids_remembered_are_the_highest() {
        let now = Instant::now();
        let mut gaps = Vec::new();
        note_skipped(&mut gaps, 0, 5_000_000, now);
        assert_eq!(gaps.len(), MAX_GAPS);
        assert_eq!(gaps.first().unwrap().0, 5_000_000 - MAX_GAPS as u64);
        assert_eq!(
            gaps.last().unwrap().0,
            4_999_999,
            "the id just below the new one"
        );
        let mut gaps = Vec::new();
        note_skipped(&mut gaps, 10, 14, now);
        assert_eq!(gaps.iter().map(|g| g.0).collect::<Vec<_>>(), [11, 12, 13]);
        note_skipped(&mut gaps, 14, 15, now);
        assert_eq!(gaps.len(), 3, "no id skipped between consecutive ids");
    }

    #[test]
    fn the_open_files_limit_bounds_the_connections() {
        let vars = |max: &str| {
            [
                ("KV_DATABASE_URL", "mysql://kv@db:3306/kvstore"),
                ("KV_MAX_CONNECTIONS", max),
                ("KV_DB_POOL_MAX", "16"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
        };
        let config = Config::from_vars(&vars("4096")).unwrap();
        assert_eq!(connection_limit(&config, 1_048_576), 4096);
        // containerd 2.x's 1024: room for the pools (16 + 2) and the others.
        assert_eq!(connection_limit(&config, 1024), 1024 - 64 - 64 - 18);
        assert_eq!(connection_limit(&config, 10), 1);
        // The limit is raised to the hard limit, and never lowered.
        let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
        assert_eq!(raise_open_files_limit(), hard.min(1 << 20));
        assert_eq!(
            rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap().0,
            hard.min(1 << 20)
        );
    }

    /// The timer of a connection that has received nothing yet (so the header timeout
    /// applies: the durations of these tests are hyper's).
    fn new_connection() -> ConnectionTimer {
        ConnectionTimer::with(
            Arc::default(),
            Duration::from_secs(5),
            Duration::from_secs(75),
        )
    }

    /// An answered connection waits `KV_IDLE_TIMEOUT` for its next request; once that
    /// request's first bytes come, its head has `KV_HEADER_READ_TIMEOUT` from then.
    #[tokio::test(start_paused = true)]
    async fn idle_connections_wait_the_idle_timeout_and_heads_the_header_timeout() {
        let s = Duration::from_secs;
        let clock = Arc::new(RequestClock::new());
        let timer = ConnectionTimer::with(clock.clone(), s(1), s(10));
        let now = || tokio::time::Instant::now();

        // New connection: hyper's deadline (the header timeout from accept).
        let start = now();
        timer.sleep(s(1)).await;
        assert_eq!(now() - start, s(1));

        // Answered, then idle: the idle timeout, not hyper's 1 s.
        clock.responded();
        let start = now();
        timer.sleep(s(1)).await;
        assert_eq!(now() - start, s(10));

        // Idle for 3 s, then a request's first bytes: 1 s from those bytes.
        clock.responded();
        let start = now();
        let mut sleep = timer.sleep(s(1));
        assert!(tokio::time::timeout(s(3), &mut sleep).await.is_err());
        clock.bytes_read(now().into_std());
        sleep.await;
        assert_eq!(now() - start, s(4));

        // Bytes read after the response but before hyper began to wait (the rest of a body
        // it drained): the connection is still idle.
        clock.responded();
        clock.bytes_read(now().into_std());
        tokio::time::advance(s(2)).await;
        let start = now();
        timer.sleep(s(1)).await;
        assert_eq!(now() - start, s(10));
    }

    /// Waits for `sleep`, returning how long that took.
    async fn waited(sleep: Pin<Box<dyn hyper::rt::Sleep>>) -> Duration {
        let t = tokio::time::Instant::now();
        sleep.await;
        t.elapsed()
    }

    #[tokio::test]
    async fn each_head_sleep_fires_at_its_own_deadline() {
        let timer = new_connection();
        let ms = Duration::from_millis;

        // A sleep polled (so the connection's Sleep is registered), then dropped: a later one
        // extends the deadline and does not fire at the first one's.
        let mut first = timer.sleep(ms(100));
        assert!(tokio::time::timeout(ms(20), &mut first).await.is_err());
        drop(first);
        let took = waited(timer.sleep(ms(250))).await;
        assert!(took >= ms(250), "fired after {took:?}, before its deadline");
        assert!(took < ms(1500), "fired after {took:?}");

        // The connection's Sleep has fired: a new one is re-armed, it does not fire at once.
        let took = waited(timer.sleep(ms(100))).await;
        assert!(took >= ms(100), "fired after {took:?}, before its deadline");

        // An earlier deadline than the one armed still fires on time.
        let mut long = timer.sleep(ms(5000));
        assert!(tokio::time::timeout(ms(20), &mut long).await.is_err());
        drop(long);
        let took = waited(timer.sleep(ms(50))).await;
        assert!(took >= ms(50), "fired after {took:?}, before its deadline");
        assert!(
            took < ms(1500),
            "fired after {took:?}: the earlier deadline was not armed"
        );
    }

    #[tokio::test]
    async fn connections_do_not_share_a_deadline() {
        let ms = Duration::from_millis;
        let (a, b) = (new_connection(), new_connection());
        let mut long = a.sleep(ms(5000));
        assert!(tokio::time::timeout(ms(20), &mut long).await.is_err());
        let took = waited(b.sleep(ms(50))).await;
        assert!(took < ms(1500), "fired after {took:?}");
        assert!(tokio::time::timeout(ms(20), &mut long).await.is_err());
    }
}
