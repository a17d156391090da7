"""Tandem: LLM serving with prefill and decode disaggregated."""
