"""U-Net of SPEC section 3: 1 input channel, C output logits, `depth` 2x downsamplings.

Each level doubles the width; decoding upsamples bilinearly and fuses the skip by
concatenation. BatchNorm follows the usual semi-supervised segmentation setups. `dropout`
(channel dropout on every decoder input, in training mode only) is how a
noised student is made; the teacher has none.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    DEPTH = 4     # 2x downsamplings: input sides are multiples of 2 ** depth

    def __init__(self, *, width: int, in_channels: int = 1, num_classes: int = 2, depth: int = DEPTH,
                 dropout: float = 0.0):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, depth=depth,
                           dropout=dropout)
        widths = [width * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([conv_block(in_channels, widths[0])] +
                                  [conv_block(widths[i], widths[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([conv_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this."""
        return 2 ** self.config["depth"]

    def forward(self, x: torch.Tensor, features=None) -> torch.Tensor:
        """Logits of `x`; `features`, a function of the encoder's feature list returning another,
        perturbs the features before decoding (UniMatch's feature-perturbation branch)."""
        skips = self.encode(x)
        return self.decode(skips if features is None else features(skips))

    def encode(self, x: torch.Tensor) -> list:
        """The encoder's features, finest first, deepest last."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        return skips

    def decode(self, skips: list) -> torch.Tensor:
        skips = list(skips)
        x = skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(self.drop(torch.cat([x, skip], dim=1)))
        return self.head(x)

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config["dropout"]
        return F.dropout2d(x, p, self.training) if p > 0 and self.training else x
