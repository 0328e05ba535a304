//! Process-wide settings made with prctl(2).

use std::io;

/// Turns transparent huge pages off for the whole process (PR_SET_THP_DISABLE).
///
/// mimalloc asks for huge pages on its arenas (MADV_HUGEPAGE), so with the kernel's
/// usual `madvise` setting the first byte touched in each 2 MiB of heap makes the
/// whole 2 MiB resident. A proxy's heap is small objects spread thin (a task and
/// two socket registrations per connection), which huge pages only inflate: the
/// first connection alone added 2.2 MiB of RSS. Nothing is mapped with huge pages
/// after this call; pages already huge stay so.
pub fn no_transparent_huge_pages() -> io::Result<()> {
    let on: libc::c_ulong = 1;
    let unused: libc::c_ulong = 0;
    // SAFETY: PR_SET_THP_DISABLE reads its integer arguments only and touches no
    // memory of ours; the variadic arguments are all unsigned longs, as prctl(2)
    // expects.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, on, unused, unused, unused) };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}
