"""Pallas kernels for dsv4 (sparse compressed attention and friends), each with a jnp reference.

Empty for now: the model's attention runs on the XLA path (`attention_impl="xla"`).
"""
