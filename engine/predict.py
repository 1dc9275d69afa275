"""Batched inference without gradient."""
import torch


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, device: torch.device,
                   batch_size: int = 8) -> torch.Tensor:
    """Logits for (N, 1, H, W) images, returned on the CPU in float32."""
    was_training = model.training
    model.eval()
    out = [model(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out)
