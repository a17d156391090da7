"""The OpenAI-compatible HTTP gateway and prefill/decode router (`tandem gateway`)."""
