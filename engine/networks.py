"""The frozen network a checkpoint holds, rebuilt from its config and best weights: a teacher's or
a student's U-Net, or a refiner (the G_AB generator of a cyclegan checkpoint)."""
import torch

from errors import UserError
from nets.cyclegan import ResnetGenerator
from nets.unet import UNet

from .state import load_checkpoint


def rebuild(cls, ckpt: dict, flag: str, path, config: dict | None = None) -> torch.nn.Module:
    """The network `cls` of a checkpoint with its best weights; a config or weights that do not
    fit this code are a one-line error, not a traceback."""
    try:
        net = cls(**(config or ckpt["config"]))
        net.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise UserError(f"{flag} {path}: its network does not fit this code ({type(err).__name__}); "
                        f"retrain it with this version") from None
    return net


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (BatchNorm running statistics) and no gradient, for good."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_network(path, kinds, flag: str, device: torch.device):
    """The frozen network of a checkpoint (the refiner G_AB of a cyclegan one), and the checkpoint."""
    ckpt = load_checkpoint(path, kinds, flag)
    if ckpt["kind"] == "cyclegan":
        net = rebuild(ResnetGenerator, ckpt, flag, path, config=ckpt["config"].get("G_AB"))
    else:
        net = rebuild(UNet, ckpt, flag, path)
    return freeze(net.to(device)), ckpt
