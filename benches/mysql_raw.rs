//! The database's own ceiling for `just bench`: raw mysql_async at a given concurrency, no HTTP,
//! no cache, with the service's pool settings (src/config.rs: pool of KV_DB_POOL_MAX
//! connections, no reset between uses, idle connections kept for 60 s, statement cache, the
//! same session init, TCP_NODELAY).
//!
//!   mysql_raw select URL KEYS [CONCURRENCY] [SECONDS] [POOL_MAX]
//!       point SELECTs by primary key on kv_entries, the service's own query, random keys
//!       `miss/0000000`..`miss/{KEYS-1}` (bulk-loaded by scripts/bench.sh)
//!   mysql_raw upsert URL RUN_ID [CONCURRENCY] [SECONDS] [POOL_MAX]
//!       single-row autocommit upserts of distinct keys into its own table `bench_raw`
//!       (durable: the server runs with innodb_flush_log_at_trx_commit=1)
//!
//! Defaults: concurrency 64, 10 s, pool 16. Prints one line:
//! `BENCH_RESULT requests=N duration_us=D p50_us=P p99_us=Q errors=E`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use mysql_async::{Pool, Value};

/// The service's read of one key (src/store/mod.rs `select_in`, which filters expired rows
/// itself, as this does below).
const SELECT: &str = "SELECT k, v, version, rev, created_at, updated_at, expires_at \
                      FROM kv_entries WHERE k = ?";
const UPSERT: &str =
    "INSERT INTO bench_raw (k, v) VALUES (?, ?) ON DUPLICATE KEY UPDATE v = VALUES(v)";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Select,
    Upsert,
}

/// xorshift64*: enough randomness for key choice, no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: mysql_raw select URL KEYS [CONCURRENCY] [SECONDS] [POOL_MAX]\n       \
         mysql_raw upsert URL RUN_ID [CONCURRENCY] [SECONDS] [POOL_MAX]"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        usage();
    }
    let mode = match args[0].as_str() {
        "select" => Mode::Select,
        "upsert" => Mode::Upsert,
        _ => usage(),
    };
    let url = args[1].clone();
    let third = args[2].clone();
    let num = |i: usize, default: u64| -> u64 {
        args.get(i)
            .map(|v| v.parse().unwrap_or_else(|_| usage()))
            .unwrap_or(default)
    };
    let concurrency = num(3, 64) as usize;
    let seconds = num(4, 10);
    let pool_max = num(5, 16) as usize;
    let keys = if mode == Mode::Select {
        third.parse::<u64>().unwrap_or_else(|_| usage())
    } else {
        0
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mysql-raw")
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        // The service's own pool settings (bounds, session settings, statement cache).
        let opts = kvstore::config::database_config(&url, None, 2.min(pool_max), pool_max)
            .expect("a mysql:// URL naming a database")
            .opts()
            .clone();
        let pool = Pool::new(opts);
        if mode == Mode::Upsert {
            let mut c = pool.get_conn().await.expect("connect");
            c.query_drop(
                "CREATE TABLE IF NOT EXISTS bench_raw (k VARBINARY(512) NOT NULL PRIMARY KEY, \
                 v LONGBLOB NOT NULL) ENGINE=InnoDB",
            )
            .await
            .expect("create bench_raw");
        }
        // Warm the pool and the statement caches for a fair start (the service's pool is warm
        // too when its scenarios start).
        {
            let mut conns = Vec::new();
            for _ in 0..pool_max {
                conns.push(pool.get_conn().await.expect("connect"));
            }
            for c in &mut conns {
                let _ = c
                    .prep(if mode == Mode::Select { SELECT } else { UPSERT })
                    .await;
            }
        }

        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let value = format!("{{\"value\":{{\"n\":1,\"s\":\"{}\"}}}}", "y".repeat(64));
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(concurrency);
        for t in 0..concurrency {
            let (pool, stop, errors) = (pool.clone(), stop.clone(), errors.clone());
            let (run_id, value) = (third.clone(), value.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((t as u64 + 1) * 0x1000_0001));
                let mut lat: Vec<u32> = Vec::with_capacity(64 * 1024);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let began = Instant::now();
                    let r = async {
                        let mut conn = pool.get_conn().await?;
                        match mode {
                            Mode::Select => {
                                let k = format!("miss/{:07}", rng.next() % keys);
                                let row: Option<mysql_async::Row> =
                                    conn.exec_first(SELECT, (k.as_bytes(),)).await?;
                                let now = kvstore::time::now_micros();
                                let live =
                                    row.and_then(|mut r| r.take::<Value, _>(6))
                                        .is_some_and(|e| {
                                            kvstore::time::from_sql(&e).is_none_or(|e| e > now)
                                        });
                                if !live {
                                    return Err(mysql_async::Error::Other(
                                        format!("key {k} not found").into(),
                                    ));
                                }
                            }
                            Mode::Upsert => {
                                let k = format!("raw/{run_id}/{t}/{i}");
                                conn.exec_drop(UPSERT, (k.as_bytes(), value.as_bytes()))
                                    .await?;
                            }
                        }
                        Ok::<_, mysql_async::Error>(())
                    }
                    .await;
                    i += 1;
                    match r {
                        Ok(()) => {
                            lat.push(began.elapsed().as_micros().min(u32::MAX as u128) as u32)
                        }
                        Err(e) => {
                            if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("mysql_raw: {e}");
                            }
                        }
                    }
                }
                lat
            }));
        }
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all: Vec<u32> = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        let elapsed = start.elapsed();
        all.sort_unstable();
        let pct = |p: f64| -> u32 {
            if all.is_empty() {
                0
            } else {
                all[((all.len() - 1) as f64 * p).round() as usize]
            }
        };
        println!(
            "BENCH_RESULT requests={} duration_us={} p50_us={} p99_us={} errors={}",
            all.len(),
            elapsed.as_micros(),
            pct(0.50),
            pct(0.99),
            errors.load(Ordering::Relaxed)
        );
        pool.disconnect().await.ok();
    });
}
