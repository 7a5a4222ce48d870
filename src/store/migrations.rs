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
    Migration {
        version: 3,
        name: "0003_put_procedure.sql",
        sql: include_str!("../../sql/0003_put_procedure.sql"),
    },
    Migration {
        version: 4,
        name: "0004_put_lock_first.sql",
        sql: include_str!("../../sql/0004_put_lock_first.sql"),
    },
];

/// How long a starting replica waits for another one that is migrating.
const LOCK_WAIT_SECONDS: u32 = 60;

/// Splits a migration file into statements as the mysql client does: `--` comment lines are
/// dropped, a statement ends with the delimiter (`;`) at the end of a line, and a
/// `DELIMITER //` line changes the delimiter (for stored procedures, whose bodies hold `;`).
pub fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut delimiter = ";".to_owned();
    let mut finish = |current: &mut String, delimiter: &str| {
        let stmt = current.trim();
        let stmt = stmt.strip_suffix(delimiter).unwrap_or(stmt).trim();
        if !stmt.is_empty() {
            out.push(stmt.to_owned());
        }
        current.clear();
    };
    for line in sql.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with("--") {
            continue;
        }
        if let Some(d) = trimmed.strip_prefix("DELIMITER ") {
            finish(&mut current, &delimiter);
            delimiter = d.trim().to_owned();
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if trimmed.ends_with(delimiter.as_str()) {
            finish(&mut current, &delimiter);
        }
    }
    finish(&mut current, &delimiter);
    out
}

/// The named lock of migrations in database `db`: `kvstore.migrate.<db>`, cut to the 64
/// characters MySQL allows a lock name (a longer name fails `GET_LOCK`, and the migrations
/// with it). Databases whose names share their first 48 characters then share the lock, so
/// their migrations run one after the other, which is harmless.
fn lock_name(db: &str) -> String {
    format!("kvstore.migrate.{db}").chars().take(64).collect()
}

/// Applies the pending migrations; returns the versions applied by this call.
pub async fn apply(conn: &mut Conn) -> Result<Vec<u32>, mysql_async::Error> {
    let lock_name = lock_name(conn.opts().db_name().unwrap_or_default());
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
    #[test]
    fn lock_names_fit_mysql_limit() {
        assert_eq!(super::lock_name("kvstore"), "kvstore.migrate.kvstore");
        let long = "d".repeat(64); // MySQL's longest database name
        let name = super::lock_name(&long);
        assert_eq!(name.chars().count(), 64);
        assert!(name.starts_with("kvstore.migrate.ddd"));
    }

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

    #[test]
    fn splits_procedures_at_their_delimiter() {
        let s = statements(
            "DROP PROCEDURE IF EXISTS p;\nDELIMITER //\nCREATE PROCEDURE p()\nBEGIN\n  \
             -- body\n  SELECT 1;\n  SELECT 2;\nEND//\nDELIMITER ;\nSELECT 3;\n",
        );
        assert_eq!(
            s,
            vec![
                "DROP PROCEDURE IF EXISTS p",
                "CREATE PROCEDURE p()\nBEGIN\n  SELECT 1;\n  SELECT 2;\nEND",
                "SELECT 3"
            ]
        );
        let procedure = statements(MIGRATIONS[2].sql);
        assert_eq!(procedure.len(), 2);
        assert!(
            procedure[1].starts_with("CREATE PROCEDURE kv_put(") && procedure[1].ends_with("END")
        );
    }
}
