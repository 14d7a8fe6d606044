"""Distributed plumbing: the world (torchrun env), role meshes (Plan), weight publishing."""
