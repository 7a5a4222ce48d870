-- kvstore schema, version 4: kv_put_v2, the single-write procedure of 0003 with its statements
-- reordered. kv_put logged the change (and so took its id, the revision) *before* the entry's
-- upsert locked the row: two concurrent writes of one key could commit in the opposite order
-- of their ids, and the newer version then carried the older revision (found by
-- tests/it/coalescing.rs: a stale entry kept in the cache, an ETag going backwards). Here the
-- upsert comes first and the revision is set once the change is logged.
-- Same privileges and portability as 0003 (MySQL 8.4, MariaDB 10.11+, SQL SECURITY INVOKER).
-- A new name rather than DROP + CREATE of kv_put, so that replicas still running the previous
-- release keep working during a rolling update; kv_put stays for them.

DROP PROCEDURE IF EXISTS kv_put_v2;

DELIMITER //
CREATE PROCEDURE kv_put_v2(
  IN p_k       VARBINARY(512),
  IN p_v       LONGBLOB,
  IN p_origin  BIGINT UNSIGNED,
  IN p_now     DATETIME(6),
  IN p_expires DATETIME(6),
  IN p_slot    SMALLINT UNSIGNED,
  IN p_begin   BOOLEAN
)
SQL SECURITY INVOKER
MODIFIES SQL DATA
BEGIN
  DECLARE v_created BOOLEAN;
  -- Any error: nothing of the write stays, and the caller gets the error.
  DECLARE EXIT HANDLER FOR SQLEXCEPTION
  BEGIN
    ROLLBACK;
    RESIGNAL;
  END;
  -- With p_begin = FALSE the caller has begun the transaction (and locked the row to check
  -- a precondition); the procedure commits it either way.
  IF p_begin THEN
    START TRANSACTION;
  END IF;
  -- The entry first: the upsert locks its row (or the new row), so for one key the change-log
  -- ids below are handed out in the order the writes commit. Version + 1 over a live row, 1
  -- over none or an expired one; assignments run left to right: the IFs read the old
  -- expires_at. The revision is a placeholder until the change is logged.
  INSERT INTO kv_entries (k, v, version, rev, created_at, updated_at, expires_at)
    VALUES (p_k, p_v, 1, 0, p_now, p_now, p_expires)
    ON DUPLICATE KEY UPDATE
      version    = IF(expires_at IS NULL OR expires_at > p_now, version + 1, 1),
      created_at = IF(expires_at IS NULL OR expires_at > p_now, created_at, p_now),
      v          = p_v,
      rev        = 0,
      updated_at = p_now,
      expires_at = p_expires;
  -- 1 row affected: inserted (2: an existing row updated).
  SET v_created = ROW_COUNT() = 1;
  -- The change-log row; its id is the write's revision (the ETag).
  INSERT INTO kv_changes (k, origin, changed_at) VALUES (p_k, p_origin, p_now);
  UPDATE kv_entries SET rev = LAST_INSERT_ID() WHERE k = p_k;
  UPDATE kv_write_counter SET n = n + 1 WHERE slot = p_slot;
  -- The entry's version, revision and creation time; known without reading a new row.
  IF v_created THEN
    SELECT 1 AS version, LAST_INSERT_ID() AS rev, p_now AS created_at;
  ELSE
    SELECT version, rev, created_at FROM kv_entries WHERE k = p_k;
  END IF;
  COMMIT;
END//
DELIMITER ;
