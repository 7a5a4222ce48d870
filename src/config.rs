//! Every `KV_*` setting in one place: its default, its parsing and its validation.
//!
//! A wrong value stops start-up with one sentence naming the variable (exit code 2, see
//! `main.rs`). Secrets (the database password, API tokens) live in types whose `Debug` is
//! redacted, so `{:?}` of the whole config is safe to log.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use mysql_async::{Opts, OptsBuilder};

/// Largest value size we accept for `KV_MAX_VALUE_BYTES`: the smallest default
/// `max_allowed_packet` of the supported servers (MariaDB 10.11: 16 MiB) minus headroom.
const MAX_VALUE_BYTES_CEILING: usize = 15 * 1024 * 1024;

/// The longest any duration setting may be.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Idle time before the kernel probes a database connection (then its own interval and count
/// apply: with Linux's defaults, a dead peer is found ≈ 11 minutes later).
const DB_TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// A configuration error: one sentence for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// An API token, kept only as its SHA-256 digest: `api::auth` compares digests, so the
/// token itself is not held after start-up, and `Debug` shows nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken([u8; 32]);

impl ApiToken {
    pub fn new(token: &str) -> ApiToken {
        use sha2::{Digest, Sha256};
        ApiToken(Sha256::digest(token.as_bytes()).into())
    }

    pub fn digest(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"[redacted]\"")
    }
}

/// Database connection settings. `Debug` shows the URL without its password.
#[derive(Clone)]
pub struct DatabaseConfig {
    /// The URL with any password removed (safe to log).
    pub display_url: String,
    opts: Opts,
}

impl DatabaseConfig {
    pub fn opts(&self) -> &Opts {
        &self.opts
    }

    /// The name of the database (schema) the service works in.
    pub fn db_name(&self) -> &str {
        self.opts.db_name().unwrap_or_default()
    }

    /// TLS to the database, verified against the CA certificates of the PEM file at `path`
    /// and only those (a provider's CA such as RDS's `global-bundle.pem`, or a cluster CA).
    /// The file is read once, here: a CA that rotates means a restart (a rollout). Host-name
    /// checking stays on unless the URL turns it off (`verify_identity=false`).
    fn with_ca_file(self, path: &str) -> Result<DatabaseConfig, ConfigError> {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let pem = std::fs::read(path)
            .map_err(|e| err(format!("KV_DATABASE_CA_FILE: cannot read {path}: {e}")))?;
        // Checked as the driver will use it at every connection (into a root store), so a
        // truncated or corrupt file stops the start instead of failing every connection.
        let bad = |what: String| err(format!("KV_DATABASE_CA_FILE: {path}: {what}"));
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| bad(format!("not a readable PEM file ({e})")))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("a certificate is not usable as a CA ({e})")))?;
        }
        if roots.is_empty() {
            return Err(bad(
                "holds no PEM certificate (no -----BEGIN CERTIFICATE----- block)".into(),
            ));
        }
        let ssl = self.opts.ssl_opts().cloned().unwrap_or_default();
        if ssl.accept_invalid_certs() {
            return Err(err(
                "KV_DATABASE_CA_FILE asks for a verified server certificate, but KV_DATABASE_URL turns verification off (verify_ca=false): drop one of them",
            ));
        }
        let ssl = ssl
            .with_root_certs(vec![pem.into()])
            .with_disable_built_in_roots(true);
        Ok(DatabaseConfig {
            opts: OptsBuilder::from_opts(self.opts).ssl_opts(Some(ssl)).into(),
            ..self
        })
    }

    /// Whether connections use TLS (from the URL's `require_ssl`, or `KV_DATABASE_CA_FILE`).
    pub fn tls(&self) -> bool {
        self.opts.ssl_opts().is_some()
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &self.display_url)
            .field("password", &"[redacted]")
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warning,
    Error,
}

impl LogLevel {
    pub fn as_slog(self) -> slog::Level {
        match self {
            LogLevel::Trace => slog::Level::Trace,
            LogLevel::Debug => slog::Level::Debug,
            LogLevel::Info => slog::Level::Info,
            LogLevel::Warning => slog::Level::Warning,
            LogLevel::Error => slog::Level::Error,
        }
    }
}

/// The whole service configuration. Defaults are listed in README.md ("Configuration").
#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    pub listen_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub max_value_bytes: usize,
    pub api_tokens: Vec<ApiToken>,
    pub auth_reads: bool,
    pub cache_ttl: Duration,
    pub cache_negative_ttl: Duration,
    pub cache_max_bytes: u64,
    pub db_pool_min: usize,
    pub db_pool_max: usize,
    /// Bounds the background readiness ping and each start-up connection attempt.
    pub db_connect_timeout: Duration,
    pub db_acquire_timeout: Duration,
    pub db_query_timeout: Duration,
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    /// How long an answered keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Request bodies held in memory at once, all requests together.
    pub body_memory_bytes: usize,
    /// Open connections the API port serves at once; more wait in the listen backlog.
    pub max_connections: usize,
    pub shutdown_delay: Duration,
    pub shutdown_timeout: Duration,
    pub purge_interval: Duration,
    pub invalidation_interval: Duration,
    pub log_level: LogLevel,
    pub access_log: bool,
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("KV_"))
            .collect();
        Config::from_vars(&vars)
    }

    /// Reads the configuration from a map of variables (the environment, or a test's map).
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let env = Env(vars);
        let database = database_config(
            env.get("KV_DATABASE_URL")
                .ok_or_else(|| err("KV_DATABASE_URL is required, e.g. mysql://kvstore:secret@127.0.0.1:3306/kvstore"))?,
            env.get("KV_DATABASE_PASSWORD"),
            env.parse("KV_DB_POOL_MIN", 2usize)?,
            env.parse("KV_DB_POOL_MAX", 16usize)?,
        )?;
        let database = match env.get("KV_DATABASE_CA_FILE") {
            Some(path) => database.with_ca_file(path)?,
            None => database,
        };

        let mut api_tokens: Vec<ApiToken> = Vec::new();
        if let Some(list) = env.get("KV_API_TOKENS") {
            api_tokens.extend(split_tokens(list.split(',')));
        }
        if let Some(path) = env.get("KV_API_TOKENS_FILE") {
            let text = std::fs::read_to_string(path)
                .map_err(|e| err(format!("KV_API_TOKENS_FILE: cannot read {path}: {e}")))?;
            api_tokens.extend(split_tokens(text.lines()));
        }
        // Set at all, even to nothing, means auth was asked for: an empty Secret or a
        // template that rendered blank must stop the start, never open the writes.
        if (vars.contains_key("KV_API_TOKENS") || vars.contains_key("KV_API_TOKENS_FILE"))
            && api_tokens.is_empty()
        {
            return Err(err(
                "KV_API_TOKENS / KV_API_TOKENS_FILE is set but holds no token (unset it to run without auth)",
            ));
        }
        let auth_reads = env.bool("KV_AUTH_READS", false)?;
        if auth_reads && api_tokens.is_empty() {
            return Err(err(
                "KV_AUTH_READS=true needs tokens: set KV_API_TOKENS or KV_API_TOKENS_FILE",
            ));
        }

        let max_value_bytes = env.parse("KV_MAX_VALUE_BYTES", 1024 * 1024usize)?;
        if !(1..=MAX_VALUE_BYTES_CEILING).contains(&max_value_bytes) {
            return Err(err(format!(
                "KV_MAX_VALUE_BYTES must be between 1 and {MAX_VALUE_BYTES_CEILING}, got {max_value_bytes}"
            )));
        }

        let config = Config {
            database,
            listen_addr: env.parse("KV_LISTEN_ADDR", "0.0.0.0:8080".parse().unwrap())?,
            metrics_addr: env.parse("KV_METRICS_ADDR", "0.0.0.0:9090".parse().unwrap())?,
            max_value_bytes,
            api_tokens,
            auth_reads,
            cache_ttl: env.duration("KV_CACHE_TTL", "30s")?,
            cache_negative_ttl: env.duration("KV_CACHE_NEGATIVE_TTL", "2s")?,
            cache_max_bytes: env.parse("KV_CACHE_MAX_BYTES", 64 * 1024 * 1024u64)?,
            db_pool_min: env.parse("KV_DB_POOL_MIN", 2usize)?,
            db_pool_max: env.parse("KV_DB_POOL_MAX", 16usize)?,
            db_connect_timeout: env.duration("KV_DB_CONNECT_TIMEOUT", "3s")?,
            db_acquire_timeout: env.duration("KV_DB_ACQUIRE_TIMEOUT", "2s")?,
            db_query_timeout: env.duration("KV_DB_QUERY_TIMEOUT", "3s")?,
            request_timeout: env.duration("KV_REQUEST_TIMEOUT", "10s")?,
            header_read_timeout: env.duration("KV_HEADER_READ_TIMEOUT", "5s")?,
            idle_timeout: env.duration("KV_IDLE_TIMEOUT", "75s")?,
            max_connections: env.parse("KV_MAX_CONNECTIONS", 4096usize)?,
            body_memory_bytes: env.parse("KV_BODY_MEMORY_BYTES", 32 * 1024 * 1024usize)?,
            shutdown_delay: env.duration("KV_SHUTDOWN_DELAY", "5s")?,
            shutdown_timeout: env.duration("KV_SHUTDOWN_TIMEOUT", "20s")?,
            purge_interval: env.duration("KV_PURGE_INTERVAL", "30s")?,
            invalidation_interval: env.duration("KV_INVALIDATION_INTERVAL", "250ms")?,
            log_level: log_level(env.get("KV_LOG_LEVEL").unwrap_or("info"))?,
            access_log: env.bool("KV_ACCESS_LOG", true)?,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("KV_CACHE_TTL", self.cache_ttl),
            ("KV_CACHE_NEGATIVE_TTL", self.cache_negative_ttl),
            ("KV_DB_CONNECT_TIMEOUT", self.db_connect_timeout),
            ("KV_DB_ACQUIRE_TIMEOUT", self.db_acquire_timeout),
            ("KV_DB_QUERY_TIMEOUT", self.db_query_timeout),
            ("KV_REQUEST_TIMEOUT", self.request_timeout),
            ("KV_HEADER_READ_TIMEOUT", self.header_read_timeout),
            ("KV_IDLE_TIMEOUT", self.idle_timeout),
            ("KV_SHUTDOWN_TIMEOUT", self.shutdown_timeout),
            ("KV_PURGE_INTERVAL", self.purge_interval),
            ("KV_INVALIDATION_INTERVAL", self.invalidation_interval),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, d)| d.is_zero()) {
            return Err(err(format!("{name} must be greater than zero")));
        }
        // Deadlines are instants plus these: a duration of centuries would overflow them.
        let shutdown_delay = ("KV_SHUTDOWN_DELAY", self.shutdown_delay);
        if let Some((name, _)) = positive
            .iter()
            .chain([&shutdown_delay])
            .find(|(_, d)| *d > MAX_DURATION)
        {
            return Err(err(format!("{name} must be at most 24h")));
        }
        if self.db_pool_max == 0 || self.db_pool_max > 1000 {
            return Err(err("KV_DB_POOL_MAX must be between 1 and 1000"));
        }
        let body_limit = crate::api::keys::body_limit(self.max_value_bytes);
        if self.body_memory_bytes < body_limit || self.body_memory_bytes > 1 << 40 {
            return Err(err(format!(
                "KV_BODY_MEMORY_BYTES must hold at least one request body of the largest size \
                 ({body_limit} bytes with KV_MAX_VALUE_BYTES={}), and be at most 1 TiB",
                self.max_value_bytes
            )));
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(err("KV_MAX_CONNECTIONS must be between 1 and 1000000"));
        }
        if self.db_pool_min > self.db_pool_max {
            return Err(err(format!(
                "KV_DB_POOL_MIN ({}) must not exceed KV_DB_POOL_MAX ({})",
                self.db_pool_min, self.db_pool_max
            )));
        }
        if self.cache_max_bytes < 64 * 1024 && self.cache_max_bytes != 0 {
            return Err(err(
                "KV_CACHE_MAX_BYTES must be 0 (cache off) or at least 65536",
            ));
        }
        Ok(())
    }

    /// Whether writes (and with `KV_AUTH_READS`, reads) need a bearer token.
    pub fn auth_enabled(&self) -> bool {
        !self.api_tokens.is_empty()
    }
}

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

fn split_tokens<'a>(
    parts: impl Iterator<Item = &'a str> + 'a,
) -> impl Iterator<Item = ApiToken> + 'a {
    parts
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.starts_with('#'))
        .map(ApiToken::new)
}

fn log_level(s: &str) -> Result<LogLevel, ConfigError> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "trace" => LogLevel::Trace,
        "debug" => LogLevel::Debug,
        "info" => LogLevel::Info,
        "warn" | "warning" => LogLevel::Warning,
        "error" => LogLevel::Error,
        other => {
            return Err(err(format!(
                "KV_LOG_LEVEL must be one of trace, debug, info, warning, error, got {other:?}"
            )))
        }
    })
}

/// The connection options of every pool to `url`: pool bounds, session settings, statement
/// cache (also used by `benches/mysql_raw.rs`, so its baseline runs with the same settings).
pub fn database_config(
    url: &str,
    password: Option<&str>,
    pool_min: usize,
    pool_max: usize,
) -> Result<DatabaseConfig, ConfigError> {
    // Never echo the URL back: it may hold a password.
    let bad = || {
        err("KV_DATABASE_URL must look like mysql://user:password@host:3306/dbname (the value given is not a valid MySQL URL)")
    };
    if !url.starts_with("mysql://") {
        return Err(bad());
    }
    let opts = Opts::from_url(url).map_err(|_| bad())?;
    let db = opts.db_name().unwrap_or_default().to_owned();
    // The driver takes the path's first segment as the database and ignores the rest, so
    // `…/kvstore/extra` or `…/kvstore/` would quietly use `kvstore`.
    let path = url["mysql://".len()..]
        .split_once('/')
        .map_or("", |(_, p)| p.split(['?', '#']).next().unwrap_or_default());
    if !db.is_empty() && path != db {
        return Err(err(
            "the path of KV_DATABASE_URL must be one database name, e.g. mysql://user:password@host:3306/kvstore",
        ));
    }
    if db.is_empty() {
        return Err(err(
            "KV_DATABASE_URL must name a database, e.g. mysql://user:password@host:3306/kvstore",
        ));
    }
    if !db
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(err(
            "the database name in KV_DATABASE_URL may only contain letters, digits, '_' and '-'",
        ));
    }
    let display_url = format!(
        "mysql://{}@{}:{}/{}",
        opts.user().unwrap_or("root"),
        opts.ip_or_hostname(),
        opts.tcp_port(),
        db
    );
    let pool_max = pool_max.max(1);
    let constraints = mysql_async::PoolConstraints::new(pool_min.min(pool_max), pool_max)
        .ok_or_else(|| err("KV_DB_POOL_MIN must not exceed KV_DB_POOL_MAX"))?;
    // TCP keepalive (unless the URL sets `tcp_keepalive`): a connection whose peer vanished
    // without a FIN (a node lost, a firewall dropping state) is found dead by the kernel
    // instead of after two hours. It matters for the statements that have no query timeout,
    // the migrations at start-up; the rest are bounded by `KV_DB_QUERY_TIMEOUT` anyway.
    let keepalive = opts.tcp_keepalive().or(Some(DB_TCP_KEEPALIVE));
    // TCP only, unless the URL asks for the socket (`prefer_socket=true`). The driver's
    // default, for a loopback address, asks the server for its Unix socket path and switches
    // to that path on this machine: through a tunnel or a proxy on 127.0.0.1 that can be a
    // different server with the same path, holding other data.
    let url_sets_socket = url.split_once('?').is_some_and(|(_, q)| {
        q.split('&')
            .any(|p| p.split('=').next() == Some("prefer_socket"))
    });
    let prefer_socket = url_sets_socket && opts.prefer_socket();
    let mut builder = OptsBuilder::from_opts(opts)
        // No COM_RESET_CONNECTION between uses: the service keeps no session state, and a
        // reset would drop every prepared statement (a prepare round trip per query).
        // Idle connections are kept (up to the max) for a minute: with the driver's default
        // (0) every connection above the minimum is closed on return, so a busy pool opens
        // and closes thousands of connections a second.
        .pool_opts(
            mysql_async::PoolOpts::default()
                .with_constraints(constraints)
                .with_reset_connection(false)
                .with_inactive_connection_ttl(std::time::Duration::from_secs(60))
                .with_ttl_check_interval(std::time::Duration::from_secs(15)),
        )
        // Writes use READ COMMITTED: no gap locks, so concurrent creates of one key do not
        // deadlock; strict mode makes the server refuse rather than truncate.
        .init(vec![
            "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'",
            "SET SESSION time_zone = '+00:00'",
        ])
        .stmt_cache_size(64)
        .tcp_nodelay(true)
        .tcp_keepalive(keepalive)
        .prefer_socket(prefer_socket);
    if let Some(pw) = password {
        builder = builder.pass(Some(pw));
    }
    Ok(DatabaseConfig {
        display_url,
        opts: builder.into(),
    })
}

struct Env<'a>(&'a HashMap<String, String>);

impl Env<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|s| s.trim()).filter(|s| !s.is_empty())
    }

    fn parse<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw.parse().map_err(|_| {
                err(format!(
                    "{name} has an invalid value {raw:?} (expected {})",
                    std::any::type_name::<T>()
                        .rsplit("::")
                        .next()
                        .unwrap_or("a value")
                ))
            }),
        }
    }

    fn bool(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name).map(str::to_ascii_lowercase).as_deref() {
            None => Ok(default),
            Some("true" | "1" | "yes" | "on") => Ok(true),
            Some("false" | "0" | "no" | "off") => Ok(false),
            Some(other) => Err(err(format!("{name} must be true or false, got {other:?}"))),
        }
    }

    fn duration(&self, name: &str, default: &str) -> Result<Duration, ConfigError> {
        let raw = self.get(name).unwrap_or(default);
        humantime::parse_duration(raw).map_err(|_| {
            err(format!(
                "{name} must be a duration such as \"250ms\", \"5s\" or \"1m\", got {raw:?}"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const URL: (&str, &str) = (
        "KV_DATABASE_URL",
        "mysql://kv:hunter2secret@db:3306/kvstore",
    );

    #[test]
    fn defaults() {
        let c = Config::from_vars(&vars(&[URL])).unwrap();
        assert_eq!(c.listen_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:9090");
        assert_eq!(c.max_value_bytes, 1 << 20);
        assert_eq!(c.cache_ttl, Duration::from_secs(30));
        assert_eq!(c.invalidation_interval, Duration::from_millis(250));
        assert_eq!(c.max_connections, 4096);
        assert_eq!(c.body_memory_bytes, 32 << 20);
        assert_eq!(c.idle_timeout, Duration::from_secs(75));
        assert!(!c.auth_enabled());
        assert_eq!(c.database.db_name(), "kvstore");
        assert_eq!(c.database.opts().tcp_keepalive(), Some(DB_TCP_KEEPALIVE));
        assert!(!c.database.opts().prefer_socket(), "TCP only by default");
        let c = Config::from_vars(&vars(&[(
            "KV_DATABASE_URL",
            "mysql://kv@127.0.0.1:3306/kvstore?prefer_socket=true",
        )]))
        .unwrap();
        assert!(
            c.database.opts().prefer_socket(),
            "unless the URL asks for it"
        );
        let c = Config::from_vars(&vars(&[(
            "KV_DATABASE_URL",
            "mysql://kv@db:3306/kvstore?tcp_keepalive=5000",
        )]))
        .unwrap();
        assert_eq!(
            c.database.opts().tcp_keepalive(),
            Some(Duration::from_secs(5)),
            "the URL's own setting wins"
        );
    }

    #[test]
    fn missing_or_malformed_url_is_one_sentence_without_the_password() {
        let e = Config::from_vars(&vars(&[])).unwrap_err().0;
        assert!(e.contains("KV_DATABASE_URL is required"), "{e}");
        let e = Config::from_vars(&vars(&[("KV_DATABASE_URL", "postgres://u:topsecret@h/db")]))
            .unwrap_err()
            .0;
        assert!(
            e.contains("KV_DATABASE_URL") && !e.contains("topsecret"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        // A path of more than one segment (the driver would use the first and drop the rest).
        for url in [
            "mysql://u:topsecret@h:3306/kvstore/extra",
            "mysql://u:topsecret@h:3306/kvstore/",
            "mysql://u:topsecret@h:3306/kvstore/../other",
        ] {
            let e = Config::from_vars(&vars(&[("KV_DATABASE_URL", url)]))
                .unwrap_err()
                .0;
            assert!(
                e.contains("one database name") && !e.contains("topsecret"),
                "{url}: {e}"
            );
        }
        for url in [
            "mysql://u:topsecret@h:3306/kvstore",
            "mysql://u:topsecret@h:3306/kvstore?require_ssl=true",
        ] {
            assert!(
                Config::from_vars(&vars(&[("KV_DATABASE_URL", url)])).is_ok(),
                "{url}"
            );
        }
    }

    #[test]
    fn password_never_in_debug() {
        let c = Config::from_vars(&vars(&[
            URL,
            ("KV_DATABASE_PASSWORD", "otherpassword42"),
            (
                "KV_API_TOKENS",
                "token-aaaaaaaaaaaaaaaa,token-bbbbbbbbbbbbbbbb",
            ),
        ]))
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2secret"), "{dbg}");
        assert!(!dbg.contains("otherpassword42"), "{dbg}");
        assert!(!dbg.contains("token-aaaa"), "{dbg}");
        assert_eq!(c.api_tokens.len(), 2);
        assert_eq!(c.database.opts().pass(), Some("otherpassword42"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (name, value) in [
            ("KV_LISTEN_ADDR", "nope"),
            ("KV_CACHE_TTL", "forever"),
            ("KV_CACHE_TTL", "0s"),
            ("KV_IDLE_TIMEOUT", "0s"),
            ("KV_IDLE_TIMEOUT", "300000000000y"),
            ("KV_HEADER_READ_TIMEOUT", "25h"),
            ("KV_SHUTDOWN_DELAY", "2d"),
            ("KV_MAX_VALUE_BYTES", "0"),
            ("KV_MAX_VALUE_BYTES", "999999999"),
            ("KV_DB_POOL_MAX", "0"),
            ("KV_MAX_CONNECTIONS", "0"),
            ("KV_BODY_MEMORY_BYTES", "1000"),
            ("KV_MAX_CONNECTIONS", "lots"),
            ("KV_AUTH_READS", "maybe"),
            ("KV_LOG_LEVEL", "loud"),
            ("KV_API_TOKENS", " , "),
            ("KV_API_TOKENS", ""),
            ("KV_API_TOKENS", "  "),
            ("KV_API_TOKENS_FILE", ""),
            ("KV_AUTH_READS", "true"),
        ] {
            let e = Config::from_vars(&vars(&[URL, (name, value)]))
                .unwrap_err()
                .0;
            assert!(
                e.contains(name) || e.contains("token"),
                "{name}={value}: {e}"
            );
        }
        let e = Config::from_vars(&vars(&[
            URL,
            ("KV_DB_POOL_MIN", "20"),
            ("KV_DB_POOL_MAX", "4"),
        ]))
        .unwrap_err()
        .0;
        assert!(e.contains("KV_DB_POOL_MIN"), "{e}");
    }

    /// A self-signed P-256 CA certificate, test data only (its key was thrown away).
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBlDCCATugAwIBAgIUCUKEYkwHYVJSuQ6viomlwK7+/z4wCgYIKoZIzj0EAwIw\nHzEdMBsGA1UEAwwUa3ZzdG9yZS11bml0LXRlc3QtY2EwIBcNMjYxMjAxMDYzNzI5\nWhgPMjEyNjExMDcwNjM3MjlaMB8xHTAbBgNVBAMMFGt2c3RvcmUtdW5pdC10ZXN0\nLWNhMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE1f4xRzmAdkeWM4BU1pyvnzyc\noFAWcHmdqGlOAbc6DD1Vgnf3kaAsGeVKUvVQ7eB0IpSMk75jQ71VrcmJnY50ZqNT\nMFEwHQYDVR0OBBYEFKq+iTs6E3l/3/EgNizb7487e0gjMB8GA1UdIwQYMBaAFKq+\niTs6E3l/3/EgNizb7487e0gjMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwID\nRwAwRAIgYKB1nCkXRvUUxj2anitz0LyUYZvnIGaCfD0QiISrsEsCIELh03UQva17\nUMQcMANHdZOJGgfJZv/jMk4SKgyjsALl\n-----END CERTIFICATE-----\n";

    #[test]
    fn database_ca_file() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("ca.pem");
        let cert = TEST_CA;
        std::fs::write(&pem, cert).unwrap();
        let pem = pem.to_str().unwrap();
        // Without it: no TLS unless the URL asks for it.
        assert!(!Config::from_vars(&vars(&[URL])).unwrap().database.tls());
        let c = Config::from_vars(&vars(&[URL, ("KV_DATABASE_CA_FILE", pem)])).unwrap();
        let ssl = c.database.opts().ssl_opts().expect("TLS is on");
        // The file is read at start (a buffer, not a path read at each connection).
        use futures_util::FutureExt;
        let [root] = ssl.root_certs() else {
            panic!("one root entry: {:?}", ssl.root_certs())
        };
        let bytes = root.read().now_or_never().expect("in memory").unwrap();
        assert_eq!(&*bytes, cert.as_bytes());
        assert!(ssl.disable_built_in_roots(), "only the given CA is trusted");
        assert!(!ssl.accept_invalid_certs() && !ssl.skip_domain_validation());
        // The URL's own TLS settings are kept.
        let url = "mysql://kv@db:3306/kvstore?require_ssl=true&verify_identity=false";
        let c = Config::from_vars(&vars(&[
            ("KV_DATABASE_URL", url),
            ("KV_DATABASE_CA_FILE", pem),
        ]))
        .unwrap();
        assert!(c
            .database
            .opts()
            .ssl_opts()
            .unwrap()
            .skip_domain_validation());
        // Refusals: a missing file, a file without a certificate, a damaged certificate,
        // verification turned off.
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let damaged = dir.path().join("damaged.pem");
        let mut lines: Vec<&str> = TEST_CA.lines().collect();
        lines.remove(3);
        std::fs::write(&damaged, lines.join("\n")).unwrap();
        let no_verify = "mysql://kv@db:3306/kvstore?require_ssl=true&verify_ca=false";
        for (url, path, expect) in [
            (
                URL.1,
                "/nonexistent/ca.pem",
                "cannot read /nonexistent/ca.pem",
            ),
            (URL.1, empty.to_str().unwrap(), "holds no PEM certificate"),
            (URL.1, damaged.to_str().unwrap(), "not usable as a CA"),
            (no_verify, pem, "verify_ca=false"),
        ] {
            let e = Config::from_vars(&vars(&[
                ("KV_DATABASE_URL", url),
                ("KV_DATABASE_CA_FILE", path),
            ]))
            .unwrap_err()
            .0;
            assert!(
                e.contains("KV_DATABASE_CA_FILE") && e.contains(expect),
                "{e}"
            );
        }
    }

    #[test]
    fn tokens_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# comment\nfile-token-0123456789\n\n").unwrap();
        let c = Config::from_vars(&vars(&[
            URL,
            ("KV_API_TOKENS_FILE", path.to_str().unwrap()),
        ]))
        .unwrap();
        assert_eq!(c.api_tokens, vec![ApiToken::new("file-token-0123456789")]);
    }
}
