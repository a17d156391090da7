"""The prefill worker: computes a prompt's KV and hands it, with the first token, to kvd."""
