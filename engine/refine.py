"""The trained SinusCycle-GAN refiner as the student stage uses it: teacher logits in, refined logits out."""
import torch

from nets.cyclegan import ResnetGenerator

from .checkpoint import load_checkpoint, rebuild
from .errors import UserError
from .frozen import freeze


def load_refiner(path, device: torch.device, teacher_ckpt: dict, flag: str = "--refiner"):
    """The refining generator G_AB of a cyclegan checkpoint trained from the teacher of
    `teacher_ckpt` (same split and size), frozen, with the checkpoint itself."""
    ckpt = load_checkpoint(path, ("cyclegan",), flag)
    if ckpt["split"] != teacher_ckpt["split"] or list(ckpt["size"]) != list(teacher_ckpt["size"]):
        raise UserError(f"{flag} {path} was trained from another teacher (its split or size differ); "
                        f"train it from this teacher")
    generator = rebuild(ResnetGenerator, ckpt, flag, path, config=ckpt["config"].get("G_AB"))
    return freeze(generator.to(device)), ckpt


def teacher_foreground(teacher_logits: torch.Tensor) -> torch.Tensor:
    """qT: the teacher's foreground probability (N, 1, H, W), the mask channel of domain A."""
    return teacher_logits.float().softmax(dim=1)[:, 1:2]


@torch.no_grad()
def refined_logits(generator: torch.nn.Module, images: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Two-class logits [0, r] with r = G_AB(image, qT): their softmax is [1 - sigmoid(r), sigmoid(r)],
    so they replace the teacher's logits anywhere (argmax, KD loss at any temperature)."""
    q = teacher_foreground(teacher_logits).to(images.dtype)
    r = generator(torch.cat([images, q], dim=1)).float()
    return torch.cat([torch.zeros_like(r), r], dim=1)


def refine_all(generator: torch.nn.Module, images: torch.Tensor, teacher_logits: torch.Tensor,
               device: torch.device, batch_size: int = 8) -> torch.Tensor:
    """`refined_logits` over a whole set, in batches on `device`; returned on the CPU."""
    return torch.cat([refined_logits(generator, images[i:i + batch_size].to(device),
                                     teacher_logits[i:i + batch_size].to(device)).cpu()
                      for i in range(0, len(images), batch_size)])
