//! What `verify` found, as text for a person and as JSON for a pipeline.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{Map, Value};

/// Sequence numbers of one kind of fault: how many, and the first of them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Numbers {
    /// How many.
    pub count: u64,
    /// The first 20 (sequence numbers, or `seq×times` for duplicates).
    pub first: Vec<String>,
}

impl Numbers {
    /// Count one, keeping its name among the first 20.
    pub fn add(&mut self, name: impl ToString) {
        self.count += 1;
        if self.first.len() < 20 {
            self.first.push(name.to_string());
        }
    }
}

/// One planned crash.
#[derive(Debug, Clone, Serialize)]
pub struct Kill {
    /// The run it ended (1-based).
    pub run: usize,
    /// Where: `sigkill` (at a random moment while records flowed) or a failpoint.
    pub point: String,
    /// Whether the failpoint was reached (otherwise the run was SIGKILLed after waiting).
    pub reached: bool,
    /// How long the run lived (ms).
    pub after_ms: u64,
    /// The newest checkpoint the run completed, as its API last said.
    pub checkpoint: Option<u64>,
}

/// A window whose row is missing or wrong.
#[derive(Debug, Clone, Serialize)]
pub struct WindowDiff {
    /// The key's values.
    pub key: String,
    /// The window's start (epoch ms).
    pub window_start: i64,
    /// What the reference computed (column → value), if the window should exist.
    pub expected: Option<Map<String, Value>>,
    /// What the target holds, if anything.
    pub got: Option<Map<String, Value>>,
}

/// The windowed check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Windows {
    /// Windows the reference computed.
    pub expected: u64,
    /// Windows whose final row equals the reference.
    pub matched: u64,
    /// Windows with no row.
    pub missing: Vec<WindowDiff>,
    /// Windows whose final row differs.
    pub wrong: Vec<WindowDiff>,
    /// Rows of windows the reference has no record for.
    pub unexpected: u64,
    /// Windows with more than one `on_time` firing (an append target written twice).
    pub fired_twice: Vec<WindowDiff>,
    /// Counts of the lists above beyond the first 20 shown.
    pub missing_count: u64,
    /// How many were wrong.
    pub wrong_count: u64,
    /// How many fired twice.
    pub fired_twice_count: u64,
}

/// Dead letters: the bad and late records of the input, each expected once.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeadLetters {
    /// Bad and late records produced.
    pub expected: u64,
    /// Dead letters found for them.
    pub found: u64,
    /// Records expected as dead letters but not found, by input position
    /// (`partition/offset`).
    pub missing: Numbers,
    /// Dead letters for records that should have been written (good records).
    pub unexpected: Numbers,
    /// Dead letters found more than once (a Kafka dead-letter topic is at least once).
    pub repeated: u64,
}

/// The whole report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The job verified (its verification name).
    pub job: String,
    /// The sink's target kind.
    pub target: String,
    /// The sink's strategy.
    pub strategy: String,
    /// Whether the strategy claims exactly once for this target.
    pub claims_exactly_once: bool,
    /// `pass_through` or `windows`.
    pub check: String,
    /// The verification topic.
    pub topic: String,
    /// The verification table, topic, key prefix or directory.
    pub table: String,
    /// Good records produced.
    pub records: u64,
    /// Bad records produced.
    pub bad_records: u64,
    /// Records produced later than allowed lateness.
    pub late_records: u64,
    /// The planned crashes.
    pub kills: Vec<Kill>,
    /// Process starts after the first.
    pub restarts: u64,
    /// Checkpoints completed over all runs (as each run's API last said).
    pub checkpoints: u64,
    /// Rows read back from the target.
    pub rows: u64,
    /// Pass-through: records with no row.
    pub missing: Numbers,
    /// Pass-through: records with more than one row.
    pub duplicated: Numbers,
    /// Pass-through: rows whose values differ from their record's.
    pub corrupted: Numbers,
    /// Rows that are no record's.
    pub unexpected: Numbers,
    /// The windowed check.
    pub windows: Option<Windows>,
    /// Dead letters.
    pub dead_letters: DeadLetters,
    /// The job's prepared or XA transactions still open in the target at the end.
    pub open_transactions: u64,
    /// Whether the last run stopped cleanly on SIGTERM.
    pub clean_stop: bool,
    /// What verify created was kept (`--keep`).
    pub kept: bool,
    /// What could not be removed.
    pub cleanup_failed: Vec<String>,
    /// Every fault found, one line each.
    pub problems: Vec<String>,
    /// Notes that are not faults.
    pub notes: Vec<String>,
    /// Whether the target is exactly right.
    pub passed: bool,
    /// How long verify took (s).
    pub seconds: f64,
    /// The job's log (all runs).
    pub log: String,
}

impl Report {
    /// Collect the problems from the figures and decide.
    pub fn judge(&mut self) {
        let mut p = Vec::new();
        if self.missing.count > 0 {
            p.push(format!(
                "{} records missing from the target (first: {})",
                self.missing.count,
                self.missing.first.join(", ")
            ));
        }
        if self.duplicated.count > 0 {
            p.push(format!(
                "{} records written more than once (seq×times, first: {})",
                self.duplicated.count,
                self.duplicated.first.join(", ")
            ));
        }
        if self.corrupted.count > 0 {
            p.push(format!(
                "{} rows differ from their records (first: {})",
                self.corrupted.count,
                self.corrupted.first.join(", ")
            ));
        }
        if self.unexpected.count > 0 {
            p.push(format!(
                "{} rows are no input record's (first: {})",
                self.unexpected.count,
                self.unexpected.first.join(", ")
            ));
        }
        if let Some(w) = &self.windows {
            if w.missing_count > 0 {
                p.push(format!("{} of {} windows have no row", w.missing_count, w.expected));
            }
            if w.wrong_count > 0 {
                p.push(format!("{} of {} windows are wrong", w.wrong_count, w.expected));
            }
            if w.fired_twice_count > 0 {
                p.push(format!(
                    "{} windows were written on time more than once",
                    w.fired_twice_count
                ));
            }
            if w.unexpected > 0 {
                p.push(format!(
                    "{} window rows are for windows no record falls into",
                    w.unexpected
                ));
            }
        }
        let d = &self.dead_letters;
        if d.missing.count > 0 {
            p.push(format!(
                "{} of {} bad or late records are not in the dead letters (first, as partition/offset: {})",
                d.missing.count,
                d.expected,
                d.missing.first.join(", ")
            ));
        }
        if d.unexpected.count > 0 {
            p.push(format!(
                "{} good records were dead-lettered (first: {})",
                d.unexpected.count,
                d.unexpected.first.join(", ")
            ));
        }
        if self.open_transactions > 0 {
            p.push(format!(
                "{} prepared transactions of the job were left open",
                self.open_transactions
            ));
        }
        if !self.claims_exactly_once {
            self.notes.push(format!(
                "strategy {} is not exactly once for a {} target by design: a replay writes again what it replays",
                self.strategy, self.target
            ));
        }
        self.passed = p.is_empty();
        self.problems = p;
    }

    /// The report as text.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let verdict = match self.passed {
            true => "PASSED: the target holds exactly what the input must give",
            false => "FAILED",
        };
        let _ = writeln!(s, "sluice verify: {verdict}");
        let _ = writeln!(
            s,
            "  job {} → {} {} ({}), check: {}",
            self.job, self.target, self.table, self.strategy, self.check
        );
        let _ = writeln!(
            s,
            "  input: {} records, {} bad, {} late, on topic {}",
            self.records, self.bad_records, self.late_records, self.topic
        );
        let kills: Vec<String> = self
            .kills
            .iter()
            .map(|k| {
                format!(
                    "{}{} after {:.1}s",
                    k.point,
                    if k.reached { "" } else { " (not reached: SIGKILL)" },
                    k.after_ms as f64 / 1000.0
                )
            })
            .collect();
        let _ = writeln!(s, "  kills: {} [{}]", self.kills.len(), kills.join("; "));
        let _ = writeln!(
            s,
            "  restarts: {}, checkpoints completed: {}, rows read back: {}",
            self.restarts, self.checkpoints, self.rows
        );
        if let Some(w) = &self.windows {
            let _ = writeln!(s, "  windows: {} expected, {} right", w.expected, w.matched);
            for d in w.wrong.iter().chain(&w.missing).chain(&w.fired_twice).take(10) {
                let _ = writeln!(
                    s,
                    "    key {} window {}: expected {} got {}",
                    d.key,
                    d.window_start,
                    d.expected
                        .as_ref()
                        .map_or("nothing".into(), |m| Value::Object(m.clone()).to_string()),
                    d.got
                        .as_ref()
                        .map_or("nothing".into(), |m| Value::Object(m.clone()).to_string())
                );
            }
        }
        let d = &self.dead_letters;
        let _ = writeln!(s, "  dead letters: {} expected, {} found", d.expected, d.found);
        let _ = writeln!(s, "  transactions left open: {}", self.open_transactions);
        for p in &self.problems {
            let _ = writeln!(s, "  PROBLEM: {p}");
        }
        for n in &self.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        if !self.clean_stop {
            let _ = writeln!(s, "  note: the last run did not stop cleanly on SIGTERM");
        }
        match (self.kept, self.cleanup_failed.is_empty()) {
            (true, _) => {
                let _ = writeln!(
                    s,
                    "  kept: the topic, table and checkpoints (--keep); the job's log: {}",
                    self.log
                );
            }
            (false, false) => {
                let _ = writeln!(s, "  could not remove: {}", self.cleanup_failed.join("; "));
            }
            _ => {}
        }
        let _ = writeln!(s, "  took {:.1}s", self.seconds);
        s
    }
}
