"""The networks: the U-Net (teacher and student), SinusCycle-GAN, and loading them from a checkpoint."""
import torch

from engine.state import freeze, load_checkpoint, rebuild

from .cyclegan import ResnetGenerator
from .unet import UNet


def load_network(path, kinds, flag: str, device: torch.device):
    """The frozen network of a checkpoint (the refiner G_AB of a cyclegan one), and the checkpoint."""
    ckpt = load_checkpoint(path, kinds, flag)
    if ckpt["kind"] == "cyclegan":
        net = rebuild(ResnetGenerator, ckpt, flag, path, config=ckpt["config"].get("G_AB"))
    else:
        net = rebuild(UNet, ckpt, flag, path)
    return freeze(net.to(device)), ckpt
