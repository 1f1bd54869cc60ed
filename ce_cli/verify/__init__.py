"""The checks: options, the streaming pipeline, comparison, tolerance model, finite differences."""
