"""BCP and UniMatch, the state-of-the-art baselines: their mixing on known boxes, their losses, the
U-Net's feature hook, the plain objectives' step, and both methods end to end."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import run_main

import objectives
from kernels import weighted_kd_loss
from nets.unet import UNet
from objectives import (OBJECTIVES, StepInputs, copy_paste_box, cutmix_boxes, largest_component_per_side,
                        masked_dice_loss, perturb_features, pseudo_label_loss, region_loss)


def logits(*shape, seed=0):
    return 3 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Passes:
    """A stand-in student that records the inputs of its passes and answers with fixed logits."""

    def __init__(self, classes=2):
        self.inputs, self.features, self.classes = [], [], classes

    def __call__(self, x, features=None):
        self.inputs.append(x.clone())
        self.features.append(features)
        n = len(x) * (2 if features else 1)
        return logits(n, self.classes, *x.shape[-2:], seed=len(self.inputs)).requires_grad_()


def inputs(student, targets=None, n=2, shape=(4, 6), settings=None, perturb=None):
    g = torch.Generator().manual_seed(0)
    return StepInputs(labelled=torch.full((n, 1, *shape), 1.0), masks=torch.ones(n, *shape, dtype=torch.long),
                      clean=torch.full((n, 1, *shape), 0.25), noised=torch.full((n, 1, *shape), 0.5),
                      student=student, targets=targets, perturb=perturb or (lambda x, g: x + 0.125), generator=g,
                      settings=settings or SimpleNamespace(confidence=0.95))


@pytest.mark.parametrize("name", ["pseudo_label", "kd"])
def test_the_plain_objectives_step_is_their_loss_of_one_pass(name):
    """The hook's default path, and the KD objectives' shared step: the student's pass on the noised
    view against the clean view's targets."""
    zt = logits(2, 2, 4, 6, seed=9)
    student = Passes()
    s = SimpleNamespace(method=name, weight=None, oracle="none", temperature=1.0, weight_window=3, weight_gamma=1.0,
                        weight_map_temperature=4.0, confidence=0.5)
    got = OBJECTIVES[name].unlabelled_term(inputs(student, targets=lambda x: zt, settings=s))
    assert len(student.inputs) == 1 and torch.equal(student.inputs[0], torch.full((2, 1, 4, 6), 0.5))
    assert student.features == [None]
    expected = pseudo_label_loss(logits(2, 2, 4, 6, seed=1), zt, s)[0] if name == "pseudo_label" else \
        weighted_kd_loss(logits(2, 2, 4, 6, seed=1), zt, weight="none")
    torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, expected)
    assert [n for n, o in OBJECTIVES.items() if o.step is None] == ["supervised", "pseudo_label", "mean_teacher"]


def test_the_unet_feature_hook_changes_the_output_only_through_the_features():
    torch.manual_seed(0)
    net, x = UNet(width=2, dropout=0.0).eval(), torch.rand(2, 1, 32, 64)
    assert torch.equal(net(x), net.decode(net.encode(x)))
    assert torch.equal(net(x, features=lambda fs: fs), net(x))
    torch.manual_seed(1)
    both = net(x, features=perturb_features)
    torch.manual_seed(1)
    expected = net.decode(perturb_features(net.encode(x)))
    assert torch.equal(both, expected)
    clean, perturbed = both.chunk(2)
    torch.testing.assert_close(clean, net(x))          # the first half is the unperturbed prediction
    assert not torch.allclose(perturbed, clean)


def test_bcp_box_is_two_thirds_of_each_side():
    box = copy_paste_box((48, 96), torch.Generator().manual_seed(0))
    rows, cols = box.any(1).nonzero()[:, 0], box.any(0).nonzero()[:, 0]
    assert len(rows) == 32 and len(cols) == 64 and box.sum() == 32 * 64
    assert torch.equal(rows, torch.arange(rows[0], rows[0] + 32))


def test_bcp_mixes_images_and_targets_both_ways_with_one_box(monkeypatch):
    box = torch.zeros(4, 6, dtype=torch.bool)
    box[1:3, 2:5] = True
    monkeypatch.setattr(objectives, "copy_paste_box", lambda shape, g: box)
    target = torch.zeros(4, 2, 4, 6)
    target[:, 0] = 1.0                          # the EMA copy says background everywhere
    student = Passes()
    b = inputs(student, targets=lambda x: target, n=4)
    seen = []
    monkeypatch.setattr(objectives, "region_loss", lambda z, y, region: seen.append((y, region)) or z.sum() * 0)
    objectives.bcp_step(b)
    x_in, x_out = student.inputs
    # inward: unlabelled image (0.25) with the labelled box (1.0) pasted in; outward the other way
    assert torch.equal(x_in, torch.where(box, 1.0, 0.25).expand(2, 1, 4, 6))
    assert torch.equal(x_out, torch.where(box, 0.25, 1.0).expand(2, 1, 4, 6))
    (y_in, in_l), (_, in_u), (y_out, out_l), (_, out_u) = seen
    assert torch.equal(y_in, box.long().expand(2, 4, 6))      # the expert mask (1) in the box, pseudo (0) outside
    assert torch.equal(y_out, (~box).long().expand(2, 4, 6))
    assert torch.equal(in_l[0], box) and torch.equal(in_u[0], ~box)       # the labelled pixels, then the others
    assert torch.equal(out_l[0], ~box) and torch.equal(out_u[0], box)


def test_bcp_weights_the_unlabelled_pixels_half():
    z = logits(2, 2, 4, 6).requires_grad_()
    box = torch.zeros(2, 4, 6, dtype=torch.bool)
    box[:, :, :3] = True
    y = torch.randint(2, (2, 4, 6), generator=torch.Generator().manual_seed(2))
    ce_in = F.cross_entropy(z[..., :3], y[..., :3])
    torch.testing.assert_close(region_loss(z, y, box), ce_in + masked_dice_loss(z[..., :3], y[..., :3],
                                                                                box[..., :3]))


def test_bcp_step_weights_the_pseudo_labelled_regions_half(monkeypatch):
    # each region's loss a power of ten, in the order the mixing test reads them: inward
    # labelled, inward unlabelled, outward labelled, outward unlabelled
    calls = []
    monkeypatch.setattr(objectives, "region_loss",
                        lambda z, y, region: calls.append(region) or torch.tensor(10.0 ** (len(calls) - 1)))
    b = inputs(Passes(), targets=lambda x: logits(len(x), 2, *x.shape[-2:], seed=5), n=4)
    loss, _ = objectives.bcp_step(b)
    assert len(calls) == 4
    torch.testing.assert_close(loss, torch.tensor(1.0 + 0.5 * 10.0 + 100.0 + 0.5 * 1000.0))


def test_bcp_keeps_each_sides_largest_component():
    labels = torch.zeros(1, 4, 8, dtype=torch.long)
    labels[0, 0:2, 0:2] = 1     # left: the big blob
    labels[0, 3, 3] = 1         # left: a speck
    labels[0, 1, 5] = 1         # right: one pixel, the side's largest
    kept = largest_component_per_side(labels, 2)
    expected = labels.clone()
    expected[0, 3, 3] = 0
    assert torch.equal(kept, expected)


def test_masked_dice_ignores_pixels_outside_the_mask():
    z, y = logits(1, 2, 3, 4), torch.randint(2, (1, 3, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[..., :2] = True
    other = z.clone()
    other[..., 2:] = -other[..., 2:]
    torch.testing.assert_close(masked_dice_loss(z, y, mask), masked_dice_loss(other, y, mask))
    p = z.softmax(1)[..., :2]
    onehot = F.one_hot(y[..., :2], 2).permute(0, 3, 1, 2).float()
    dice = (2 * (p * onehot).sum((0, 2, 3)) + 1e-5) / ((p * p + onehot).sum((0, 2, 3)) + 1e-5)
    torch.testing.assert_close(masked_dice_loss(z, y, mask), (1 - dice).mean())


def test_unimatch_cutmix_mixes_images_and_pseudo_labels_with_the_same_box(monkeypatch):
    box = torch.zeros(2, 4, 6, dtype=torch.bool)
    box[0, :2, :3] = True                          # the second image keeps no box
    monkeypatch.setattr(objectives, "cutmix_boxes", lambda n, shape, g: box)
    student = Passes()
    b = inputs(student)
    b = dataclasses.replace(b, noised=torch.stack([torch.full((1, 4, 6), 0.5), torch.full((1, 4, 6), 0.75)]))
    weak = logits(4, 2, 4, 6, seed=1)[:2]          # what Passes answers first, weak half
    label = weak.argmax(1)
    seen = []
    monkeypatch.setattr(objectives, "masked_dice_loss", lambda z, y, keep: seen.append((y, keep)) or z.sum() * 0)
    objectives.unimatch_step(b)
    assert student.features[0] is objectives.perturb_features and torch.equal(student.inputs[0], b.clean)
    s1 = student.inputs[1][:2]
    assert torch.equal(s1[0, 0], torch.where(box[0], 0.75, 0.5)) and torch.equal(s1[1], b.noised[1])
    torch.testing.assert_close(student.inputs[1][2:], torch.where(box[:, None], b.clean.roll(1, 0), b.clean) + 0.125)
    (y1, _), (y2, _), (y_fp, keep_fp) = seen
    assert torch.equal(y1[0], torch.where(box[0], label[1], label[0])) and torch.equal(y1[1], label[1])
    assert torch.equal(y1, y2) and torch.equal(y_fp, label)
    assert torch.equal(keep_fp, weak.softmax(1).max(1)[0] >= 0.95)


def test_unimatch_boxes_follow_its_sizes():
    boxes = cutmix_boxes(400, (48, 96), torch.Generator().manual_seed(0))
    area = boxes.float().mean((1, 2))
    assert 0.4 < (area > 0).float().mean() < 0.6        # a box with probability 0.5
    assert area[area > 0].min() > 0.01 and area.max() <= 0.4


@pytest.mark.parametrize("method", ["bcp", "unimatch"])
def test_modern_baselines_train_end_to_end(tiny_teacher, tiny_students, method):
    ckpt = torch.load(tiny_students[method], weights_only=True)      # two steps, --confidence 0.5
    assert ckpt["kind"] == "student" and ckpt["method"] == method and ckpt["step"] == 2
    assert ("ema" in ckpt["train_state"]) == (method == "bcp")
    teacher = torch.load(tiny_teacher, weights_only=True)["train_state"]["model"]
    assert any(not torch.equal(teacher[k], v) for k, v in ckpt["train_state"]["model"].items())


def test_bcp_needs_two_images_of_each_kind(tiny_data, tiny_teacher, tmp_path):
    proc = run_main("train_student.py", "--data", tiny_data, "--teacher", tiny_teacher, "--method", "bcp",
                    "--out", tmp_path / "s.pt", "--steps", 1, "--width", 4, "--batch-size", 1)
    assert proc.returncode == 2 and "at least 2" in proc.stderr


def test_the_plan_scales_both_as_their_code_and_trains_them_on_the_baseline_seeds(tmp_path):
    from reproduction.plan import PROFILES, Planner, method_settings, ratio_tag
    assert method_settings("bcp", 30000) == {"--lambda-max": 1.0, "--ramp-steps": 1, "--ema-decay": 0.99}
    assert method_settings("unimatch", 150) == {"--lambda-max": 1.0, "--ramp-steps": 1}
    quick = PROFILES["quick"]
    runs = Planner("quick", tmp_path / "data", tmp_path / "out").plan()
    for method in ("bcp", "unimatch"):
        students = [r for r in runs if r.script == "train_student" and r.name.endswith(f"student-{method}.pt")]
        # Table 1's ratio on the baseline seeds, Table 4's other ratios on the efficiency seeds
        for ratio in quick["table4_ratios"]:
            at_ratio = [r for r in students if f"/{ratio_tag(ratio)}/" in r.name]
            assert len(at_ratio) == quick["seeds"]["baselines" if ratio == quick["ratio"] else "efficiency"]
        others = len(quick["table4_ratios"]) - 1
        assert len(students) == quick["seeds"]["baselines"] + quick["seeds"]["efficiency"] * others
