//! The job's recent past for the live page: one [`Sample`] every few seconds for the
//! last half hour, kept in memory (a page opened during an incident shows how it
//! started, not only the present).

use std::collections::VecDeque;

use serde::Serialize;

/// Samples kept: half an hour at one every 2 s.
pub const KEPT: usize = 900;

/// The job at one moment.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Sample {
    /// When (epoch ms).
    pub at_ms: u64,
    /// Records read per second since the sample before.
    pub records_in_per_second: f64,
    /// Rows committed to the sink per second since the sample before.
    pub rows_written_per_second: f64,
    /// Consumer lag over every partition (records).
    pub lag: i64,
    /// The highest share of time a subtask was blocked on its output.
    pub backpressure: f64,
    /// The duration of the last completed checkpoint (ms), if any.
    pub checkpoint_ms: Option<u64>,
}

/// A ring of samples, with the totals the next rate is taken against.
#[derive(Debug, Default)]
pub struct Series {
    samples: VecDeque<Sample>,
    last: Option<(u64, u64, u64)>,
}

/// What the job's counters say now, for [`Series::push`].
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Epoch ms.
    pub at_ms: u64,
    /// Records read so far.
    pub records_in: u64,
    /// Rows committed so far.
    pub rows_written: u64,
    /// See [`Sample::lag`].
    pub lag: i64,
    /// See [`Sample::backpressure`].
    pub backpressure: f64,
    /// See [`Sample::checkpoint_ms`].
    pub checkpoint_ms: Option<u64>,
}

impl Series {
    /// Add a sample from the counters `now` (rates against the sample before; none for
    /// the first, which only sets the base).
    pub fn push(&mut self, now: Now) {
        let rate = |before: u64, total: u64, secs: f64| total.saturating_sub(before) as f64 / secs;
        if let Some((at, records_in, rows)) = self.last {
            let secs = now.at_ms.saturating_sub(at) as f64 / 1000.0;
            if secs < 0.5 {
                return;
            }
            self.samples.push_back(Sample {
                at_ms: now.at_ms,
                records_in_per_second: rate(records_in, now.records_in, secs),
                rows_written_per_second: rate(rows, now.rows_written, secs),
                lag: now.lag,
                backpressure: now.backpressure,
                checkpoint_ms: now.checkpoint_ms,
            });
            while self.samples.len() > KEPT {
                self.samples.pop_front();
            }
        }
        self.last = Some((now.at_ms, now.records_in, now.rows_written));
    }

    /// Every sample kept, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_taken_between_samples_and_the_ring_keeps_half_an_hour() {
        let mut s = Series::default();
        let at = |i: u64| Now {
            at_ms: 1_000_000 + i * 2_000,
            records_in: i * 1_000,
            rows_written: i * 500,
            lag: 7,
            backpressure: 0.25,
            checkpoint_ms: Some(40),
        };
        s.push(at(0));
        assert!(s.samples().is_empty());
        s.push(at(1));
        assert_eq!(s.samples()[0].records_in_per_second, 500.0);
        assert_eq!(s.samples()[0].rows_written_per_second, 250.0);
        for i in 2..2_000 {
            s.push(at(i));
        }
        assert_eq!(s.samples().len(), KEPT);
        assert_eq!(s.samples().last().map(|x| x.at_ms), Some(1_000_000 + 1_999 * 2_000));
    }
}
