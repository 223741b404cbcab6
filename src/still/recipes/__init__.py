"""still.recipes."""
