"""What the update net sees: scale-free features of the gradient and second derivative.

Andrychowicz et al. (2016) feed the LSTM ``(log|g| / p, sign(g))`` with ``p = 10``. That
preprocessing ties the net to the gradient scale of the network it was meta-trained on:
measured here, on the 3-conv/2-fc MNIST network about half of the gradient coordinates
and 80 % of the second-derivative coordinates fall below e^-10 (the clip point), against
1 % and 3 % on the 1-conv/1-fc network, so a transferred net is fed inputs it never saw.

zoo's features are ratios instead, which mean the same on networks of any width, depth
or loss scale (multiplying the loss by ``c`` multiplies ``g`` by ``c`` and ``v`` by ``c²``
and leaves every feature unchanged):

gradient family (``"g"``), each divided by ``sqrt(v̂) + EPS`` and clipped to ``±CLIP``:
    ``g_rms``   the current gradient,
    ``m_fast``  momentum with ``BETA_FAST`` (Adam's first moment),
    ``m_slow``  momentum with ``BETA_SLOW`` (a longer timescale),
where ``v̂`` is the bias-corrected running mean of ``g²`` with ``BETA_V`` (Adam's second
moment);

curvature family (``"h"``), from ``h̄``, the bias-corrected running mean of the second
derivative with ``BETA_H``:
    ``h_rel``    ``log((h̄ + δ) / (mean_tensor(h̄) + δ))``: how curved this coordinate is
                 relative to the rest of its tensor,
    ``h_trend``  ``log((h + δ) / (h̄ + δ))``: is the curvature rising or falling,
each divided by ``H_LOG_SCALE`` and clipped to ``±CLIP``; ``δ = H_FLOOR · mean_tensor(h̄)``
(plus ``TINY``) so dead units and biases with zero curvature give finite features.

The feature set and every constant are recorded in a checkpoint's ``config.json``
(:func:`FeatureSpec.to_config`); a checkpoint is only loaded with the same set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .errors import ConfigError

__all__ = ["FEATURE_SETS", "FeatureSpec", "FeatureState", "compute_features", "init_state"]

FEATURE_VERSION = 1

# Adam's defaults (Kingma & Ba, 2015), so an untrained update net reproduces Adam.
BETA_FAST = 0.9
BETA_V = 0.999
EPS = 1e-8
# A slower momentum, as in Wichrowska et al. (2017)'s multi-timescale inputs.
BETA_SLOW = 0.99
# Running mean of the second derivative; the same timescale as the slow momentum.
BETA_H = 0.99
# |g|/sqrt(v) is at most 1/sqrt(1 - BETA_V) ≈ 31.6; values past 5 are rare outliers that
# would saturate the LSTM gates.
CLIP = 5.0
# log-ratios of curvature span about ±10; divide so that typical values are O(1).
H_LOG_SCALE = 4.0
# Relative floor for curvature ratios: coordinates below 1e-4 of their tensor's mean are
# treated as flat (keeps log finite for dead ReLU units, whose h is exactly 0).
H_FLOOR = 1e-4
TINY = 1e-30

FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "g": ("g_rms", "m_fast", "m_slow"),
    "gh": ("g_rms", "m_fast", "m_slow", "h_rel", "h_trend"),
    # Ablations of "gh" (benchmarks/ablation.py): one feature family left out each.
    "gh-no-momenta": ("g_rms", "h_rel", "h_trend"),
    "gh-no-h-rel": ("g_rms", "m_fast", "m_slow", "h_trend"),
    "gh-no-h-trend": ("g_rms", "m_fast", "m_slow", "h_rel"),
}
CURVATURE_FEATURES = ("h_rel", "h_trend")


@dataclass(frozen=True)
class FeatureSpec:
    """A named, versioned feature set."""

    name: str = "gh"

    def __post_init__(self) -> None:
        if self.name not in FEATURE_SETS:
            known = ", ".join(sorted(FEATURE_SETS))
            raise ConfigError(f"unknown feature set {self.name!r}; known feature sets: {known}")

    @property
    def names(self) -> tuple[str, ...]:
        return FEATURE_SETS[self.name]

    @property
    def num_features(self) -> int:
        return len(self.names)

    @property
    def uses_curvature(self) -> bool:
        return any(name in CURVATURE_FEATURES for name in self.names)

    def to_config(self) -> dict:
        return {
            "set": self.name,
            "version": FEATURE_VERSION,
            "names": list(self.names),
            "constants": {
                "beta_fast": BETA_FAST,
                "beta_slow": BETA_SLOW,
                "beta_v": BETA_V,
                "beta_h": BETA_H,
                "eps": EPS,
                "clip": CLIP,
                "h_log_scale": H_LOG_SCALE,
                "h_floor": H_FLOOR,
            },
        }

    @classmethod
    def from_config(cls, config: dict) -> FeatureSpec:
        spec = cls(config["set"])
        if config.get("version") != FEATURE_VERSION or list(config.get("names", [])) != list(
            spec.names
        ):
            raise ConfigError(
                f"feature set {config.get('set')!r} version {config.get('version')} "
                f"(names {config.get('names')}) is not the one this zoo implements "
                f"(version {FEATURE_VERSION}, names {list(spec.names)}); upgrade zoo"
            )
        # The constants are fixed by the version; a checkpoint that records others was made
        # by different code (or edited) and its nets would see inputs they were not trained on.
        expected = spec.to_config()["constants"]
        recorded = config.get("constants")
        if recorded != expected:
            differing = sorted(
                k
                for k in expected
                if not isinstance(recorded, dict) or recorded.get(k) != expected[k]
            )
            raise ConfigError(
                f"feature set {spec.name!r} records constants that differ from this zoo's "
                f"({', '.join(differing) or 'extra keys'}; expected {expected}); the "
                "checkpoint was made with other feature code"
            )
        return spec


class FeatureState(NamedTuple):
    """Per-coordinate running statistics; every field is a flat tensor of shape (N,)."""

    step: Tensor  # steps taken by this coordinate (float, for bias correction)
    m_fast: Tensor
    m_slow: Tensor
    v: Tensor
    h_avg: Tensor


def init_state(n: int, device=None) -> FeatureState:
    zeros = [torch.zeros(n, device=device, dtype=torch.float32) for _ in FeatureState._fields]
    return FeatureState(*zeros)


def _segment_mean(values: Tensor, segments: Tensor, counts: Tensor) -> Tensor:
    """Mean of ``values`` within each segment (parameter tensor), broadcast back to (N,)."""
    sums = torch.zeros(counts.shape[0], dtype=values.dtype, device=values.device)
    sums.index_add_(0, segments, values)
    return (sums / counts)[segments]


def compute_features(
    spec: FeatureSpec,
    state: FeatureState,
    grad: Tensor,
    hess: Tensor | None,
    segments: Tensor,
    counts: Tensor,
) -> tuple[Tensor, Tensor, FeatureState]:
    """Advance the running statistics and return ``(features, adam_dir, new_state)``.

    ``features`` is (N, num_features); ``adam_dir`` is ``m̂_fast / (sqrt(v̂) + EPS)``, the
    preconditioned direction the update net's output rescales. ``segments`` maps each
    coordinate to its parameter tensor and ``counts`` holds each tensor's size. Inputs are
    used as values only (no gradient flows through features).
    """
    grad = grad.detach().float()
    step = state.step + 1.0
    m_fast = BETA_FAST * state.m_fast + (1 - BETA_FAST) * grad
    m_slow = BETA_SLOW * state.m_slow + (1 - BETA_SLOW) * grad
    v = BETA_V * state.v + (1 - BETA_V) * grad * grad
    denom = torch.sqrt(v / (1 - BETA_V**step)) + EPS
    m_fast_hat = m_fast / (1 - BETA_FAST**step)
    adam_dir = m_fast_hat / denom
    names = spec.names
    columns = {"g_rms": grad / denom, "m_fast": adam_dir}
    if "m_slow" in names:
        columns["m_slow"] = m_slow / (1 - BETA_SLOW**step) / denom
    h_avg = state.h_avg
    if spec.uses_curvature:
        if hess is None:
            raise ValueError(f"feature set {spec.name!r} needs the second derivative")
        hess = hess.detach().float().clamp_min(0.0)
        h_avg = BETA_H * state.h_avg + (1 - BETA_H) * hess
        h_bar = h_avg / (1 - BETA_H**step)
        mean = _segment_mean(h_bar, segments, counts)
        delta = H_FLOOR * mean + TINY
        columns["h_rel"] = torch.log((h_bar + delta) / (mean + delta)) / H_LOG_SCALE
        columns["h_trend"] = torch.log((hess + delta) / (h_bar + delta)) / H_LOG_SCALE
    features = torch.stack([columns[name] for name in names], dim=1).clamp(-CLIP, CLIP)
    return features, adam_dir, FeatureState(step, m_fast, m_slow, v, h_avg)
