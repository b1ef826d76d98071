"""Getting bytes from registries: the OCI registry client, range scheduling and chunk cache.

The registry client here is shared by every part (converter, agent, profiles, rig)."""
