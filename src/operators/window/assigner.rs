//! Which windows a record belongs to.

use crate::time::Window;

/// Cuts time into windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowAssigner {
    /// `[start, start + size)` back to back, boundaries at `offset` modulo `size`.
    /// Fixed, non-overlapping windows of `size` ms, shifted by `offset`.
    Tumbling {
        /// Window length (ms).
        size: i64,
        /// Shift of window starts from the epoch (ms).
        offset: i64,
    },
    /// Windows of `size` starting every `slide`.
    /// Windows of `size` ms starting every `slide` ms.
    Sliding {
        /// Window length (ms).
        size: i64,
        /// Distance between window starts (ms).
        slide: i64,
        /// Shift of window starts from the epoch (ms).
        offset: i64,
    },
    /// `[t, t + gap)` per record, merged with every window of its key it touches.
    /// Per-key windows that close after `gap` ms without a record.
    Session {
        /// Inactivity that closes a session (ms).
        gap: i64,
    },
    /// One window for all time.
    Global,
}

impl WindowAssigner {
    /// The windows a record with event time `ts` falls into (appended to `out`).
    pub fn assign(&self, ts: i64, out: &mut Vec<Window>) {
        out.clear();
        match *self {
            WindowAssigner::Tumbling { size, offset } => {
                let start = window_start(ts, offset, size);
                out.push(Window {
                    start,
                    end: start.saturating_add(size),
                });
            }
            WindowAssigner::Sliding { size, slide, offset } => {
                let mut start = window_start(ts, offset, slide);
                while start > ts.saturating_sub(size) {
                    out.push(Window {
                        start,
                        end: start.saturating_add(size),
                    });
                    start = start.saturating_sub(slide);
                }
            }
            WindowAssigner::Session { gap } => out.push(Window {
                start: ts,
                end: ts.saturating_add(gap),
            }),
            WindowAssigner::Global => out.push(Window {
                start: i64::MIN,
                end: i64::MAX,
            }),
        }
    }

    /// Whether windows merge (sessions).
    pub fn is_merging(&self) -> bool {
        matches!(self, WindowAssigner::Session { .. })
    }
}

/// Start of the window of length `size` holding `ts` (Flink's `getWindowStartWithOffset`).
fn window_start(ts: i64, offset: i64, size: i64) -> i64 {
    ts - (ts - offset).rem_euclid(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assign(a: WindowAssigner, ts: i64) -> Vec<(i64, i64)> {
        let mut out = Vec::new();
        a.assign(ts, &mut out);
        out.into_iter().map(|w| (w.start, w.end)).collect()
    }

    #[test]
    fn tumbling_with_offset_and_negative_times() {
        let t = WindowAssigner::Tumbling { size: 10, offset: 0 };
        assert_eq!(assign(t, 0), vec![(0, 10)]);
        assert_eq!(assign(t, 9), vec![(0, 10)]);
        assert_eq!(assign(t, 10), vec![(10, 20)]);
        assert_eq!(assign(t, -1), vec![(-10, 0)]);
        let shifted = WindowAssigner::Tumbling { size: 10, offset: 3 };
        assert_eq!(assign(shifted, 12), vec![(3, 13)]);
        assert_eq!(assign(shifted, 13), vec![(13, 23)]);
    }

    #[test]
    fn sliding_windows_overlap() {
        let s = WindowAssigner::Sliding {
            size: 10,
            slide: 5,
            offset: 0,
        };
        assert_eq!(assign(s, 7), vec![(5, 15), (0, 10)]);
        assert_eq!(assign(s, 10), vec![(10, 20), (5, 15)]);
    }
}
