//! Coalescing (`store::coalesce`): concurrent point reads go to the database as one
//! `SELECT … IN (…)`, concurrent plain writes as one transaction. Each request must still get
//! exactly its own answer, a failed batch must leave nothing behind, and the counter stays
//! exact.

use std::collections::HashSet;

use futures_util::future::join_all;
use mysql_async::prelude::*;
use serde_json::{json, Value};

use crate::common::*;

/// `(count, sum)` of `kvstore_db_batch_size` for one operation.
async fn batches(app: &TestApp, op: &str) -> (u64, u64) {
    let text = app.metrics_text().await;
    let sample = |name: &str| -> u64 {
        let prefix = format!("kvstore_db_batch_size_{name}{{operation=\"{op}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
            .trim()
            .parse::<f64>()
            .unwrap() as u64
    };
    (sample("count"), sample("sum"))
}

/// The revision in an ETag (`"<rev>"`, maybe weak).
fn rev_of(etag: &str) -> u64 {
    etag.trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .unwrap_or_else(|_| panic!("ETag {etag} is not a revision"))
}

/// `(version, rev)` of the writes of one key, sorted by version: a newer version must carry a
/// newer revision, or caches (ordered by revision) would keep the older entry.
fn assert_revisions_follow_versions(writes: &[(u64, u64)]) {
    for pair in writes.windows(2) {
        assert!(
            pair[0].1 < pair[1].1,
            "version {} has revision {} but version {} has revision {}",
            pair[0].0,
            pair[0].1,
            pair[1].0,
            pair[1].1
        );
    }
}

async fn writes_total(app: &TestApp) -> u64 {
    app.stats().await["writes_total"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_plain_writes_share_transactions_and_each_gets_its_own_result() {
    let (app, db) = spawn_app(&[]).await;
    let before = writes_total(&app).await;
    let (b0, s0) = batches(&app, "upsert").await;
    // 150 distinct keys and 50 writes of one key, all at once.
    let requests = (0..200).map(|i| {
        let app = &app;
        async move {
            let key = if i < 150 {
                format!("co/k{i:03}")
            } else {
                "co/same".to_string()
            };
            let r = app.put_value(&key, json!({ "i": i })).await;
            let status = r.status().as_u16();
            let etag = r.headers()["etag"].to_str().unwrap().to_string();
            let body: Value = r.json().await.unwrap();
            (i, key, status, etag, body)
        }
    });
    let answers = join_all(requests).await;
    let mut same_versions = Vec::new();
    let mut etags = HashSet::new();
    let mut last_same = None;
    for (i, key, status, etag, body) in &answers {
        assert_eq!(
            body["key"],
            json!(key),
            "request {i} got another request's entry"
        );
        assert_eq!(body["value"], json!({ "i": i }), "request {i}");
        assert!(etags.insert(etag.clone()), "ETag {etag} given twice");
        if *i < 150 {
            assert_eq!(*status, 201, "request {i}");
            assert_eq!(body["version"], 1);
        } else {
            let v = body["version"].as_u64().unwrap();
            assert_eq!(*status, if v == 1 { 201 } else { 200 }, "request {i}");
            if v == 50 {
                last_same = Some(body["value"].clone());
            }
            same_versions.push((v, rev_of(etag)));
        }
    }
    same_versions.sort_unstable();
    assert_eq!(
        same_versions.iter().map(|(v, _)| *v).collect::<Vec<u64>>(),
        (1..=50).collect::<Vec<u64>>()
    );
    assert_revisions_follow_versions(&same_versions);
    let newest: Value = app.get("/v1/keys/co/same").await.json().await.unwrap();
    assert_eq!(newest["version"], 50);
    assert_eq!(Some(newest["value"].clone()), last_same);

    assert_eq!(
        writes_total(&app).await,
        before + 200,
        "writes_total is exact"
    );
    let (b1, s1) = batches(&app, "upsert").await;
    assert_eq!(s1 - s0, 200, "every plain write went through the coalescer");
    assert!(
        b1 - b0 < 200,
        "200 concurrent writes ran in {} batches",
        b1 - b0
    );
    // Every entry's revision is its own change-log row.
    let mut conn = db.conn().await;
    let linked: Option<u64> = conn
        .query_first(
            "SELECT COUNT(*) FROM kv_entries e JOIN kv_changes c ON c.id = e.rev AND c.k = e.k \
             WHERE e.k LIKE 'co/%'",
        )
        .await
        .unwrap();
    assert_eq!(linked, Some(151));
    let logged: Option<u64> = conn
        .query_first("SELECT COUNT(*) FROM kv_changes WHERE k LIKE 'co/%'")
        .await
        .unwrap();
    assert_eq!(logged, Some(200), "one change-log row per write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_batch_leaves_nothing_and_acknowledges_nothing() {
    let (app, db) = spawn_app(&[]).await;
    let mut conn = db.conn().await;
    // One key the database refuses: the batch holding it fails as a whole.
    conn.query_drop(
        "CREATE TRIGGER refuse_bad BEFORE INSERT ON kv_entries FOR EACH ROW \
         BEGIN IF NEW.k = 'fb/bad' THEN \
         SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused by the test'; END IF; END",
    )
    .await
    .unwrap();
    let before = writes_total(&app).await;
    let requests = (0..120).map(|i| {
        let app = &app;
        async move {
            let key = if i % 10 == 0 {
                "fb/bad".to_string()
            } else {
                format!("fb/k{i:03}")
            };
            let status = app.put_value(&key, json!(i)).await.status().as_u16();
            (key, status)
        }
    });
    let answers = join_all(requests).await;
    let mut acknowledged = 0;
    for (key, status) in &answers {
        let stored: Option<u64> = conn
            .exec_first("SELECT COUNT(*) FROM kv_entries WHERE k = ?", (key,))
            .await
            .unwrap();
        let logged: Option<u64> = conn
            .exec_first("SELECT COUNT(*) FROM kv_changes WHERE k = ?", (key,))
            .await
            .unwrap();
        match status {
            201 => {
                acknowledged += 1;
                assert_eq!(
                    (stored, logged),
                    (Some(1), Some(1)),
                    "{key} was acknowledged"
                );
            }
            500 => assert_eq!(
                (stored, logged),
                (Some(0), Some(0)),
                "{key} failed but left rows behind"
            ),
            other => panic!("{key}: unexpected status {other}"),
        }
    }
    assert!(
        answers.iter().all(|(k, s)| k != "fb/bad" || *s == 500),
        "the refused key never succeeds"
    );
    assert!(
        acknowledged > 0,
        "writes outside the failing batches succeed"
    );
    assert_eq!(writes_total(&app).await, before + acknowledged);
    // A failed batch never leaves a stale entry in the cache either.
    let r = app.get("/v1/keys/fb/bad").await;
    assert_problem(r, 404, "not_found").await;
    // The refusal is a 500 `internal` problem whose detail shows neither the SQL nor the
    // database's message (the log line with the same request id has them).
    let doc = assert_problem(app.put_value("fb/bad", json!(0)).await, 500, "internal").await;
    let detail = doc["detail"].as_str().unwrap().to_lowercase();
    for leak in [
        "refused by the test",
        "45000",
        "insert",
        "kv_entries",
        "select",
        "trigger",
    ] {
        assert!(!detail.contains(leak), "detail leaks {leak:?}: {detail}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_share_a_select_and_each_gets_its_own_entry() {
    let db = TestDb::new().await;
    let mut writer = spawn_app_on(&db.url, &[]).await;
    for chunk in (0..300).collect::<Vec<u32>>().chunks(50) {
        join_all(chunk.iter().map(|i| {
            let writer = &writer;
            async move {
                let r = writer
                    .put_value(&format!("cm/k{i:03}"), json!({ "n": i }))
                    .await;
                assert_eq!(r.status(), 201);
            }
        }))
        .await;
    }
    writer.stop().await;
    // A new instance: every read below is a miss.
    let app = spawn_app_on(&db.url, &[]).await;
    let (b0, s0) = batches(&app, "get").await;
    let reads = (0..400u32).map(|i| {
        let app = &app;
        async move {
            let r = app.get(&format!("/v1/keys/cm/k{i:03}")).await;
            let status = r.status().as_u16();
            (i, status, r.json::<Value>().await.unwrap())
        }
    });
    for (i, status, body) in join_all(reads).await {
        if i < 300 {
            assert_eq!(status, 200, "cm/k{i:03}");
            assert_eq!(body["key"], format!("cm/k{i:03}"));
            assert_eq!(body["value"], json!({ "n": i }));
        } else {
            assert_eq!(status, 404, "cm/k{i:03} does not exist");
            assert_eq!(body["code"], "not_found");
        }
    }
    let (b1, s1) = batches(&app, "get").await;
    assert_eq!(s1 - s0, 400, "every miss went through the coalescer");
    assert!(
        b1 - b0 < 400,
        "400 concurrent misses ran in {} batches",
        b1 - b0
    );
}

/// Writes that are never batched (values over 64 KiB: one `kv_put_v2` call each), racing on
/// one key: each newer version carries a newer revision, and the cache ends on the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_single_writes_of_one_key_get_revisions_in_version_order() {
    let (app, _db) = spawn_app(&[]).await;
    let big = "x".repeat(70 * 1024);
    let requests = (0..30).map(|i| {
        let (app, big) = (&app, &big);
        async move {
            let r = app.put_value("co/big", json!({ "i": i, "pad": big })).await;
            assert!(r.status().is_success(), "write {i}: {}", r.status());
            let etag = r.headers()["etag"].to_str().unwrap().to_string();
            let body: Value = r.json().await.unwrap();
            (body["version"].as_u64().unwrap(), rev_of(&etag))
        }
    });
    let mut writes = join_all(requests).await;
    writes.sort_unstable();
    assert_eq!(
        writes.iter().map(|(v, _)| *v).collect::<Vec<u64>>(),
        (1..=30).collect::<Vec<u64>>()
    );
    assert_revisions_follow_versions(&writes);
    let newest = app.get("/v1/keys/co/big").await;
    assert_eq!(
        rev_of(newest.headers()["etag"].to_str().unwrap()),
        writes[29].1
    );
}
