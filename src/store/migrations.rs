//! Schema migrations: the numbered files of `sql/`, embedded in the binary, applied in order
//! under a MySQL named lock (`GET_LOCK`) so that replicas starting together are safe, and
//! recorded in `kv_schema_migrations`. A migration's statements and its record commit in one
//! transaction where MySQL allows it (DML); DDL commits implicitly, so schema files are
//! written to be re-runnable (`IF NOT EXISTS`, `INSERT IGNORE`).

use mysql_async::prelude::*;
use mysql_async::{Conn, TxOpts};

pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every file of `sql/`, in order. Released files are never edited: add a new one.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_schema.sql",
        sql: include_str!("../../sql/0001_schema.sql"),
    },
    Migration {
        version: 2,
        name: "0002_initial_dataset.sql",
        sql: include_str!("../../sql/0002_initial_dataset.sql"),
    },
];

/// How long a starting replica waits for another one that is migrating.
const LOCK_WAIT_SECONDS: u32 = 60;

/// Splits a migration file into statements: `--` comment lines are dropped and a statement
/// ends with `;` at the end of a line.
pub fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with("--") {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if trimmed.ends_with(';') {
            let stmt = current.trim().trim_end_matches(';').trim().to_owned();
            if !stmt.is_empty() {
                out.push(stmt);
            }
            current.clear();
        }
    }
    let rest = current.trim();
    if !rest.is_empty() {
        out.push(rest.to_owned());
    }
    out
}

/// Applies the pending migrations; returns the versions applied by this call.
pub async fn apply(conn: &mut Conn) -> Result<Vec<u32>, mysql_async::Error> {
    let lock_name = format!(
        "kvstore.migrate.{}",
        conn.opts().db_name().unwrap_or_default()
    );
    let got: Option<Option<i64>> = conn
        .exec_first(
            "SELECT GET_LOCK(?, ?)",
            (lock_name.as_str(), LOCK_WAIT_SECONDS),
        )
        .await?;
    if got.flatten() != Some(1) {
        return Err(mysql_async::Error::Other(
            format!("could not take the migration lock within {LOCK_WAIT_SECONDS} s").into(),
        ));
    }
    let result = apply_locked(conn).await;
    let released: Result<Option<Option<i64>>, _> = conn
        .exec_first("SELECT RELEASE_LOCK(?)", (lock_name.as_str(),))
        .await;
    let applied = result?;
    released?;
    Ok(applied)
}

async fn apply_locked(conn: &mut Conn) -> Result<Vec<u32>, mysql_async::Error> {
    conn.query_drop(
        "CREATE TABLE IF NOT EXISTS kv_schema_migrations (\
           version    INT UNSIGNED NOT NULL PRIMARY KEY,\
           name       VARCHAR(255) NOT NULL,\
           applied_at DATETIME(6)  NOT NULL\
         ) ENGINE=InnoDB",
    )
    .await?;
    let done: Vec<u32> = conn
        .query("SELECT version FROM kv_schema_migrations")
        .await?;
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
        let mut tx = conn.start_transaction(TxOpts::default()).await?;
        for stmt in statements(m.sql) {
            tx.query_drop(stmt).await?;
        }
        tx.exec_drop(
            "INSERT INTO kv_schema_migrations (version, name, applied_at) \
             VALUES (?, ?, UTC_TIMESTAMP(6))",
            (m.version, m.name),
        )
        .await?;
        tx.commit().await?;
        applied.push(m.version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sql_file_is_embedded_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/sql");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let embedded: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(files, embedded);
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }

    #[test]
    fn splits_statements() {
        let s =
            statements("-- c\nCREATE TABLE a (x INT);\n\nINSERT INTO a VALUES\n  (1),\n  (2);\n");
        assert_eq!(
            s,
            vec![
                "CREATE TABLE a (x INT)",
                "INSERT INTO a VALUES\n  (1),\n  (2)"
            ]
        );
        assert_eq!(statements(MIGRATIONS[1].sql).len(), 2);
    }
}
