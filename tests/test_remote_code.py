"""Portable checkpoints (flamingo/hub.py): a saved folder loads with transformers alone (`trust_remote_code=True`),
offline, and generates what the package generates."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from isolated import REPO, run_isolated
from PIL import Image
from tiny_models import TINY_FLAMINGO_DIR, TINY_OTTER_DIR, randomize_gates
from torch.distributed.fsdp import FSDPModule
from transformers import AutoConfig, AutoProcessor
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from flamingo import FlamingoModel
from flamingo.hub import GENERATED_HEADER, export_code, non_bare_imports
from otter import OtterModel

PROMPTS = {
    "otter": "<image>User: What colour is it? GPT:<answer>",
    "flamingo": "<image>An image of",
}
FAMILIES = {"otter": OtterModel, "flamingo": FlamingoModel}
TINY_DIRS = {"otter": TINY_OTTER_DIR, "flamingo": TINY_FLAMINGO_DIR}


def tiny(model_type: str):
    """A tiny model with random weights, gates open so that the image matters."""
    torch.manual_seed(0)
    return randomize_gates(FAMILIES[model_type](AutoConfig.from_pretrained(TINY_DIRS[model_type])).eval())


def save_tiny(folder: Path, model_type: str) -> Path:
    """A tiny model and its processor, saved."""
    tiny(model_type).save_pretrained(folder)
    AutoProcessor.from_pretrained(TINY_DIRS[model_type]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["otter", "flamingo"])
def saved(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(model type, saved folder, image file)."""
    root = tmp_path_factory.mktemp(f"remote-{request.param}")
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "image.png")
    return request.param, save_tiny(root / f"tiny-{request.param}", request.param), root / "image.png"


def package_generation(folder: Path, image: Path, prompt: str) -> dict:
    model = FAMILIES[json.loads((folder / "config.json").read_text())["model_type"]].from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(text=prompt, images=[Image.open(image)])
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return {"input_ids": inputs["input_ids"].tolist(), "ids": output.tolist()}


# The child's side: load through every Auto class the folder serves and generate greedily.
LOAD_AND_GENERATE = """
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

folder, image, prompt, trust = {folder!r}, {image!r}, {prompt!r}, {trust!r}
if not trust:  # the package's Auto registrations, as its users get them
    import flamingo, otter  # noqa: E401
    flamingo.register(), otter.register()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust)
inputs = processor(text=prompt, images=[Image.open(image)])
results = {{"processor_class": type(processor).__module__ + "." + type(processor).__name__,
           "input_ids": inputs["input_ids"].tolist()}}
if trust:  # without being allowed to run the folder's code: refused, never a bare tokenizer
    try:
        results["without_trust"] = type(AutoProcessor.from_pretrained(folder)).__name__
    except ValueError as error:
        results["without_trust"] = str(error)
for auto in (AutoModel, AutoModelForImageTextToText):
    model, info = auto.from_pretrained(folder, trust_remote_code=trust, output_loading_info=True)
    output = model.eval().generate(**inputs, max_new_tokens=6, do_sample=False)
    results[auto.__name__] = {{"class": type(model).__module__ + "." + type(model).__name__,
                              "problems": {{k: sorted(map(str, v)) for k, v in info.items() if v}},
                              "ids": output.tolist()}}
report(**results)
"""


def load_and_generate(folder: Path, image: Path, prompt: str, *, package: bool) -> dict:
    code = LOAD_AND_GENERATE.format(folder=str(folder), image=str(image), prompt=prompt, trust=not package)
    return run_isolated(code, folder.parent, package=package)


@pytest.mark.slow  # a fresh Python process per folder
def test_transformers_alone_loads_the_folder_and_generates_the_package_ids(saved):
    model_type, folder, image = saved
    expected = package_generation(folder, image, PROMPTS[model_type])
    child = load_and_generate(folder, image, PROMPTS[model_type], package=False)

    assert not child["package_importable"] and child["package_modules"] == []  # really without the package
    assert child["network"] == []
    assert child["processor_class"].startswith("transformers_modules.")
    assert "trust_remote_code=True" in child["without_trust"]
    assert child["input_ids"] == expected["input_ids"]
    for auto in ("AutoModel", "AutoModelForImageTextToText"):
        assert child[auto]["class"].startswith("transformers_modules.")
        assert child[auto]["class"].endswith(f"modeling_{model_type}.{FAMILIES[model_type].__name__}")
        assert child[auto]["problems"] == {}  # every weight found: the published key layout is registered too
        assert child[auto]["ids"] == expected["ids"]


@pytest.mark.slow  # a fresh Python process per folder
def test_offline_load_with_the_package_never_touches_the_network(saved):
    model_type, folder, image = saved
    child = load_and_generate(folder, image, PROMPTS[model_type], package=True)
    assert child["package_importable"]
    assert child["AutoModel"]["class"] == f"{FAMILIES[model_type].__module__}.{FAMILIES[model_type].__name__}"
    assert child["network"] == []
    assert child["AutoModel"]["ids"] == package_generation(folder, image, PROMPTS[model_type])["ids"]


def test_config_and_processor_files_name_the_exported_classes(saved):
    model_type, folder, _ = saved
    model_class = FAMILIES[model_type].__name__
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": f"configuration_{model_type}.{model_class.replace('Model', 'Config')}",
        "AutoModel": f"modeling_{model_type}.{model_class}",
        "AutoModelForImageTextToText": f"modeling_{model_type}.{model_class}",
    }
    processor = {"AutoProcessor": f"processing_{model_type}.{model_class.replace('Model', 'Processor')}"}
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"] == processor
    assert json.loads((folder / "tokenizer_config.json").read_text())["auto_map"] == processor
    for reference in [*config["auto_map"].values(), *processor.values()]:
        assert (folder / f"{reference.partition('.')[0]}.py").exists(), reference


def test_exported_modules_are_the_package_source_with_relative_imports(saved):
    model_type, folder, _ = saved
    expected = {"configuration_flamingo", "modeling_flamingo", "processing_flamingo", "hub", "recipes", "local_files",
                "video"}
    if model_type == "otter":
        expected |= {"configuration_otter", "modeling_otter", "processing_otter"}
    assert {path.stem for path in folder.glob("*.py")} == expected
    for path in folder.glob("*.py"):
        package = "otter" if path.stem.endswith("_otter") else "flamingo"
        original = (REPO / package / path.name).read_text().splitlines()
        generated = path.read_text().splitlines()
        assert generated[0] == GENERATED_HEADER.format(module=f"{package}.{path.stem}").rstrip("\n")
        changed = [(a, b) for a, b in zip(original, generated[1:], strict=True) if a != b]
        assert all(b.lstrip().startswith("from .") for _, b in changed), changed  # only imports differ
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.partition(".")[0] not in ("flamingo", "otter"), f"{path.name}:{node.lineno}"


def test_exported_modules_need_nothing_beyond_torch_transformers_and_einops(saved):
    _, folder, _ = saved
    assert non_bare_imports(folder) == {}


def test_a_model_loaded_from_its_own_code_saves_the_same_code_again(saved, tmp_path):
    _, folder, _ = saved
    # In this process the package's own classes are registered, and the Auto classes prefer them: ask for the
    # folder's class by name.
    model_class = get_class_from_dynamic_module(json.loads((folder / "config.json").read_text())["auto_map"]["AutoModel"], folder)
    model = model_class.from_pretrained(folder)
    assert type(model).__module__.startswith("transformers_modules.")
    model.save_pretrained(tmp_path)
    for path in folder.glob("*.py"):
        if not path.stem.startswith("processing") and path.stem != "video":  # the model's save writes the model's modules
            assert (tmp_path / path.name).read_text().splitlines()[1:] == path.read_text().splitlines()[1:], path.name


def test_export_refuses_imports_it_cannot_flatten(tmp_path, monkeypatch):
    package = tmp_path / "brokenpkg"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")
    (package / "module.py").write_text("from brokenpkg import VALUE\n\n\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from brokenpkg.module import Thing

    with pytest.raises(ValueError, match=r"module\.py:1 imports from the package brokenpkg"):
        export_code(tmp_path, [Thing])


def test_export_warns_about_imports_a_bare_environment_lacks(tmp_path, monkeypatch, caplog):
    package = tmp_path / "heavypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "module.py").write_text("import pytest\n\n\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from heavypkg.module import Thing

    out = tmp_path / "out"
    out.mkdir()
    with caplog.at_level("WARNING", logger="flamingo.hub"):
        export_code(out, [Thing])
    assert non_bare_imports(out) == {"module.py": ["pytest"]}
    assert "imports {'module.py': ['pytest']}" in caplog.text


def test_a_model_whose_class_a_wrapper_replaced_exports_its_own_class(tmp_path):
    """FSDP2 gives a sharded model a class made on the fly (`FSDPOtterModel`, defined in no module's namespace)."""
    model = tiny("otter")
    model.__class__ = type(f"FSDP{OtterModel.__name__}", (FSDPModule, OtterModel), {})  # as fully_shard does
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_otter.OtterModel"
    assert (tmp_path / "modeling_otter.py").exists()



# The child's side: the classes imported from their modules, as research code does, so that nothing has registered
# the model type with the Auto classes; stdin is closed, as in a batch job, where transformers' prompt is an error.
LOAD_FROM_MODULES = """
import builtins
import importlib

prompts = []
builtins.input = lambda text="": prompts.append(text) or ""
folder, model_type = {folder!r}, {model_type!r}
processor_class = getattr(importlib.import_module(f"{{model_type}}.processing_{{model_type}}"), {processor!r})
model_class = getattr(importlib.import_module(f"{{model_type}}.modeling_{{model_type}}"), {model!r})
processor, model = processor_class.from_pretrained(folder), model_class.from_pretrained(folder)
report(prompts=prompts, processor=type(processor).__module__, model=type(model).__module__)
"""


@pytest.mark.slow  # a fresh Python process per folder
def test_classes_imported_from_their_modules_load_a_folder_without_asking_to_trust_its_code(saved):
    model_type, folder, _ = saved
    processor = f"{FAMILIES[model_type].__name__.removesuffix('Model')}Processor"
    code = LOAD_FROM_MODULES.format(folder=str(folder), model_type=model_type, processor=processor,
                                    model=FAMILIES[model_type].__name__)
    child = run_isolated(code, folder.parent, package=True)
    assert child["prompts"] == []
    assert child["processor"] == f"{model_type}.processing_{model_type}"
    assert child["model"] == f"{model_type}.modeling_{model_type}"
