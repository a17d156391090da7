"""Code shared by every Tandem service: config helpers, logging, generated stubs."""
