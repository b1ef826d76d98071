"""Learned prefetch profiles: run traces (`trace`) are learned and merged (`learn`) into
a versioned, strictly parsed profile (`format`), turned into the agent's ordered
prefetch plan (`plan`), and shared fleet-wide as registry artifacts that refer to the
accelerated image (`registry_sync`). Import the submodules; this package stays empty so
that the tracer can use the format without pulling in the registry client."""
