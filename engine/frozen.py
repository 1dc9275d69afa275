"""Upstream networks a later stage uses without training them."""
import torch

from nets.unet import UNet

from .checkpoint import load_checkpoint, rebuild


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (BatchNorm running statistics) and no gradient, for good."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_teacher(path, device: torch.device, flag: str = "--teacher"):
    """The teacher U-Net of a teacher checkpoint, frozen, with the checkpoint itself."""
    ckpt = load_checkpoint(path, ("teacher",), flag)
    return freeze(rebuild(UNet, ckpt, flag, path).to(device)), ckpt
