"""The file format, the bottom layer: names of a serialized model's files and rank templates
(`names`), and the record every tensors file carries about itself (`record`)."""
