"""Meshes, logical-axis rules and expert-parallel dispatch for dsv4."""

from sharding.rules import DEFAULT_RULES, logical_to_spec, param_shardings, single_device_mesh

__all__ = ["DEFAULT_RULES", "logical_to_spec", "param_shardings", "single_device_mesh"]
