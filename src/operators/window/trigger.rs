//! When a window emits: the built-in triggers and the trait for custom ones.

use serde::{Deserialize, Serialize};

use crate::state::KeyGroup;
use crate::time::timers::TimeDomain;
use crate::time::{max_timestamp, TimerService, Window};

/// What a trigger decides. Firing emits the window's current result; purging clears its
/// contents (the window itself stays until its cleanup time, so lateness still works).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerResult {
    /// Nothing happens.
    Continue,
    /// Emit the window's result, keep its contents.
    Fire,
    /// Drop the window's contents without a result.
    Purge,
    /// Emit the result, then drop the contents.
    FireAndPurge,
}

impl TriggerResult {
    /// Whether a result is emitted.
    pub fn fires(self) -> bool {
        matches!(self, TriggerResult::Fire | TriggerResult::FireAndPurge)
    }
    /// Whether the contents are dropped.
    pub fn purges(self) -> bool {
        matches!(self, TriggerResult::Purge | TriggerResult::FireAndPurge)
    }
}

/// Per (key, window) state a trigger may keep: checkpointed with the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerState {
    /// Records added to the window since it was created (the operator counts them).
    pub count: u64,
    /// A time the trigger remembers (e.g. its next early firing); 0 when unset.
    pub mark: i64,
}

/// What a trigger can see and do: the timers of the current key and window.
pub struct TriggerContext<'a> {
    /// Timers of the operator.
    pub timers: &'a mut TimerService,
    /// The key group of the current key.
    pub key_group: KeyGroup,
    /// The current key.
    pub key: &'a [u8],
    /// The current watermark.
    pub watermark: i64,
    /// The current processing time (ms).
    pub processing_time: i64,
}

impl TriggerContext<'_> {
    /// Ask for `on_timer` at `time` in `domain` for `window` of the current key.
    pub fn register(&mut self, domain: TimeDomain, time: i64, window: Window) {
        self.timers.register(domain, time, self.key_group, self.key, window);
    }
}

/// Decides when a window fires. The four hooks of Flink's triggers; `on_merge` and
/// `clear` have defaults. The window operator registers a timer at every window's end
/// (and at its cleanup, after allowed lateness) itself, so a trigger sees those without
/// registering them; it registers only its own (early) timers.
pub trait Trigger: Send + Sync {
    /// A record was added to `window` (`state.count` already counts it).
    fn on_element(&self, ts: i64, window: Window, state: &mut TriggerState, ctx: &mut TriggerContext) -> TriggerResult;
    /// An event-time timer of this window is due.
    fn on_event_time(
        &self,
        time: i64,
        window: Window,
        state: &mut TriggerState,
        ctx: &mut TriggerContext,
    ) -> TriggerResult;
    /// A processing-time timer of this window is due.
    fn on_processing_time(
        &self,
        time: i64,
        window: Window,
        state: &mut TriggerState,
        ctx: &mut TriggerContext,
    ) -> TriggerResult;
    /// Session windows were merged into `window`: register what the merged one needs.
    fn on_merge(&self, window: Window, state: &mut TriggerState, ctx: &mut TriggerContext) {
        let _ = (window, state, ctx);
    }
    /// The window is being removed.
    fn clear(&self, window: Window, state: &mut TriggerState, ctx: &mut TriggerContext) {
        let _ = (window, state, ctx);
    }
    /// Whether this trigger fires a window once, when the watermark passes its end, and
    /// at once for a late record, and does nothing else ([`EventTimeTrigger`]): the
    /// window operator can then keep its state by window.
    fn fires_at_event_time_end_only(&self) -> bool {
        false
    }
}

/// Fires when the watermark passes the window's end, and at once for every late record
/// within allowed lateness.
pub struct EventTimeTrigger;

impl Trigger for EventTimeTrigger {
    fn on_element(&self, _ts: i64, w: Window, _: &mut TriggerState, ctx: &mut TriggerContext) -> TriggerResult {
        if max_timestamp(&w) <= ctx.watermark {
            TriggerResult::Fire
        } else {
            TriggerResult::Continue
        }
    }
    fn on_event_time(&self, time: i64, w: Window, _: &mut TriggerState, _: &mut TriggerContext) -> TriggerResult {
        if time == max_timestamp(&w) {
            TriggerResult::Fire
        } else {
            TriggerResult::Continue
        }
    }
    fn on_processing_time(&self, _: i64, _: Window, _: &mut TriggerState, _: &mut TriggerContext) -> TriggerResult {
        TriggerResult::Continue
    }
    fn fires_at_event_time_end_only(&self) -> bool {
        true
    }
}

/// Fires when the processing-time clock passes the window's end.
pub struct ProcessingTimeTrigger;

impl Trigger for ProcessingTimeTrigger {
    fn on_element(&self, _: i64, _: Window, _: &mut TriggerState, _: &mut TriggerContext) -> TriggerResult {
        TriggerResult::Continue
    }
    fn on_event_time(&self, _: i64, _: Window, _: &mut TriggerState, _: &mut TriggerContext) -> TriggerResult {
        TriggerResult::Continue
    }
    fn on_processing_time(&self, time: i64, w: Window, _: &mut TriggerState, _: &mut TriggerContext) -> TriggerResult {
        if time == max_timestamp(&w) {
            TriggerResult::Fire
        } else {
            TriggerResult::Continue
        }
    }
}

/// Fires every `every` records, and when the window ends (`end` says in which time).
pub struct CountTrigger {
    /// Fire after this many records.
    pub every: u64,
    /// The trigger that decides the final firing.
    pub end: Box<dyn Trigger>,
}

impl Trigger for CountTrigger {
    fn on_element(&self, ts: i64, w: Window, state: &mut TriggerState, ctx: &mut TriggerContext) -> TriggerResult {
        let end = self.end.on_element(ts, w, state, ctx);
        if state.count.is_multiple_of(self.every) {
            TriggerResult::Fire
        } else {
            end
        }
    }
    fn on_event_time(&self, t: i64, w: Window, s: &mut TriggerState, ctx: &mut TriggerContext) -> TriggerResult {
        self.end.on_event_time(t, w, s, ctx)
    }
    fn on_processing_time(&self, t: i64, w: Window, s: &mut TriggerState, ctx: &mut TriggerContext) -> TriggerResult {
        self.end.on_processing_time(t, w, s, ctx)
    }
    fn on_merge(&self, w: Window, s: &mut TriggerState, ctx: &mut TriggerContext) {
        self.end.on_merge(w, s, ctx)
    }
}

/// Fires every `interval` of `clock` time while the window is open (early results of a
/// long window), and when it ends.
pub struct ContinuousTrigger {
    /// Fire every this many ms.
    pub interval: i64,
    /// Event or processing time.
    pub clock: TimeDomain,
    /// The trigger that decides the final firing.
    pub end: Box<dyn Trigger>,
}

impl ContinuousTrigger {
    fn schedule(&self, from: i64, w: Window, state: &mut TriggerState, ctx: &mut TriggerContext) {
        let next = from - from.rem_euclid(self.interval) + self.interval;
        if next < max_timestamp(&w) && state.mark != next {
            state.mark = next;
            ctx.register(self.clock, next, w);
        }
    }
}

impl Trigger for ContinuousTrigger {
    fn on_element(&self, ts: i64, w: Window, state: &mut TriggerState, ctx: &mut TriggerContext) -> TriggerResult {
        let end = self.end.on_element(ts, w, state, ctx);
        if state.mark == 0 {
            let from = match self.clock {
                TimeDomain::EventTime => ts,
                TimeDomain::ProcessingTime => ctx.processing_time,
            };
            self.schedule(from, w, state, ctx);
        }
        end
    }
    fn on_event_time(&self, t: i64, w: Window, s: &mut TriggerState, ctx: &mut TriggerContext) -> TriggerResult {
        if self.clock == TimeDomain::EventTime && t == s.mark {
            self.schedule(t, w, s, ctx);
            return TriggerResult::Fire;
        }
        self.end.on_event_time(t, w, s, ctx)
    }
    fn on_processing_time(&self, t: i64, w: Window, s: &mut TriggerState, ctx: &mut TriggerContext) -> TriggerResult {
        if self.clock == TimeDomain::ProcessingTime && t == s.mark {
            self.schedule(t, w, s, ctx);
            return TriggerResult::Fire;
        }
        self.end.on_processing_time(t, w, s, ctx)
    }
    fn on_merge(&self, w: Window, s: &mut TriggerState, ctx: &mut TriggerContext) {
        self.end.on_merge(w, s, ctx);
        if s.mark != 0 && s.mark < max_timestamp(&w) {
            ctx.register(self.clock, s.mark, w);
        }
    }
}

/// A trigger that never ends a window by itself (the end of a global window).
pub struct NeverTrigger;

impl Trigger for NeverTrigger {
    fn on_element(&self, _: i64, _: Window, _: &mut TriggerState, _: &mut TriggerContext) -> TriggerResult {
        TriggerResult::Continue
    }
    fn on_event_time(&self, _: i64, _: Window, _: &mut TriggerState, _: &mut TriggerContext) -> TriggerResult {
        TriggerResult::Continue
    }
    fn on_processing_time(&self, _: i64, _: Window, _: &mut TriggerState, _: &mut TriggerContext) -> TriggerResult {
        TriggerResult::Continue
    }
}

/// Turns every firing of the trigger it wraps into fire-and-purge: each result then
/// holds only the records since the previous one (deltas instead of running totals).
pub struct PurgingTrigger(pub Box<dyn Trigger>);

fn purging(r: TriggerResult) -> TriggerResult {
    match r {
        TriggerResult::Fire => TriggerResult::FireAndPurge,
        other => other,
    }
}

impl Trigger for PurgingTrigger {
    fn on_element(&self, ts: i64, w: Window, s: &mut TriggerState, ctx: &mut TriggerContext) -> TriggerResult {
        purging(self.0.on_element(ts, w, s, ctx))
    }
    fn on_event_time(&self, t: i64, w: Window, s: &mut TriggerState, ctx: &mut TriggerContext) -> TriggerResult {
        purging(self.0.on_event_time(t, w, s, ctx))
    }
    fn on_processing_time(&self, t: i64, w: Window, s: &mut TriggerState, ctx: &mut TriggerContext) -> TriggerResult {
        purging(self.0.on_processing_time(t, w, s, ctx))
    }
    fn on_merge(&self, w: Window, s: &mut TriggerState, ctx: &mut TriggerContext) {
        self.0.on_merge(w, s, ctx)
    }
    fn clear(&self, w: Window, s: &mut TriggerState, ctx: &mut TriggerContext) {
        self.0.clear(w, s, ctx)
    }
}
