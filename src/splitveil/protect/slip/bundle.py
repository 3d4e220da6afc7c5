"""On disk: the model owner's decomposition cache, and the executor's residual-only bundle, in separate folders.

- The owner's cache (`runtime.slip_cache_dir`) holds `decomposition.safetensors`: every matrix's factors (left =
  U_k S_k [m, k], right = V_k^T [k, n], so W_secure = left @ right) beside its residual. It stays with the trusted
  side. Its `residual/` subfolder is the bundle made from it.
- The bundle (`splitveil slip export-bundle --out DIR`, `runtime.export_bundle`) holds `manifest.json` and
  `residual.safetensors` (one float32 W_residual [m, n] per linear group) and nothing else. It is all the untrusted
  executor is given.

`check_residual_only` refuses a folder that holds anything more: a decomposition file, any other file or folder, or
a tensor that is not one of the manifest's residuals in its full [m, n] shape (a low-rank factor has a side of k).
`slip serve --bundle` runs it before it loads anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from splitveil.core.errors import ConfigError
from splitveil.protect.slip.decompose import Decomposition, LinearGroup

DECOMPOSITION_FILE = "decomposition.safetensors"
RESIDUAL_DIR = "residual"  # the bundle's folder inside the owner's cache
BUNDLE_FILES = ("manifest.json", "residual.safetensors")


def has_bundle(folder: Path) -> bool:
    """Whether `folder` holds a finished bundle's files (what the owner's cache checks before making one)."""
    return all((Path(folder) / name).is_file() for name in BUNDLE_FILES)


def check_residual_only(folder: Path) -> None:
    """Raises ConfigError (one line) unless `folder` holds exactly a residual bundle and nothing of W_secure."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"no such bundle folder: {folder}")
    names = sorted(path.name for path in folder.iterdir())
    secret = [str(path.relative_to(folder)) for path in sorted(folder.rglob("*decomposition*"))]
    if secret:
        raise ConfigError(f"{folder} holds {secret[0]}, the decomposition (U_k S_k and V_k^T, from which W_secure is "
                          f"formed): the executor gets the residual only; make its folder with `splitveil slip "
                          f"export-bundle --model M --out DIR` and serve DIR")
    extra = [name for name in names if name not in BUNDLE_FILES]
    if extra:
        raise ConfigError(f"{folder} holds {', '.join(extra[:3])} besides the residual bundle (only manifest.json and "
                          f"residual.safetensors may be served); serve a folder made by `splitveil slip export-bundle`")
    missing = [name for name in BUNDLE_FILES if name not in names]
    if missing:
        raise ConfigError(f"{folder} holds no SLIP residual bundle ({' and '.join(missing)} missing); make one with "
                          f"`splitveil slip export-bundle --model M --out DIR`")
    expected = _residual_shapes(folder / "manifest.json")
    found = _tensor_shapes(folder / "residual.safetensors")
    for key, shape in found.items():
        if expected.get(key) != shape:
            raise ConfigError(f"{folder}/residual.safetensors holds {key} {list(shape)}, not a linear group's residual "
                              f"[m, n] of the manifest (a low-rank factor of W_secure?); refusing to serve it")
    if set(expected) - set(found):
        raise ConfigError(f"{folder}/residual.safetensors lacks {sorted(set(expected) - set(found))[0]} of its manifest")


def _residual_shapes(manifest_file: Path) -> dict[str, tuple[int, ...]]:
    try:
        manifest = json.loads(manifest_file.read_text())
        groups = [LinearGroup.from_dict(group) for group in manifest["groups"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{manifest_file} is not a SLIP residual manifest ({error})") from None
    if manifest.get("format") != "splitveil-slip-residual/1":
        raise ConfigError(f"{manifest_file} is not a SLIP residual manifest")
    return {f"group.{group.group_id}": (group.total_out, group.in_features) for group in groups}


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as tensors:
            return {key: tuple(tensors.get_slice(key).get_shape()) for key in tensors.keys()}
    except Exception as error:  # a corrupt or foreign file
        raise ConfigError(f"{path} is not a safetensors file ({error})") from None


# -- the owner's cache of decompositions -----------------------------------------------------------------------


def save_decompositions(folder: Path, decompositions: dict[int, list[Decomposition]]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for gid, parts in decompositions.items():
        for j, part in enumerate(parts):
            tensors[f"left.{gid}.{j}"] = part.left.contiguous()
            tensors[f"right.{gid}.{j}"] = part.right.contiguous()
            tensors[f"residual.{gid}.{j}"] = part.residual.contiguous()
    save_file(tensors, str(folder / DECOMPOSITION_FILE))


def load_decompositions(folder: Path, groups: list[LinearGroup]) -> dict[int, list[Decomposition]] | None:
    from safetensors.torch import load_file

    path = folder / DECOMPOSITION_FILE
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    try:
        return {g.group_id: [Decomposition(tensors[f"left.{g.group_id}.{j}"], tensors[f"right.{g.group_id}.{j}"],
                                           tensors[f"residual.{g.group_id}.{j}"]) for j in range(len(g.members))]
                for g in groups}
    except KeyError:
        return None
