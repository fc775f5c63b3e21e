//! Watermark generation per Kafka partition, and the minimum over an operator's inputs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::MIN_WATERMARK;

/// Generates the watermarks of one partition. Periodic generators answer
/// [`WatermarkGenerator::on_periodic`]; punctuated ones answer from
/// [`WatermarkGenerator::on_event`] (a record that says "all before me has arrived").
pub trait WatermarkGenerator: Send {
    /// A record with event time `timestamp` was read; a punctuated generator may return
    /// a watermark now.
    fn on_event(&mut self, timestamp: i64) -> Option<i64>;

    /// Called on every watermark interval; a periodic generator returns its watermark.
    fn on_periodic(&mut self) -> Option<i64> {
        None
    }

    /// The largest event time seen, checkpointed so that a restored partition goes on
    /// where it was instead of starting over from no watermark.
    fn max_timestamp(&self) -> Option<i64>;

    /// Resume from a checkpointed [`WatermarkGenerator::max_timestamp`].
    fn restore(&mut self, max_timestamp: Option<i64>);
}

/// Records arrive at most `bound` out of order: the watermark trails the largest event
/// time seen by `bound` (and 1 ms, so that records at exactly the bound are not late).
/// With a bound of zero this is the monotonous strategy.
#[derive(Debug, Clone)]
pub struct BoundedOutOfOrderness {
    bound_ms: i64,
    max: Option<i64>,
}

impl BoundedOutOfOrderness {
    /// Watermarks `bound` behind the greatest event time seen.
    pub fn new(bound: Duration) -> Self {
        Self {
            bound_ms: bound.as_millis() as i64,
            max: None,
        }
    }

    /// Timestamps never decrease within a partition.
    pub fn monotonous() -> Self {
        Self::new(Duration::ZERO)
    }
}

impl WatermarkGenerator for BoundedOutOfOrderness {
    fn on_event(&mut self, timestamp: i64) -> Option<i64> {
        self.max = Some(self.max.map_or(timestamp, |m| m.max(timestamp)));
        None
    }

    fn on_periodic(&mut self) -> Option<i64> {
        self.max.map(|m| m.saturating_sub(self.bound_ms).saturating_sub(1))
    }

    fn max_timestamp(&self) -> Option<i64> {
        self.max
    }

    fn restore(&mut self, max_timestamp: Option<i64>) {
        self.max = max_timestamp;
    }
}

/// A watermark announced rather than derived: the value passed to `on_event` is a
/// watermark someone upstream computed (a writer of a hop between instances), taken as
/// it is and never moved back.
#[derive(Debug, Clone, Default)]
pub struct Announced {
    max: Option<i64>,
}

impl WatermarkGenerator for Announced {
    fn on_event(&mut self, watermark: i64) -> Option<i64> {
        self.max = Some(self.max.map_or(watermark, |m| m.max(watermark)));
        self.max
    }

    fn on_periodic(&mut self) -> Option<i64> {
        self.max
    }

    fn max_timestamp(&self) -> Option<i64> {
        self.max
    }

    fn restore(&mut self, max_timestamp: Option<i64>) {
        self.max = max_timestamp;
    }
}

/// The one rule by which a source combines its partitions and an operator its inputs:
/// the watermark is the minimum over the live ones and never goes back; when none is
/// live, what the quiet ones delivered (the minimum of their own watermarks, where they
/// have one) still goes out before idleness, so the last records before a pause can
/// close their windows; a live one after idleness says so at the current watermark.
#[derive(Debug)]
struct Combiner {
    emitted: i64,
    idle: bool,
}

impl Combiner {
    fn new() -> Self {
        Self {
            emitted: MIN_WATERMARK,
            idle: false,
        }
    }

    /// `live`: minimum over live members; `delivered`: minimum over quiet members'
    /// watermarks (ignoring those without one).
    fn update(&mut self, live: Option<i64>, delivered: Option<i64>) -> InputTime {
        match live {
            None if self.idle => InputTime::Unchanged,
            None => {
                self.idle = true;
                match delivered.filter(|w| *w > self.emitted) {
                    Some(w) => {
                        self.emitted = w;
                        InputTime::AdvancedThenIdle(w)
                    }
                    None => InputTime::Idle,
                }
            }
            Some(w) => {
                let was_idle = std::mem::replace(&mut self.idle, false);
                if w > self.emitted {
                    self.emitted = w;
                    InputTime::Advanced(w)
                } else if was_idle {
                    InputTime::Advanced(self.emitted)
                } else {
                    InputTime::Unchanged
                }
            }
        }
    }
}

/// What a source subtask should tell its downstream after a watermark interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceTime {
    /// Event time has advanced to this (or: the source is active again at it).
    Watermark(i64),
    /// No partition is live: do not hold back downstream watermarks.
    Idle,
}

struct PartitionClock {
    generator: Box<dyn WatermarkGenerator>,
    watermark: i64,
    last_data: Instant,
}

/// The watermarks of the partitions one source subtask reads, and the one it emits: the
/// minimum over partitions that are live. A partition is not live while it has had no
/// record for `idle_timeout`; it rejoins with its next record. The emitted watermark
/// never goes back.
///
/// A partition read to the broker's end stays live at its own watermark, as in Flink:
/// while reading live, a consumer is at the end of some partitions most of the time and
/// producers deliver partitions at different moments, so a partition at its end is the
/// one whose next records are still on their way. Letting it stop holding the watermark
/// back made the others close its windows before those records arrived.
pub struct PartitionWatermarks<K: Ord> {
    parts: BTreeMap<K, PartitionClock>,
    idle_timeout: Option<Duration>,
    combined: Combiner,
    /// The live partition holding the watermark back, for metrics.
    holding: Option<K>,
}

impl<K: Ord + Clone> PartitionWatermarks<K> {
    /// `idle_timeout` of `None` or zero: partitions never count as idle for silence.
    pub fn new(idle_timeout: Option<Duration>) -> Self {
        Self {
            parts: BTreeMap::new(),
            idle_timeout: idle_timeout.filter(|d| !d.is_zero()),
            combined: Combiner::new(),
            holding: None,
        }
    }

    /// Track a new partition with its generator.
    pub fn add(&mut self, key: K, generator: Box<dyn WatermarkGenerator>, now: Instant) {
        self.parts.insert(
            key,
            PartitionClock {
                generator,
                watermark: MIN_WATERMARK,
                last_data: now,
            },
        );
    }

    /// A record of partition `key` with event time `timestamp` was read.
    pub fn on_record(&mut self, key: &K, timestamp: i64, now: Instant) {
        if let Some(p) = self.parts.get_mut(key) {
            if let Some(w) = p.generator.on_event(timestamp) {
                p.watermark = p.watermark.max(w);
            }
            p.last_data = now;
        }
    }

    /// The largest event time seen per partition, for the checkpoint.
    pub fn max_timestamp(&self, key: &K) -> Option<i64> {
        self.parts.get(key).and_then(|p| p.generator.max_timestamp())
    }

    /// A partition's own watermark (`None` before its first record).
    pub fn watermark(&self, key: &K) -> Option<i64> {
        self.parts.get(key).map(|p| p.watermark).filter(|w| *w != MIN_WATERMARK)
    }

    /// The watermark emitted last.
    pub fn current(&self) -> i64 {
        self.combined.emitted
    }

    /// The live partition with the lowest watermark, if any.
    pub fn holding_back(&self) -> Option<&K> {
        self.holding.as_ref()
    }

    /// Run the periodic generators and say what to emit, if anything changed: a
    /// watermark, idleness, or (when the last live partition just went quiet) both, the
    /// watermark that its final records allow first.
    pub fn on_interval(&mut self, now: Instant) -> Vec<SourceTime> {
        let mut live: Option<(i64, &K)> = None;
        let mut all: Option<i64> = None;
        for (k, p) in self.parts.iter_mut() {
            if let Some(w) = p.generator.on_periodic() {
                p.watermark = p.watermark.max(w);
            }
            // A partition that never had a record has no watermark to offer.
            if p.watermark != MIN_WATERMARK {
                all = Some(all.map_or(p.watermark, |m: i64| m.min(p.watermark)));
            }
            let silent = self
                .idle_timeout
                .is_some_and(|t| now.saturating_duration_since(p.last_data) >= t);
            if silent {
                continue;
            }
            if live.is_none_or(|(m, _)| p.watermark < m) {
                live = Some((p.watermark, k));
            }
        }
        self.holding = live.map(|(_, k)| k.clone());
        match self.combined.update(live.map(|(w, _)| w), all) {
            InputTime::Unchanged => vec![],
            InputTime::Advanced(w) => vec![SourceTime::Watermark(w)],
            InputTime::Idle => vec![SourceTime::Idle],
            InputTime::AdvancedThenIdle(w) => vec![SourceTime::Watermark(w), SourceTime::Idle],
        }
    }
}

/// The watermark of an operator subtask: the minimum over its inputs that are neither
/// idle nor ended. It never goes back.
#[derive(Debug)]
pub struct InputWatermarks {
    inputs: Vec<InputClock>,
    combined: Combiner,
}

#[derive(Debug, Clone, Copy)]
struct InputClock {
    watermark: i64,
    idle: bool,
    ended: bool,
}

/// What the subtask should do after an input's watermark status changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputTime {
    /// Nothing changed downstream.
    Unchanged,
    /// The combined watermark advanced (or the subtask became active again at it):
    /// fire timers up to it and forward it.
    Advanced(i64),
    /// Every input is idle or ended: forward idleness.
    Idle,
    /// The last live input went idle, and what the inputs delivered before still
    /// advances the watermark: fire timers up to it, forward it, then idleness.
    AdvancedThenIdle(i64),
}

impl InputWatermarks {
    /// Watermarks over `inputs` inputs, none seen yet.
    pub fn new(inputs: usize) -> Self {
        Self {
            inputs: vec![
                InputClock {
                    watermark: MIN_WATERMARK,
                    idle: false,
                    ended: false,
                };
                inputs
            ],
            combined: Combiner::new(),
        }
    }

    /// The combined watermark.
    pub fn current(&self) -> i64 {
        self.combined.emitted
    }

    /// Input `input` delivered `watermark`; returns the combined time if it advanced.
    pub fn on_watermark(&mut self, input: usize, watermark: i64) -> InputTime {
        let i = &mut self.inputs[input];
        i.watermark = i.watermark.max(watermark);
        i.idle = false;
        self.recompute()
    }

    /// Data arrived on `input`: an idle input is live again (at its old watermark).
    pub fn on_data(&mut self, input: usize) -> InputTime {
        if !self.inputs[input].idle {
            return InputTime::Unchanged;
        }
        self.inputs[input].idle = false;
        self.recompute()
    }

    /// Input `input` went idle (it no longer holds the watermark back).
    pub fn on_idle(&mut self, input: usize) -> InputTime {
        self.inputs[input].idle = true;
        self.recompute()
    }

    /// Input `input` ended.
    pub fn on_end(&mut self, input: usize) -> InputTime {
        self.inputs[input].ended = true;
        self.recompute()
    }

    fn recompute(&mut self) -> InputTime {
        let open = self.inputs.iter().filter(|i| !i.ended);
        let live = open.clone().filter(|i| !i.idle).map(|i| i.watermark).min();
        let delivered = open.map(|i| i.watermark).filter(|w| *w != MIN_WATERMARK).min();
        self.combined.update(live, delivered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_out_of_orderness_trails_the_maximum() {
        let mut g = BoundedOutOfOrderness::new(Duration::from_millis(100));
        assert_eq!(g.on_periodic(), None);
        g.on_event(1_000);
        g.on_event(900);
        assert_eq!(g.on_periodic(), Some(899));
    }

    #[test]
    fn source_emits_the_minimum_over_live_partitions() {
        let t0 = Instant::now();
        let mut w = PartitionWatermarks::new(Some(Duration::from_secs(10)));
        for p in 0..2 {
            w.add(p, Box::new(BoundedOutOfOrderness::monotonous()), t0);
        }
        w.on_record(&0, 100, t0);
        // Partition 1 has no data yet: it holds the watermark at the minimum.
        assert_eq!(w.on_interval(t0), vec![]);
        assert_eq!(w.holding_back(), Some(&1));
        w.on_record(&1, 50, t0);
        assert_eq!(w.on_interval(t0), vec![SourceTime::Watermark(49)]);
        // Partition 1 goes silent past the idle timeout: partition 0 alone counts.
        w.on_record(&0, 300, t0 + Duration::from_secs(11));
        assert_eq!(
            w.on_interval(t0 + Duration::from_secs(11)),
            vec![SourceTime::Watermark(299)]
        );
        // It comes back with older data: the watermark does not go back.
        w.on_record(&1, 60, t0 + Duration::from_secs(12));
        assert_eq!(w.on_interval(t0 + Duration::from_secs(12)), vec![]);
        assert_eq!(w.current(), 299);
    }

    #[test]
    fn a_partition_with_nothing_new_holds_the_watermark_until_its_idle_timeout() {
        let t0 = Instant::now();
        let mut w = PartitionWatermarks::new(Some(Duration::from_secs(5)));
        w.add("a", Box::new(BoundedOutOfOrderness::monotonous()), t0);
        w.add("b", Box::new(BoundedOutOfOrderness::monotonous()), t0);
        w.on_record(&"a", 500, t0);
        w.on_record(&"b", 100, t0);
        assert_eq!(w.on_interval(t0), vec![SourceTime::Watermark(99)]);
        // "a" runs ahead while "b" has nothing new (read to its end, its next records
        // still on their way): "b" holds the watermark at its own.
        let t1 = t0 + Duration::from_secs(4);
        w.on_record(&"a", 9_000, t1);
        assert_eq!(w.on_interval(t1), vec![]);
        assert_eq!(w.holding_back(), Some(&"b"));
        // Only silence past the idle timeout releases it.
        let t2 = t0 + Duration::from_secs(5);
        assert_eq!(w.on_interval(t2), vec![SourceTime::Watermark(8_999)]);
        // Both silent: idleness, said once.
        let t3 = t1 + Duration::from_secs(5);
        assert_eq!(w.on_interval(t3), vec![SourceTime::Idle]);
        assert_eq!(w.on_interval(t3), vec![], "idleness is said once");
        w.on_record(&"a", 9_500, t3);
        assert_eq!(w.on_interval(t3), vec![SourceTime::Watermark(9_499)], "active again");
    }

    #[test]
    fn without_an_idle_timeout_an_empty_partition_holds_the_watermark() {
        let t0 = Instant::now();
        let mut w = PartitionWatermarks::new(None);
        w.add(0, Box::new(BoundedOutOfOrderness::monotonous()), t0);
        w.add(1, Box::new(BoundedOutOfOrderness::monotonous()), t0);
        w.on_record(&0, 100, t0);
        assert_eq!(w.on_interval(t0 + Duration::from_secs(3600)), vec![]);
        assert_eq!(w.holding_back(), Some(&1));
    }

    #[test]
    fn inputs_combine_to_the_minimum_and_ended_or_idle_inputs_do_not_hold_back() {
        let mut w = InputWatermarks::new(3);
        assert_eq!(w.on_watermark(0, 10), InputTime::Unchanged);
        assert_eq!(w.on_watermark(1, 20), InputTime::Unchanged);
        assert_eq!(w.on_watermark(2, 5), InputTime::Advanced(5));
        assert_eq!(w.on_end(2), InputTime::Advanced(10));
        assert_eq!(w.on_idle(0), InputTime::Advanced(20));
        assert_eq!(w.on_idle(1), InputTime::Idle);
        assert_eq!(w.on_data(0), InputTime::Advanced(20));
        assert_eq!(w.on_watermark(0, 30), InputTime::Advanced(30));
    }

    #[test]
    fn an_input_that_went_idle_ahead_still_counts_when_the_last_live_one_goes_idle() {
        let mut w = InputWatermarks::new(2);
        // Input 0 read everything (far ahead) and went idle; input 1 had no data.
        assert_eq!(w.on_watermark(0, 1_000), InputTime::Unchanged);
        assert_eq!(w.on_idle(0), InputTime::Unchanged);
        assert_eq!(w.on_idle(1), InputTime::AdvancedThenIdle(1_000));
        assert_eq!(
            w.on_watermark(1, 500),
            InputTime::Advanced(1_000),
            "active again, no step back"
        );
    }
}
