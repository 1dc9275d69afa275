"""SinusCycle-GAN: network shapes, the refined-logit contract, and train_cyclegan.py end to end
(checkpoint, exact resume, frozen teacher, bad input) on a tiny phantom."""
import numpy as np
import pytest
import torch
from conftest import assert_same_training, run_scripts

import train_cyclegan
from data import load_tensors
from engine.networks import load_network
from engine.state import check_same_experiment, load_checkpoint
from errors import UserError
from nets.cyclegan import BOUND, MASK_CLIP, PatchDiscriminator, ResnetGenerator, refine_logits

TINY = ["--width", "4", "--blocks", "1", "--disc-width", "4", "--batch-size", "2", "--pool-size", "3"]
RESUME_AT = 2       # the step of the full run a resumed run starts from


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder for this module's runs (on the shared tiny phantom and its teacher)."""
    return tmp_path_factory.mktemp("cyclegan")


def cyclegan_args(tiny_data, tiny_teacher):
    return ["--data", tiny_data, "--teacher", tiny_teacher, "--steps", 6, "--val-every", 2, *TINY]


@pytest.fixture(scope="module")
def full_run(tiny, tiny_data, tiny_teacher):
    """An uninterrupted 6-step refiner run: (checkpoint path, the line it printed at its end); its
    step-2 checkpoint is kept as full_at2.pt. The same process then makes averaged.pt, the run with
    the generator averaged at 0.5, and its averaged_at2.pt."""
    out, averaged = tiny / "full.pt", tiny / "averaged.pt"
    proc = run_scripts(("train_cyclegan.py", *cyclegan_args(tiny_data, tiny_teacher), "--out", out),
                       ("train_cyclegan.py", *averaged_args(tiny_data, tiny_teacher), "--out", averaged),
                       snapshots={out: {RESUME_AT: tiny / "full_at2.pt"},
                                  averaged: {RESUME_AT: tiny / "averaged_at2.pt"}})
    return out, next(line for line in proc.stdout.splitlines() if line.startswith(f"{out}: "))


def averaged_args(tiny_data, tiny_teacher):
    return [*cyclegan_args(tiny_data, tiny_teacher), "--average", "0.5"]


@pytest.fixture(scope="module")
def resumed_runs(tiny, tiny_data, tiny_teacher, full_run):
    """The two runs of full_run resumed from their step-2 checkpoints (the file a run killed then
    leaves; a real kill is checked on the teacher), one after the other in one process:
    {"full": checkpoint, "averaged": checkpoint}."""
    snapshots = {"full": tiny / "full_at2.pt", "averaged": tiny / "averaged_at2.pt"}
    assert load_checkpoint(snapshots["full"], ("cyclegan",), "--out", finished=False)["step"] == RESUME_AT
    run_scripts(("train_cyclegan.py", *cyclegan_args(tiny_data, tiny_teacher), "--out", snapshots["full"], "--resume"),
                ("train_cyclegan.py", *averaged_args(tiny_data, tiny_teacher), "--out", snapshots["averaged"],
                 "--resume"))
    return {name: torch.load(path, weights_only=True) for name, path in snapshots.items()}


def test_generator_and_discriminator_shapes():
    x = torch.rand(3, 2, 36, 52)            # multiples of 4, not of 8
    g = ResnetGenerator(width=4, blocks=2, map_temperature=4.0)
    assert g(x).shape == (3, 1, 36, 52)
    ResnetGenerator(**g.config).load_state_dict(g.state_dict())   # strict: a missing or extra key raises
    d = PatchDiscriminator(1, width=4, layers=3)

    def conv(n, stride):                    # 4x4 kernels, padding 1
        return (n + 2 - 4) // stride + 1
    h, w = 36, 52
    for stride in (2, 2, 2, 1, 1):
        h, w = conv(h, stride), conv(w, stride)
    assert d(x[:, 1:]).shape == (3, 1, h, w)
    PatchDiscriminator(**d.config).load_state_dict(d.state_dict())


def test_untrained_generator_is_the_identity_and_can_flip_any_pixel():
    x = torch.rand(2, 2, 16, 24)
    g = ResnetGenerator(width=4, blocks=1, map_temperature=4.0)
    torch.testing.assert_close(g(x), torch.logit(x[:, 1:].clamp(MASK_CLIP, 1 - MASK_CLIP)))
    # the bound exceeds the clipped logit, so a saturated correction turns a sure pixel around
    assert BOUND > torch.logit(torch.tensor(1 - MASK_CLIP)).item()
    torch.nn.init.constant_(g.net[-1].bias, -20.0)
    assert (g(torch.ones(1, 2, 8, 8)) < 0).all()


def test_refined_logits_keep_the_teacher_and_carry_the_generator_at_the_map_temperature():
    torch.manual_seed(0)
    images, teacher = torch.rand(2, 1, 20, 28), (torch.randn(2, 2, 20, 28) * 3).clamp(-5, 5)
    identity = refine_logits(ResnetGenerator(width=4, blocks=1, map_temperature=4.0).eval(), images, teacher)
    torch.testing.assert_close(identity[:, 1] - identity[:, 0], teacher[:, 1] - teacher[:, 0])   # |z| < 11.8
    g = ResnetGenerator(width=4, blocks=1, map_temperature=2.0).eval()
    torch.nn.init.normal_(g.net[-1].weight, std=0.1)
    out = refine_logits(g, images, teacher)
    assert out.shape == (2, 2, 20, 28) and not out.requires_grad
    q = torch.sigmoid((teacher[:, 1:] - teacher[:, :1]) / 2.0)
    torch.testing.assert_close(out.softmax(1)[:, 1:], torch.sigmoid(2.0 * g(torch.cat([images, q], 1))))


def test_discriminators_see_binary_translated_masks_but_pass_gradients():
    soft = torch.full((2, 1, 16, 32), 0.7, requires_grad=True)
    seen = []
    view = train_cyclegan.DiscriminatorView(with_image=False)
    view(lambda x: seen.append(x) or x.sum(), torch.rand(2, 1, 16, 32), soft, torch.Generator().manual_seed(1))
    assert set(seen[0].unique().tolist()) <= {0.0, 1.0} and seen[0].shape == (2, 1, 16, 32)
    seen[0].sum().backward()
    assert soft.grad.abs().max() > 0
    moved = train_cyclegan.translate(soft.detach(), torch.Generator().manual_seed(3))
    assert moved.shape == soft.shape and (moved == 0).any()


def test_real_masks_are_deformed_into_other_binary_masks():
    mask = torch.zeros(3, 1, 32, 64)
    mask[:, :, 8:20, 10:30] = 1
    out = train_cyclegan.deform_masks(mask, torch.Generator().manual_seed(0), pixels=1.5)
    assert set(out.unique().tolist()) == {0.0, 1.0} and not torch.equal(out, mask)
    assert torch.equal(train_cyclegan.deform_masks(mask, torch.Generator(), pixels=0), mask)


def test_keep_rule_needs_a_sure_dice_gain_and_no_worse_hd95():
    teacher = dict(dice=np.full(30, 0.8), hd95=np.full(30, 5.0))
    rng = np.random.default_rng(0)
    sure = dict(dice=0.8 + 0.01 + rng.normal(0, 0.005, 30), hd95=np.full(30, 4.5))
    assert train_cyclegan.refinement_gain(teacher, sure)["passes"]
    noisy = dict(dice=0.8 + 0.001 + rng.normal(0, 0.02, 30), hd95=np.full(30, 4.5))
    assert not train_cyclegan.refinement_gain(teacher, noisy)["passes"]
    worse_boundary = dict(sure, hd95=np.full(30, 5.5))
    assert not train_cyclegan.refinement_gain(teacher, worse_boundary)["passes"]
    assert not train_cyclegan.refinement_gain(teacher, teacher)["passes"]


def test_keep_rule_compares_hd95_over_the_cases_where_both_are_defined():
    teacher = dict(dice=np.array([0.8, 0.7, 0.9]), hd95=np.array([np.nan, 4.0, 6.0]))
    refined = dict(dice=np.array([0.8, 0.8, 0.9]), hd95=np.array([1.0, np.nan, 5.0]))
    got = train_cyclegan.refinement_gain(teacher, refined)
    assert got["teacher_hd95"] == 6.0 and got["refined_hd95"] == 5.0          # the third case only
    assert got["teacher_dice"] == pytest.approx(0.8) and got["dice_gain"] == pytest.approx(0.1 / 3)


def test_keep_rule_metrics_are_per_case_dice_and_hd95_of_the_argmax():
    from monai.metrics import compute_hausdorff_distance
    target = torch.zeros(2, 24, 32, dtype=torch.long)
    target[:, 4:14, 5:15] = 1
    pred = torch.zeros_like(target)
    pred[0, 4:14, 7:17] = 1                    # shifted two columns: Dice 2 * 80 / 200
    pred[1, 6:20, 3:15] = 1                    # larger and lower: Dice 2 * 80 / (168 + 100)
    logits = torch.stack([1 - pred, pred], 1).float()
    got = train_cyclegan.dice_and_hd95_per_case(logits, target)
    np.testing.assert_allclose(got["dice"], [0.8, 160 / 268], rtol=1e-6)
    expected = compute_hausdorff_distance(pred[:, None].float(), target[:, None].float(), percentile=95,
                                          include_background=True)[:, 0]
    np.testing.assert_allclose(got["hd95"], expected.double().numpy(), rtol=0, atol=1e-5)


def test_training_writes_a_loadable_checkpoint_with_teacher_vs_refined_metrics(tiny_data, tiny_teacher, full_run):
    path, summary = full_run
    assert "Dice" in summary and "HD95" in summary
    ckpt = load_checkpoint(path, ("cyclegan",), "--refiner")
    assert ckpt["step"] == 6 and ckpt["size"] == [32, 64]
    assert {k.split(".")[0] for k in ckpt["train_state"]["nets"]} == {"G_AB", "G_BA", "D_A", "D_B"}
    teacher, teacher_ckpt = load_network(tiny_teacher, ("teacher",), "--teacher", torch.device("cpu"))
    assert ckpt["split"] == teacher_ckpt["split"]

    # the stored metrics, recomputed here from the two checkpoints alone
    images, masks = load_tensors(tiny_data, ckpt["split"]["val"], (32, 64))
    with torch.no_grad():
        teacher_logits = teacher(images)
    refiner, _ = load_network(path, ("cyclegan",), "--refiner", torch.device("cpu"))
    refined = refine_logits(refiner, images, teacher_logits)

    def dice(pred, target):
        pred, target = pred.flatten(1).float(), target.flatten(1).float()
        return (2 * (pred * target).sum(1) / (pred.sum(1) + target.sum(1)).clamp(min=1)).mean().item()
    m = ckpt["metrics"]
    assert m["teacher_dice"] == pytest.approx(dice(teacher_logits.argmax(1), masks), abs=1e-6)
    assert m["refined_dice"] == pytest.approx(dice(refined[:, 1] > 0, masks), abs=1e-6)
    assert m["dice_gain"] == pytest.approx(m["refined_dice"] - m["teacher_dice"])
    # the six-step teacher predicts no foreground, so its Dice is 0 and HD95 is undefined in every
    # case here; the two tests above check the HD95 average and the per-case metrics
    assert {"teacher_hd95", "refined_hd95"} <= set(m)
    # the trained refiner of the final step (the running average of G_AB by default) is written whatever
    # the keep rule says, and the verdict is recorded beside it, with the test that failed named
    averaged = ckpt["train_state"]["average"]
    assert ckpt["metrics"]["step"] == 6 and ckpt["metrics"]["passes"] in (0.0, 1.0)
    assert all(torch.equal(v, averaged[k]) for k, v in ckpt["model"].items())
    assert any(not torch.equal(v, ResnetGenerator(**ckpt["config"]["G_AB"]).state_dict()[k])
               for k, v in ckpt["model"].items())
    failures = train_cyclegan.keep_rule_failures(m)
    assert bool(m["passes"]) == (not failures)
    assert ("passes the keep rule" if m["passes"] else "fails the keep rule: " + "; ".join(failures)) in summary


def test_keep_rule_names_each_test_that_fails():
    fine = dict(dice_gain_low=0.01, teacher_hd95=5.0, refined_hd95=4.0)
    assert train_cyclegan.keep_rule_failures(fine) == []
    failures = train_cyclegan.keep_rule_failures(dict(fine, dice_gain_low=-0.01, refined_hd95=6.0))
    assert len(failures) == 2 and "lower bound -0.0100" in failures[0] and "5.00 -> 6.00" in failures[1]
    assert train_cyclegan.keep_rule_failures(dict(fine, refined_hd95=float("nan"))) == \
        ["HD95 is undefined on every validation case"]


def test_the_generator_average_moves_a_part_of_the_way():
    average, model = ResnetGenerator(width=4, blocks=1, map_temperature=4.0), ResnetGenerator(width=4, blocks=1,
                                                                                              map_temperature=4.0)
    before = {k: v.clone() for k, v in average.state_dict().items()}
    for p in model.parameters():
        torch.nn.init.normal_(p)
    train_cyclegan.average_into(average, model, 0.9)
    for k, v in average.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * model.state_dict()[k])


def test_an_averaged_refiner_resumes_exactly(tiny, resumed_runs):
    full = load_checkpoint(tiny / "averaged.pt", ("cyclegan",), "--out")
    again = resumed_runs["averaged"]
    assert_same_training(full, again, "average")
    assert full["train_state"]["average"].keys() == full["model"].keys()


def test_resume_equals_an_uninterrupted_run(full_run, resumed_runs):
    """From the checkpoint the full run wrote at step 2, a resumed run ends where the uninterrupted
    one did."""
    full = load_checkpoint(full_run[0], ("cyclegan",), "--out")
    again = resumed_runs["full"]
    assert again["step"] == 6
    assert_same_training(full, again, "nets")
    for a, b in zip(full["train_state"]["pool_b"], again["train_state"]["pool_b"], strict=True):
        assert torch.equal(a, b)


def test_teacher_gets_no_gradient_and_keeps_its_statistics(tiny_data, tiny_teacher, tiny):
    teacher, _ = load_network(tiny_teacher, ("teacher",), "--teacher", torch.device("cpu"))
    teacher.requires_grad_(True)            # so that only the training code can keep it out of the graph
    buffers = {k: v.clone() for k, v in teacher.state_dict().items()}
    generator, discriminator = dict(width=4, blocks=1, map_temperature=4.0), dict(width=4, layers=3)
    nets = torch.nn.ModuleDict(dict(G_AB=ResnetGenerator(**generator), G_BA=ResnetGenerator(**generator),
                                    D_A=PatchDiscriminator(1, **discriminator),
                                    D_B=PatchDiscriminator(1, **discriminator)))
    xa, xb = torch.rand(2, 1, 32, 64), torch.rand(2, 1, 32, 64)
    yb = (torch.rand(2, 1, 32, 64) > 0.7).float()
    qa = train_cyclegan.teacher_map(teacher, xa, 4.0)
    view, g = train_cyclegan.DiscriminatorView(with_image=False), torch.Generator().manual_seed(0)
    s = train_cyclegan.CycleGANSettings(teacher=tiny_teacher)
    loss, fake_a, fake_b, _ = train_cyclegan.generator_loss(nets, view, xa, qa, xb, yb, s, g)
    fakes = train_cyclegan.pair(xb, fake_a), train_cyclegan.pair(xa, fake_b)
    (loss + train_cyclegan.discriminator_loss(nets, view, xa, qa, xb, yb, *fakes, g)).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in buffers.items())
    assert all(p.grad is not None for p in nets["G_AB"].parameters())


def refused(capsys, tiny, tiny_data, *args):
    """Run train_cyclegan in this process; it must exit with status 2 and one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        train_cyclegan.main(["--data", str(tiny_data), "--out", str(tiny / "never.pt"), "--steps", "2",
                             *map(str, args)])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tiny / "never.pt").exists()
    return stderr


def test_wrong_kind_of_teacher_is_refused_in_one_line(tiny_data, tiny_teacher, capsys, tiny, full_run):
    stderr = refused(capsys, tiny, tiny_data, "--teacher", full_run[0])
    assert "--teacher" in stderr and "cyclegan checkpoint" in stderr
    with pytest.raises(UserError, match="--refiner .* teacher checkpoint, expected a cyclegan"):
        load_network(tiny_teacher, ("cyclegan",), "--refiner", torch.device("cpu"))


def test_the_refiner_has_no_size_of_its_own(tiny_data, tiny_teacher, capsys, tiny):
    stderr = refused(capsys, tiny, tiny_data, "--teacher", tiny_teacher, "--size", 64, 128)
    assert "--size" in stderr


def test_refiner_from_another_teacher_is_refused(tiny_data, tiny_teacher, tiny, full_run):
    other = torch.load(tiny_teacher, weights_only=True)
    other["split"] = dict(other["split"], labeled=other["split"]["labeled"][1:])
    with pytest.raises(UserError, match="another teacher"):
        check_same_experiment(load_checkpoint(full_run[0], ("cyclegan",), "--refiner"), "--refiner", full_run[0],
                              other)
