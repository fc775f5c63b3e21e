//! Time: event-time extraction, watermarks (per partition, with idleness), the timer
//! service, and the processing-time clock.
//!
//! Event time is read from a record once, at the source. Watermarks say "no record with
//! an earlier event time is expected any more"; they are generated per Kafka partition,
//! the source emits the minimum over its live partitions, and every operator forwards
//! the minimum over its live inputs ([`watermark::InputWatermarks`]).

pub mod extract;
#[cfg(feature = "rocksdb")]
pub mod rocks_timers;
pub mod timers;
pub mod watermark;

pub use crate::clock::wall_clock_ms;
pub use extract::{too_far_ahead, TimestampAssigner};
#[cfg(feature = "rocksdb")]
pub use rocks_timers::RocksTimers;
pub use timers::{Timer, TimerService};
pub use watermark::{InputWatermarks, PartitionWatermarks, WatermarkGenerator};

/// A window: event time `start..end` (end exclusive), the namespace of its state.
pub type Window = crate::state::Namespace;

/// The watermark before any has been seen.
pub const MIN_WATERMARK: i64 = i64::MIN;

/// The last event time a window holds (Flink's `maxTimestamp`).
pub fn max_timestamp(w: &Window) -> i64 {
    w.end.saturating_sub(1)
}

/// Processing time as the runtime sees it: the wall clock at start plus tokio's
/// monotonic time since, so that tests with paused time control it.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_ms: i64,
    base: tokio::time::Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self::starting_at(wall_clock_ms())
    }
}

impl Clock {
    /// A clock that reads `epoch_ms` now.
    pub fn starting_at(epoch_ms: i64) -> Self {
        Self {
            base_ms: epoch_ms,
            base: tokio::time::Instant::now(),
        }
    }

    /// Processing time: milliseconds since the epoch.
    pub fn now_ms(&self) -> i64 {
        self.base_ms + self.base.elapsed().as_millis() as i64
    }
}
