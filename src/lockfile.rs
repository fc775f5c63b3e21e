//! An exclusive lock file that names its holder: held by the process for as long as
//! the file stays open (the kernel lets go when the process dies). One process per
//! checkpoint directory, one per dataset of a files sink.

use std::fs;
use std::io::Write as _;
use std::path::Path;

use crate::error::{Error, Result};

/// Lock `path` (created if missing) and write this process into it: `Ok(Ok(file))`
/// while held (keep the file open), `Ok(Err(holder))` when another process holds it,
/// with what that one wrote.
pub fn lock(path: &Path) -> Result<std::result::Result<fs::File, String>> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(Error::storage(format!("open {}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(path).unwrap_or_default();
            return Ok(Err(holder.trim().to_string()));
        }
        Err(fs::TryLockError::Error(e)) => return Err(Error::storage(format!("lock {}", path.display()))(e)),
    }
    let me = format!("pid {} since {}", std::process::id(), crate::clock::wall_clock_ms());
    file.set_len(0)
        .and_then(|()| file.write_all(me.as_bytes()))
        .map_err(Error::storage(format!("write {}", path.display())))?;
    Ok(Ok(file))
}
