//! Transactions in few round trips: a multi-statement text batch (`START TRANSACTION;
//! SELECT … FOR UPDATE`) or a stored procedure that begins and commits its own transaction
//! (`CALL kv_put_v2(…)`, sql/0004_put_lock_first.sql) instead of one round trip per statement.
//!
//! Client data never reaches the SQL as text: keys and values go in as hexadecimal literals
//! (`X'6b6579'`), which mean the same bytes whatever the connection's character set or
//! `sql_mode` (`NO_BACKSLASH_ESCAPES`) is; everything else is an integer or a timestamp the
//! service formats itself.
//!
//! mysql_async tracks only the transactions it starts itself, so [`ServerTx`] makes sure a
//! transaction begun by a batch or a procedure never goes back to the pool open: an error rolls it back
//! (the error of a later statement is only seen by draining the result, which `batch`
//! does), and a batch abandoned half-way (the query timeout drops the future) closes the
//! connection, which makes the server roll it back. (mysql_async already discards a
//! connection whose I/O was interrupted inside one of its routines; `Drop` covers the rest.)

use mysql_async::prelude::*;
use mysql_async::{Conn, Row};

use crate::time::{Micros, Rfc3339Micros};

/// SQL text under construction: ASCII bytes (hexadecimal, digits, the service's own SQL).
/// A batch of writes carries every key five times and every value once, as hexadecimal, and
/// four timestamps per write: these are written byte by byte, without `fmt`.
#[derive(Default)]
pub struct Sql(Vec<u8>);

impl Sql {
    pub fn with_capacity(bytes: usize) -> Sql {
        Sql(Vec::with_capacity(bytes))
    }

    /// Literal SQL written by the service (never client data).
    pub fn raw(&mut self, sql: &str) -> &mut Sql {
        self.0.extend_from_slice(sql.as_bytes());
        self
    }

    /// Arbitrary bytes as a hexadecimal literal.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Sql {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.0.reserve(3 + 2 * b.len());
        self.0.extend_from_slice(b"X'");
        for &byte in b {
            self.0.push(HEX[usize::from(byte >> 4)]);
            self.0.push(HEX[usize::from(byte & 0xf)]);
        }
        self.0.push(b'\'');
        self
    }

    pub fn uint(&mut self, n: u64) -> &mut Sql {
        self.raw(itoa::Buffer::new().format(n))
    }

    /// A DATETIME(6) literal (`'2026-11-22 19:54:48.123456'`), or NULL.
    pub fn datetime(&mut self, us: Option<Micros>) -> &mut Sql {
        let Some(us) = us else {
            return self.raw("NULL");
        };
        let ts = Rfc3339Micros::new(us);
        let ts = ts.as_str(); // 2026-11-22T19:54:48.123456Z
        self.raw("'")
            .raw(&ts[..10])
            .raw(" ")
            .raw(&ts[11..ts.len() - 1])
            .raw("'")
    }

    pub fn into_string(self) -> String {
        String::from_utf8(self.0).expect("SQL text is built from ASCII and &str only")
    }
}

/// The rows of every result set. The error of a statement after the first is kept as a
/// pending result, which `is_empty` does not see: dropping the result returns it.
async fn all_rows<P: mysql_async::prelude::Protocol>(
    mut result: mysql_async::QueryResult<'_, 'static, P>,
) -> Result<Vec<Row>, mysql_async::Error> {
    let mut rows = Vec::new();
    while !result.is_empty() {
        rows.append(&mut result.collect::<Row>().await?);
    }
    result.drop_result().await?;
    Ok(rows)
}

/// A connection whose transaction was begun by SQL, out of mysql_async's sight (see the
/// module docs).
pub struct ServerTx {
    conn: Option<Conn>,
}

impl ServerTx {
    pub fn new(conn: Conn) -> ServerTx {
        ServerTx { conn: Some(conn) }
    }

    /// Runs a text batch and returns the rows of all its result sets (in practice: of the
    /// one SELECT in it). On error the transaction is rolled back before the error is
    /// returned.
    pub async fn batch(&mut self, sql: String) -> Result<Vec<Row>, mysql_async::Error> {
        let conn = self.conn.as_mut().expect("ServerTx used after it ended");
        let r = async {
            let result = conn.query_iter(sql).await?;
            all_rows(result).await
        }
        .await;
        self.rolled_back_on_error(r).await
    }

    /// Executes a prepared statement (a CALL), like [`ServerTx::batch`].
    pub async fn exec(
        &mut self,
        stmt: &str,
        params: impl Into<mysql_async::Params> + Send,
    ) -> Result<Vec<Row>, mysql_async::Error> {
        let conn = self.conn.as_mut().expect("ServerTx used after it ended");
        let r = async {
            let result = conn.exec_iter(stmt, params).await?;
            all_rows(result).await
        }
        .await;
        self.rolled_back_on_error(r).await
    }

    async fn rolled_back_on_error<T>(
        &mut self,
        r: Result<T, mysql_async::Error>,
    ) -> Result<T, mysql_async::Error> {
        if r.is_err() {
            self.rollback().await;
        }
        r
    }

    /// Ends the transaction without committing. If even ROLLBACK fails, the connection is
    /// closed instead of going back to the pool.
    pub async fn rollback(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            if conn.query_drop("ROLLBACK").await.is_err() {
                let _ = conn.disconnect().await;
            }
        }
    }

    /// The transaction has ended (its batch committed): the connection goes back to the pool.
    pub fn finish(mut self) {
        self.conn.take();
    }
}

impl Drop for ServerTx {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Abandoned mid-transaction: the session must end so the server rolls it back.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = conn.disconnect().await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        let mut sql = Sql::default();
        sql.raw("SELECT ")
            .bytes(b"k'\\\0\xff")
            .raw(", ")
            .uint(42)
            .raw(", ")
            .datetime(Some(1_700_000_000_123_456))
            .raw(", ")
            .datetime(None)
            .raw(", ")
            .bytes(b"");
        assert_eq!(
            sql.into_string(),
            "SELECT X'6b275c00ff', 42, '2023-11-14 22:13:20.123456', NULL, X''"
        );
    }

    /// Timestamp literals name the same instant as the driver's own rendering of the
    /// DATETIME(6) parameter, over years 0000–9999.
    #[test]
    fn datetimes_agree_with_the_driver() {
        for us in crate::time::sample_instants(-62_167_219_200_000_000) {
            let mut sql = Sql::default();
            sql.datetime(Some(us));
            let ours = sql.into_string();
            let theirs = crate::time::to_sql(us).as_sql(true);
            // The driver leaves out a zero time of day and a zero fraction; the literals mean
            // the same either way.
            let mut theirs = theirs.trim_matches('\'').to_owned();
            if theirs.len() == 10 {
                theirs.push_str(" 00:00:00");
            }
            if !theirs.contains('.') {
                theirs.push_str(".000000");
            }
            assert_eq!(ours, format!("'{theirs}'"), "{us}");
        }
    }
}
