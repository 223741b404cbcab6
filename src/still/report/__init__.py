"""still.report."""
