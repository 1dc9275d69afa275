"""Pieces the U-Net stages (teacher, student) share: their labelled batch, the best-by-validation
bookkeeping and the checkpoint they write."""
import torch

from data import augment_geometry, augment_photometric, batch_indices, step_generator

from .checkpoint import rng_state, save_checkpoint, set_rng_state, weights_copy
from .metrics import dice_score
from .predict import predict_logits
from .run import args_record, git_hash


def labeled_batch(images, masks, batch_size: int, seed: int, step: int, device):
    """Batch `step` of the labelled stream, geometrically and photometrically augmented."""
    idx = batch_indices(len(images), batch_size, seed, step)
    g = step_generator(seed, step, "labeled")
    x, y = augment_geometry(images[idx].to(device), masks[idx].to(device), g)
    return augment_photometric(x, g), y


def validation_dice(model, images, masks, device) -> dict:
    return {"dice": dice_score(predict_logits(model, images, device), masks).item()}


class StageState:
    """Training modules, the best weights so far, and the one checkpoint file that holds both."""

    def __init__(self, kind: str, path, model, modules: dict, args, split: dict, size, extra: dict | None = None,
                 config: dict | None = None, score: str = "dice"):
        """`model` is the network later stages use (its best weights are kept), `modules` everything
        with a state_dict that --resume needs, `score` the validation metric that picks the best."""
        self.kind, self.path, self.model, self.modules = kind, path, model, modules
        self.args, self.split, self.size, self.extra = args, split, list(size), extra or {}
        self.config, self.score = config or model.config, score
        self.best = dict(score=-float("inf"), step=0, metrics={}, weights=None)
        self.version = git_hash()

    def restore(self, ckpt: dict) -> int:
        """Load the training state of `ckpt`; return the step to continue from."""
        state = ckpt["train_state"]
        for name, module in self.modules.items():
            module.load_state_dict(state[name])
        set_rng_state(state["rng"])
        self.best = dict(score=state["best_score"], step=state["best_step"], metrics=ckpt["metrics"],
                         weights=ckpt["model"])
        return state["step"]

    def save(self, step: int, metrics: dict) -> None:
        """Keep the model if its score is the best yet, then write the checkpoint."""
        score = metrics[self.score]
        if score > self.best["score"]:
            self.best.update(score=score, step=step, metrics=dict(metrics, step=step),
                             weights=weights_copy(self.model))
        train_state = {name: weights_copy(module) if isinstance(module, torch.nn.Module) else module.state_dict()
                       for name, module in self.modules.items()}
        train_state.update(step=step, rng=rng_state(), best_score=self.best["score"], best_step=self.best["step"])
        save_checkpoint(self.path, dict(
            kind=self.kind, config=self.config, model=self.best["weights"], split=self.split, size=self.size,
            metrics=self.best["metrics"], args=args_record(self.args), code_version=self.version, step=step,
            train_state=train_state, **self.extra))
