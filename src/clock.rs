//! The wall clock, read the same way by every layer (state's time-to-live as much as
//! time's watermarks): the lowest leaf, importing nothing of the crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock time in epoch milliseconds.
pub fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
