"""Feature-map pruning: FMP, FMPTL, selection, compaction."""
