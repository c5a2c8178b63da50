"""Descriptor-based file operations (O_NOFOLLOW, *at() calls, atomic rename, fsync): the only
way certd touches a directory someone else might write."""
