"""Export directions: ``directions.safetensors`` + ``manifest.json``, loadable with one call.

Each direction is stored twice: ``<name>`` (unnormalised) and ``<name>.unit`` (unit vector, for
steering); the manifest records hook, method, norm, provenance, score/rank and the scale that was
validated for steering, if any. For deployment the same directions go out as llama.cpp control
vectors (GGUF, the layout repeng writes) and as files that load as ``steering_vectors.SteeringVector``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from saediff.errors import MissingFileError, SaediffError
from saediff.methods.directions import Direction

__all__ = [
    "FORMATS",
    "export_directions",
    "export_gguf",
    "export_run",
    "export_steering_vectors",
    "load_direction",
    "load_directions",
    "load_steering_vector",
    "model_type",
    "read_gguf_control_vector",
    "validated_scales",
]

log = logging.getLogger(__name__)


def export_directions(
    directions: list[Direction],
    out: str | Path,
    *,
    model: str = "",
    extra: dict | None = None,
    per_direction: dict[str, dict] | None = None,
) -> Path:
    """Write ``out/directions.safetensors`` and ``out/manifest.json`` (atomically, file by file)."""
    from saediff import __version__
    from saediff._io import atomic_save_safetensors, atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [d.name for d in directions]
    if len(set(names)) != len(names):
        raise SaediffError(
            f"export_directions: duplicate names {sorted(n for n in names if names.count(n) > 1)}"
        )
    tensors = {}
    for d in directions:
        tensors[d.name] = d.vector.float().contiguous()
        tensors[f"{d.name}.unit"] = d.unit().float().contiguous()
    atomic_save_safetensors(tensors, out / "directions.safetensors")
    manifest = {
        "kind": "saediff.directions",
        "saediff_version": __version__,
        "model": model,
        **(extra or {}),
        "directions": [
            {
                "name": d.name,
                "hook": d.hook,
                "method": d.method,
                "norm": d.norm,
                "provenance": d.provenance,
                **(per_direction or {}).get(d.name, {}),
            }
            for d in directions
        ],
    }
    atomic_write_json(out / "manifest.json", manifest)
    return out


def load_directions(path: str | Path) -> dict[str, Direction]:
    """Directions from an export folder (or its ``directions.safetensors``), by name."""
    from safetensors.torch import load_file

    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    mpath, wpath = folder / "manifest.json", folder / "directions.safetensors"
    for f in (mpath, wpath):
        if not f.exists():
            raise MissingFileError(f"direction export incomplete: {f} missing")
    manifest = json.loads(mpath.read_text())
    tensors = load_file(str(wpath))
    out = {}
    for entry in manifest["directions"]:
        name = entry["name"]
        if name not in tensors:
            raise SaediffError(f"{wpath}: manifest lists {name!r} but the file has no such tensor")
        out[name] = Direction(
            name, tensors[name], entry["hook"], entry["method"], entry.get("provenance", {})
        )
    return out


def load_direction(source: str) -> Direction:
    """One direction named ``FOLDER:NAME`` (an export folder and a direction in it)."""
    folder, _, name = str(source).rpartition(":")
    if not folder:
        raise SaediffError(
            f"a direction is FOLDER:NAME (a saediff export folder and a direction in it), got {source!r}"
        )
    found = load_directions(folder)
    if name not in found:
        raise SaediffError(f"{folder} has no direction {name!r} (it has {', '.join(sorted(found))})")
    return found[name]


def validated_scales(run_dir: str | Path) -> dict[str, dict]:
    """Per direction name, what the steering checks of the diff run ``run_dir`` found:
    ``validated_scale``, the coefficient on the unit direction that the check chose (what
    ``add_direction`` adds, llama.cpp's ``--control-vector-scaled FILE SCALE`` and a
    ``SteeringVector``'s multiplier take), beside the check's own figures. The scale is the one the
    protocol chose within its KL budget; whether steering there beats the null directions at the
    same cost is ``steer_verdict`` (``holds`` / ``fails`` / ``inconclusive``), with
    ``steer_effect``, its interval and ``steer_p_value``.

    ``steer.json`` (``saediff steer``, any model): the scale chosen on the selection half of the
    questions (``validated_scale_x_resid_norm``: the same in units of the mean residual norm at
    the direction's block) and its KL per neutral token, the EM rate on the held-out half with its
    95% interval, the coherent rate, the effect over the unsteered model against the null; a
    candidate no scale reached a cost level for gets ``validated_scale`` None and its note.
    ``steering.json`` (the organism's check, top latents and dense directions): its chosen scale,
    the misaligned rate off the narrow domain there, and the same verdict figures. A run without
    either gives ``{}``."""
    from saediff._io import read_json_if_exists

    run_dir = Path(run_dir)
    per: dict[str, dict] = {}
    organism = read_json_if_exists(run_dir / "steering.json") or {}
    for name, r in {**organism.get("steer", {}), **organism.get("steer_directions", {})}.items():
        per[name] = {
            "validated_scale": r["best_scale"],
            "steer_other_misaligned": r["best"],
            **_verdict_figures(r),
        }
    path = run_dir / "steer.json"
    steer = read_json_if_exists(path)
    if steer is not None:
        if not isinstance(steer.get("induce"), dict):
            raise SaediffError(f"{path}: no 'induce' results (not saediff steer output)")
        for name, r in steer["induce"].items():
            missing = [k for k in ("scale", "scale_abs", "em_rate") if k not in r]
            if missing:
                raise SaediffError(f"{path}: induce.{name} lacks {', '.join(missing)}")
            if r["scale_abs"] is None:  # no scale reached a cost level: nothing validated
                per[name] = {"validated_scale": None, "steer_note": r.get("note")}
                continue
            per[name] = {
                "validated_scale": r["scale_abs"],
                "validated_scale_x_resid_norm": r["scale"],
                "steer_em_rate": r["em_rate"],
                "steer_em_rate_ci": r.get("em_rate_ci"),
                "steer_coherent_rate": r.get("coherent_rate"),
                "steer_base_em_rate": (steer.get("base") or {}).get("em_rate"),
                **_verdict_figures(r),
            }
    return per


def _verdict_figures(r: dict) -> dict:
    """A steering check's verdict figures (keys absent in a check written before the null had them)."""
    return {
        "steer_cost_kl": r.get("cost_kl"),
        "steer_effect": r.get("effect"),
        "steer_effect_ci": r.get("effect_ci"),
        "steer_p_value": r.get("p_value"),
        "steer_verdict": r.get("verdict"),
        "steer_null_q95": (r.get("null_quantiles") or {}).get("q95"),
    }


# ---- formats used where directions steer or monitor a deployed model ----------------------------

FORMATS = ("saediff", "gguf", "steering-vectors")
"""``saediff``: directions.safetensors + manifest.json; ``gguf``: llama.cpp control vectors;
``steering-vectors``: files that load as a ``steering_vectors.SteeringVector``"""


def _layer(d: Direction) -> int:
    from saediff.models.hooks import parse_layer

    return parse_layer(d.hook)


def export_gguf(
    directions: list[Direction], out: str | Path, model_hint: str, *, scales: dict[str, float] | None = None
) -> dict[str, Path]:
    """One llama.cpp control vector per direction, ``out/NAME.gguf``, in the layout repeng writes
    (architecture ``controlvector``, ``controlvector.model_hint``, ``controlvector.layer_count``,
    one float32 tensor ``direction.L``). llama.cpp adds ``direction.L`` to the output of block L
    (``blocks.L.hook_resid_post``), so the unit vector is stored at its own block index; block 0 is
    never steered by llama.cpp and is skipped. The vector is the unit direction; the scale its
    steering check validated (if any) goes into ``saediff.validated_scale`` for
    ``--control-vector-scaled FILE SCALE``. Written through a temp file, then renamed."""
    import os
    import tempfile

    import gguf
    import numpy as np

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for d in directions:
        L = _layer(d)
        if L < 1:
            log.warning("%s sits at block 0, which llama.cpp control vectors never steer: skipped", d.name)
            continue
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{d.name}.", suffix=".tmp")
        os.close(fd)
        try:
            w = gguf.GGUFWriter(tmp, "controlvector")
            w.add_string("controlvector.model_hint", model_hint)
            w.add_uint32("controlvector.layer_count", 1)
            w.add_string("saediff.name", d.name)
            w.add_string("saediff.method", d.method)
            w.add_string("saediff.hook", d.hook)
            w.add_float32("saediff.norm", d.norm)
            if scales and scales.get(d.name) is not None:
                w.add_float32("saediff.validated_scale", float(scales[d.name]))
            w.add_tensor(f"direction.{L}", d.unit().float().numpy().astype(np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            os.replace(tmp, out / f"{d.name}.gguf")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written[d.name] = out / f"{d.name}.gguf"
    if not written:
        raise SaediffError("no direction to write as a llama.cpp control vector (all at block 0)")
    return written


def read_gguf_control_vector(path: str | Path) -> tuple[str, dict]:
    """``(model_hint, {block: float32 numpy vector})`` of a llama.cpp control vector file, read with
    gguf's reader."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    if arch is None or arch.contents() != "controlvector":
        raise SaediffError(
            f"{path}: not a llama.cpp control vector (general.architecture is not controlvector)"
        )
    hint = reader.get_field("controlvector.model_hint")
    vectors = {
        int(t.name.split(".", 1)[1]): np.asarray(t.data, dtype=np.float32).reshape(-1).copy()
        for t in reader.tensors
        if t.name.startswith("direction.")
    }
    return (hint.contents() if hint is not None else ""), vectors


def export_steering_vectors(directions: list[Direction], out: str | Path) -> dict[str, Path]:
    """One file per direction, ``out/NAME.safetensors``: tensor ``layer.L`` (the unit direction) with
    metadata ``layer_type = decoder_block``, which ``load_steering_vector`` turns into a
    ``steering_vectors.SteeringVector`` that adds it to the output of decoder block L
    (``blocks.L.hook_resid_post``)."""
    from saediff._io import atomic_save_safetensors

    out = Path(out)
    written = {}
    for d in directions:
        path = out / f"{d.name}.safetensors"
        atomic_save_safetensors(
            {f"layer.{_layer(d)}": d.unit().float().contiguous()},
            path,
            metadata={
                "kind": "saediff.steering_vector",
                "layer_type": "decoder_block",
                "name": d.name,
                "method": d.method,
                "hook": d.hook,
                "norm": repr(d.norm),
            },
        )
        written[d.name] = path
    return written


def load_steering_vector(path: str | Path, multiplier: float = 1.0):
    """A ``steering_vectors.SteeringVector`` from a file of ``export_steering_vectors`` (the library:
    ``pip install --no-deps steering-vectors``; its metadata pins transformers < 5, it runs on 5)."""
    from safetensors import safe_open
    from steering_vectors import SteeringVector

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("kind") != "saediff.steering_vector":
            raise SaediffError(f"{path}: not a saediff steering-vector file")
        acts = {int(k.split(".", 1)[1]): f.get_tensor(k) * multiplier for k in f.keys()}
    return SteeringVector(layer_activations=acts, layer_type=meta.get("layer_type", "decoder_block"))


def export_run(run_dir: str | Path, out: str | Path, top: int = 3, formats: set[str] | None = None) -> dict:
    """``saediff export``: the directions of a diff run that each registered method keeps
    (``DiffingMethod.keeps``: the SAE diff's top ``top`` latents by its ranking, every other
    method's all; directions of no registered method, such as a ground truth, too) into ``out``
    (``directions.safetensors`` + ``manifest.json``, each direction with its rank, score and validated
    steering scale when a steering check ran), plus llama.cpp control vectors (``gguf``) and
    steering-vectors files (``steering-vectors``) when asked. Returns ``{"out", "directions", "files"}``."""
    from saediff.data.runs import read_run
    from saediff.methods.base import method_of_tag

    run_dir, out = Path(run_dir), Path(out)
    wanted = set(formats or ())
    if not wanted <= set(FORMATS):
        raise SaediffError(
            f"--format takes {', '.join(FORMATS)}, got {', '.join(sorted(wanted - set(FORMATS)))}"
        )
    run = read_run(run_dir)
    dirs = load_directions(run_dir / "directions")
    info = run["steps"]["diff"]
    # each registered method decides which of its directions a run exports (the SAE diff: its top latents)
    owner = {d.method: method_of_tag(d.method) for d in dirs.values()}
    chosen = [d for d in dirs.values() if owner[d.method] is None or owner[d.method].keeps(d, info, top)]
    per = validated_scales(run_dir)  # saediff steer's steer.json, or the organism's steering.json
    manifest = json.loads((run_dir / "directions" / "manifest.json").read_text())
    for entry in manifest["directions"]:
        per.setdefault(entry["name"], {}).update({k: entry[k] for k in ("rank", "score") if k in entry})
    cos_path = run_dir / "cosines.json"
    extra = {"run": str(run_dir), "cosines": json.loads(cos_path.read_text()) if cos_path.exists() else None}
    files: dict[str, list[str]] = {}
    if "gguf" in wanted:
        scales = {n: p.get("validated_scale") for n, p in per.items()}
        files["gguf"] = [
            str(p)
            for p in export_gguf(
                chosen, out / "gguf", model_type(manifest.get("model", "")), scales=scales
            ).values()
        ]
    if "steering-vectors" in wanted:
        files["steering-vectors"] = [
            str(p) for p in export_steering_vectors(chosen, out / "steering_vectors").values()
        ]
    export_directions(
        chosen, out, model=manifest.get("model", ""), per_direction=per, extra={**extra, "files": files}
    )
    return {"out": str(out), "directions": [d.name for d in chosen], "files": files}


def model_type(model: str) -> str:
    """``config.json``'s model_type of a local model folder (llama.cpp's model hint), else the hub
    config's when cached, else empty."""
    cfg = Path(model) / "config.json"
    if cfg.exists():
        return json.loads(cfg.read_text()).get("model_type", "")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model).model_type
    except (OSError, ValueError):
        return ""
