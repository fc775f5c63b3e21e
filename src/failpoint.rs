//! Crash points: with `SLUICE_FAILPOINT=<name>:<checkpoint>` the process aborts (as a
//! crash would) at the named point once the checkpoint id reaches `<checkpoint>`. They
//! put a crash exactly in the narrow windows of the exactly-once protocol that random
//! SIGKILLs rarely hit:
//!
//! - `after_prepare`: a sink prepared its transaction, before acknowledging the barrier
//! - `before_store`: every subtask acknowledged, before the checkpoint is stored
//! - `before_commit`: the checkpoint is stored and announced, before a sink commits
//! - `after_commit`: a sink committed an epoch (the target has it), before it forgets
//!   it: the restored checkpoint still lists the epoch, and recovery must see it done
//! - `during_restore`: a restart restored a checkpoint and its sink recovered (committed
//!   or rolled back what the checkpoint left), before it reads anything: the next
//!   restart recovers the same checkpoint again
//!
//! And one that fails instead of crashing, for the paths a process takes when it gives
//! up on its own:
//!
//! - `fail_before_commit`: a sink's commit returns an error instead of committing
//!
//! `<name>:once:<checkpoint>` fires a point once per process, at the first checkpoint
//! from `<checkpoint>` on (a single failure, where `<name>:<checkpoint>` fails every
//! later one too).
//!
//! Release builds carry the points (`sluice verify` arms them in the job it runs and
//! kills); they are off unless the variable is set, and a process that finds one armed
//! says so in its log at start. The checks run per checkpoint, never per record.
//!
//! [`sabotage`] switches, which break the protocol on purpose so that tests can show
//! `verify` catching a broken build, exist only with the cargo feature `failpoints`.

use std::sync::OnceLock;

/// The crash points a process can be armed with.
pub const POINTS: [&str; 6] = [
    "after_prepare",
    "before_store",
    "before_commit",
    "after_commit",
    "during_restore",
    "fail_before_commit",
];

/// `SLUICE_FAILPOINT`, parsed once: the point, its first checkpoint, and whether it
/// fires only once.
struct Spec {
    point: String,
    from: u64,
    once: bool,
}

fn spec() -> Option<&'static Spec> {
    static SPEC: OnceLock<Option<Spec>> = OnceLock::new();
    SPEC.get_or_init(|| {
        let spec = std::env::var("SLUICE_FAILPOINT").ok()?;
        let (point, at) = spec.split_once(':')?;
        let (once, from) = match at.strip_prefix("once:") {
            Some(from) => (true, from),
            None => (false, at),
        };
        Some(Spec {
            point: point.to_string(),
            from: from.parse().ok()?,
            once,
        })
    })
    .as_ref()
}

/// The armed point as `<name>:<spec>`, for the warning a process logs at start.
pub fn armed_point() -> Option<String> {
    spec().map(|s| format!("{}:{}{}", s.point, if s.once { "once:" } else { "" }, s.from))
}

/// Whether `SLUICE_FAILPOINT` arms point `name` at `checkpoint`.
fn armed(name: &str, checkpoint: u64) -> bool {
    let Some(spec) = spec() else {
        return false;
    };
    if spec.point != name || checkpoint < spec.from {
        return false;
    }
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    !spec.once || !FIRED.swap(true, std::sync::atomic::Ordering::Relaxed)
}

/// With `SLUICE_FAILPOINT=<name>:<checkpoint>`, abort the process once the checkpoint
/// id reaches `<checkpoint>`.
pub fn crash_if(name: &str, checkpoint: u64) {
    if armed(name, checkpoint) {
        eprintln!("sluice: failpoint {name} at checkpoint {checkpoint}: aborting");
        std::process::abort();
    }
}

/// With `SLUICE_FAILPOINT=<name>:<checkpoint>`, an error once the checkpoint id reaches
/// `<checkpoint>`.
pub fn fail_if(name: &str, checkpoint: u64) -> crate::Result<()> {
    match armed(name, checkpoint) {
        true => Err(crate::Error::Internal(format!(
            "failpoint {name} at checkpoint {checkpoint}"
        ))),
        false => Ok(()),
    }
}

/// Test builds only (feature `failpoints`): whether `SLUICE_SABOTAGE` names this way of
/// breaking the exactly-once protocol on purpose, so that tests can show `sluice verify`
/// failing a broken build with the right numbers:
///
/// - `commit_early`: a two-phase sink commits each epoch when it prepares it, before the
///   checkpoint completes (a crash then replays what was committed: duplicates)
/// - `skip_restore_commit`: recovery ignores the epochs a checkpoint lists, so they are
///   rolled back instead of committed (missing records)
/// - `drop_late`: the window operator drops records later than allowed lateness instead
///   of dead-lettering them
#[cfg(feature = "failpoints")]
pub fn sabotage(name: &str) -> bool {
    static SABOTAGE: OnceLock<Option<String>> = OnceLock::new();
    SABOTAGE
        .get_or_init(|| std::env::var("SLUICE_SABOTAGE").ok())
        .as_deref()
        == Some(name)
}

/// Compiled out: sabotage exists only in test builds.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn sabotage(_name: &str) -> bool {
    false
}
