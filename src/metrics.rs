//! The Prometheus registry and every metric the service exports (README "Observability").
//!
//! Labels are bounded: HTTP metrics are labelled by method, route *template* and status
//! class, database metrics by operation — never by key.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::api::route;

const HTTP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Database operations, the `operation` label of the database metrics.
pub const DB_OPERATIONS: &[&str] = &[
    "get", "list", "upsert", "delete", "stats", "ping", "purge", "poll", "migrate",
];

pub struct Metrics {
    pub registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    /// The counter and histogram of each (method, route, status class), looked up once:
    /// `with_label_values` hashes the labels and takes a lock on every call.
    http_series: Box<[OnceLock<(IntCounter, Histogram)>]>,
    pub http_in_flight: IntGauge,
    /// Open connections and their limit, by listener (`api`, `metrics`).
    pub http_connections: IntGaugeVec,
    pub http_connections_max: IntGaugeVec,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub cache_entries: IntGauge,
    pub cache_size_bytes: IntGauge,
    pub cache_capacity_bytes: IntGauge,
    pub cache_evictions: IntCounterVec,
    pub cache_invalidations: IntCounter,
    pub db_duration: HistogramVec,
    pub db_errors: IntCounterVec,
    /// Requests per coalesced database batch (point reads, plain writes).
    db_batch: HistogramVec,
    pub db_pool_in_use: IntGauge,
    pub db_pool_max: IntGauge,
    pub db_pool_waiting: IntGauge,
    pub db_up: IntGauge,
    pub ready: IntGauge,
    pub writes: IntCounterVec,
    pub expired_purged: IntCounter,
}

impl Metrics {
    pub fn new(version: &str, revision: &str) -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        let build_info = reg(
            r,
            IntGaugeVec::new(
                Opts::new("kvstore_build_info", "Build information; always 1."),
                &["version", "revision"],
            ),
        );
        build_info.with_label_values(&[version, revision]).set(1);

        let http_labels = &["method", "route", "status_class"];
        let db_buckets = HTTP_BUCKETS.to_vec();
        let m = Metrics {
            http_requests: reg(
                r,
                IntCounterVec::new(
                    Opts::new("kvstore_http_requests_total", "HTTP requests answered."),
                    http_labels,
                ),
            ),
            http_duration: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "kvstore_http_request_duration_seconds",
                        "Time from request head received to response head ready.",
                    )
                    .buckets(HTTP_BUCKETS.to_vec()),
                    http_labels,
                ),
            ),
            http_series: (0..METHODS.len() * route::ALL.len() * STATUS_CLASSES.len())
                .map(|_| OnceLock::new())
                .collect(),
            http_in_flight: reg(
                r,
                IntGauge::new("kvstore_http_requests_in_flight", "HTTP requests being served."),
            ),
            http_connections: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "kvstore_http_connections_open",
                        "Open client connections, by listener (api, metrics).",
                    ),
                    &["listener"],
                ),
            ),
            http_connections_max: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "kvstore_http_connections_max",
                        "Connections a listener serves at once; more wait to be accepted.",
                    ),
                    &["listener"],
                ),
            ),
            cache_hits: reg(
                r,
                IntCounter::new("kvstore_cache_hits_total", "Reads answered from the cache."),
            ),
            cache_misses: reg(
                r,
                IntCounter::new(
                    "kvstore_cache_misses_total",
                    "Reads that queried the database (misses and Cache-Control: no-cache bypasses).",
                ),
            ),
            cache_entries: reg(
                r,
                IntGauge::new("kvstore_cache_entries", "Entries in the cache (incl. negative)."),
            ),
            cache_size_bytes: reg(
                r,
                IntGauge::new("kvstore_cache_size_bytes", "Weighted size of the cache in bytes."),
            ),
            cache_capacity_bytes: reg(
                r,
                IntGauge::new("kvstore_cache_capacity_bytes", "The cache's byte budget."),
            ),
            cache_evictions: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "kvstore_cache_evictions_total",
                        "Entries evicted from the cache, by cause (size or expired).",
                    ),
                    &["cause"],
                ),
            ),
            cache_invalidations: reg(
                r,
                IntCounter::new(
                    "kvstore_cache_invalidations_total",
                    "Cached entries dropped because another replica changed the key.",
                ),
            ),
            db_duration: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "kvstore_db_query_duration_seconds",
                        "Database operation latency (incl. waiting for a connection).",
                    )
                    .buckets(db_buckets),
                    &["operation"],
                ),
            ),
            db_errors: reg(
                r,
                IntCounterVec::new(
                    Opts::new("kvstore_db_errors_total", "Failed database operations."),
                    &["operation"],
                ),
            ),
            db_batch: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "kvstore_db_batch_size",
                        "Requests that went to the database together in one coalesced batch.",
                    )
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
                    &["operation"],
                ),
            ),
            db_pool_in_use: reg(
                r,
                IntGauge::new(
                    "kvstore_db_pool_connections_in_use",
                    "Pool connections currently checked out.",
                ),
            ),
            db_pool_max: reg(
                r,
                IntGauge::new("kvstore_db_pool_connections_max", "Pool size limit."),
            ),
            db_pool_waiting: reg(
                r,
                IntGauge::new("kvstore_db_pool_waiting", "Operations waiting for a connection."),
            ),
            db_up: reg(
                r,
                IntGauge::new("kvstore_db_up", "1 if the last database ping succeeded."),
            ),
            ready: reg(r, IntGauge::new("kvstore_ready", "1 if /readyz answers 200.")),
            writes: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "kvstore_writes_total",
                        "Acknowledged writes on this instance (upsert, delete).",
                    ),
                    &["operation"],
                ),
            ),
            expired_purged: reg(
                r,
                IntCounter::new(
                    "kvstore_expired_purged_total",
                    "Expired entries removed by the background purge.",
                ),
            ),
            registry,
        };
        // Pre-create the bounded label sets so dashboards and alerts see zeros, not gaps.
        for op in DB_OPERATIONS {
            m.db_errors.with_label_values(&[op]);
        }
        for op in ["get", "upsert"] {
            m.db_batch.with_label_values(&[op]);
        }
        for cause in ["size", "expired"] {
            m.cache_evictions.with_label_values(&[cause]);
        }
        for op in ["upsert", "delete"] {
            m.writes.with_label_values(&[op]);
        }
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = m.registry.register(Box::new(pc));
        }
        m
    }

    /// Counts an answered request and observes its duration. `method` is a `method_label`,
    /// `route` one of `route::ALL`.
    pub fn observe_http(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let index = |labels: &[&str], label: &str| {
            labels
                .iter()
                .position(|l| *l == label)
                .unwrap_or(labels.len() - 1)
        };
        let (m, r) = (index(&METHODS, method), index(&route::ALL, route));
        let c = status_class_index(status);
        let slot = (m * route::ALL.len() + r) * STATUS_CLASSES.len() + c;
        let (count, duration) = self.http_series[slot].get_or_init(|| {
            let labels = [METHODS[m], route::ALL[r], STATUS_CLASSES[c]];
            (
                self.http_requests.with_label_values(&labels),
                self.http_duration.with_label_values(&labels),
            )
        });
        count.inc();
        duration.observe(elapsed.as_secs_f64());
    }

    pub fn db_timer(&self, operation: &'static str) -> prometheus::HistogramTimer {
        self.db_duration
            .with_label_values(&[operation])
            .start_timer()
    }

    /// Observes the size of a coalesced batch (`operation`: `get` or `upsert`).
    pub fn db_batch_size(&self, operation: &'static str, requests: usize) {
        self.db_batch
            .with_label_values(&[operation])
            .observe(requests as f64);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

/// Holds a gauge one higher while alive, even when the future holding it is dropped
/// (requests in flight, connections checked out, operations waiting for one).
pub struct GaugeGuard<'a>(&'a IntGauge);

impl<'a> GaugeGuard<'a> {
    pub fn hold(g: &'a IntGauge) -> Self {
        g.inc();
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// HTTP method labels, bounded: anything else is `OTHER`.
pub const METHODS: [&str; 6] = ["GET", "HEAD", "PUT", "POST", "DELETE", "OTHER"];
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

pub fn method_label(m: &warp::http::Method) -> &'static str {
    METHODS[..METHODS.len() - 1]
        .iter()
        .find(|l| **l == m.as_str())
        .unwrap_or(&"OTHER")
}

fn status_class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    c: prometheus::Result<C>,
) -> C {
    let c = c.expect("metric definition is valid");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pre-resolved series carry the labels they were asked for, one series each.
    #[test]
    fn http_series_are_labelled_by_method_route_and_class() {
        let m = Metrics::new("0", "test");
        let ms = Duration::from_millis(3);
        m.observe_http("GET", route::KEY, 200, ms);
        m.observe_http("GET", route::KEY, 204, ms);
        m.observe_http("OTHER", route::UNMATCHED, 404, ms);
        m.observe_http("POST", route::KEYS, 503, ms);
        m.observe_http("DELETE", route::OPENAPI, 101, ms);
        let text = String::from_utf8(m.render()).unwrap();
        for series in [
            r#"kvstore_http_requests_total{method="GET",route="/v1/keys/{key}",status_class="2xx"} 2"#,
            r#"kvstore_http_requests_total{method="OTHER",route="unmatched",status_class="4xx"} 1"#,
            r#"kvstore_http_requests_total{method="POST",route="/v1/keys",status_class="5xx"} 1"#,
            r#"kvstore_http_requests_total{method="DELETE",route="/openapi.json",status_class="1xx"} 1"#,
            r#"kvstore_http_request_duration_seconds_count{method="GET",route="/v1/keys/{key}",status_class="2xx"} 2"#,
        ] {
            assert!(text.contains(series), "missing {series} in\n{text}");
        }
        let series = text
            .lines()
            .filter(|l| l.starts_with("kvstore_http_requests_total{"))
            .count();
        assert_eq!(series, 4, "{text}");
    }

    #[test]
    fn method_labels_are_bounded() {
        use warp::http::Method;
        assert_eq!(method_label(&Method::PUT), "PUT");
        assert_eq!(method_label(&Method::OPTIONS), "OTHER");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "OTHER");
    }
}
