"""The student's objectives on tiny tensors: each loss and its gradient is what SPEC section 6 says,
and the registry is what the command line, the plan and the tables offer."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import train_student
from engine.cli import build_parser
from kernels import kd_weight_map
from kernels import WEIGHT_MODES
from nets.unet import UNet
from objectives import OBJECTIVES, StepInputs, consistency_loss, ema_update, oracle_logits, pseudo_label_loss, \
    ramp, supervised_loss
from reproduction.plan import PROFILES
from reproduction.tables import table_specs

def logits(*shape, seed=0, scale=3.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_the_registry_is_what_the_command_line_and_the_tables_offer():
    actions = {a.dest: a for a in build_parser(train_student.StudentSettings, "")._actions}
    assert tuple(actions["method"].choices) == tuple(OBJECTIVES)
    assert tuple(actions["weight"].choices) == tuple(WEIGHT_MODES)
    assert set(OBJECTIVES) <= set(table_specs(PROFILES["quick"])["table1"]["rows"])
    assert {o.weight for o in OBJECTIVES.values() if o.weight} <= set(WEIGHT_MODES)
    assert [name for name, o in OBJECTIVES.items() if o.refine] == ["kd_refine", "wkd_refine"]


def test_ramp_follows_the_sigmoid_shaped_schedule():
    assert ramp(0, 2.0, 100) == pytest.approx(2.0 * math.exp(-5.0))
    assert ramp(50, 2.0, 100) == pytest.approx(2.0 * math.exp(-1.25))
    assert ramp(100, 2.0, 100) == 2.0 and ramp(1000, 2.0, 100) == 2.0
    values = [ramp(s, 1.0, 100) for s in range(101)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_supervised_loss_is_cross_entropy_plus_soft_dice():
    z, y = logits(2, 2, 5, 7), (torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.5).long()
    p = z.softmax(1)[:, 1]
    dice = (2 * (p * y).sum() + 1e-5) / (p.sum() + y.sum() + 1e-5)
    torch.testing.assert_close(supervised_loss(z, y), F.cross_entropy(z, y) + 1 - dice)


def test_pseudo_label_ignores_pixels_under_the_confidence():
    teacher = torch.tensor([[[[5.0, 0.0, -4.0]], [[0.0, 0.1, 4.0]]]])   # confident 0, unsure, confident 1
    student = torch.zeros(1, 2, 1, 3, requires_grad=True)
    loss, logged = pseudo_label_loss(student, teacher, SimpleNamespace(confidence=0.9))
    assert logged == {"kept": pytest.approx(2 / 3)}          # the fraction of pixels that teach
    loss.backward()
    assert student.grad[..., 1].abs().max() == 0          # the unsure pixel teaches nothing
    assert student.grad[..., 0].abs().max() > 0 and student.grad[..., 2].abs().max() > 0
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)))   # mean CE of the two kept pixels


def test_mean_teacher_ema_moves_toward_the_student_at_the_set_decay():
    torch.manual_seed(0)
    model, ema = UNet(width=2), UNet(width=2)
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, model, step=1000, decay=0.99)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.99 * b + 0.01 * p)
    ema_update(ema, model, step=0, decay=0.99)      # warm-up: the first update copies the model
    for e, p in zip(ema.parameters(), model.parameters()):
        torch.testing.assert_close(e, p)


def test_consistency_is_the_mse_of_the_two_softmaxes_and_vanishes_when_they_agree():
    zs, ze = logits(2, 2, 4, 6), logits(2, 2, 4, 6, seed=1)
    torch.testing.assert_close(consistency_loss(zs, ze, None), ((zs.softmax(1) - ze.softmax(1)) ** 2).mean())
    assert consistency_loss(zs, zs.clone(), None) == 0


def kd_term(name: str, zs, zt, truth=None, **settings):
    """The unlabelled term of a KD objective with the student answering `zs` and the targets `zt`."""
    s = SimpleNamespace(**dict(dict(method=name, weight=None, oracle="none", temperature=1.0, weight_window=3,
                                    weight_gamma=1.0, weight_map_temperature=4.0), **settings))
    inputs = StepInputs(labelled=None, masks=None, clean=torch.zeros(1), noised=torch.zeros(1),
                        student=lambda x: zs, targets=lambda x: zt, perturb=None, generator=None, settings=s,
                        truth=truth)
    return OBJECTIVES[name].unlabelled_term(inputs)


@pytest.mark.parametrize("name", ["kd", "wkd", "kd_refine", "wkd_refine"])
def test_kd_gradient_is_t_w_times_ps_minus_pt_over_z(name):
    zs, zt = logits(2, 2, 6, 9).requires_grad_(), logits(2, 2, 6, 9, seed=1)
    weight, t = OBJECTIVES[name].weight, 2.0
    kd_term(name, zs, zt, temperature=t).backward()
    w = kd_weight_map(zs.detach(), zt, mode=weight, window=3, map_temperature=4.0, backend="torch")
    expected = t * w[:, None] * ((zs.detach() / t).softmax(1) - (zt / t).softmax(1)) / w.sum()
    # atol: the kernel's ssim weight uses exp2 and one reciprocal of the window count, whose float32
    # rounding differs from the reference's by ~1e-6 relative; the gradient is of order 1e-3
    torch.testing.assert_close(zs.grad, expected, rtol=1e-4, atol=1e-6)
    assert zs.grad.abs().sum() > 0


def test_the_weight_flag_overrides_the_methods_weight():
    zs, zt = logits(2, 2, 6, 9), logits(2, 2, 6, 9, seed=1)
    torch.testing.assert_close(kd_term("wkd", zs, zt, weight="none"), kd_term("kd", zs, zt))
    assert not torch.allclose(kd_term("wkd", zs, zt), kd_term("kd", zs, zt))


def test_the_oracle_weight_counts_the_pixels_where_the_teacher_is_right_and_only_those():
    zs, zt = logits(2, 3, 6, 9).requires_grad_(), logits(2, 3, 6, 9, seed=1)
    truth = torch.randint(3, (2, 6, 9), generator=torch.Generator().manual_seed(2))
    right = zt.argmax(1) == truth
    assert 0 < right.float().mean() < 1
    kd_term("kd", zs, zt, truth, oracle="weight").backward()
    grad = zs.grad.permute(0, 2, 3, 1)       # (N, H, W, C): a pixel's gradient in a row
    assert grad[~right].abs().max() == 0 and grad[right].abs().sum(1).min() > 0
    kl = (zt.softmax(1) * (zt.log_softmax(1) - zs.detach().log_softmax(1))).sum(1)
    torch.testing.assert_close(kd_term("kd", zs.detach(), zt, truth, oracle="weight"), kl[right].mean())


def test_oracle_targets_are_the_true_masks_so_kd_is_their_cross_entropy_up_to_the_margin():
    zs, zt = logits(2, 2, 6, 9), logits(2, 2, 6, 9, seed=1)
    truth = torch.randint(2, (2, 6, 9), generator=torch.Generator().manual_seed(2))
    loss = kd_term("kd", zs, zt, truth, oracle="targets")
    ce = F.cross_entropy(zs, truth)
    assert abs(loss.item() - ce.item()) < 1e-3 * (1 + ce.item())        # a 0.99995 target, not exactly 1
    torch.testing.assert_close(loss, kd_term("kd", zs, oracle_logits(truth, 2)))


def test_kd_with_a_zero_weight_map_gives_no_unlabelled_gradient():
    zs, zt = logits(1, 2, 5, 5).requires_grad_(), logits(1, 2, 5, 5, seed=1)
    loss = kd_term("kd", zs, zt, 1 - zt.argmax(1), oracle="weight")     # the teacher wrong everywhere
    loss.backward()
    assert loss == 0 and zs.grad.abs().max() == 0


def test_each_objective_tells_its_target_network():
    assert OBJECTIVES["supervised"].target is None and OBJECTIVES["supervised"].step is None
    assert OBJECTIVES["mean_teacher"].target == "ema" and OBJECTIVES["bcp"].target == "ema"
    assert OBJECTIVES["unimatch"].target == "student"      # its pseudo labels come from its own weak pass
    assert all(o.target == "teacher" for n, o in OBJECTIVES.items()
               if n not in ("supervised", "mean_teacher", "bcp", "unimatch"))
