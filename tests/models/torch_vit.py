"""An independent PyTorch reference of the VideoMAEv2 fine-tuning ViT.

Written from the published architecture (VideoMAEv2 ``models/vit.py``): the
state-dict names are the original ones, so checkpoints made here are
indistinguishable from real VideoMAEv2 files for the converter.
Inputs are (B, C, T, H, W), as in PyTorch.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sinusoid_table(n_position: int, dim: int) -> torch.Tensor:
    table = np.array(
        [
            [pos / np.power(10000, 2 * (j // 2) / dim) for j in range(dim)]
            for pos in range(n_position)
        ]
    )
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float).unsqueeze(0)


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim, heads, cos_attn=False):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.cos_attn = cos_attn
        if cos_attn:
            self.scale = nn.Parameter(torch.log(10 * torch.ones((heads, 1, 1))))
        else:
            self.scale = head_dim**-0.5
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.cos_attn:
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(self.scale, max=4.6052).exp()  # VideoMAEv2's literal
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_hidden, drop_path=0.0, init_values=0.0, cos_attn=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, cos_attn)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)
        if init_values > 0:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x):
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch=16, tubelet=2, in_chans=3):
        super().__init__()
        self.proj = nn.Conv3d(
            in_chans, dim, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch)
        )

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        num_classes,
        embed_dim,
        depth,
        heads,
        mlp_hidden,
        num_frames=16,
        img_size=224,
        drop_path_rate=0.0,
        init_values=0.0,
        cos_attn=False,
        learned_pos_emb=False,
        patch=16,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(embed_dim, patch)
        n = (num_frames // 2) * (img_size // patch) ** 2
        if learned_pos_emb:
            self.pos_embed = nn.Parameter(torch.randn(1, n, embed_dim) * 0.02)
        else:
            self.pos_embed = sinusoid_table(n, embed_dim)  # a plain tensor: not in the state dict
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, heads, mlp_hidden, dpr[i], init_values, cos_attn)
                for i in range(depth)
            ]
        )
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = x + self.pos_embed.type_as(x)
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x.mean(1))

    def forward(self, x):
        return self.head(self.forward_features(x))


PRESETS = {"S": (384, 12, 6, 1536), "B": (768, 12, 12, 3072)}


def make(
    preset, num_classes, num_frames=16, img_size=224, seed=0, dims=None, **kw
) -> VisionTransformer:
    """A reference model with random (non-trivial) weights, biases and norms included.

    ``dims``: (width, depth, heads, mlp width) in place of the preset's (e.g. a giant shrunk).
    """
    torch.manual_seed(seed)
    dim, depth, heads, mlp = dims or PRESETS[preset]
    model = VisionTransformer(num_classes, dim, depth, heads, mlp, num_frames, img_size, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias", ".bias")) or "norm" in name:
                p.add_(torch.randn_like(p) * 0.05)
            if name.startswith("head"):
                p.normal_(0, 0.05)
    return model.eval()
