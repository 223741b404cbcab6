"""still.search."""
