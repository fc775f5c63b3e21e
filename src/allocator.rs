//! The process's allocator settings (mimalloc, the `sluice` binary's global allocator).
//!
//! mimalloc keeps freed pages for a second before it hands them back to the system, and
//! on Linux it commits its arenas eagerly, so that a purge only marks pages free
//! (`MADV_FREE`) and they stay counted in the process's resident memory until the
//! kernel needs them. A job reading a backlog frees as much as it allocates (every
//! record, every fired window): with mimalloc's defaults the bench's 10,000-key
//! windowed job peaked at 270–290 MiB resident; with freed memory returned at once and
//! arenas committed as they are used, at 203–236 MiB, at the same rate and with less
//! CPU time (fewer pages touched afresh). See docs/benchmarks.md.

use std::os::raw::c_int;

// Option numbers of mimalloc 3 (`mi_option_e` in its `mimalloc.h`), the version
// `libmimalloc-sys` builds by default; the crate only names those of mimalloc 2.
const ARENA_EAGER_COMMIT: c_int = 4;
const PURGE_DELAY: c_int = 15;

/// Return freed memory to the system at once and commit arenas only as they are used.
/// Must run before mimalloc reserves its first arena, at the first allocation: the
/// `sluice` binary and the end-to-end bench call it from `.init_array`, before `main`.
/// Harmless where mimalloc is not the global allocator (it tunes one nothing uses).
pub fn return_freed_memory_promptly() {
    // SAFETY: setting an option is a plain store into mimalloc's option table, valid
    // at any time; the numbers are checked against mimalloc's defaults in the tests.
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, 0);
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0);
    }
}

/// Puts [`return_freed_memory_promptly`] in the binary's `.init_array`, so that it runs
/// before `main`, before mimalloc reserves its first arena. Use once, in a binary whose
/// global allocator is mimalloc.
#[macro_export]
macro_rules! tune_allocator_before_main {
    () => {
        #[used]
        #[cfg_attr(target_os = "linux", link_section = ".init_array")]
        static TUNE_ALLOCATOR: extern "C" fn() = {
            extern "C" fn tune() {
                $crate::allocator::return_freed_memory_promptly();
            }
            tune
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_numbers_are_mimallocs() {
        // Read before anything sets them: mimalloc 3's defaults in its `options.c` (a
        // purge delay of 1,000 ms; arenas committed eagerly on overcommitting systems: 2).
        // SAFETY: reading an option is a plain load from mimalloc's option table.
        let (delay, eager) = unsafe {
            (
                libmimalloc_sys::mi_option_get(PURGE_DELAY),
                libmimalloc_sys::mi_option_get(ARENA_EAGER_COMMIT),
            )
        };
        assert_eq!((delay, eager), (1000, 2), "mimalloc's option numbers moved");
    }
}
