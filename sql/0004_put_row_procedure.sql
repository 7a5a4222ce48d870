-- kvstore schema, version 4: the write of one entry *inside* a transaction the caller owns, so
-- concurrent plain PUTs/POSTs can share one transaction and one round trip (src/store/mod.rs,
-- `put_many`): START TRANSACTION; CALL kv_put_row(…) per write; one counter UPDATE; COMMIT.
-- Same statements as kv_put (0003) without the transaction and the counter. Runs on MySQL 8.4
-- and MariaDB 10.11+. An error leaves the statement undone and is returned to the caller, who
-- rolls the whole transaction back. Never DROP + CREATE it in place (see 0003): a changed
-- version gets a new name in a new migration.

DROP PROCEDURE IF EXISTS kv_put_row;

DELIMITER //
CREATE PROCEDURE kv_put_row(
  IN p_k       VARBINARY(512),
  IN p_v       LONGBLOB,
  IN p_origin  BIGINT UNSIGNED,
  IN p_now     DATETIME(6),
  IN p_expires DATETIME(6)
)
SQL SECURITY INVOKER
MODIFIES SQL DATA
BEGIN
  -- The change-log row; its id is the write's revision (the ETag).
  INSERT INTO kv_changes (k, origin, changed_at) VALUES (p_k, p_origin, p_now);
  -- Version + 1 over a live row, 1 over none or an expired one (as in kv_put).
  INSERT INTO kv_entries (k, v, version, rev, created_at, updated_at, expires_at)
    VALUES (p_k, p_v, 1, LAST_INSERT_ID(), p_now, p_now, p_expires)
    ON DUPLICATE KEY UPDATE
      version    = IF(expires_at IS NULL OR expires_at > p_now, version + 1, 1),
      created_at = IF(expires_at IS NULL OR expires_at > p_now, created_at, p_now),
      v          = p_v,
      rev        = LAST_INSERT_ID(),
      updated_at = p_now,
      expires_at = p_expires;
  -- 1 row affected: inserted (2: an existing row updated).
  IF ROW_COUNT() = 1 THEN
    SELECT 1 AS version, LAST_INSERT_ID() AS rev, p_now AS created_at;
  ELSE
    SELECT version, rev, created_at FROM kv_entries WHERE k = p_k;
  END IF;
END//
DELIMITER ;
