"""Unit tests: the package's own code in this process (real files, real tensorizer, real
servers on loopback where a test reads remotely); no vLLM engine."""
