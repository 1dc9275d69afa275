"""SinusCycle-GAN networks of SPEC section 5: a ResNet-block generator and a PatchGAN discriminator.

Both read an (image, mask) pair as two channels. The image is only a condition: the generator
returns one foreground logit for a new mask of the same image, never a translated image.
Instance norm throughout, as in the usual unpaired-translation setups.

A residual generator adds the logit of its input mask to its output, with the last layer
initialised to zero: untrained, it returns its input mask, and training learns a correction.
The mask is clipped to [MASK_EPS, 1 - MASK_EPS] first, so that the logit stays finite and a
confident pixel can still be changed (the sigmoid's gradient there is about MASK_EPS).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

MASK_EPS = 0.01


def norm_relu(c: int) -> list:
    return [nn.InstanceNorm2d(c, affine=True), nn.ReLU(inplace=True)]


class ResidualBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), *norm_relu(c),
                                  nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c, affine=True))

    def forward(self, x):
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """7x7 stem, two stride-2 downsamplings, `blocks` residual blocks, two upsamplings, 7x7 head.

    Input sides must be multiples of 4 (`stride`). The mask is the last input channel.
    """
    stride = 4

    def __init__(self, in_channels: int = 2, out_channels: int = 1, width: int = 32, blocks: int = 6,
                 residual: bool = False):
        super().__init__()
        self.config = dict(in_channels=in_channels, out_channels=out_channels, width=width, blocks=blocks,
                           residual=residual)
        w = width
        self.net = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(in_channels, w, 7), *norm_relu(w),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), *norm_relu(2 * w),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), *norm_relu(4 * w),
            *[ResidualBlock(4 * w) for _ in range(blocks)],
            nn.ConvTranspose2d(4 * w, 2 * w, 3, stride=2, padding=1, output_padding=1), *norm_relu(2 * w),
            nn.ConvTranspose2d(2 * w, w, 3, stride=2, padding=1, output_padding=1), *norm_relu(w),
            nn.ReflectionPad2d(3), nn.Conv2d(w, out_channels, 7),
        )
        if residual:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out + torch.logit(x[:, -1:], eps=MASK_EPS) if self.config["residual"] else out


class PatchDiscriminator(nn.Module):
    """PatchGAN: a map of real/fake scores, one per overlapping patch (70x70 for layers=3)."""

    def __init__(self, in_channels: int = 2, width: int = 32, layers: int = 3):
        super().__init__()
        self.config = dict(in_channels=in_channels, width=width, layers=layers)
        seq = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        c = width
        for i in range(1, layers + 1):
            c_out = width * 2 ** min(i, 3)
            seq += [nn.Conv2d(c, c_out, 4, stride=2 if i < layers else 1, padding=1),
                    nn.InstanceNorm2d(c_out, affine=True), nn.LeakyReLU(0.2, inplace=True)]
            c = c_out
        seq.append(nn.Conv2d(c, 1, 4, padding=1))
        self.net = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def foreground_probability(logits: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) probability of not-background: the mask channel SinusCycle-GAN refines."""
    return logits.float().softmax(dim=1)[:, 1:].sum(dim=1, keepdim=True)


@torch.no_grad()
def refine_logits(generator: nn.Module, images: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Teacher logits refined by G_AB, which refines the foreground probability: r = G_AB(image, qT).
    With two classes they are [0, r], whose softmax is [1 - sigmoid(r), sigmoid(r)]. With more, the
    refined foreground is shared among the classes as the teacher shares it: the log-probabilities
    log(1 - sigmoid(r)) and log(sigmoid(r) p_c / (1 - p_0)). Either replaces the teacher's logits
    anywhere (argmax, KD loss at any temperature)."""
    q = foreground_probability(teacher_logits).to(images.dtype)
    r = generator(torch.cat([images, q], dim=1)).float()
    if teacher_logits.shape[1] == 2:
        return torch.cat([torch.zeros_like(r), r], dim=1)
    share = teacher_logits.float().log_softmax(dim=1)[:, 1:]
    share = share - share.logsumexp(dim=1, keepdim=True)
    return torch.cat([F.logsigmoid(-r), F.logsigmoid(r) + share], dim=1)
