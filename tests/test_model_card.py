"""The model card (README.md) that `save_pretrained` writes and `write_model_card` fills in: its metadata, its usage
snippet (run against the saved folder, with transformers alone and with the package), training and conversion."""

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from isolated import run_isolated
from tiny_models import TINY_FLAMINGO_DIR, TINY_OTTER_DIR, tiny_model
from transformers import AutoConfig, AutoProcessor

from flamingo import FlamingoModel
from flamingo.hub import push_folder, write_model_card
from otter import OtterModel

FAMILIES = {"otter": OtterModel, "flamingo": FlamingoModel}
TINY_DIRS = {"otter": TINY_OTTER_DIR, "flamingo": TINY_FLAMINGO_DIR}


def save_tiny(folder: Path, model_type: str) -> Path:
    source = TINY_DIRS[model_type]
    torch.manual_seed(0)
    FAMILIES[model_type](AutoConfig.from_pretrained(source)).save_pretrained(folder)
    AutoProcessor.from_pretrained(source).save_pretrained(folder)
    return folder


def usage_snippet(folder: Path) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), flags=re.DOTALL)
    assert len(blocks) == 1
    return blocks[0]


def test_saving_writes_a_card_with_the_hub_metadata(tmp_path):
    model = tiny_model()
    model.config.name_or_path = "some-org/flamingo-base"  # as after from_pretrained("some-org/flamingo-base")
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.base_model == ["some-org/flamingo-base"]
    assert card.data.license == "other" and "licenses of the models they were built from" in card.text
    assert {"flamingo", "image-text-to-text", "custom_code"} <= set(card.data.tags)
    assert f"# {tmp_path.name}\n" in card.text and 'checkpoint = "' + tmp_path.name + '"' in card.text
    assert "a gated cross-attention block every 2 of the 4 decoder layers of a `llama` language model" in card.text


@pytest.mark.slow  # fresh Python processes
@pytest.mark.parametrize("model_type", ["otter", "flamingo"])
def test_the_usage_snippet_runs_with_transformers_alone_and_with_the_package(tmp_path, monkeypatch, model_type):
    folder = save_tiny(tmp_path / f"tiny-{model_type}", model_type)
    snippet = usage_snippet(folder)
    # The snippet names the checkpoint by the folder's name: run it beside the folder, as its parent directory.
    child = run_isolated(
        "import contextlib, io\nout = io.StringIO()\nwith contextlib.redirect_stdout(out):\n"
        f"    exec({snippet!r})\nreport(printed=out.getvalue())",
        tmp_path,
    )
    assert not child["package_importable"] and child["network"] == []

    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet, {})  # noqa: S102  (the card's own snippet, run as a reader would)
    assert child["printed"] == printed.getvalue() and printed.getvalue().strip()


def test_training_and_conversion_sections(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    write_model_card(
        tmp_path,
        name="someone/otter-colours",
        base_models=["luodian/OTTER-MPT1B-RPJama-Init", str(tmp_path)],  # a local folder is not a base model id
        license="mit",
        tags=["toy"],
        training={"datasets": ["toy colours"], "settings": {"steps": 40, "learning rate": 1e-4}, "results": {"held-out accuracy": 0.93}},
        conversion={"source": "checkpoint.pt", "language model": "anas-awadalla/mpt-1b", "parity": "max |logit diff| 2e-6"},
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == ["luodian/OTTER-MPT1B-RPJama-Init"]
    assert card.data.license == "mit" and "licenses of the models" not in card.text
    assert "toy" in card.data.tags
    assert 'checkpoint = "someone/otter-colours"' in card.text
    assert "Data: `toy colours`." in card.text
    assert "| steps | 40 |" in card.text and "| learning rate | 0.0001 |" in card.text
    assert "| held-out accuracy | 0.93 |" in card.text
    assert "from `checkpoint.pt`" in card.text and "| language model | `anas-awadalla/mpt-1b` |" in card.text
    assert "Parity: max |logit diff| 2e-6" in card.text


def test_saving_keeps_a_card_of_ones_own_and_replaces_its_own(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, model_card=False)
    assert not (tmp_path / "README.md").exists()
    (tmp_path / "README.md").write_text("# My model\n")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# My model\n"

    write_model_card(tmp_path, training={"datasets": ["toy colours"]})  # asked for: written
    model.save_pretrained(tmp_path)  # its own card: brought up to date (without what only the caller knew)
    assert "Data:" not in (tmp_path / "README.md").read_text()


def test_push_folder_uploads_the_folder_as_saved(tmp_path, monkeypatch):
    calls = []

    class Repo:
        repo_id = "someone/tiny"

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)) or Repo())
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", lambda self, **kw: calls.append(("upload", kw)) or "https://hub/commit/1")
    assert push_folder(tmp_path, "tiny", private=True) == "https://hub/commit/1"
    assert calls[0] == ("create", "tiny", {"private": True, "exist_ok": True})
    assert calls[1][1]["repo_id"] == "someone/tiny" and calls[1][1]["folder_path"] == tmp_path
