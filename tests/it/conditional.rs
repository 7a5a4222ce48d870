//! ETags and conditional requests (API.md "Conditional requests").

use std::collections::HashSet;

use serde_json::json;

use crate::common::*;

fn etag(r: &reqwest::Response) -> String {
    r.headers()["etag"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn if_none_match_gives_304() {
    let (app, _db) = spawn_app(&[]).await;
    let r = app.put_value("k", json!(1)).await;
    let tag = etag(&r);
    assert!(
        tag.starts_with('"') && tag.ends_with('"'),
        "strong ETag: {tag}"
    );
    let r = app
        .client
        .get(app.url("/v1/keys/k"))
        .header("if-none-match", &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(etag(&r), tag);
    assert!(r.bytes().await.unwrap().is_empty());
    let r = app
        .client
        .get(app.url("/v1/keys/k"))
        .header("if-none-match", "\"999999\", ".to_string() + &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = app
        .client
        .get(app.url("/v1/keys/k"))
        .header("if-none-match", "\"999999\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // After a write the old ETag no longer matches.
    app.put_value("k", json!(2)).await;
    let r = app
        .client
        .get(app.url("/v1/keys/k"))
        .header("if-none-match", &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn if_match_guards_writes() {
    let (app, _db) = spawn_app(&[]).await;
    let tag1 = etag(&app.put_value("k", json!(1)).await);
    let r = app
        .client
        .put(app.url("/v1/keys/k"))
        .header("if-match", &tag1)
        .json(&json!({"value": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tag2 = etag(&r);
    // The stale ETag loses, and the value stays.
    let r = app
        .client
        .put(app.url("/v1/keys/k"))
        .header("if-match", &tag1)
        .json(&json!({"value": 3}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 412, "precondition_failed").await;
    let r = app
        .client
        .post(app.url("/v1/keys"))
        .header("if-match", &tag1)
        .json(&json!({"key": "k", "value": 3}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 412, "precondition_failed").await;
    let e: serde_json::Value = app.get("/v1/keys/k").await.json().await.unwrap();
    assert_eq!(
        (e["value"].clone(), e["version"].clone()),
        (json!(2), json!(2))
    );
    // If-Match on a missing key fails; `*` means "exists".
    let r = app
        .client
        .put(app.url("/v1/keys/missing"))
        .header("if-match", "*")
        .json(&json!({"value": 1}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 412, "precondition_failed").await;
    let r = app
        .client
        .put(app.url("/v1/keys/k"))
        .header("if-match", "*")
        .json(&json!({"value": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // DELETE with If-Match.
    let r = app
        .client
        .delete(app.url("/v1/keys/k"))
        .header("if-match", &tag2)
        .send()
        .await
        .unwrap();
    assert_problem(r, 412, "precondition_failed").await;
    let cur = etag(&app.get("/v1/keys/k").await);
    let r = app
        .client
        .delete(app.url("/v1/keys/k"))
        .header("if-match", &cur)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}

#[tokio::test]
async fn if_none_match_star_creates_only() {
    let (app, _db) = spawn_app(&[]).await;
    let put = |v: i32| {
        app.client
            .put(app.url("/v1/keys/once"))
            .header("if-none-match", "*")
            .json(&json!({"value": v}))
            .send()
    };
    assert_eq!(put(1).await.unwrap().status(), 201);
    assert_problem(put(2).await.unwrap(), 412, "precondition_failed").await;
    let r = app
        .client
        .post(app.url("/v1/keys"))
        .header("if-none-match", "*")
        .json(&json!({"key": "once", "value": 3}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 412, "precondition_failed").await;
    let e: serde_json::Value = app.get("/v1/keys/once").await.json().await.unwrap();
    assert_eq!(e["value"], 1);
    // Many concurrent create-only writes: exactly one wins.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let c = app.client.clone();
        let url = app.url("/v1/keys/race");
        tasks.push(tokio::spawn(async move {
            c.put(url)
                .header("if-none-match", "*")
                .json(&json!({"value": i}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    assert_eq!(codes.iter().filter(|c| **c == 201).count(), 1, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 412).count(), 15, "{codes:?}");
}

#[tokio::test]
async fn etags_never_repeat_across_delete_and_recreate() {
    let (app, _db) = spawn_app(&[]).await;
    let mut seen = HashSet::new();
    for round in 0..5 {
        for v in 0..3 {
            let r = app.put_value("aba", json!(v)).await;
            assert!(seen.insert(etag(&r)), "ETag repeated in round {round}");
            let got = app.get("/v1/keys/aba").await;
            assert!(seen.contains(&etag(&got)));
        }
        let before = etag(&app.get("/v1/keys/aba").await);
        assert_eq!(app.delete("aba").await.status(), 204);
        // A client holding the old ETag cannot write the re-created key with it.
        let r = app.put_value("aba", json!("again")).await;
        assert_eq!(r.status(), 201);
        let new = etag(&r);
        assert_ne!(new, before);
        seen.insert(new.clone());
        let r = app
            .client
            .put(app.url("/v1/keys/aba"))
            .header("if-match", &before)
            .json(&json!({"value": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 412);
        let e: serde_json::Value = app.get("/v1/keys/aba").await.json().await.unwrap();
        assert_eq!(e["version"], 1, "re-created key starts at version 1");
        assert_eq!(app.delete("aba").await.status(), 204);
    }
}

/// `If-None-Match: *` racing a create of the same key: exactly one of them creates it,
/// never one overwriting the other. Here the conditional write's first round trip (which
/// reads, or claims, the row) runs, its answer is held back by a proxy, and meanwhile
/// another client inserts the key; then the answer is let through. Before the fix the read
/// was a `SELECT … FOR UPDATE`, which under READ COMMITTED locks nothing when the row is
/// absent: the other insert committed, and the conditional write then went ahead and
/// replaced it (200). Found by a black-box review: 8 concurrent create-only PUTs gave a 201
/// and a 200.
#[tokio::test]
async fn if_none_match_star_never_overwrites_a_concurrent_create() {
    use crate::common::proxy::{Mode, Proxy};
    use kvstore::store::{Precondition, WriteOutcome};
    use mysql_async::prelude::Queryable;
    use std::time::Duration;
    let db = TestDb::new().await;
    let proxy = Proxy::start(db.server_addr()).await;
    // One connection, warmed by a conditional write, so the raced write needs no new one.
    let app = spawn_app_on(
        &db.url_via(proxy.addr),
        &[("KV_DB_POOL_MAX", "1"), ("KV_DB_POOL_MIN", "1")],
    )
    .await;
    let create_only = Precondition {
        if_match: None,
        if_none_match: Some(vec!["*".into()]),
    };
    let store = app.state().store.clone();
    let warm = store.upsert("warm", "1", None, &create_only).await.unwrap();
    assert!(matches!(warm, WriteOutcome::Created(_)), "{warm:?}");

    proxy.set(Mode::HoldResponses);
    let mine = tokio::spawn({
        let (store, pre) = (store.clone(), create_only.clone());
        async move { store.upsert("contended", "\"mine\"", None, &pre).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let theirs = tokio::spawn({
        let mut other = db.conn().await;
        async move {
            other
                .query_drop(
                    "INSERT INTO kv_entries (k, v, version, rev, created_at, updated_at, expires_at) \
                     VALUES ('contended', '\"theirs\"', 1, 999999, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), NULL)",
                )
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set(Mode::Pass);
    let mine = mine.await.unwrap().unwrap();
    let theirs = theirs.await.unwrap();
    match (&mine, &theirs) {
        // The conditional write claimed the key first; the other insert found it taken.
        (WriteOutcome::Created(_), Err(e)) => {
            assert!(e.to_string().contains("Duplicate"), "{e}")
        }
        // The other insert came first; the conditional write saw it.
        (WriteOutcome::PreconditionFailed, Ok(())) => {}
        _ => panic!("both wrote the key: {mine:?} / {theirs:?}"),
    }
}

/// A precondition header that is not `*` or a list of entity tags is refused (400), not
/// ignored: an ignored `If-None-Match` would let the write through unconditionally.
#[tokio::test]
async fn malformed_preconditions_are_refused() {
    let (app, _db) = spawn_app(&[]).await;
    let r = app.put_value("m", json!("before")).await;
    let tag = etag(&r);
    let bare = tag.trim_matches('"').to_string();
    for name in ["if-none-match", "if-match"] {
        for bad in [
            bare.as_str(),
            "\"unterminated",
            "W/",
            "\"a\" \"b\"",
            "*, \"zzz\"",
        ] {
            let r = app
                .client
                .put(app.url("/v1/keys/m"))
                .header(name, bad)
                .json(&json!({"value": "after"}))
                .send()
                .await
                .unwrap();
            let p = assert_problem(r, 400, "invalid_request").await;
            assert!(p["detail"].as_str().unwrap().contains("entity tags"), "{p}");
        }
    }
    let r = app
        .client
        .delete(app.url("/v1/keys/m"))
        .header("if-match", bare.as_str())
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "invalid_request").await;
    let e: serde_json::Value = app.get("/v1/keys/m").await.json().await.unwrap();
    assert_eq!(e["value"], "before", "nothing was written");
    // A read with a malformed If-None-Match simply gets the entry.
    let r = app
        .client
        .get(app.url("/v1/keys/m"))
        .header("if-none-match", bare.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// RFC 9110 §13.2.2 on reads: `If-Match` / `If-Unmodified-Since` can fail a read of an
/// existing entry (412), `If-None-Match` / `If-Modified-Since` make it a 304; a read that
/// would be a 404 ignores them all, and so does a read whose header cannot be read.
#[tokio::test]
async fn preconditions_on_reads() {
    let (app, _db) = spawn_app(&[]).await;
    let r = app.put_value("r", json!("v")).await;
    let tag = etag(&r);
    let modified = r.headers()["last-modified"].to_str().unwrap().to_string();
    let get = |method: reqwest::Method, key: &str, headers: &[(&str, &str)]| {
        let mut b = app
            .client
            .request(method, app.url(&format!("/v1/keys/{key}")));
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.send()
    };
    const EPOCH: &str = "Thu, 01 Jan 1970 00:00:00 GMT";
    let weak = format!("W/{tag}");
    let other = "\"other\", ".to_string() + &tag;
    let cases: &[(&[(&str, &str)], u16)] = &[
        (&[("if-match", &tag)], 200),
        (&[("if-match", &other)], 200),
        (&[("if-match", "*")], 200),
        (&[("if-match", "\"other\"")], 412),
        (&[("if-match", &weak)], 412),       // strong comparison
        (&[("if-match", "not-a-tag")], 200), // unreadable: ignored on a read
        (&[("if-unmodified-since", &modified)], 200),
        (&[("if-unmodified-since", EPOCH)], 412),
        // If-Match present: If-Unmodified-Since is not looked at
        (&[("if-match", &tag), ("if-unmodified-since", EPOCH)], 200),
        (&[("if-modified-since", &modified)], 304),
        (&[("if-modified-since", EPOCH)], 200),
        (&[("if-modified-since", "Thu Jan  1 00:00:00 1970")], 200), // asctime
        (&[("if-modified-since", "yesterday")], 200),
        // If-None-Match present: If-Modified-Since is not looked at
        (
            &[
                ("if-none-match", "\"other\""),
                ("if-modified-since", &modified),
            ],
            200,
        ),
        (
            &[("if-none-match", &tag), ("if-modified-since", EPOCH)],
            304,
        ),
        // a failed If-Match wins over a matching If-None-Match
        (&[("if-match", "\"other\""), ("if-none-match", &tag)], 412),
    ];
    for (headers, want) in cases {
        let r = get(reqwest::Method::GET, "r", headers).await.unwrap();
        assert_eq!(r.status(), *want, "GET with {headers:?}");
        match want {
            412 => {
                let p = assert_problem(r, 412, "precondition_failed").await;
                assert!(p["detail"].as_str().unwrap().contains("\"r\""), "{p}");
            }
            304 => {
                assert_eq!(etag(&r), tag, "{headers:?}");
                assert!(r.bytes().await.unwrap().is_empty(), "{headers:?}");
            }
            _ => assert_eq!(r.json::<serde_json::Value>().await.unwrap()["value"], "v"),
        }
        let r = get(reqwest::Method::HEAD, "r", headers).await.unwrap();
        assert_eq!(r.status(), *want, "HEAD with {headers:?}");
    }
    // A read that would be a 404 ignores its preconditions.
    for headers in [
        [("if-match", "\"other\"")],
        [("if-unmodified-since", EPOCH)],
    ] {
        let r = get(reqwest::Method::GET, "absent", &headers).await.unwrap();
        assert_problem(r, 404, "not_found").await;
    }
    // Only the entry's current ETag matches after a write.
    app.put_value("r", json!("w")).await;
    let r = get(reqwest::Method::GET, "r", &[("if-match", &tag)])
        .await
        .unwrap();
    assert_problem(r, 412, "precondition_failed").await;
}
