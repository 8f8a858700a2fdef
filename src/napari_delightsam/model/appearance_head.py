"""The appearance head (v2's ``modality_head_kind = "appearance"``; beyond the paper).

It reads the same modality-independent stage-0 features as v1's pooled ``ModalityHead``, so
``auto`` still costs no second encoder pass, but it sees layout as well as colour statistics
(three strided convolutions before pooling) and answers three questions about the image:

* ``modality``: which of the K modalities (logits; divided by a temperature calibrated on
  validation data, so that the softmax is a probability one can threshold);
* ``order``: in which of the six channel orders its colour channels arrive (index 0 = as
  trained, ``data.appearance.CHANNEL_ORDERS``; BGR is the common one);
* ``hue``: by how many degrees its hue is rotated from what the model was trained on.

``DeLightSAM.forward`` uses the last two in eval mode to put a colour image back into the
colours the network knows (``colour_correction``): channels reordered when the order head is
sure, hue rotated back when the predicted rotation is large. A grey image is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.appearance import CHANNEL_ORDERS, channel_order_matrix, hue_matrix

#: hue predictions are in units of this many degrees (the training range is about ±45°)
HUE_UNIT = 45.0
#: a hue threshold no prediction reaches: hue correction off
NEVER = 1000.0


@dataclass
class AppearanceOutput:
    #: (B,K) calibrated modality logits (already divided by the temperature)
    modality_logits: torch.Tensor
    #: (B,6) channel-order logits
    order_logits: torch.Tensor
    #: (B,) predicted hue rotation in degrees
    hue_degrees: torch.Tensor


class AppearanceHead(nn.Module):
    """(B,C,S/8,S/8) stage-0 features -> modality, channel order and hue rotation."""

    def __init__(self, in_chs: int, num_modalities: int, width: int = 96, hidden: int = 256) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.GELU())

        self.trunk = nn.Sequential(block(in_chs, width), block(width, 128), block(128, 128))
        self.mlp = nn.Sequential(nn.Linear(2 * in_chs + 2 * 128, hidden), nn.LayerNorm(hidden), nn.GELU())
        self.modality = nn.Linear(hidden, num_modalities)
        self.order = nn.Linear(hidden, len(CHANNEL_ORDERS))
        self.hue = nn.Linear(hidden, 1)
        #: softmax temperature of the modality logits (fitted on validation data after training)
        self.register_buffer("temperature", torch.ones(()))
        #: the order head must give a non-identity order at least this probability to reorder
        self.register_buffer("order_min_p", torch.tensor(0.5))
        #: hue rotations predicted below this many degrees are left alone (``NEVER``: never rotate;
        #: finite, since checkpoints refuse non-finite tensors)
        self.register_buffer("hue_min_degrees", torch.tensor(NEVER))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        t = self.trunk(x).flatten(2)
        flat = x.flatten(2)
        pooled = torch.cat([flat.mean(-1), flat.std(-1), t.mean(-1), t.amax(-1)], dim=1)
        return self.mlp(pooled)

    def forward(self, x: torch.Tensor, *, calibrated: bool = True) -> AppearanceOutput:
        f = self.features(x)
        logits = self.modality(f)
        if calibrated:
            logits = logits / self.temperature.clamp_min(1e-3)
        return AppearanceOutput(logits, self.order(f), self.hue(f)[:, 0] * HUE_UNIT)

    def correction(self, out: AppearanceOutput, colour: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,3,3) RGB matrices that undo the predicted channel order and hue, and (B,) bool: which
        images change. ``colour``: (B,) bool, False for grey images (never changed)."""
        b = out.order_logits.shape[0]
        dev = out.order_logits.device
        p = out.order_logits.detach().float().softmax(1)
        conf, order = p.max(1)
        reorder = (order != 0) & (conf >= self.order_min_p) & colour
        hue = out.hue_degrees.detach().float()
        rotate = (hue.abs() >= self.hue_min_degrees) & colour
        mats = torch.eye(3, device=dev).repeat(b, 1, 1)
        for i in torch.nonzero(reorder | rotate).flatten().tolist():
            m = np.eye(3)
            if bool(reorder[i]):
                m = channel_order_matrix(int(order[i])).T  # a permutation's inverse is its transpose
            if bool(rotate[i]):
                m = hue_matrix(-float(hue[i])) @ m
            mats[i] = torch.as_tensor(m, dtype=torch.float32, device=dev)
        return mats, reorder | rotate


def describe_correction(matrix: np.ndarray) -> str | None:
    """Words for a colour correction matrix (None for the identity): e.g. "channels BGR -> RGB"."""
    m = np.asarray(matrix, dtype=np.float64)
    if np.allclose(m, np.eye(3), atol=1e-4):
        return None
    for k, perm in enumerate(CHANNEL_ORDERS):
        if k and np.allclose(m, channel_order_matrix(k).T, atol=1e-4):
            names = "".join("RGB"[c] for c in perm)
            return f"channels {names} -> RGB"
    # hue (possibly after a reorder): the rotation angle of the YIQ chroma plane
    for k in range(len(CHANNEL_ORDERS)):
        rest = m @ np.linalg.inv(channel_order_matrix(k).T)
        from ..data.augment import _RGB2YIQ, _YIQ2RGB

        yiq = _RGB2YIQ @ rest @ _YIQ2RGB
        if np.allclose(yiq[0], [1, 0, 0], atol=1e-3):
            deg = float(np.degrees(np.arctan2(yiq[2, 1], yiq[1, 1])))
            prefix = "" if k == 0 else "channels " + "".join("RGB"[c] for c in CHANNEL_ORDERS[k]) + " -> RGB, "
            return f"{prefix}hue {deg:+.0f}°"
    return "colour corrected"
