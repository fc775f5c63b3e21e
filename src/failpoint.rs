//! Crash points for tests: with the cargo feature `failpoints` and
//! `SLUICE_FAILPOINT=<name>:<checkpoint>`, the process aborts (as a crash would) at the
//! named point once the checkpoint id reaches `<checkpoint>`. They put a crash exactly in
//! the narrow windows of the exactly-once protocol that random SIGKILLs rarely hit:
//!
//! - `after_prepare`: a sink prepared its transaction, before acknowledging the barrier
//! - `before_store`: every subtask acknowledged, before the checkpoint is stored
//! - `before_commit`: the checkpoint is stored and announced, before a sink commits
//! - `after_commit`: a sink committed an epoch (the target has it), before it forgets
//!   it: the restored checkpoint still lists the epoch, and recovery must see it done
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
//! Without the feature, `crash_if` and `fail_if` compile to nothing.

/// Whether `SLUICE_FAILPOINT` arms point `name` at `checkpoint`.
#[cfg(feature = "failpoints")]
fn armed(name: &str, checkpoint: u64) -> bool {
    let Ok(spec) = std::env::var("SLUICE_FAILPOINT") else {
        return false;
    };
    let Some((point, at)) = spec.split_once(':') else {
        return false;
    };
    if point != name {
        return false;
    }
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    match at.strip_prefix("once:") {
        Some(from) => {
            from.parse::<u64>().is_ok_and(|from| checkpoint >= from)
                && !FIRED.swap(true, std::sync::atomic::Ordering::Relaxed)
        }
        None => at.parse::<u64>().is_ok_and(|from| checkpoint >= from),
    }
}

/// With `SLUICE_FAILPOINT=<name>:<checkpoint>`, abort the process once the checkpoint
/// id reaches `<checkpoint>`.
#[cfg(feature = "failpoints")]
pub fn crash_if(name: &str, checkpoint: u64) {
    if armed(name, checkpoint) {
        eprintln!("sluice: failpoint {name} at checkpoint {checkpoint}: aborting");
        std::process::abort();
    }
}

/// Compiled out: failpoints exist only with the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn crash_if(_name: &str, _checkpoint: u64) {}

/// With `SLUICE_FAILPOINT=<name>:<checkpoint>`, an error once the checkpoint id reaches
/// `<checkpoint>`.
#[cfg(feature = "failpoints")]
pub fn fail_if(name: &str, checkpoint: u64) -> crate::Result<()> {
    match armed(name, checkpoint) {
        true => Err(crate::Error::Internal(format!(
            "failpoint {name} at checkpoint {checkpoint}"
        ))),
        false => Ok(()),
    }
}

/// Compiled out: failpoints exist only with the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn fail_if(_name: &str, _checkpoint: u64) -> crate::Result<()> {
    Ok(())
}
