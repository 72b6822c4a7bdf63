"""The simulator: predicted time and speedup of a pattern on a GPU, and why, before running.

    report = spcompile.simulate(Neighborhood(shape=(256, 256), window=80), heads=24)
    report.flop_bound, report.tile_bound, report.predicted_speedup, report.block_sparse
    print(report); report.to_json(); report.plot("tiles.png")

Layers: ``hardware`` (profiles: datasheet + fitted data), ``model`` (the cost of one launch of
the forward kernel over a tile plan), ``verdict`` (block-sparse or not, per axis, and why),
``simulate`` (patterns to launches), ``report`` (tables, JSON, pictures), ``optimize`` (tile
shapes and strides), ``calibrate`` (fits profiles to measurements).
"""

from .hardware import Profile, builtin_profiles, load_profile
from .optimize import Recommendation, recommend
from .report import SimReport
from .simulate import simulate

__all__ = [
    "Profile",
    "Recommendation",
    "SimReport",
    "builtin_profiles",
    "load_profile",
    "recommend",
    "simulate",
]
