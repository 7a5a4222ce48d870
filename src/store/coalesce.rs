//! Request coalescing: concurrent point reads (and concurrent plain writes) go to the database
//! together, one statement batch for many requests, instead of one round trip each.
//!
//! A fixed number of workers share one queue. A worker waits for the first job, then takes
//! whatever else is already queued (up to `max_items`, or until the jobs' weight reaches
//! `max_weight`) and runs them as one batch. Nothing waits to fill a batch: a lone request
//! goes alone, as soon as a worker is free; under load, the requests that queue up while the
//! workers are busy become the next batches. With `workers` batches in flight, at most
//! `workers` pool connections are used.
//!
//! A batch succeeds or fails as a whole: on an error every job in it gets the error. A job
//! that waited in the queue longer than `max_wait` (the pool's acquire timeout) gets
//! [`DbError::Timeout`] instead of running late, as it would have waiting for a connection.
//! A caller that gives up (its request timed out) only drops its reply.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Mutex};

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
        for _ in 0..limits.workers.max(1) {
            let (rx, run) = (rx.clone(), run.clone());
            tokio::spawn(async move {
                while let Some(jobs) = next_batch(&rx, &limits, weight).await {
                    let (items, replies): (Vec<T>, Vec<_>) =
                        jobs.into_iter().map(|j| (j.item, j.reply)).unzip();
                    let n = items.len();
                    let results = run(items).await.and_then(|results| {
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

/// The next batch: the first queued job (waiting for one), then whatever else is queued now.
/// `None` when the coalescer is gone.
async fn next_batch<T, R>(
    rx: &Mutex<mpsc::UnboundedReceiver<Job<T, R>>>,
    limits: &Limits,
    weight: fn(&T) -> usize,
) -> Option<Vec<Job<T, R>>> {
    let mut rx = rx.lock().await;
    let mut batch = Vec::new();
    let mut total = 0;
    loop {
        let job = if batch.is_empty() {
            rx.recv().await?
        } else {
            match rx.try_recv() {
                Ok(job) => job,
                Err(_) => break,
            }
        };
        if job.queued.elapsed() > limits.max_wait {
            let _ = job.reply.send(Err(DbError::Timeout("connection")));
            continue;
        }
        total += weight(&job.item);
        batch.push(job);
        if batch.len() >= limits.max_items || total >= limits.max_weight {
            break;
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn limits(workers: usize, max_items: usize) -> Limits {
        Limits {
            workers,
            max_items,
            max_weight: usize::MAX,
            max_wait: Duration::from_secs(5),
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
