"""passthru: a FUSE passthrough filesystem on backingfs."""
