"""tracer: which files, and which byte ranges, a starting container reads (eBPF).

Use `Tracer` (tracer.trace) to load once per process, `add_target` per container, and
`collect` per startup window; `TracerUnavailable` says why a node cannot trace.
"""
