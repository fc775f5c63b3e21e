//! Crash points for tests: with the cargo feature `failpoints` and
//! `SLUICE_FAILPOINT=<name>:<checkpoint>`, the process aborts (as a crash would) at the
//! named point once the checkpoint id reaches `<checkpoint>`. They put a crash exactly in
//! the narrow windows of the exactly-once protocol that random SIGKILLs rarely hit:
//!
//! - `after_prepare`: a sink prepared its transaction, before acknowledging the barrier
//! - `before_store`: every subtask acknowledged, before the checkpoint is stored
//! - `before_commit`: the checkpoint is stored and announced, before a sink commits
//!
//! And one that fails instead of crashing, for the paths a process takes when it gives
//! up on its own:
//!
//! - `fail_before_commit`: a sink's commit returns an error instead of committing
//!
//! Without the feature, `crash_if` and `fail_if` compile to nothing.

/// With `SLUICE_FAILPOINT=<name>:<checkpoint>`, abort the process once the checkpoint
/// id reaches `<checkpoint>`.
#[cfg(feature = "failpoints")]
pub fn crash_if(name: &str, checkpoint: u64) {
    let Ok(spec) = std::env::var("SLUICE_FAILPOINT") else {
        return;
    };
    let Some((point, from)) = spec.split_once(':') else {
        return;
    };
    if point == name && from.parse::<u64>().is_ok_and(|from| checkpoint >= from) {
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
    let Ok(spec) = std::env::var("SLUICE_FAILPOINT") else {
        return Ok(());
    };
    match spec.split_once(':') {
        Some((point, from)) if point == name && from.parse::<u64>().is_ok_and(|from| checkpoint >= from) => Err(
            crate::Error::Internal(format!("failpoint {name} at checkpoint {checkpoint}")),
        ),
        _ => Ok(()),
    }
}

/// Compiled out: failpoints exist only with the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn fail_if(_name: &str, _checkpoint: u64) -> crate::Result<()> {
    Ok(())
}
