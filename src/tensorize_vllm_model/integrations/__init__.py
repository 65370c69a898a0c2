"""The integrations with serving engines; vLLM is the one there is."""
