"""The names of dwfs's own extended attributes, importable without the rest of vfs (the
command line reads and sets them through the mount)."""

QUERY_XATTR = b"user.dwfs.query"  # makes an empty directory a smart folder
STATE_XATTR = b"user.dwfs.state"  # a ghost's state: ghost, hydrated, pinned
