//! Restart strategies: after a failure, whether to restart the job and after how long.
//! Pure logic over timestamps the caller passes in, so it is tested without sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// What happens when the running job fails (a broker or database error, a dead task).
/// Every restart restores the newest completed checkpoint.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "strategy", rename_all = "snake_case", deny_unknown_fields)]
pub enum RestartConfig {
    /// Fail the process at the first error.
    None,
    /// Restart up to `attempts` times, waiting `delay` before each.
    FixedDelay {
        /// Restarts allowed in the job's life.
        #[serde(default = "attempts")]
        attempts: u32,
        /// Pause before each restart.
        #[serde(default = "delay", with = "humantime_serde")]
        delay: Duration,
    },
    /// Restart after `delay` unless more than `max_failures` happened within `interval`.
    FailureRate {
        /// Failures allowed within `interval`.
        #[serde(default = "attempts")]
        max_failures: u32,
        /// The window over which failures are counted.
        #[serde(default = "failure_interval", with = "humantime_serde")]
        interval: Duration,
        /// Pause before each restart.
        #[serde(default = "delay", with = "humantime_serde")]
        delay: Duration,
    },
    /// Restart forever, waiting `initial`, then `initial * multiplier`, ... up to `max`;
    /// the wait falls back to `initial` after `reset_after` without failure.
    ExponentialBackoff {
        /// First pause.
        #[serde(default = "delay", with = "humantime_serde")]
        initial: Duration,
        /// Longest pause.
        #[serde(default = "max_backoff", with = "humantime_serde")]
        max: Duration,
        /// Factor from one pause to the next.
        #[serde(default = "multiplier")]
        multiplier: f64,
        /// A run this long without a failure starts the pauses over.
        #[serde(default = "reset_after", with = "humantime_serde")]
        reset_after: Duration,
    },
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig::ExponentialBackoff {
            initial: delay(),
            max: max_backoff(),
            multiplier: multiplier(),
            reset_after: reset_after(),
        }
    }
}

// The defaults of `[restart]`.
fn attempts() -> u32 {
    3
}
fn delay() -> Duration {
    Duration::from_secs(1)
}
fn failure_interval() -> Duration {
    Duration::from_secs(60)
}
fn max_backoff() -> Duration {
    Duration::from_secs(60)
}
fn multiplier() -> f64 {
    2.0
}
fn reset_after() -> Duration {
    Duration::from_secs(600)
}

/// Decides, after each failure, whether and when the job restarts.
#[derive(Debug)]
pub struct RestartPolicy {
    config: RestartConfig,
    failures: VecDeque<Instant>,
    attempts: u32,
    backoff: Duration,
}

impl RestartPolicy {
    /// A policy as configured.
    pub fn new(config: RestartConfig) -> Self {
        let backoff = match &config {
            RestartConfig::ExponentialBackoff { initial, .. } => *initial,
            _ => Duration::ZERO,
        };
        Self {
            config,
            failures: VecDeque::new(),
            attempts: 0,
            backoff,
        }
    }

    /// A failure happened at `now`: `Some(wait)` to restart after `wait`, `None` to give up.
    pub fn on_failure(&mut self, now: Instant) -> Option<Duration> {
        match &self.config {
            RestartConfig::None => None,
            RestartConfig::FixedDelay { attempts, delay } => {
                self.attempts += 1;
                (self.attempts <= *attempts).then_some(*delay)
            }
            RestartConfig::FailureRate {
                max_failures,
                interval,
                delay,
            } => {
                self.failures.push_back(now);
                while let Some(first) = self.failures.front() {
                    if now.duration_since(*first) > *interval {
                        self.failures.pop_front();
                    } else {
                        break;
                    }
                }
                (self.failures.len() as u32 <= *max_failures).then_some(*delay)
            }
            RestartConfig::ExponentialBackoff {
                initial,
                max,
                multiplier,
                reset_after,
            } => {
                if let Some(last) = self.failures.back() {
                    if now.duration_since(*last) >= *reset_after {
                        self.backoff = *initial;
                    }
                }
                self.failures.clear();
                self.failures.push_back(now);
                let wait = self.backoff;
                self.backoff = Duration::try_from_secs_f64(self.backoff.as_secs_f64() * multiplier)
                    .unwrap_or(*max)
                    .min(*max);
                Some(wait)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn none_never_restarts() {
        let mut p = RestartPolicy::new(RestartConfig::None);
        assert_eq!(p.on_failure(Instant::now()), None);
    }

    #[test]
    fn fixed_delay_counts_attempts() {
        let mut p = RestartPolicy::new(RestartConfig::FixedDelay { attempts: 2, delay: S });
        let t = Instant::now();
        assert_eq!(p.on_failure(t), Some(S));
        assert_eq!(p.on_failure(t), Some(S));
        assert_eq!(p.on_failure(t), None);
    }

    #[test]
    fn failure_rate_forgets_old_failures() {
        let mut p = RestartPolicy::new(RestartConfig::FailureRate {
            max_failures: 2,
            interval: 10 * S,
            delay: S,
        });
        let t = Instant::now();
        assert_eq!(p.on_failure(t), Some(S));
        assert_eq!(p.on_failure(t + S), Some(S));
        assert_eq!(p.on_failure(t + 2 * S), None, "three failures within 10 s");
        let mut p = RestartPolicy::new(RestartConfig::FailureRate {
            max_failures: 2,
            interval: 10 * S,
            delay: S,
        });
        assert_eq!(p.on_failure(t), Some(S));
        assert_eq!(p.on_failure(t + S), Some(S));
        assert_eq!(
            p.on_failure(t + 20 * S),
            Some(S),
            "the first two are outside the window"
        );
    }

    #[test]
    fn exponential_backoff_grows_caps_and_resets() {
        let mut p = RestartPolicy::new(RestartConfig::ExponentialBackoff {
            initial: S,
            max: 5 * S,
            multiplier: 2.0,
            reset_after: 60 * S,
        });
        let t = Instant::now();
        let waits: Vec<_> = (0..5).map(|i| p.on_failure(t + i * S).unwrap()).collect();
        assert_eq!(waits, vec![S, 2 * S, 4 * S, 5 * S, 5 * S]);
        assert_eq!(p.on_failure(t + 200 * S), Some(S), "quiet for longer than reset_after");
    }
}
