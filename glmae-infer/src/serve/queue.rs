//! The series queue: the series waiting in the spool, when each last received an instance, which
//! is quiet, and the bounds on how many series and instances may wait.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

/// A series waiting in the spool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Waiting {
    /// When its first instance arrived.
    pub(super) first: Instant,
    /// When its last instance was stored.
    pub(super) last: Instant,
    /// Instances stored.
    instances: usize,
    /// Instances being written now: the series is not taken while any is.
    writers: usize,
    /// Found in the spool at start-up (received by an earlier run).
    pub(super) recovered: bool,
}

/// Why an instance is refused before it is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// `max_pending_series` series already wait.
    TooManySeries(usize),
    /// The series already has `max_instances_per_series` instances.
    TooManyInstances(usize),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::TooManySeries(n) => write!(f, "{n} series already wait (--max-pending-series)"),
            Refusal::TooManyInstances(n) => write!(f, "the series already has {n} instances"),
        }
    }
}

/// The series waiting to be segmented: when each last received an instance, and the bound on
/// how many may wait.
#[derive(Debug)]
pub(super) struct SeriesQueue {
    series: BTreeMap<String, Waiting>,
    max_series: usize,
    max_instances: usize,
}

impl SeriesQueue {
    pub(super) fn new(max_series: usize, max_instances: usize) -> Self {
        Self { series: BTreeMap::new(), max_series: max_series.max(1), max_instances: max_instances.max(1) }
    }

    /// An instance of `uid` is about to be written: admits it (a new series only while fewer
    /// than `max_series` wait) and holds the series until [`SeriesQueue::end`].
    pub(super) fn begin(&mut self, uid: &str, now: Instant) -> Result<(), Refusal> {
        if let Some(w) = self.series.get_mut(uid) {
            if w.instances + w.writers >= self.max_instances {
                return Err(Refusal::TooManyInstances(w.instances));
            }
            w.writers += 1;
            return Ok(());
        }
        if self.series.len() >= self.max_series {
            return Err(Refusal::TooManySeries(self.series.len()));
        }
        self.series.insert(
            uid.to_string(),
            Waiting { first: now, last: now, instances: 0, writers: 1, recovered: false },
        );
        Ok(())
    }

    /// The write begun by [`SeriesQueue::begin`] is over; `stored` says whether it succeeded.
    pub(super) fn end(&mut self, uid: &str, now: Instant, stored: bool) {
        let Some(w) = self.series.get_mut(uid) else { return };
        w.writers = w.writers.saturating_sub(1);
        if stored {
            w.instances += 1;
            w.last = now;
        }
        if w.instances == 0 && w.writers == 0 {
            self.series.remove(uid);
        }
    }

    /// The series quiet for `quiet` (nothing written to it since), the longest-quiet first;
    /// it leaves the queue.
    pub(super) fn take_quiet(&mut self, now: Instant, quiet: Duration) -> Option<(String, Waiting)> {
        let uid = self
            .series
            .iter()
            .filter(|(_, w)| {
                w.writers == 0 && w.instances > 0 && now.saturating_duration_since(w.last) >= quiet
            })
            .min_by_key(|(_, w)| w.last)
            .map(|(uid, _)| uid.clone())?;
        let w = self.series.remove(&uid)?;
        Some((uid, w))
    }

    /// A series found in the spool at start-up: it waits `quiet` from now, whatever the bound.
    pub(super) fn requeue(&mut self, uid: &str, instances: usize, now: Instant) {
        self.series.insert(
            uid.to_string(),
            Waiting { first: now, last: now, instances, writers: 0, recovered: true },
        );
    }

    /// The waiting series and their instance counts.
    pub(super) fn waiting(&self) -> Vec<(String, usize)> {
        self.series.iter().map(|(uid, w)| (uid.clone(), w.instances)).collect()
    }
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;

    use super::*;

    #[test]
    fn quiet_series_are_taken_in_turn_and_not_while_written() -> anyhow::Result<()> {
        let t0 = Instant::now();
        let s = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let quiet = Duration::from_secs(5);
        let mut q = SeriesQueue::new(8, 100);
        assert_eq!(q.begin("1.1", s(0.0)), Ok(()));
        q.end("1.1", s(0.0), true);
        assert_eq!(q.begin("1.2", s(1.0)), Ok(()));
        q.end("1.2", s(1.0), true);
        assert_eq!(q.begin("1.1", s(2.0)), Ok(()));
        q.end("1.1", s(3.0), true);
        // 1.2 (last at 1 s) is quiet at 6 s; 1.1 (last at 3 s) only at 8 s.
        assert_eq!(q.take_quiet(s(5.9), quiet), None);
        let (uid, w) = q.take_quiet(s(6.0), quiet).context("no series is quiet at 6 s")?;
        assert_eq!((uid.as_str(), w.instances), ("1.2", 1));
        assert_eq!(q.take_quiet(s(7.0), quiet), None);
        // An instance being written holds the series, however long it takes.
        assert_eq!(q.begin("1.1", s(7.5)), Ok(()));
        assert_eq!(q.take_quiet(s(20.0), quiet), None);
        q.end("1.1", s(20.0), true);
        assert_eq!(q.take_quiet(s(24.0), quiet), None);
        let (uid, w) = q.take_quiet(s(25.0), quiet).context("no series is quiet at 25 s")?;
        assert_eq!((uid.as_str(), w.instances, w.first, w.last), ("1.1", 3, s(0.0), s(20.0)));
        assert!(q.waiting().is_empty());
        Ok(())
    }

    #[test]
    fn the_queue_is_bounded() {
        let now = Instant::now();
        let mut q = SeriesQueue::new(2, 3);
        assert_eq!(q.begin("1.1", now), Ok(()));
        q.end("1.1", now, true);
        assert_eq!(q.begin("1.2", now), Ok(()));
        // A third series is refused while two wait (one still being written counts).
        assert_eq!(q.begin("1.3", now), Err(Refusal::TooManySeries(2)));
        // More instances of a waiting series are welcome, up to the instance bound.
        assert_eq!(q.begin("1.1", now), Ok(()));
        q.end("1.1", now, true);
        assert_eq!(q.begin("1.1", now), Ok(()));
        q.end("1.1", now, true);
        assert_eq!(q.begin("1.1", now), Err(Refusal::TooManyInstances(3)));
        // A first write that fails leaves no series behind, and frees its place.
        q.end("1.2", now, false);
        assert_eq!(q.waiting(), vec![("1.1".to_string(), 3)]);
        assert_eq!(q.begin("1.3", now), Ok(()));
        q.end("1.3", now, true);
        // Once a series is taken, its place is free again.
        let later = now + Duration::from_secs(10);
        assert_eq!(q.take_quiet(later, Duration::from_secs(1)).map(|(u, _)| u), Some("1.1".to_string()));
        assert_eq!(q.begin("1.4", later), Ok(()));
        // Series found at start-up are queued whatever the bound.
        q.requeue("1.5", 7, later);
        assert_eq!(q.waiting().len(), 3);
    }
}
