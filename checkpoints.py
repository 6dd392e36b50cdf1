"""Reading, upgrading and writing checkpoints and weight files, with nothing in them run.

Every file a run reads back goes through `safe_load` (torch.load with weights_only=True: a
pickle that names a class or a function is refused), so a checkpoint, pretrain.py's
encoder.pth or timm weights from elsewhere cannot run code. `read_weights` and
`load_backbone` serve --pretrained; `upgrade_keys` reads checkpoints written before the
network was one module; `averaged_weights` puts EMA / SWA weights into a weights-only
checkpoint. Rebuilding a trained model from its checkpoint is ensemble.load_checkpoint, above
model.py, which uses this module.
"""
from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch

from util import UsageError

log = logging.getLogger(__name__)
BACKBONE = "net.backbone."  # where a run's checkpoint keeps the backbone's tensors


class PretrainedError(UsageError):
    """--pretrained names weights that cannot be had or do not fit the model."""


class CheckpointError(UsageError):
    """A checkpoint that cannot be used, or members that cannot be blended."""


def safe_load(path: str | Path, error: type[UsageError] = UsageError, what: str = "",
              fix: str = "train it again"):
    """torch.load with weights_only=True: tensors, numbers, strings, lists and dicts come
    back, and nothing in the file is run. A pickle that names any other global (a class, a
    function: what a crafted file uses to run code) is refused with `error`; so is a file
    that is truncated, empty or not a torch file at all, with `fix` as what to do."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise error(f"{what}{path}: no such file") from None
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)|global '?([\w.]+)", str(e))
        if m:  # a pickle that asks for a class or function by name
            raise error(f"{what}{path}: refused, it holds objects other than tensors and plain "
                        f"values (it names {m.group(1) or m.group(2)}); loading it could run "
                        f"code") from None
        lines = [x for x in str(e).splitlines() if x.strip() and "Weights only" not in x]
        reason = (lines[-2] if len(lines) > 1 else type(e).__name__)[:80]
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated zip, empty file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:80]
    raise error(f"{what}{path}: not a complete torch file (truncated, empty or another format: "
                f"{reason}); {fix}")


def read_weights(path: str | Path) -> dict:
    """The tensors of a weights file: a timm state dict (.pth, .safetensors), pretrain.py's
    encoder.pth, or a run's checkpoint (its backbone `net.*`). Nothing in it is run: pickles
    are read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"--pretrained {path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = safe_load(path, PretrainedError, "--pretrained ",
                           "pass pretrain.py's encoder.pth, a run's best.ckpt or timm weights")
    except PretrainedError:
        raise
    except Exception as e:  # UnpicklingError, RuntimeError, SafetensorError, ...
        raise PretrainedError(f"--pretrained {path}: not a weights file this project can read "
                              f"({type(e).__name__}); pass pretrain.py's encoder.pth, a run's "
                              f"best.ckpt or a timm .pth/.safetensors file") from None
    for key in ("state_dict_ema", "state_dict", "model"):  # timm prefers the EMA weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise PretrainedError(f"--pretrained {path}: holds no tensors by name")
    sd = upgrade_keys(sd)
    if any(k.startswith(BACKBONE) for k in sd):  # a run's checkpoint: keep the backbone's
        sd = {k[len(BACKBONE):]: v for k, v in sd.items() if k.startswith(BACKBONE)}
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def load_backbone(net: torch.nn.Module, path: str | Path) -> dict:
    """Load the backbone tensors of `path` into the timm model `net`, the classifier left
    as initialised; an RGB stem is summed to one channel (as timm does). Only tensors that
    carry weights count (parameters and running statistics; BatchNorm's step counters are
    left out). Returns the counts loaded / skipped / mismatched / wanted (the backbone's
    weight tensors); PretrainedError when none of them loads."""
    def counted(d):
        return {k: v for k, v in d.items() if not k.endswith("num_batches_tracked")}

    everything, whole = read_weights(path), net.state_dict()
    sd, own = counted(everything), counted(whole)
    head = {f"{n}.{p}" for n in [net.default_cfg.get("classifier", "")] if n
            for p in ("weight", "bias")}
    take, skipped, mismatched = {}, 0, 0
    for k, v in sd.items():
        if k in head or k not in own:
            skipped += 1
        elif v.shape == own[k].shape:
            take[k] = v
        elif v.dim() == 4 and v.shape[1] == 3 and own[k].shape[1] == 1 and \
                v.shape[0] == own[k].shape[0] and v.shape[2:] == own[k].shape[2:]:
            take[k] = v.sum(1, keepdim=True)  # the RGB stem of image weights, as timm adapts it
        else:
            mismatched += 1
    wanted = len(set(own) - head)
    if not take:
        raise PretrainedError(f"--pretrained {path}: none of its {len(sd)} weight tensors fits "
                              f"the {wanted} of {type(net).__name__}'s backbone ({skipped} "
                              f"skipped, {mismatched} of another shape): pass weights of the "
                              f"-m model")
    if len(take) < wanted / 2:
        log.warning("--pretrained %s: only %d of the backbone's %d weight tensors loaded; the "
                    "rest start from scratch (weights of another model?)", path, len(take),
                    wanted)
    counters = {k: v for k, v in everything.items() if k not in sd and k in whole
                and v.shape == whole[k].shape}  # loaded with their layers, never counted
    net.load_state_dict({**take, **counters}, strict=False)
    return dict(loaded=len(take), skipped=skipped, mismatched=mismatched, wanted=wanted)


def upgrade_keys(state: dict) -> dict:
    """A state dict of a checkpoint written before the network was one module (backbone at
    `net.*`, SED head at `head.*`) in today's names (`net.backbone.*`, `net.head.*`)."""
    if not any(k.startswith("net.") for k in state) or any(k.startswith(BACKBONE) for k in state):
        return state
    return {("net.backbone." + k[4:] if k.startswith("net.") else
             "net." + k if k.startswith("head.") else k): v for k, v in state.items()}


def averaged_weights(module, checkpoint: dict) -> None:
    """Put the averaging callback's weights (EMA, SWA) into a weights-only checkpoint, which
    Lightning writes without calling callbacks' checkpoint hooks; a full checkpoint (last.ckpt)
    gets them from the callback itself."""
    if "optimizer_states" in checkpoint or module._trainer is None:
        return
    from lightning.pytorch.callbacks import WeightAveraging

    for cb in module.trainer.callbacks:
        if isinstance(cb, WeightAveraging) and cb._average_model is not None:
            cb.on_save_checkpoint(module.trainer, module, checkpoint)
            checkpoint.pop("current_model_state", None)
            checkpoint.pop("averaging_state", None)
