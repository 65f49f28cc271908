"""overlay: an overlayfs-compatible union filesystem on backingfs."""
