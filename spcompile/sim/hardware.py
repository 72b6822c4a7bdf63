"""Hardware profiles: what a GPU can do (datasheet) and how fast our kernel runs on it (fitted).

A profile is data, a JSON file: built-in ones live in ``spcompile/sim/profiles/``, calibrated
ones under ``~/.cache/spcompile/profiles/`` (``spcompile calibrate`` writes them), and any path
works too. Re-calibrating edits the file, never the code.

Two halves:

- ``hardware``: SM count, peak dense matrix rates per dtype, HBM and L2 bandwidth, L2 size,
  shared memory and warps per SM, launch latency. From datasheets, or measured by ``calibrate``.
- ``kernel``: the forward kernel's efficiency coefficients (see ``model``): achieved fraction of
  the peak rate per launch configuration, partial-tile extra, per-Q-tile overhead, permuted-load
  cost; plus the dense SDPA rate it is compared with. Fitted to measurements. A profile without
  its own takes another profile's (``kernel_from``) and is marked uncalibrated: its predictions
  are the datasheet rates scaled by another GPU's efficiencies, a guide rather than a measurement.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DTYPES",
    "KernelCoefficients",
    "LaunchKey",
    "Profile",
    "builtin_profiles",
    "dtype_name",
    "load_profile",
    "user_profile_dir",
]

PROFILE_DIR = Path(__file__).parent / "profiles"

#: dtype names a profile's rates are keyed by, and their element sizes in bytes.
DTYPES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
}


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` / ``"bfloat16"`` / ``"bf16"`` -> ``"bf16"`` (and fp16, fp32)."""
    name = _ALIASES.get(str(dtype).lower())
    if name is None:
        raise ValueError(f"expected a dtype among bf16, fp16, fp32 (or their torch names), "
                         f"got {dtype!r}")
    return name


def user_profile_dir() -> Path:
    """Where ``calibrate`` writes profiles: ``profiles/`` beside the kernel cache
    (``$SPCOMPILE_CACHE_DIR``, default ``~/.cache/spcompile``)."""
    root = os.environ.get("SPCOMPILE_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "spcompile"
    return base / "profiles"


@dataclass(frozen=True)
class LaunchKey:
    """One launch configuration of the forward kernel: tile volumes, warps, pipeline stages,
    whether tiles are boxes of an N-d grid (``permuted``: loads through the token layout,
    2-D/3-D TMA boxes), and whether it is the warp-specialized Hopper kernel (``specialized``:
    ``codegen.sm90``, 12 warps: two consumer warpgroups and a producer); each runs at its own
    efficiency."""

    q_tokens: int
    kv_tokens: int
    warps: int
    stages: int
    permuted: bool = False
    specialized: bool = False

    def __str__(self) -> str:
        text = f"q{self.q_tokens}-kv{self.kv_tokens}-w{self.warps}-s{self.stages}"
        return text + "-ws" * self.specialized + "-nd" * self.permuted

    @classmethod
    def parse(cls, text: str) -> LaunchKey:
        try:
            parts = text.split("-")
            q, kv, w, s = parts[:4]
            flags = parts[4:]
            if flags not in ([], ["ws"], ["nd"], ["ws", "nd"]):
                raise ValueError(text)
            return cls(int(q[1:]), int(kv[2:]), int(w[1:]), int(s[1:]), "nd" in flags,
                       "ws" in flags)
        except ValueError:
            raise ValueError(f"expected a launch key like 'q128-kv64-w4-s2' (N-d tiles: "
                             f"'q128-kv128-w8-s3-nd'; the warp-specialized kernel: "
                             f"'q128-kv64-w12-s4-ws'), got {text!r}") from None


@dataclass(frozen=True)
class KernelCoefficients:
    """How our forward kernel runs on one GPU (see ``model`` for where each enters).

    ``efficiency[key]``: achieved fraction of the peak matrix rate of one SM while it runs full
    tiles at launch configuration ``key``. ``partial_extra``: a partial tile costs ``1 +
    partial_extra`` full tiles (mask arithmetic). ``q_tile_overhead_us``: prologue and epilogue
    of one program (load Q, write O and LSE). ``item_overhead_us``: the same for one item of a
    persistent launch (``codegen.sm90.persistent_for``), whose next Q tile loads while the item
    before it runs (None: ``q_tile_overhead_us``). ``permute_ns_per_token``: extra SM time per
    token loaded through a permuted (gathered) layout. ``gather_extra``: a tile of gathered
    global keys (``plan.gather``: loaded through a token index, masked with the exclusion
    expression) costs that many full tiles more. ``sdpa_tflops[dtype]``: the dense SDPA rate
    speedups are measured against; ``sdpa_tflops_by_kv_len[dtype][kv_len]`` the rates measured
    at several key lengths (SDPA slowed from ~636 to ~583 TFLOP/s between 65k and 115k tokens on
    the H100, 24 heads), interpolated in log(kv_len). ``host_us``: CPU time of one ``attn_fwd``
    call (kernels shorter than that are host-bound when the CPU cannot run ahead).
    ``list_tile_us``: extra SM time of a tile whose KV index comes from a run-time list (TopK):
    a dependent load before every K/V load, a latency per tile whatever its size.
    ``rank_gsteps``: billions of row elements per second that TopK's ranking kernel scans (each
    of its ``k`` rounds is a max and an argmax over the row: compute, not bandwidth).
    """

    efficiency: dict[str, float]
    partial_extra: float
    q_tile_overhead_us: float
    permute_ns_per_token: float
    sdpa_tflops: dict[str, float]
    gather_extra: float = 0.0
    sdpa_tflops_by_kv_len: dict[str, dict[str, float]] = field(default_factory=dict)
    host_us: float = 0.0
    list_tile_us: float = 0.0
    rank_gsteps: float = 0.0
    item_overhead_us: float | None = None
    fit: dict[str, Any] = field(default_factory=dict)

    def overhead_us(self, persistent: bool) -> float:
        """A program's (or a persistent launch's item's) start and end."""
        if persistent and self.item_overhead_us is not None:
            return self.item_overhead_us
        return self.q_tile_overhead_us

    def efficiency_for(self, key: LaunchKey) -> tuple[float, str | None]:
        """(efficiency, note): exact when fitted; else the same launch on the other layout kind;
        else the nearest fitted launch (same kernel, then tile volume, warps, stages)."""
        text = str(key)
        if text in self.efficiency:
            return self.efficiency[text], None
        if not self.efficiency:
            raise ValueError("the profile has no kernel efficiencies")
        other = str(dataclasses.replace(key, permuted=not key.permuted))
        if other in self.efficiency:
            return self.efficiency[other], (f"launch {text} was never measured: using the "
                                            f"efficiency of {other}")

        def distance(candidate: str) -> tuple[int, int, int, int, int]:
            k = LaunchKey.parse(candidate)
            return (int(k.specialized != key.specialized),
                    abs((k.q_tokens * k.kv_tokens).bit_length()
                        - (key.q_tokens * key.kv_tokens).bit_length()),
                    abs(k.warps - key.warps), abs(k.stages - key.stages),
                    int(k.permuted != key.permuted))

        nearest = min(self.efficiency, key=distance)
        return self.efficiency[nearest], (f"launch {text} was never measured: using the "
                                          f"efficiency of {nearest}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "efficiency": dict(sorted(self.efficiency.items())),
            "partial_extra": self.partial_extra,
            "q_tile_overhead_us": self.q_tile_overhead_us,
            "item_overhead_us": self.item_overhead_us,
            "permute_ns_per_token": self.permute_ns_per_token,
            "gather_extra": self.gather_extra,
            "sdpa_tflops": self.sdpa_tflops,
            "sdpa_tflops_by_kv_len": self.sdpa_tflops_by_kv_len,
            "host_us": self.host_us,
            "list_tile_us": self.list_tile_us,
            "rank_gsteps": self.rank_gsteps,
            "fit": self.fit,
        }

    @classmethod
    def from_dict(cls, tree: dict[str, Any]) -> KernelCoefficients:
        return cls(
            efficiency={k: float(v) for k, v in tree["efficiency"].items()},
            partial_extra=float(tree["partial_extra"]),
            q_tile_overhead_us=float(tree["q_tile_overhead_us"]),
            item_overhead_us=(None if tree.get("item_overhead_us") is None
                              else float(tree["item_overhead_us"])),
            permute_ns_per_token=float(tree["permute_ns_per_token"]),
            gather_extra=float(tree.get("gather_extra", 0.0)),
            sdpa_tflops={k: float(v) for k, v in tree["sdpa_tflops"].items()},
            sdpa_tflops_by_kv_len={
                dtype: {str(n): float(r) for n, r in table.items()}
                for dtype, table in tree.get("sdpa_tflops_by_kv_len", {}).items()},
            host_us=float(tree.get("host_us", 0.0)),
            list_tile_us=float(tree.get("list_tile_us", 0.0)),
            rank_gsteps=float(tree.get("rank_gsteps", 0.0)),
            fit=dict(tree.get("fit", {})),
        )


@dataclass(frozen=True)
class Profile:
    """One GPU: datasheet half (``hardware`` keys) and fitted half (``kernel``)."""

    name: str
    description: str
    num_sms: int
    peak_tflops: dict[str, float]  # dense matrix rate per dtype (fp32: what our kernel uses)
    hbm_gbps: float
    l2_gbps: float
    l2_mb: float  # MiB (2**20 bytes): CUDA's L2_cache_size over 2**20, the datasheets' "MB"
    smem_per_sm_kb: float
    max_warps_per_sm: int
    launch_us: float
    kernel: KernelCoefficients
    calibrated: bool
    wgmma: bool = False  # Hopper's warpgroup MMA: the warp-specialized kernel runs here
    kernel_from: str | None = None
    aliases: tuple[str, ...] = ()  # substrings of torch.cuda.get_device_name() it describes
    matmul_tflops: dict[str, float] = field(default_factory=dict)  # measured GEMM rates
    sources: dict[str, str] = field(default_factory=dict)
    path: str | None = None

    @property
    def l2_bytes(self) -> int:
        """The L2 cache in bytes (``l2_mb`` read as MiB, as CUDA reports it)."""
        return int(self.l2_mb * 2**20)

    # -- rates ---------------------------------------------------------------------------
    def peak(self, dtype: str) -> float:
        """Peak dense matrix FLOP/s for ``dtype``."""
        return self.peak_tflops[dtype] * 1e12

    def matmul_rate(self, dtype: str) -> float:
        """Achieved dense GEMM FLOP/s: measured when calibrated, else the SDPA rate (the best
        achieved matrix rate the profile knows)."""
        if dtype in self.matmul_tflops:
            return self.matmul_tflops[dtype] * 1e12
        return self.sdpa_rate(dtype, 16384)

    def sdpa_rate(self, dtype: str, kv_len: int) -> float:
        """Dense SDPA FLOP/s at this key length: measured rates (interpolated in log kv_len),
        else the typical rate; scaled by the peak ratio where not measured (fp32, or a profile
        that borrows another GPU's coefficients)."""
        k = self.kernel
        own_dtype = dtype if (dtype in k.sdpa_tflops or dtype in k.sdpa_tflops_by_kv_len) \
            else "bf16"
        table = k.sdpa_tflops_by_kv_len.get(own_dtype)
        rate = _interpolate(table, kv_len) if table else k.sdpa_tflops[own_dtype]
        base = load_profile(self.kernel_from) if self.kernel_from is not None else self
        # The measured rate is a fraction of the measuring GPU's peak in the measured dtype.
        rate *= self.peak_tflops[dtype] / base.peak_tflops[own_dtype]
        return rate * 1e12

    def occupancy(self, q_tokens: int, kv_tokens: int, block_d: int, block_dv: int,
                  elem_bytes: int, warps: int, stages: int) -> int:
        """Programs resident per SM: shared memory holds Q plus ``stages`` K and V tiles.

        The estimate matches the H100 sweep: 128x64 tiles at 2 stages fit twice per SM (96 KB
        each) and ran 1.5x faster than at 3 stages (128 KB, once per SM).
        """
        smem = elem_bytes * (q_tokens * block_d + stages * kv_tokens * (block_d + block_dv))
        by_smem = int(self.smem_per_sm_kb * 1024 // max(smem, 1))
        return max(1, min(by_smem, self.max_warps_per_sm // warps))

    # -- files ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "calibrated": self.calibrated,
            "hardware": {
                "num_sms": self.num_sms,
                "peak_tflops": self.peak_tflops,
                "hbm_gbps": self.hbm_gbps,
                "l2_gbps": self.l2_gbps,
                "l2_mb": self.l2_mb,
                "smem_per_sm_kb": self.smem_per_sm_kb,
                "max_warps_per_sm": self.max_warps_per_sm,
                "launch_us": self.launch_us,
                "wgmma": self.wgmma,
            },
            "aliases": list(self.aliases),
            "sources": self.sources,
        }
        if self.matmul_tflops:
            out["hardware"]["matmul_tflops"] = self.matmul_tflops
        if self.kernel_from is not None:
            out["kernel_from"] = self.kernel_from
        else:
            out["kernel"] = self.kernel.to_dict()
        return out

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def _interpolate(table: dict[str, float], x: int) -> float:
    """Piecewise linear in log(x) between measured points, constant beyond them."""
    points = sorted((int(n), r) for n, r in table.items())
    if x <= points[0][0]:
        return points[0][1]
    for (x0, r0), (x1, r1) in itertools.pairwise(points):
        if x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return r0 + t * (r1 - r0)
    return points[-1][1]


def _from_dict(tree: dict[str, Any], path: str | None) -> Profile:
    where = path or "profile"
    try:
        hw = tree["hardware"]
        kernel_from = tree.get("kernel_from")
        if kernel_from is not None:
            if kernel_from == tree["name"]:
                raise ValueError(f"{where}: kernel_from names the profile itself")
            kernel = load_profile(kernel_from).kernel
        else:
            kernel = KernelCoefficients.from_dict(tree["kernel"])
        peak = {k: float(v) for k, v in hw["peak_tflops"].items()}
        missing = [d for d in DTYPES if d not in peak]
        if missing:
            raise ValueError(f"{where}: hardware.peak_tflops lacks {missing}")
        return Profile(
            name=str(tree["name"]),
            description=str(tree.get("description", tree["name"])),
            num_sms=int(hw["num_sms"]),
            peak_tflops=peak,
            hbm_gbps=float(hw["hbm_gbps"]),
            l2_gbps=float(hw["l2_gbps"]),
            l2_mb=float(hw["l2_mb"]),
            smem_per_sm_kb=float(hw["smem_per_sm_kb"]),
            max_warps_per_sm=int(hw["max_warps_per_sm"]),
            launch_us=float(hw["launch_us"]),
            kernel=kernel,
            calibrated=bool(tree.get("calibrated", False)) and kernel_from is None,
            wgmma=bool(hw.get("wgmma", False)),
            kernel_from=kernel_from,
            aliases=tuple(str(a) for a in tree.get("aliases", ())),
            matmul_tflops={k: float(v) for k, v in hw.get("matmul_tflops", {}).items()},
            sources=dict(tree.get("sources", {})),
            path=path,
        )
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e.args[0]!r} in the profile") from None


def builtin_profiles() -> list[str]:
    """Names of the profiles shipped with spcompile."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def _find(name: str) -> Path | None:
    candidate = Path(name).expanduser()
    if candidate.suffix == ".json" and candidate.is_file():
        return candidate
    slug = name.lower().replace(" ", "-")
    for folder in (user_profile_dir(), PROFILE_DIR):
        path = folder / f"{slug}.json"
        if path.is_file():
            return path
    return None


_CACHE: dict[tuple[str, float], Profile] = {}


def load_profile(device: str | Profile = "h100") -> Profile:
    """A profile by built-in name (``h100``), calibrated name, or path to a JSON file.

    Calibrated profiles under ``~/.cache/spcompile/profiles`` win over built-in ones of the
    same name, so ``calibrate --name h100`` replaces the shipped numbers on that machine.
    """
    if isinstance(device, Profile):
        return device
    path = _find(str(device))
    if path is None:
        raise ValueError(
            f"unknown device {device!r}: expected a profile name among "
            f"{', '.join(builtin_profiles())}, a calibrated profile in {user_profile_dir()}, "
            "or a path to a profile .json (spcompile calibrate writes one)")
    key = (str(path.resolve()), path.stat().st_mtime)
    if key not in _CACHE:
        try:
            tree = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        _CACHE[key] = _from_dict(tree, str(path))
    return _CACHE[key]
