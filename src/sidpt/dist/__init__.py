"""Distributed plumbing: the world (torchrun env), role meshes and bridge groups (Plan), what
crosses them (transfer: trajectory groups, weights, reference requests)."""
