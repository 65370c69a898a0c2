"""Reading tensors files: one protocol (`base`), one module per read engine (`local`,
`remote`, `tensorizer`; `decrypt` for the first two), and the reader that opens a file and
picks the engine (`reader`). See `read.base` for the request type."""
