"""Glue for frameworks that build and compile the model themselves (Axolotl, the HF Trainer).

Each module imports its framework only when it is itself imported; ``import dora_fused``
imports none of them.
"""
