"""POSIX helpers shared by the btrfs and zfs backends."""
