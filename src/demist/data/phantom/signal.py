"""Signal equations of the two 3T contrasts (vectorised over voxels; T1 and T2 in ms, PD relative).

MPRAGE: steady state of the inversion - recovery - gradient-echo train - recovery cycle (Deichmann et al. 2000),
read at the centre of k-space (the middle of a linearly ordered train). FLAIR: inversion recovery spin echo with
long TR. Both return magnitudes, as a scanner does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MprageProtocol:
    tr_ms: float = 2300.0  # inversion-to-inversion
    ti_ms: float = 900.0  # inversion to the centre of k-space
    flip_deg: float = 9.0
    echo_spacing_ms: float = 7.1
    lines: int = 176
    inversion_efficiency: float = 0.96


@dataclass(frozen=True)
class FlairProtocol:
    tr_ms: float = 9000.0
    ti_ms: float = 2450.0
    te_ms: float = 110.0
    inversion_efficiency: float = 0.96


def mprage_signal(pd: np.ndarray, t1_ms: np.ndarray, protocol: MprageProtocol = MprageProtocol()) -> np.ndarray:
    """|M_z| before the centre line's pulse, times PD and sin(flip)."""
    t1 = np.asarray(t1_ms, np.float64)
    flip = np.deg2rad(protocol.flip_deg)
    before_train = protocol.ti_ms - protocol.lines / 2 * protocol.echo_spacing_ms
    after_train = protocol.tr_ms - before_train - protocol.lines * protocol.echo_spacing_ms
    e1 = np.exp(-protocol.echo_spacing_ms / t1)
    decay = np.cos(flip) * e1  # per-pulse attenuation of M_z in the train
    train_steady = (1 - e1) / (1 - decay)
    e_before, e_after = np.exp(-before_train / t1), np.exp(-after_train / t1)
    decay_train = decay**protocol.lines
    eff = protocol.inversion_efficiency
    # M_z just before the inversion, from requiring the cycle to return to itself (linear in that unknown).
    m_inv = (1 - e_after + e_after * (train_steady + (1 - e_before - train_steady) * decay_train)) / (
        1 + e_after * decay_train * eff * e_before)
    m_train_start = 1 - (1 + eff * m_inv) * e_before
    m_centre = train_steady + (m_train_start - train_steady) * decay ** (protocol.lines / 2)
    return (np.asarray(pd) * np.abs(m_centre) * np.sin(flip)).astype(np.float32)


def flair_signal(pd: np.ndarray, t1_ms: np.ndarray, t2_ms: np.ndarray,
                 protocol: FlairProtocol = FlairProtocol()) -> np.ndarray:
    """PD·|1 − (1+eff)·e^(−TI/T1) + e^(−TR/T1)|·e^(−TE/T2)."""
    t1 = np.asarray(t1_ms, np.float64)
    recovery = 1 - (1 + protocol.inversion_efficiency) * np.exp(-protocol.ti_ms / t1) + np.exp(-protocol.tr_ms / t1)
    return (np.asarray(pd) * np.abs(recovery) * np.exp(-protocol.te_ms / np.asarray(t2_ms))).astype(np.float32)
