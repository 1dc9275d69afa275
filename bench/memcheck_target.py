"""What `compute-sanitizer --tool memcheck` runs in the GPU session: a small KD forward and backward
of every weight mode, with the student's logits as training lays them out (bfloat16, channels-last)
and the teacher's both ways it does (bfloat16 and float32, NCHW), and one boundary-metrics call.

    compute-sanitizer --tool memcheck python3 -m bench.memcheck_target
"""
import torch

from bench.boundary_speed import SPACING, sinus_batch
from kernels import boundary_metrics, weighted_kd_loss

SHAPE = (2, 2, 64, 512)      # the training width, so the kernels compiled earlier in the session serve


def main():
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    student = (3 * torch.randn(SHAPE, generator=gen, device=device)).to(torch.bfloat16)
    student = student.contiguous(memory_format=torch.channels_last).requires_grad_()
    for teacher_dtype in (torch.bfloat16, torch.float32):
        teacher = student.detach().float() + 2 * torch.randn(SHAPE, generator=gen, device=device)
        for mode in ("none", "agree", "ssim"):
            loss = weighted_kd_loss(student, teacher.to(teacher_dtype), weight=mode, window=3, map_temperature=4.0)
            loss.backward()
    pred, truth = sinus_batch(2, *SHAPE[2:], seed=1)
    boundary_metrics(pred.to(device), truth.to(device), spacing=SPACING)
    torch.cuda.synchronize()
    print("kd forward and backward (3 weights x 2 teacher dtypes) and one boundary call done", flush=True)


if __name__ == "__main__":
    main()
