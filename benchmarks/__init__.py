"""Load tests, benchmarks and synthetic phantoms; talk to the console over HTTP."""
