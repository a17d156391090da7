"""Model execution shared by the prefill and decode workers (and by nothing else)."""
