"""One module per `starflow` command; each body only parses options and calls the library."""
