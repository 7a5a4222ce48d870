//! Request coalescing: concurrent point reads (and concurrent plain writes) go to the database
//! together, one statement batch for many requests, instead of one round trip each.
//!
//! A fixed number of workers share one queue. A worker waits for the first job, then takes
//! whatever else is already queued (up to `max_items`, or until the jobs' weight reaches
//! `max_weight`) and runs them as one batch. When no batch is in flight, nothing waits to
//! fill one: a lone request goes alone, at once. While another batch is in flight, a batch
//! smaller than `busy_min` waits for more jobs or for that batch to end, whichever comes
//! first, and no longer than `max_linger` (the batch in flight may be stuck). Without that
//! wait, an idle worker took the first request to arrive on its own, and under load a third
//! of all write batches were single writes, each paying a whole statement and commit. With
//! `workers` batches in flight, at most `workers` pool connections are used.
//!
//! A batch succeeds or fails as a whole: on an error every job in it gets the error. A job
//! that waited in the queue longer than `max_wait` (the pool's acquire timeout) gets
//! [`DbError::Timeout`] instead of running late, as it would have waiting for a connection.
//! A caller that gives up (its request timed out) only drops its reply.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use tokio::sync::{mpsc, oneshot, Mutex, Notify};

use crate::error::DbError;

struct Job<T, R> {
    item: T,
    queued: Instant,
    reply: oneshot::Sender<Result<R, DbError>>,
}

/// Limits of one batch.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Concurrent batches (each on its own connection).
    pub workers: usize,
    pub max_items: usize,
    /// While another batch is in flight, a smaller batch waits for more jobs or for that
    /// batch to end.
    pub busy_min: usize,
    /// ... but no longer than this (a batch in flight may be stuck, on a row lock say).
    pub max_linger: Duration,
    /// A batch takes no more jobs once their summed weight reaches this.
    pub max_weight: usize,
    /// A job queued longer than this fails with a timeout instead of running.
    pub max_wait: Duration,
}

pub struct Coalescer<T, R> {
    queue: mpsc::UnboundedSender<Job<T, R>>,
}

impl<T: Send + 'static, R: Send + 'static> Coalescer<T, R> {
    /// Starts the workers on the current runtime. `run` gets the jobs' items in queue order
    /// and returns one result per item, in the same order. The workers end when the
    /// coalescer is dropped.
    pub fn spawn<F, Fut>(limits: Limits, weight: fn(&T) -> usize, run: F) -> Coalescer<T, R>
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<R>, DbError>> + Send,
    {
        let (queue, rx) = mpsc::unbounded_channel::<Job<T, R>>();
        let rx = Arc::new(Mutex::new(rx));
        let run = Arc::new(run);
        let busy = Arc::new(Busy::default());
        for _ in 0..limits.workers.max(1) {
            let (rx, run, busy) = (rx.clone(), run.clone(), busy.clone());
            tokio::spawn(async move {
                while let Some(jobs) = next_batch(&rx, &limits, weight, &busy).await {
                    if jobs.is_empty() {
                        continue;
                    }
                    let (items, replies): (Vec<T>, Vec<_>) =
                        jobs.into_iter().map(|j| (j.item, j.reply)).unzip();
                    let n = items.len();
                    // A panic in `run` fails its batch, not the worker: a dead worker would
                    // leave its share of reads and writes queued for ever.
                    let results = {
                        let _in_flight = busy.start();
                        AssertUnwindSafe(run(items))
                            .catch_unwind()
                            .await
                            .unwrap_or_else(|_| {
                                Err(DbError::Other("a database batch panicked".into()))
                            })
                    };
                    let results = results.and_then(|results| {
                        if results.len() == n {
                            Ok(results)
                        } else {
                            Err(DbError::Other(format!(
                                "a batch of {n} returned {} results",
                                results.len()
                            )))
                        }
                    });
                    match results {
                        Ok(results) => {
                            for (reply, r) in replies.into_iter().zip(results) {
                                let _ = reply.send(Ok(r));
                            }
                        }
                        Err(e) => {
                            for reply in replies {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                }
            });
        }
        Coalescer { queue }
    }

    /// Queues `item` and waits for its result.
    pub async fn submit(&self, item: T) -> Result<R, DbError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            item,
            queued: Instant::now(),
            reply,
        };
        if self.queue.send(job).is_err() {
            return Err(DbError::Other("the database workers have stopped".into()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(DbError::Other("a database worker stopped".into())))
    }
}

/// The batches in flight, and a signal each time one ends.
#[derive(Default)]
struct Busy {
    in_flight: AtomicUsize,
    ended: Notify,
}

impl Busy {
    fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self)
    }
}

/// One batch in flight; dropped when it ends (however it ends).
struct InFlight<'a>(&'a Busy);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.ended.notify_waiters();
    }
}

/// The next batch: the first queued job (waiting for one), then whatever else is queued now;
/// while another batch is in flight, more (see the module docs). `None` when the coalescer
/// is gone.
async fn next_batch<T, R>(
    rx: &Mutex<mpsc::UnboundedReceiver<Job<T, R>>>,
    limits: &Limits,
    weight: fn(&T) -> usize,
    busy: &Busy,
) -> Option<Vec<Job<T, R>>> {
    let mut rx = rx.lock().await;
    let mut batch = Vec::new();
    let mut total = 0;
    // Set when this batch first waits beside one in flight: it waits `max_linger` at most.
    let mut linger_until: Option<tokio::time::Instant> = None;
    loop {
        // Registered before the in-flight count is read, so an end in between is not missed.
        let ended = busy.ended.notified();
        let mut ended = std::pin::pin!(ended);
        ended.as_mut().enable();
        let job = if batch.is_empty() {
            rx.recv().await?
        } else if let Ok(job) = rx.try_recv() {
            job
        } else if batch.len() < limits.busy_min && busy.in_flight.load(Ordering::SeqCst) > 0 {
            let until = *linger_until
                .get_or_insert_with(|| tokio::time::Instant::now() + limits.max_linger);
            tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => job,
                    None => break,
                },
                () = ended => continue,
                () = tokio::time::sleep_until(until) => break,
            }
        } else {
            break;
        };
        if job.queued.elapsed() > limits.max_wait {
            time_out(job);
            continue;
        }
        total += weight(&job.item);
        batch.push(job);
        if batch.len() >= limits.max_items || total >= limits.max_weight {
            break;
        }
    }
    if linger_until.is_some() {
        // The wait is short (`max_linger`), but a job still must not run later than it may
        // wait for a connection.
        let (late, on_time): (Vec<_>, _) = batch
            .into_iter()
            .partition(|job| job.queued.elapsed() > limits.max_wait);
        late.into_iter().for_each(time_out);
        batch = on_time;
    }
    Some(batch)
}

/// A job that waited longer than `max_wait` gets the error it would have had waiting for a
/// connection, instead of running.
fn time_out<T, R>(job: Job<T, R>) {
    let _ = job.reply.send(Err(DbError::Timeout("connection")));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn limits(workers: usize, max_items: usize) -> Limits {
        Limits {
            workers,
            max_items,
            busy_min: 1,
            max_linger: Duration::from_secs(5),
            max_weight: usize::MAX,
            max_wait: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn a_batch_that_panics_fails_its_jobs_and_the_workers_go_on() {
        let c = Coalescer::spawn(
            limits(1, 1),
            |_| 1,
            |items: Vec<u32>| async move {
                assert!(items != [13], "the test's panic");
                Ok(items)
            },
        );
        assert!(matches!(c.submit(13).await, Err(DbError::Other(_))));
        for i in 0..3 {
            assert_eq!(c.submit(i).await.unwrap(), i, "the one worker still runs");
        }
    }

    #[tokio::test]
    async fn each_caller_gets_its_own_result_and_queued_jobs_share_a_batch() {
        let batches = Arc::new(AtomicUsize::new(0));
        let largest = Arc::new(AtomicUsize::new(0));
        let (b, l) = (batches.clone(), largest.clone());
        let c = Arc::new(Coalescer::spawn(
            limits(2, 16),
            |_| 1,
            move |items: Vec<u32>| {
                b.fetch_add(1, Ordering::SeqCst);
                l.fetch_max(items.len(), Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok(items.into_iter().map(|i| i * 10).collect())
                }
            },
        ));
        let tasks: Vec<_> = (0..200u32)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { (i, c.submit(i).await) })
            })
            .collect();
        for t in tasks {
            let (i, r) = t.await.unwrap();
            assert_eq!(r.unwrap(), i * 10);
        }
        let n = batches.load(Ordering::SeqCst);
        assert!(n < 200, "200 concurrent jobs ran in {n} batches");
        assert!(largest.load(Ordering::SeqCst) <= 16, "max_items holds");
    }

    /// Polls until `cond` holds (at most 5 s).
    async fn until(cond: impl Fn() -> bool) {
        for _ in 0..5000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("condition not reached within 5 s");
    }

    #[tokio::test]
    async fn while_a_batch_is_in_flight_a_small_one_waits_for_more_jobs_or_for_its_end() {
        let batches = Arc::new(std::sync::Mutex::new(Vec::<Vec<u32>>::new()));
        let release = Arc::new(Notify::new());
        let (b, r) = (batches.clone(), release.clone());
        let c = Arc::new(Coalescer::spawn(
            Limits {
                busy_min: 3,
                ..limits(2, 16)
            },
            |_| 1,
            move |items: Vec<u32>| {
                b.lock().unwrap().push(items.clone());
                let r = r.clone();
                async move {
                    if items == [0] {
                        r.notified().await; // the batch in flight, until the test ends it
                    }
                    Ok(items)
                }
            },
        ));
        let ran = || batches.lock().unwrap().clone();
        let submit = |i: u32| {
            let c = c.clone();
            tokio::spawn(async move { c.submit(i).await })
        };
        // Nothing in flight: a lone job goes at once.
        let first = submit(0);
        until(|| ran().len() == 1).await;
        // One in flight: a lone job waits ...
        let lone = submit(1);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(ran(), [vec![0]], "a lone job ran beside a batch in flight");
        // ... until `busy_min` jobs are queued, which go without waiting for the first batch.
        let more = [submit(2), submit(3)];
        until(|| ran().len() == 2).await;
        assert_eq!(ran()[1], [1, 2, 3]);
        assert!(!first.is_finished());
        // A lone job waits for the batch in flight to end, then goes.
        let last = submit(4);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(ran().len(), 2, "a lone job ran beside a batch in flight");
        release.notify_one();
        assert_eq!(first.await.unwrap().unwrap(), 0);
        assert_eq!(last.await.unwrap().unwrap(), 4);
        assert_eq!(ran()[2], [4]);
        assert_eq!(lone.await.unwrap().unwrap(), 1);
        for (i, m) in more.into_iter().enumerate() {
            assert_eq!(m.await.unwrap().unwrap(), i as u32 + 2);
        }
    }

    #[tokio::test]
    async fn a_stuck_batch_in_flight_holds_a_lone_job_no_longer_than_max_linger() {
        let release = Arc::new(Notify::new());
        let r = release.clone();
        let c = Arc::new(Coalescer::spawn(
            Limits {
                busy_min: 3,
                max_linger: Duration::from_millis(20),
                ..limits(2, 16)
            },
            |_| 1,
            move |items: Vec<u32>| {
                let r = r.clone();
                async move {
                    if items == [0] {
                        r.notified().await;
                    }
                    Ok(items)
                }
            },
        ));
        let stuck = tokio::spawn({
            let c = c.clone();
            async move { c.submit(0).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let lone = tokio::time::timeout(Duration::from_secs(2), c.submit(1)).await;
        assert_eq!(
            lone.expect("the lone job waited for the stuck batch")
                .unwrap(),
            1
        );
        assert!(!stuck.is_finished());
        release.notify_one();
        assert_eq!(stuck.await.unwrap().unwrap(), 0);
    }

    #[tokio::test]
    async fn a_failed_batch_fails_every_job_in_it_and_weight_ends_a_batch() {
        let largest = Arc::new(AtomicUsize::new(0));
        let l = largest.clone();
        let lim = Limits {
            max_weight: 3,
            ..limits(1, 100)
        };
        let c = Arc::new(Coalescer::spawn(
            lim,
            |_| 1,
            move |items: Vec<usize>| {
                l.fetch_max(items.len(), Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    if items.contains(&0) {
                        Err(DbError::Server {
                            code: 1213,
                            message: "deadlock".into(),
                        })
                    } else {
                        Ok(items)
                    }
                }
            },
        ));
        let tasks: Vec<_> = (0..50usize)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { c.submit(i % 2).await })
            })
            .collect();
        let mut failed = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(w) => assert_eq!(w, 1),
                Err(e) => {
                    assert!(e.is_retryable(), "the batch's own error: {e}");
                    failed += 1;
                }
            }
        }
        assert!(
            failed >= 25,
            "every batch with a 0 in it failed as a whole ({failed})"
        );
        assert!(largest.load(Ordering::SeqCst) <= 3, "weight 3 ends a batch");
    }

    #[tokio::test]
    async fn a_job_that_waited_too_long_times_out_instead_of_running() {
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let lim = Limits {
            max_wait: Duration::from_millis(20),
            ..limits(1, 1)
        };
        let c = Arc::new(Coalescer::spawn(
            lim,
            |_| 1,
            move |items: Vec<u64>| {
                r.fetch_add(items.len(), Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_millis(items[0])).await;
                    Ok(items)
                }
            },
        ));
        let slow = tokio::spawn({
            let c = c.clone();
            async move { c.submit(100).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let late = c.submit(1).await;
        assert_eq!(slow.await.unwrap().unwrap(), 100);
        assert!(matches!(late, Err(DbError::Timeout(_))), "{late:?}");
        assert_eq!(ran.load(Ordering::SeqCst), 1, "the late job never ran");
    }
}
