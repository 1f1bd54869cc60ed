"""Output: one emit path (JSON, tables, -q, closed pipes) and the renderers of check reports."""
