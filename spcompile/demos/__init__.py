"""Built-in examples (``spcompile demo``): small models written the way real code is."""
