//! Writes run as text batches whose transactions mysql_async does not know about
//! (`store::batch`): a failed or abandoned batch must never leave a transaction open.

use std::time::{Duration, Instant};

use kvstore::store::batch::ServerTx;
use mysql_async::prelude::*;

use crate::common::*;

/// A pool of exactly one connection, so the next checkout is the same session.
fn one_connection_pool(db: &TestDb) -> mysql_async::Pool {
    let opts = mysql_async::OptsBuilder::from_opts(mysql_async::Opts::from_url(&db.url).unwrap())
        .pool_opts(
            mysql_async::PoolOpts::default()
                .with_constraints(mysql_async::PoolConstraints::new(1, 1).unwrap())
                .with_reset_connection(false),
        );
    mysql_async::Pool::new(opts)
}

/// A fresh database with an empty table `t`, a direct connection to look behind the pool's
/// back, and a pool of one connection.
async fn with_table_t() -> (TestDb, mysql_async::Conn, mysql_async::Pool) {
    let db = TestDb::new().await;
    let mut admin = db.conn().await;
    admin
        .query_drop("CREATE TABLE t (id INT PRIMARY KEY) ENGINE=InnoDB")
        .await
        .unwrap();
    let pool = one_connection_pool(&db);
    (db, admin, pool)
}

async fn rows_in_t(admin: &mut mysql_async::Conn) -> u64 {
    admin
        .query_first("SELECT COUNT(*) FROM t")
        .await
        .unwrap()
        .unwrap()
}

async fn open_transactions_of(conn: &mut mysql_async::Conn, id: u32) -> u64 {
    conn.exec_first(
        "SELECT COUNT(*) FROM information_schema.innodb_trx WHERE trx_mysql_thread_id = ?",
        (id,),
    )
    .await
    .unwrap()
    .unwrap()
}

#[tokio::test]
async fn an_error_in_a_later_statement_is_returned_and_rolls_back() {
    let (_db, mut admin, pool) = with_table_t().await;
    let conn = pool.get_conn().await.unwrap();
    let session = conn.id();
    let mut tx = ServerTx::new(conn);
    let err = tx
        .batch(
            "START TRANSACTION; INSERT INTO t VALUES (1); \
             INSERT INTO no_such_table VALUES (1); COMMIT"
                .into(),
        )
        .await
        .expect_err("the third statement fails");
    assert!(err.to_string().contains("1146"), "{err}");
    drop(tx);

    // The same session comes back from the pool with nothing open...
    let conn = pool.get_conn().await.unwrap();
    assert_eq!(conn.id(), session, "the session was kept (ROLLBACK worked)");
    assert_eq!(open_transactions_of(&mut admin, session).await, 0);
    // ...so the next transaction on it cannot commit the half-done one.
    let mut next = ServerTx::new(conn);
    next.batch("START TRANSACTION; COMMIT".into())
        .await
        .unwrap();
    next.finish();
    let rows = rows_in_t(&mut admin).await;
    assert_eq!(rows, 0, "the row of the failed batch was committed");
    pool.disconnect().await.unwrap();
}

#[tokio::test]
async fn an_abandoned_batch_ends_its_session() {
    let (_db, mut admin, pool) = with_table_t().await;
    let conn = pool.get_conn().await.unwrap();
    let session = conn.id();
    let mut tx = ServerTx::new(conn);
    // As when the query timeout drops the future mid-batch.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(300),
        tx.batch("START TRANSACTION; INSERT INTO t VALUES (2); SELECT SLEEP(1)".into()),
    )
    .await;
    assert!(abandoned.is_err(), "the batch should still be running");
    drop(tx);

    let deadline = Instant::now() + Duration::from_secs(10);
    while open_transactions_of(&mut admin, session).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the abandoned transaction is still open"
        );
        // information_schema.innodb_trx is a cache that a read refreshes only when the
        // previous read is at least 100 ms old.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let conn = pool.get_conn().await.unwrap();
    assert_ne!(
        conn.id(),
        session,
        "the abandoned session went back to the pool"
    );
    let rows = rows_in_t(&mut admin).await;
    assert_eq!(rows, 0);
    drop(conn);
    pool.disconnect().await.unwrap();
}
