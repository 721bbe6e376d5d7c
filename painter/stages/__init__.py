"""Ray wiring of the jobs: one module per job (tokenize, train, generate), built on the plain callables below."""
