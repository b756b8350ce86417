"""The medcap seed's published vision checkpoint (``meta_model_last.pt``, ``meta_model_{epoch}.pt``) loaded onto
a ``llama3_1_8b_biomedclip`` model (or any model with an open_clip tower and the ``pooled_mlp`` projector).

The seed saved ``torch.save({'visual': visual.state_dict(), 'projector': projector.state_dict()})`` where
``visual`` is open_clip's BiomedCLIP image tower (``model.visual``) and ``projector`` is
``nn.Sequential(nn.Linear(512, 4096), nn.GELU(), nn.Linear(4096, 4096 * 50))``. Here the tower is
``OpenClipEncoder.visual`` (the same open_clip module, so the same names) and the projector is
``PooledToTokens.net`` (the same three layers), so the seed's ``0.weight`` is ``net.0.weight`` and so on. Both
reshape the projector's output as [B, 50, 4096] in the same order.

The file is read with ``torch.load(weights_only=True)``: a file that holds pickled code is refused before any of it
runs. Every key is accounted for: a missing, surplus or misshapen tensor is an error that names it.
"""

from pathlib import Path
from typing import Callable

from torch import Tensor, nn

from medcap.models.projectors import PooledToTokens
from medcap.models.tensor_files import load_weights_only, not_tensors

PARTS = ("visual", "projector")
PROJECTOR_PREFIX = "net."  # PooledToTokens keeps the seed's nn.Sequential as .net


def is_seed_checkpoint(path: str | Path) -> bool:
    """A single ``.pt`` file (medcap's own checkpoints are folders holding ``model.safetensors``)."""
    path = Path(path)
    return path.suffix == ".pt" and path.is_file()


def read(path: str | Path) -> dict[str, dict[str, Tensor]]:
    """``{'visual': {name: tensor}, 'projector': {name: tensor}}`` from the file, tensors only."""
    state = load_weights_only(path, "tensors", "; a medcap seed checkpoint holds only two state dicts")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict with keys {list(PARTS)} (the medcap seed's meta_model_*.pt), "
                         f"found {type(state).__name__}")
    missing, surplus = [k for k in PARTS if k not in state], [k for k in state if k not in PARTS]
    if missing or surplus:
        raise ValueError(f"{path}: expected top-level keys {list(PARTS)}; missing {missing}, surplus {surplus}")
    for part in PARTS:
        bad = not_tensors(state[part], part)
        if bad:
            raise ValueError(f"{path}: '{part}' must be a state dict of tensors; not a tensor: {bad[:5]}")
    return state


def _check_fits(module: nn.Module, state: dict[str, Tensor], name: Callable[[str], str], where: str) -> None:
    """``state`` (keys already renamed to ``module``'s) holds exactly the module's tensors, in its shapes;
    ``name`` gives a key's name in the file, for the messages."""
    expected = module.state_dict()
    problems = [f"missing {name(k)}" for k in expected if k not in state]
    problems += [f"surplus {name(k)}" for k in state if k not in expected]
    problems += [f"{name(k)} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}"
                 for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise ValueError(f"{where} does not fit the model: {'; '.join(problems[:6])}{more}")


def load(model, path: str | Path) -> Path:
    """Load the seed's ``visual`` and ``projector`` state dicts into ``model.vision.encoder.visual`` and
    ``model.vision.projector``; the decoder is untouched. Returns ``path``."""
    path = Path(path)
    state = read(path)
    encoder, projector = model.vision.encoder, model.vision.projector
    visual = getattr(encoder, "visual", None)
    if not isinstance(visual, nn.Module):
        raise ValueError(f"{path}: a medcap seed checkpoint holds an open_clip image tower, but the model's encoder "
                         f"is {type(encoder).__name__}; build the model with "
                         f"medcap.models.builders.llama3_1_8b_biomedclip (projector: pooled_mlp)")
    if not isinstance(projector, PooledToTokens):
        raise ValueError(f"{path}: a medcap seed checkpoint holds the pooled 512 -> 50 x 4096 projector, but the "
                         f"model's projector is {type(projector).__name__}; use projector: pooled_mlp")
    renamed = {PROJECTOR_PREFIX + k: v for k, v in state["projector"].items()}
    # both parts are checked before either is loaded: a file that does not fit changes nothing
    _check_fits(visual, state["visual"], lambda k: f"visual.{k}", f"{path}: visual")
    _check_fits(projector, renamed, lambda k: f"projector.{k.removeprefix(PROJECTOR_PREFIX)}", f"{path}: projector")
    visual.load_state_dict(state["visual"], strict=True)
    projector.load_state_dict(renamed, strict=True)
    return path
