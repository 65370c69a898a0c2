"""Reading tensors files: one protocol (`base`), one read core (`memory`, `checks`,
`source`), one module per read engine (`local` with `staged`, `remote`, `ranges`,
`tensorizer`; `decrypt` for encrypted files), a converted load's partial reads (`parts`,
`partial`, `scatter`), and the reader that opens a file and picks the engine (`reader`)."""
