"""Crash-safe, permission-safe file operations: how certd puts bytes on disk.

Three rules, because TLS servers read these files while certd writes them:

1. **Never a wider mode, not even for an instant.** A new file is created by ``open(O_CREAT |
   O_EXCL)`` with at most the owner's bits of its final mode, so the kernel itself creates it
   private; then ``fchown`` (when asked) and ``fchmod`` to the final mode, all before the first
   byte is written. Widening to a group only after the group is set means nobody outside that
   group can ever hold it open (permissions are checked at ``open()``, so an early open by the
   wrong group would read the key later). No create-then-chmod of a file with data in it.
2. **Readers see the old file or the new one, never a mix.** Write a hidden temporary file beside
   the target, ``fsync`` it, ``rename()`` it over the target, ``fsync`` the directory (the
   rename is only durable once the directory is). A failure removes the temporary file and
   leaves the target exactly as it was.
3. **Errors an operator can act on.** Every ``OSError`` becomes one-line
   :class:`~certd.core.errors.StoreError` naming the path (not the temporary file) and the system's
   reason, with a hint for full, read-only or forbidden filesystems. Data never appears in it.

4. **Never through a name someone else can swap.** In a directory certd does not own alone (a
   deploy directory ``www-data`` can write), every operation goes through a descriptor of that
   directory, opened once: ``openat``/``mkdirat``/``renameat``/``unlinkat``/``linkat`` with
   ``O_NOFOLLOW``, ``fchmod``/``fchown`` on the open file, ``(st_dev, st_ino)`` checked before a
   deletion, trees walked by descriptor (:func:`rmtree_at`), never by path. The ``*_at``
   helpers take that descriptor; the path-based helpers open the parent once and call them.

Temporary names are ``.<final name>.tmp-<random>``. A temporary file or directory is
``flock()``ed while it is being filled, so :func:`remove_stale_temps` can clean up what a
killed process left behind without touching one that another process is still writing.
"""

from certd.fs.oserrors import (TMP_INFIX, temp_name, store_error, os_errors)
from certd.fs.sync import FsyncCount, counting as counting_fsyncs, fsync
from certd.fs.descriptors import (open_dir, dir_fd, open_dir_at, open_own_dir, open_nofollow, read_at, lstat_at,
                                  fsync_fd, identity)
from certd.fs.removal import (delete_at, rmtree_at, secure_delete, secure_rmtree, hide_and_remove,
                              hide_and_remove_at, remove_stale_temps)
from certd.fs.writing import (write_new, atomic_write, atomic_write_at, fsync_dir, atomic_symlink, atomic_symlink_at,
                              ensure_dir, TempDir)

__all__ = [
    'FsyncCount', 'TMP_INFIX', 'TempDir', 'atomic_symlink', 'atomic_symlink_at', 'atomic_write', 'atomic_write_at',
    'counting_fsyncs', 'delete_at', 'dir_fd', 'ensure_dir', 'fsync', 'fsync_dir', 'fsync_fd', 'hide_and_remove',
    'hide_and_remove_at', 'identity', 'lstat_at', 'open_dir', 'open_dir_at', 'open_nofollow', 'open_own_dir',
    'os_errors', 'read_at', 'remove_stale_temps', 'rmtree_at', 'secure_delete', 'secure_rmtree', 'store_error',
    'temp_name', 'write_new',
]
