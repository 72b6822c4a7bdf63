"""Triton kernel generation from tile plans (no FX here)."""
