-- kvstore schema, version 1. Never edit a released migration: add a new file instead.
-- Runs on MySQL 8.4 and MariaDB 10.11+ (no MySQL-only syntax, no utf8mb4_0900_* collations).

-- One row per key. VARBINARY keys sort byte-wise, which is the listing order.
-- `rev` is the id of the kv_changes row of the entry's last write: unique across all writes
-- ever, so it is the ETag (a key deleted and created again never gets an old one back) and it
-- orders the writes of one key (writes of a key are serialised by its row lock).
CREATE TABLE IF NOT EXISTS kv_entries (
  k          VARBINARY(512)  NOT NULL,
  v          LONGBLOB        NOT NULL,
  version    BIGINT UNSIGNED NOT NULL,
  rev        BIGINT UNSIGNED NOT NULL,
  created_at DATETIME(6)     NOT NULL,
  updated_at DATETIME(6)     NOT NULL,
  expires_at DATETIME(6)     NULL,
  PRIMARY KEY (k),
  KEY kv_entries_expires_at (expires_at)
) ENGINE=InnoDB;

-- writes_total, split over 64 rows so concurrent writes do not queue on one hot row.
-- Each write adds 1 to a random slot inside its own transaction; the total is SUM(n).
CREATE TABLE IF NOT EXISTS kv_write_counter (
  slot SMALLINT UNSIGNED NOT NULL,
  n    BIGINT UNSIGNED   NOT NULL,
  PRIMARY KEY (slot)
) ENGINE=InnoDB;

INSERT IGNORE INTO kv_write_counter (slot, n) VALUES
  (0,0),(1,0),(2,0),(3,0),(4,0),(5,0),(6,0),(7,0),(8,0),(9,0),(10,0),(11,0),(12,0),(13,0),(14,0),(15,0),
  (16,0),(17,0),(18,0),(19,0),(20,0),(21,0),(22,0),(23,0),(24,0),(25,0),(26,0),(27,0),(28,0),(29,0),(30,0),(31,0),
  (32,0),(33,0),(34,0),(35,0),(36,0),(37,0),(38,0),(39,0),(40,0),(41,0),(42,0),(43,0),(44,0),(45,0),(46,0),(47,0),
  (48,0),(49,0),(50,0),(51,0),(52,0),(53,0),(54,0),(55,0),(56,0),(57,0),(58,0),(59,0),(60,0),(61,0),(62,0),(63,0);

-- Change log: one row per write or delete, written in the same transaction. Replicas poll it
-- (by id, remembering gaps because auto-increment ids can commit out of order) to drop their
-- cached copy of keys another replica changed. Rows older than a few minutes are purged.
CREATE TABLE IF NOT EXISTS kv_changes (
  id         BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  k          VARBINARY(512)  NOT NULL,
  origin     BIGINT UNSIGNED NOT NULL,
  changed_at DATETIME(6)     NOT NULL,
  PRIMARY KEY (id),
  KEY kv_changes_changed_at (changed_at)
) ENGINE=InnoDB;
