//! slog setup: JSON lines on stdout (slog-json), formatted where they are logged and written
//! by a background thread, so a slow stdout never blocks a request.
//!
//! Each record is serialised straight into a line buffer and handed to the writer thread as
//! bytes; the thread writes every line waiting at that moment with one `write(2)`. Under
//! load that is dozens of lines per system call; when idle a line is written at once. (The
//! usual slog-async drain copies every field of every record into owned values for its
//! thread first: a third of the cost of a cached GET, measured with callgrind.) When the
//! writer falls more than `QUEUE_LINES` behind, lines are dropped and counted, and the count
//! is logged once the writer catches up. Dropping the returned guard writes what is queued
//! (done last at shutdown).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use slog::{o, Drain, Logger};

use crate::config::LogLevel;

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE_LINES: usize = 16 * 1024;
/// At most this much is gathered into one write.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

pub struct LogGuard(Option<std::thread::JoinHandle<()>>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        // The writer ends once every sender is gone (the logger was dropped before the guard)
        // and it has written what was queued. A logger still alive elsewhere must not hang
        // shutdown, so the thread is joined only when it is finished.
        if let Some(handle) = self.0.take() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while !handle.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
    }
}

/// slog-json's output: collects one record, and on the flush slog-json does after each
/// record hands the line to the writer thread.
struct LineSender {
    line: Vec<u8>,
    tx: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

impl Write for LineSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let line = std::mem::replace(&mut self.line, Vec::with_capacity(512));
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The writer is gone (shutdown): nothing left to write to.
            Err(TrySendError::Disconnected(_)) => {}
        }
        Ok(())
    }
}

/// The writer thread: blocks for a line, then takes every line already waiting, and writes
/// them in one call.
fn write_lines(rx: Receiver<Vec<u8>>, dropped: Arc<AtomicU64>, mut out: impl Write) {
    let mut batch = Vec::with_capacity(WRITE_BATCH_BYTES);
    while let Ok(line) = rx.recv() {
        batch.extend_from_slice(&line);
        while batch.len() < WRITE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(line) => batch.extend_from_slice(&line),
                Err(_) => break,
            }
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let _ = writeln!(
                batch,
                "{{\"msg\":\"log lines dropped: the writer fell behind\",\"level\":\"warning\",\
                 \"ts\":\"{}\",\"service\":\"kvstore\",\"count\":{lost}}}",
                crate::time::rfc3339_micros(crate::time::now_micros())
            );
        }
        // Nothing sensible to do when stdout fails: the line is lost either way.
        let _ = out.write_all(&batch).and_then(|_| out.flush());
        batch.clear();
    }
}

/// Builds the process logger. Every record carries `ts`, `level` and `msg` plus its fields.
pub fn init(level: LogLevel) -> (Logger, LogGuard) {
    let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
    let dropped = Arc::new(AtomicU64::new(0));
    let writer = {
        let dropped = dropped.clone();
        std::thread::Builder::new()
            .name("kvstore-log".into())
            .spawn(move || write_lines(rx, dropped, std::io::stdout()))
            .expect("spawn the log writer thread")
    };
    let json = slog_json::Json::new(LineSender {
        line: Vec::with_capacity(512),
        tx,
        dropped,
    })
    .set_newlines(true)
    .set_flush(true)
    .add_key_value(o!(
        "ts" => slog::PushFnValue(|_, ser| {
            ser.emit(crate::time::rfc3339_micros(crate::time::now_micros()))
        }),
        "level" => slog::FnValue(|rec| rec.level().as_str().to_ascii_lowercase()),
        "msg" => slog::PushFnValue(|rec, ser| ser.emit(rec.msg())),
    ))
    .build();
    let drain = Mutex::new(json).fuse().filter_level(level.as_slog()).fuse();
    let logger = Logger::root(drain, o!("service" => "kvstore"));
    (logger, LogGuard(Some(writer)))
}

/// A logger that discards everything (unit tests).
pub fn discard() -> Logger {
    Logger::root(slog::Discard, o!())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines sent before the writer runs are written together, whole and in order, and
    /// dropped lines are reported.
    #[test]
    fn the_writer_batches_whole_lines_in_order_and_reports_drops() {
        #[derive(Clone, Default)]
        struct Out(Arc<Mutex<Vec<Vec<u8>>>>);
        impl Write for Out {
            fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().push(data.to_vec());
                Ok(data.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (tx, rx) = mpsc::sync_channel(2);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut sender = LineSender {
            line: Vec::new(),
            tx,
            dropped: dropped.clone(),
        };
        for i in 0..3 {
            writeln!(sender, "{{\"n\":{i}}}").unwrap();
            sender.flush().unwrap();
        }
        assert_eq!(dropped.load(Ordering::Relaxed), 1, "the queue holds 2 lines");
        drop(sender);
        let out = Out::default();
        write_lines(rx, dropped, out.clone());
        let writes = out.0.lock().unwrap().clone();
        assert_eq!(writes.len(), 1, "one write for everything that was waiting");
        let text = String::from_utf8(writes[0].clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(&lines[..2], ["{\"n\":0}", "{\"n\":1}"]);
        let report: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(report["count"], 1);
        assert_eq!(report["level"], "warning");
    }
}
