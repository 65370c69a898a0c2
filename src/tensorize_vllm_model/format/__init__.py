"""The file format (above storage: names resolve URIs, keys are files): names of a serialized model's files and rank templates
(`names`), the record every tensors file carries about itself (`record`), everything known of
tensorizer beyond its public API and its error texts (`compat`), the header and index checks
(`header`), stored hashes (`hashes`) and the writer (`writer`)."""
