"""The bottom layer: errors, settings from the environment, redaction of secrets,
progress lines and interrupt handling; imports nothing else of the package."""
