"""flamingo-eval against OpenFlamingo 2.0.1's own `evaluate_captioning`, on the same tiny model (OpenFlamingo's factory
and its conversion), the same test items and the same demonstrations (OpenFlamingo's random draws handed to
flamingo-eval): every prompt and every caption must be identical. The harness is scripts/benchmark_eval.py's."""

import os
import shutil
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # runs OpenFlamingo's own evaluator

pytest.importorskip("open_flamingo", reason="open-flamingo 2.0.1 (the reference evaluator) is not installed")
pytest.importorskip("open_clip", reason="open_clip builds the reference's vision tower")
if shutil.which("java") is None:
    pytest.skip("flamingo-eval scores CIDEr with pycocoevalcap, whose tokenizer needs Java", allow_module_level=True)

import benchmark_eval  # noqa: E402  (scripts/, on the tests' path)

ITEMS, BATCH = 6, 4  # two batches, the second one smaller, both left padded


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    """Both models, the data, and OpenFlamingo's `evaluate` module; OpenFlamingo's eval folder (it imports its
    siblings as top-level modules: `utils`, `evaluate`, ...) and its process group are removed afterwards."""
    path, modules, environ = list(sys.path), set(sys.modules), dict(os.environ)
    work = tmp_path_factory.mktemp("openflamingo-eval")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        (theirs, image_processor, tokenizer), (model, processor) = benchmark_eval.build_models(work)
    data = benchmark_eval.build_data(work, ITEMS)
    of_evaluate = benchmark_eval.import_openflamingo_evaluate()
    started = not torch.distributed.is_initialized()
    if started:  # its loop shards with a DistributedSampler
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561")
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    eval_model = benchmark_eval.openflamingo_eval_model(theirs, image_processor, tokenizer, of_evaluate.BaseEvalModel)
    yield of_evaluate, eval_model, model, processor, data
    if started:
        torch.distributed.destroy_process_group()
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if getattr(sys.modules[name], "__file__", None) and "open_flamingo" in sys.modules[name].__file__:
            del sys.modules[name]
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.parametrize(
    "shots, beams",
    [(0, 1), (2, 1), (0, 3), (2, 3)],
    ids=["0-shot-greedy", "2-shot-greedy", "0-shot-3-beams", "2-shot-3-beams"],
)
def test_same_prompts_and_captions_as_openflamingo(sides, shots, beams):
    """0-shot: two text-only demonstrations, as OpenFlamingo builds them; the converted model must tokenize as
    OpenFlamingo ran (LLaMA's legacy tokenization after special tokens). With beams, OpenFlamingo runs without its
    KV cache: under transformers 5 its cached beam search does not return the beams its own forward passes score
    best (see docs/evaluation.md)."""
    of_evaluate, eval_model, model, processor, data = sides
    eval_model.use_cache = beams == 1
    try:
        count, same_prompts, same_captions = benchmark_eval.agreement(
            of_evaluate, eval_model, model, processor, data, shots, ITEMS, BATCH, beams
        )
    finally:
        eval_model.use_cache = True
    assert count == ITEMS
    assert same_prompts == ITEMS
    assert same_captions == ITEMS


def test_legacy_tokenization_is_what_makes_the_prompts_agree(sides):
    """The prompt text after `<|endofchunk|>` and `<image>`: transformers 5's default LLaMA tokenization (what
    OpenFlamingo's factory gets under transformers 5) differs from the converted model's, the transformers 4.x one."""
    from transformers import AutoTokenizer

    _, eval_model, _, processor, data = sides
    prompt = "Output:a red circle<|endofchunk|>\n<image>Output:"
    lm_folder = data.parent / "openflamingo" / "lm"
    default = AutoTokenizer.from_pretrained(lm_folder)
    default.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    assert processor.tokenizer(prompt)["input_ids"] == eval_model.tokenizer(prompt)["input_ids"]
    assert default(prompt)["input_ids"] != eval_model.tokenizer(prompt)["input_ids"]
