"""HSIC-JAX: channel pruning of CNNs by HSIC Lasso and normalised HSIC, in JAX."""

from hsic_jax.groups import ChannelGroup, ChannelSlice
