"""Model families (config parsing, weight names, layer assembly), checkpoint loading and the built-in default model."""
