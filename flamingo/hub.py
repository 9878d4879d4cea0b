"""Portable checkpoints: what a `save_pretrained` folder needs to load where this package is not installed.

transformers loads a model whose code it does not ship from the folder itself (`trust_remote_code=True`): the
configs name the classes in `auto_map` ("AutoModel": "modeling_otter.OtterModel") and the folder holds those
modules. transformers' own export (`register_for_auto_class`) copies a class's file as it is and records one Auto
class per object; here a family needs several (AutoModel and AutoModelForImageTextToText) and its modules import
each other across packages (`from flamingo.modeling_flamingo import ...` in `otter/`), which a flat folder cannot
resolve. So the modules are generated at save time from the package's own source: each module the classes need,
followed through the package's imports, written flat into the folder with those imports made relative. A folder
loaded that way saves its code again the same way (its modules' imports are already relative).

The model card (`README.md`) says what the checkpoint is and how to run it with transformers alone.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData
from transformers.dynamic_module_utils import get_imports
from transformers.utils import logging

logger = logging.get_logger(__name__)

GENERATED_HEADER = "# Generated from the flamingo-otter-hf module `{module}` when this checkpoint was saved.\n"
CARD_MARKER = "<!-- model card written by flamingo-otter-hf -->"
# What the generated modules may import besides the standard library: torch, transformers (which brings
# huggingface_hub and numpy) and einops, what any Flamingo-style code needs, and Pillow, which transformers' image
# processors need.
REMOTE_CODE_REQUIREMENTS = ("PIL", "einops", "huggingface_hub", "numpy", "torch", "transformers")


# --------------------------------------------------------------------------------------------------
# auto_map and code
# --------------------------------------------------------------------------------------------------
def class_reference(cls: type) -> str:
    """`module.Class` as `auto_map` names a class of a file in the folder."""
    return f"{cls.__module__.rpartition('.')[2]}.{cls.__name__}"


def exportable_class(cls: type, base: type) -> type:
    """`cls`, or the class it stands for when a wrapper made it on the fly (FSDP2 turns a model's class into
    `FSDP<Model>(FSDPModule, <Model>)`): the first `base` subclass of its MRO that its module defines under its
    name, which the folder's code has."""
    for candidate in cls.__mro__:
        named = getattr(sys.modules.get(candidate.__module__), candidate.__name__, None) is candidate
        if named and issubclass(candidate, base):
            return candidate
    raise ValueError(f"Neither {cls.__qualname__} nor a base is a {base.__name__} defined at the top level of a module")


def model_auto_map(model_class: type) -> dict[str, str]:
    """The `auto_map` of a model's config.json: its config and model classes, for every Auto class it serves."""
    model = class_reference(model_class)
    return {"AutoConfig": class_reference(model_class.config_class), "AutoModel": model, "AutoModelForImageTextToText": model}


def processor_auto_map(processor_class: type) -> dict[str, str]:
    """The `auto_map` of processor_config.json and tokenizer_config.json."""
    return {"AutoProcessor": class_reference(processor_class)}


def export_code(folder: str | os.PathLike, classes: Iterable[type]) -> list[Path]:
    """Write the modules defining `classes`, and every package module they import, flat into `folder`, with the
    package imports rewritten to relative ones. Returns the files written."""
    roots = [cls.__module__ for cls in classes]
    # The classes' packages and this one's (`flamingo`, which every family builds on): imports from them are the
    # package's own modules, which go into the folder.
    packages = {name.partition(".")[0] for name in [*roots, __name__]}
    written = []
    for module, source in generated_modules(roots, packages).items():
        path = Path(folder) / f"{module.rpartition('.')[2]}.py"
        path.write_text(source, encoding="utf-8")
        written.append(path)
    if extra := non_bare_imports(folder):
        logger.warning(f"The code saved in {folder} imports {extra}: transformers will ask users to install them")
    return written


def generated_modules(roots: Sequence[str], packages: set[str]) -> dict[str, str]:
    """Source of each module `roots` need (themselves and, recursively, the modules of `packages` they import),
    with those imports rewritten to `from .<module> import`, keyed by module name."""
    sources: dict[str, str] = {}
    flat_names: dict[str, str] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in sources:
            continue
        flat = name.rpartition(".")[2]
        if flat_names.setdefault(flat, name) != name:
            raise ValueError(f"Cannot export both {flat_names[flat]} and {name}: a checkpoint folder holds one {flat}.py")
        source, needed = _relative_source(name, packages)
        sources[name] = source
        pending.extend(needed)
    return sources


def _relative_source(name: str, packages: set[str]) -> tuple[str, list[str]]:
    """A module's source with its package imports made relative to a flat folder, and the modules they name."""
    module = importlib.import_module(name)
    path = Path(module.__file__)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if lines and lines[0].startswith(GENERATED_HEADER.partition("`")[0]):
        lines = lines[1:]  # saving a model that was itself loaded from generated code
    needed = []
    for node in sorted(_package_imports(ast.parse("".join(lines)), packages, path), key=lambda n: (-n.lineno, -n.col_offset)):
        target = importlib.util.resolve_name("." * node.level + (node.module or ""), module.__package__)
        if node.module is None or hasattr(importlib.import_module(target), "__path__"):
            raise ValueError(
                f"{path}:{node.lineno} imports from the package {target}; code exported with a checkpoint can only "
                f"import from modules (`from {target}.<module> import ...`)"
            )
        line = lines[node.lineno - 1]
        start = node.col_offset
        lines[node.lineno - 1] = line[:start] + re.sub(r"^from\s+[\w.]+", f"from .{target.rpartition('.')[2]}", line[start:])
        needed.append(target)
    return GENERATED_HEADER.format(module=name) + "".join(lines), needed


def _package_imports(tree: ast.Module, packages: set[str], path: Path) -> list[ast.ImportFrom]:
    """The `from ... import` statements of `tree` (at any depth: transformers follows them all) that name a module
    of `packages` or a relative one."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(alias.name.partition(".")[0] in packages for alias in node.names):
            raise ValueError(f"{path}:{node.lineno}: write package imports as `from <package>.<module> import ...`")
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").partition(".")[0] in packages):
            found.append(node)
    return found


def non_bare_imports(folder: str | os.PathLike) -> dict[str, list[str]]:
    """For each Python file of `folder`, the top-level modules it imports that are neither in the standard library
    nor in `REMOTE_CODE_REQUIREMENTS`: what transformers would ask a user to install before loading it."""
    allowed = set(sys.stdlib_module_names) | set(REMOTE_CODE_REQUIREMENTS)
    found = {path.name: [m for m in get_imports(path) if m not in allowed] for path in sorted(Path(folder).glob("*.py"))}
    return {name: modules for name, modules in found.items() if modules}


# --------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------
USAGE = '''\
```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

checkpoint = "{checkpoint}"
model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)

image = Image.new("RGB", (224, 224), (200, 30, 30))  # your image, e.g. Image.open("photo.jpg")
if processor.chat_template:  # Otter: its instruction format
    messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
else:  # OpenFlamingo: a completion prompt, with one image token where each image belongs
    prompt = f"{{processor.image_token}}An image of"
inputs = processor(images=[image], text=prompt)
output = model.generate(**inputs, max_new_tokens=20)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```'''
def write_model_card(
    folder: str | os.PathLike,
    *,
    name: str | None = None,
    base_models: Sequence[str] = (),
    license: str = "other",
    tags: Sequence[str] = (),
    training: dict[str, Any] | None = None,
    conversion: dict[str, Any] | None = None,
) -> Path:
    """Write `README.md` into a saved model folder (its config.json is read) and return its path.

    Args:
        name: the checkpoint's name, in the title and the usage snippet: a hub id once pushed. Default: the folder's.
        base_models: hub ids of the models this one is built from (names that are not hub ids are left out).
        license: a hub license id; "other" (the default) says the weights carry their base models' licenses.
        tags: added to `flamingo`, the model type, `image-text-to-text` and `custom_code`.
        training: what `otter-train` did: `datasets` (list of names), `results` (metric -> value) and `settings`
            (name -> value), each optional.
        conversion: what `flamingo-convert` converted: `source` (the checkpoint), `parity` (a measured figure, as
            text), and any other name -> value (base language model, vision tower, target, dtype).
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    name = name or folder.name
    model_type = config["model_type"]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=[m for m in dict.fromkeys(base_models) if _is_hub_id(m)] or None,
        license=license,
        tags=list(dict.fromkeys(["flamingo", model_type, "image-text-to-text", "custom_code", *tags])),
    )
    sections = [
        f"{CARD_MARKER}\n# {name}",
        _description(config, license),
        "## Usage\n\nWith transformers alone: the model and processor code is in this folder. With the "
        "`flamingo-otter-hf` package installed, `flamingo.loading.load_model_and_processor(checkpoint)` loads it with "
        "the package's own classes.\n\n"
        + USAGE.format(checkpoint=name),
    ]
    if training:
        sections.append(_training_section(training))
    if conversion:
        sections.append(_conversion_section(conversion))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    path = folder / "README.md"
    card.save(path)
    return path


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | None = None) -> str:
    """Upload a saved folder as it is (weights, processor, code and model card) to the hub repo `repo_id`, created if
    needed, and return the commit's URL. (`model.push_to_hub` would replace the card with transformers' default.)"""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return str(api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"Upload {Path(folder).name}"))


def has_own_model_card(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a README.md this package did not write (which `save_pretrained` leaves alone)."""
    path = Path(folder) / "README.md"
    return path.exists() and CARD_MARKER not in path.read_text(encoding="utf-8")


def _is_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()


def _description(config: dict[str, Any], license: str) -> str:
    text, vision = config["text_config"], config["vision_config"]
    layers = text.get("num_hidden_layers", text.get("n_layers"))
    every = config["cross_attn_every_n_layers"]
    lines = [
        (
            f"A Flamingo-architecture vision-language model (`model_type: {config['model_type']}`): a CLIP vision "
            f"tower ({vision.get('num_hidden_layers')} layers, {vision.get('image_size')} px), a Perceiver resampler "
            f"({config['perceiver_num_latents']} latents per image) and a gated cross-attention block every {every} "
            f"of the {layers} decoder layers of a `{text['model_type']}` language model."
        ),
        (
            "Prompts interleave text and images: each `<image>` token stands for the next image; a chunk ends with "
            "`<|endofchunk|>`, where generation stops."
        ),
    ]
    if license == "other":
        lines.append("License: the weights carry the licenses of the models they were built from.")
    return "\n\n".join(lines)


def _table(rows: dict[str, Any], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    return "\n".join(lines)


def _training_section(training: dict[str, Any]) -> str:
    parts = ["## Training"]
    if datasets := training.get("datasets"):
        parts.append("Data: " + ", ".join(f"`{d}`" for d in datasets) + ".")
    if settings := training.get("settings"):
        parts.append(_table(settings, ("setting", "value")))
    if results := training.get("results"):
        parts.append("### Results\n\n" + _table(results, ("metric", "value")))
    return "\n\n".join(parts)


def _conversion_section(conversion: dict[str, Any]) -> str:
    details = {k: v for k, v in conversion.items() if k not in ("source", "parity")}
    parts = ["## Conversion"]
    if source := conversion.get("source"):
        parts.append(f"Converted with `flamingo-convert` from `{source}`.")
    if details:
        parts.append(_table({k: f"`{v}`" for k, v in details.items()}, ("input", "value")))
    if parity := conversion.get("parity"):
        parts.append(f"Parity: {parity}")
    return "\n\n".join(parts)


__all__ = [
    "class_reference",
    "export_code",
    "exportable_class",
    "has_own_model_card",
    "model_auto_map",
    "non_bare_imports",
    "processor_auto_map",
    "push_folder",
    "write_model_card",
]
