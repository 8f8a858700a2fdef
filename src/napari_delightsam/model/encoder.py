"""DC-Encoder (paper §III-B): TinyViT-5M backbone with a modality controller in every ViT layer.

Layout at 1024² (shapes B×C×H×W):

    image (B,3,1024,1024)
      stem: 3×3 s2 conv+BN, GELU, 3×3 s2 conv+BN          -> (B, 64, 256, 256)
      stage 0: 2 MBConv, patch merging 64->128 s2          -> (B,128, 128, 128)   [no controller]
      stage 1: 2 TinyViT blocks (4 heads, window 7), merge 128->160 s2   -> (B,160,64,64)
      stage 2: 6 TinyViT blocks (5 heads, window 14), merge 160->320 s1  -> (B,320,64,64)
      stage 3: 2 TinyViT blocks (10 heads, window 7)                    -> (B,320,64,64)
      neck: 1×1 conv, LayerNorm2d, 3×3 conv, LayerNorm2d  -> h (B,256,64,64)

The blocks, convs and attention come from ``timm.models.tiny_vit``; this module only adds the
modality controller (``controller.py``) and the MobileSAM stage order (merge at a stage's end,
stride 1 once the stride-16 grid is reached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from timm.models.tiny_vit import Attention, ConvNorm, MBConv, TinyVitBlock
from torch import nn

from ..config import ModelConfig
from .controller import ModalityFFN, ModalityPromptTokens


class Stem(nn.Module):
    """Two 3×3 stride-2 Conv+BN with GELU between: (B,3,S,S) -> (B,C,S/4,S/4)."""

    def __init__(self, out_chs: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, out_chs // 2, 3, 2, 1)
        self.act = nn.GELU()
        self.conv2 = ConvNorm(out_chs // 2, out_chs, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


class PatchMerging(nn.Module):
    """1×1 conv, 3×3 depthwise (stride 1 or 2), 1×1 conv, each with BN; GELU between."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(dim, out_dim, 1, 1, 0)
        self.act1 = nn.GELU()
        self.conv2 = ConvNorm(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.act2 = nn.GELU()
        self.conv3 = ConvNorm(out_dim, out_dim, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))


class ControlledAttention(Attention):
    """timm's TinyViT window attention + per-modality key/value prompt tokens (Eq. 1).

    Uses ``F.scaled_dot_product_attention`` with the relative-position bias (and the prompt
    tokens' logit bias) as the additive mask.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, num_modalities: int, num_tokens: int) -> None:
        head_dim = dim // num_heads
        super().__init__(dim, head_dim, num_heads, attn_ratio=1, resolution=(window_size, window_size))
        self.prompt = (
            ModalityPromptTokens(num_modalities, num_heads, head_dim, num_tokens) if num_tokens > 0 else None
        )

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, modality: torch.Tensor | None = None, rows_per_sample: int = 1
    ) -> torch.Tensor:
        rows, n, _ = x.shape
        attn_bias = self.get_attention_biases(x.device)  # (heads, N, N)
        x = self.norm(x)
        qkv = self.qkv(x)
        q, k, v = qkv.view(rows, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = attn_bias.to(q.dtype).unsqueeze(0)
        if modality is not None and self.prompt is not None:
            pk, pv, pbias = self.prompt(modality, rows_per_sample)
            k = torch.cat([k, pk.to(k.dtype)], dim=2)
            v = torch.cat([v, pv.to(v.dtype)], dim=2)
            mask = torch.cat(
                [mask.expand(pbias.shape[0], -1, -1, -1), pbias.to(q.dtype).expand(-1, -1, n, -1)], dim=-1
            )
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x.transpose(1, 2).reshape(rows, n, self.out_dim)
        return self.proj(x)


class DCEncoderBlock(TinyVitBlock):
    """TinyViT block with the modality controller: x + A; local conv; + FFN(x) + FFN_k(x) (Eq. 2).

    x: (B, H, W, C) channels-last tokens, as in timm.
    """

    def __init__(self, cfg: ModelConfig, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__(
            dim=dim,
            num_heads=num_heads,
            window_size=window_size,
            mlp_ratio=cfg.mlp_ratio,
            local_conv_size=cfg.local_conv_size,
        )
        tokens = cfg.controller_tokens if cfg.controller_attention == "kv" else 0
        self.attn = ControlledAttention(dim, num_heads, window_size, cfg.num_modalities, tokens)
        hidden = int(round(dim * cfg.controller_ffn_ratio))
        self.controller_ffn = ModalityFFN(cfg.num_modalities, dim, hidden) if hidden > 0 else None

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        b, h, w, c = x.shape
        ws = self.window_size
        shortcut = x
        if h == ws and w == ws:
            x = self.attn(x.reshape(b, h * w, c), modality, 1).view(b, h, w, c)
        else:
            pad_b = (ws - h % ws) % ws
            pad_r = (ws - w % ws) % ws
            if pad_b or pad_r:
                x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            ph, pw = h + pad_b, w + pad_r
            nh, nw = ph // ws, pw // ws
            x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
            x = self.attn(x, modality, nh * nw)
            x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
            if pad_b or pad_r:
                x = x[:, :h, :w].contiguous()
        x = shortcut + self.drop_path1(x)

        x = self.local_conv(x.permute(0, 3, 1, 2)).reshape(b, c, h * w).transpose(1, 2)
        out = x + self.drop_path2(self.mlp(x))
        if self.controller_ffn is not None and modality is not None:
            out = out + self.controller_ffn(x, modality)
        return out.view(b, h, w, c)


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks then patch merging (B,C,H,W)."""

    def __init__(self, dim: int, out_dim: int, depth: int, expand_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[MBConv(dim, dim, expand_ratio, nn.GELU, 0.0) for _ in range(depth)])
        self.downsample = PatchMerging(dim, out_dim, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.blocks(x))


class ViTStage(nn.Module):
    """TinyViT blocks with controllers, then an optional patch merging (B,C,H,W)."""

    def __init__(
        self, cfg: ModelConfig, dim: int, out_dim: int | None, depth: int, heads: int, window: int, stride: int
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([DCEncoderBlock(cfg, dim, heads, window) for _ in range(depth)])
        self.downsample = PatchMerging(dim, out_dim, stride) if out_dim is not None else None

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x, modality)
        x = x.permute(0, 3, 1, 2)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class DCEncoder(nn.Module):
    """Domain-controllable image encoder: (B,3,S,S) -> h (B, embed_dim, S/16, S/16)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dims = cfg.embed_dims
        self.stem = Stem(dims[0])
        stages: list[nn.Module] = [ConvStage(dims[0], dims[1], cfg.depths[0], cfg.mbconv_expand_ratio)]
        stride = 8  # after stem (4) and stage-0 merging (2)
        for i in range(1, len(dims)):
            last = i == len(dims) - 1
            merge_stride = 2 if stride < 16 else 1
            stages.append(
                ViTStage(
                    cfg,
                    dims[i],
                    None if last else dims[i + 1],
                    cfg.depths[i],
                    cfg.num_heads[i],
                    cfg.window_sizes[i],
                    merge_stride,
                )
            )
            if not last:
                stride *= merge_stride
        if stride != 16:
            raise ValueError(f"encoder stride is {stride}, expected 16; use at least 4 stages")
        self.stages = nn.ModuleList(stages)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], cfg.embed_dim, 1, bias=False),
            LayerNorm2d(cfg.embed_dim),
            nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 3, padding=1, bias=False),
            LayerNorm2d(cfg.embed_dim),
        )

    @property
    def conv_out_channels(self) -> int:
        return self.stages[0].downsample.conv3.conv.out_channels

    def forward_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Modality-independent part: stem + stage 0. (B,3,S,S) -> (B, dims[1], S/8, S/8)."""
        return self.stages[0](self.stem(x))

    def forward_vit(self, x: torch.Tensor, modality: torch.Tensor | None) -> torch.Tensor:
        """ViT stages (controller of ``modality``; None = controller off) + neck -> h."""
        for stage in self.stages[1:]:
            x = stage(x, modality)
        return self.neck(x)

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_vit(self.forward_conv(x), modality)

    @torch.no_grad()
    def neutralise_controllers(self) -> None:
        """Make every modality controller a no-op (up to the prompt tokens' share of attention).

        The parallel FFNs already start with a zero down-projection; the prompt tokens' values
        are set to zero here, so a token only takes its (small) share of each softmax and adds
        nothing. A pretrained backbone then gives its own features with the controller on, and
        a controller trained for one modality leaves the others as they were.
        """
        for module in self.modules():
            if isinstance(module, ModalityPromptTokens):
                module.value.zero_()
                module.logit_bias.zero_()
            elif isinstance(module, ModalityFFN):
                module.down_weight.zero_()
                module.down_bias.zero_()

    def controller_parameters(self) -> list[nn.Parameter]:
        """Parameters of the modality controllers (all modalities)."""
        return [p for n, p in self.named_parameters() if ".prompt." in n or ".controller_ffn." in n]
