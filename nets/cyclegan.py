"""SinusCycle-GAN networks (SPEC section 5): a ResNet-block generator and a PatchGAN discriminator.

A mask travels between the networks as a soft foreground map m in [0, 1]. A generator reads an
(image, m) pair and returns a foreground logit; the image is only a condition, never translated.
It is residual: its output is the logit of its input map plus a bounded correction,

    r = logit(clip(m, MASK_CLIP, 1 - MASK_CLIP)) + BOUND * tanh(h(image, m)),

with h's last layer starting at zero, so an untrained generator returns its input and training
learns a correction. The bound (4.0) is larger than the clipped logit (2.94), so any pixel can be
flipped, and tanh keeps a flip from running away. A teacher's logits z enter at the map
temperature T (m = sigmoid(z / T)) and leave as T * r, so a teacher pixel keeps its logit up to
|z| = 2.94 T, and confident pixels still get a gradient (the sigmoid's slope at the clip is 0.05;
a clip of 0.01 would leave 0.01).

The discriminator judges the mask map alone by default (`in_channels=1`): with a receptive field
of about one sinus lobe it can judge shape, but it cannot tell domain A's radiographs from domain
B's, which a discriminator of (image, mask) pairs with a field wider than the image can. Spectral
norm keeps it smooth, so that its gradient on the mask carries a direction.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

MASK_CLIP = 0.05
BOUND = 4.0


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
    """7x7 stem, two stride-2 downsamplings, `blocks` residual blocks, two upsamplings, 7x7 head;
    input sides must be multiples of 4. Input: (image, map) as two channels; output: the logit r."""

    def __init__(self, *, width: int, blocks: int, map_temperature: float, in_channels: int = 2):
        super().__init__()
        self.config = dict(in_channels=in_channels, width=width, blocks=blocks, map_temperature=map_temperature)
        self.map_temperature = map_temperature
        w = width
        self.net = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(in_channels, w, 7), *norm_relu(w),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), *norm_relu(2 * w),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), *norm_relu(4 * w),
            *[ResidualBlock(4 * w) for _ in range(blocks)],
            nn.ConvTranspose2d(4 * w, 2 * w, 3, stride=2, padding=1, output_padding=1), *norm_relu(2 * w),
            nn.ConvTranspose2d(2 * w, w, 3, stride=2, padding=1, output_padding=1), *norm_relu(w),
            nn.ReflectionPad2d(3), nn.Conv2d(w, 1, 7),
        )
        self.make_identity()

    def make_identity(self) -> None:
        """Zero the correction: the generator then returns the logit of its (clipped) input map."""
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logit(x[:, -1:].clamp(MASK_CLIP, 1 - MASK_CLIP)) + BOUND * torch.tanh(self.net(x))


class PatchDiscriminator(nn.Module):
    """PatchGAN: a map of real/fake scores, one per overlapping patch. Receptive field: 16 px for
    layers=1, 34 for 2, 70 for 3. Spectral norm on every convolution, no normalisation layers."""

    def __init__(self, in_channels: int, *, width: int, layers: int):
        super().__init__()
        self.config = dict(in_channels=in_channels, width=width, layers=layers)
        seq = [spectral_norm(nn.Conv2d(in_channels, width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2, inplace=True)]
        c = width
        for i in range(1, layers + 1):
            c_out = width * 2 ** min(i, 3)
            seq += [spectral_norm(nn.Conv2d(c, c_out, 4, stride=2 if i < layers else 1, padding=1)),
                    nn.LeakyReLU(0.2, inplace=True)]
            c = c_out
        seq.append(spectral_norm(nn.Conv2d(c, 1, 4, padding=1)))
        self.net = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def foreground_logit(logits: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) log-odds of not-background: the mask the refiners change."""
    logits = logits.float()
    return logits[:, 1:].logsumexp(dim=1, keepdim=True) - logits[:, :1]


def with_foreground_logit(teacher_logits: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Logits whose foreground log-odds are `r`. With two classes they are [0, r] (softmax:
    [1 - sigmoid(r), sigmoid(r)]); with more, the foreground is shared among the classes as the
    teacher shares it: log(1 - sigmoid(r)) and log(sigmoid(r) p_c / (1 - p_0)). Either replaces
    the teacher's logits anywhere (argmax, KD loss at any temperature)."""
    if teacher_logits.shape[1] == 2:
        return torch.cat([torch.zeros_like(r), r], dim=1)
    share = teacher_logits.float().log_softmax(dim=1)[:, 1:]
    share = share - share.logsumexp(dim=1, keepdim=True)
    return torch.cat([F.logsigmoid(-r), F.logsigmoid(r) + share], dim=1)


@torch.no_grad()
def refine_logits(generator: nn.Module, images: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Teacher logits refined by G_AB at its map temperature T: m = sigmoid(z / T), r = T G_AB(image, m)."""
    t = generator.map_temperature
    z = foreground_logit(teacher_logits)
    r = generator(torch.cat([images, torch.sigmoid(z / t).to(images.dtype)], dim=1)).float()
    return with_foreground_logit(teacher_logits, t * r)
