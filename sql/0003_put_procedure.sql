-- kvstore schema, version 3: the write of a PUT/POST as one stored procedure, so the service
-- sends it in one round trip as one prepared CALL (parsed once per connection) instead of a
-- transaction of five statements. Runs on MySQL 8.4 and MariaDB 10.11+; the file can also be
-- applied with the mysql client (it understands the DELIMITER lines, as the service does).
-- SQL SECURITY INVOKER: it runs with the privileges of the caller (the service's user).
-- To change it later, create a procedure with a new name in a new migration (and call that
-- from the new code): a DROP + CREATE of kv_put would fail the calls of running replicas for
-- a moment.

DROP PROCEDURE IF EXISTS kv_put;

DELIMITER //
CREATE PROCEDURE kv_put(
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
  -- The change-log row; its id is the write's revision (the ETag).
  INSERT INTO kv_changes (k, origin, changed_at) VALUES (p_k, p_origin, p_now);
  -- Version + 1 over a live row, 1 over none or an expired one. Assignments run left to
  -- right: the IFs read the old expires_at.
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
  SET v_created = ROW_COUNT() = 1;
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
