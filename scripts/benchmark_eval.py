#!/usr/bin/env python
"""Items per second of `flamingo-eval` against OpenFlamingo 2.0.1's own evaluation code, on the same tiny model and
data, in one run: captioning at 0 and 4 shots, beam search as OpenFlamingo evaluates (3 beams, 20 new tokens).

    python scripts/benchmark_eval.py [--items 32] [--batch-size 8] [--shots 0 4] [--out benchmark-eval]

What runs on each side:
- the model: a seeded tiny OpenFlamingo built by OpenFlamingo's own factory (`tests/openflamingo_reference.py`, the
  parity tests' reference), and the same weights converted by `flamingo-convert` (the parity tests show both give
  the same logits);
- the data: the toy captions of `otter-prepare-data toy-eval` (a Karpathy-split JSON, 5 captions per image);
- OpenFlamingo: `open_flamingo/eval/evaluate.py`'s `evaluate_captioning` (its dataset, demonstration sampling,
  prompt building, loop, gather and scoring), with an `EvalModel` written here because the PyPI wheel lacks
  `open_flamingo/eval/models/` (it follows the repository's `models/open_flamingo.py`: per-image preprocessing,
  left-padded tokens, `Flamingo.generate`, new tokens decoded). Its scorer runs COCOEvalCap, whose SPICE needs a
  download: it is replaced by the same pycocoevalcap CIDEr that flamingo-eval uses, so both sides score alike;
- flamingo-eval: `flamingo.eval.evaluate` on the converted model.

Then, on the same demonstrations (OpenFlamingo's draws handed to flamingo-eval), it counts the test items whose
prompt and prediction are identical on both sides, greedy and with beam search. Two things keep the CIDEr of the
timed runs apart, and are not flamingo-eval deviating from OpenFlamingo's protocol (docs/evaluation.md, "Agreement
with OpenFlamingo's evaluator"): each side draws its random demonstrations with its own generator, and
OpenFlamingo's cached beam search, run under transformers 5, does not return the beams that its own forward passes
score best (without its KV cache it returns flamingo-eval's). The beam check therefore runs OpenFlamingo with
`use_cache=False`.

Timings include prompt building, image loading, generation and scoring, not model loading. On a shared or busy
machine they are noisy: compare the two columns of one run, not runs with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=32, help="test items per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    return parser.parse_args(argv)


# ---- the shared model and data -------------------------------------------------------------------------------


def build_models(work: Path):
    """OpenFlamingo's model (its factory + checkpoint.pt, as the parity tests build it) and ours converted from the
    same files. OpenFlamingo's image preprocessing is its factory's: open_clip's transform of the CLIP model."""
    sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]
    import open_clip
    from openflamingo_reference import CLIP_NAME, build_reference
    from reference_factory import build_open_flamingo

    from flamingo.convert import convert, open_clip_vision_tower
    from flamingo.loading import load_model_and_processor

    reference, every = work / "openflamingo", 2
    if not (reference / "checkpoint.pt").is_file():
        build_reference(reference, "llama", every, seed=0)
    config, weights = (
        reference / "open_clip" / f"{CLIP_NAME}.json",
        reference / "open_clip" / "open_clip_model.safetensors",
    )
    open_clip.add_model_config(config)
    theirs, tokenizer = build_open_flamingo(CLIP_NAME, weights, reference / "lm", every)
    theirs.load_state_dict(torch.load(reference / "checkpoint.pt"), strict=False)
    tokenizer = transformers4_tokenizer(reference / "lm", tokenizer)
    _, _, image_processor = open_clip.create_model_and_transforms(CLIP_NAME, pretrained=str(weights))
    folder = work / "converted"
    if not (folder / "config.json").is_file():
        convert(
            reference / "checkpoint.pt",
            folder,
            reference / "lm",
            open_clip_vision_tower(config, weights),
            cross_attn_every_n_layers=every,
            overwrite=True,
        )
    ours = load_model_and_processor(folder)
    return (theirs.eval(), image_processor, tokenizer), (ours.model, ours.processor)


def transformers4_tokenizer(lm_folder: Path, factory_tokenizer):
    """OpenFlamingo's tokenizer as OpenFlamingo ran it (transformers 4.x): LLaMA's text after a special token starts a
    new word ("<|endofchunk|>\\n" -> "<|endofchunk|>", "\u2581", "<0x0A>"), which transformers 5 only does with
    `legacy=True`. Its factory, run under transformers 5, loads the LM folder with the new default (`legacy=False`)
    and would tokenize every prompt differently from the converted model, whose converter keeps the old behaviour
    (`flamingo.convert.load_base_tokenizer`). The special tokens are appended as its factory appends them."""
    from flamingo.convert import load_base_tokenizer

    tokenizer = load_base_tokenizer(lm_folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    added = ["<|endofchunk|>", "<image>", tokenizer.pad_token]
    if tokenizer.convert_tokens_to_ids(added) != factory_tokenizer.convert_tokens_to_ids(added):
        raise RuntimeError(f"the tokens {added} get other ids than OpenFlamingo's factory gave them")
    return tokenizer


def build_data(work: Path, items: int) -> Path:
    from otter.data.toy_eval import make_toy_eval_data

    data = work / f"data-{items}"
    if not (data / "toy_captions.json").is_file():
        make_toy_eval_data(data, num_train=max(64, items), num_test=items)
    karpathy = json.loads((data / "dataset_toy_captions.json").read_text())
    coco = {  # the COCO-format references that OpenFlamingo's scorer reads
        "images": [{"id": entry["cocoid"]} for entry in karpathy["images"] if entry["split"] == "test"],
        "annotations": [
            {"image_id": entry["cocoid"], "id": entry["cocoid"] * 10 + j, "caption": s["raw"]}
            for entry in karpathy["images"]
            if entry["split"] == "test"
            for j, s in enumerate(entry["sentences"])
        ],
        "type": "captions",
        "info": {},
        "licenses": [],
    }
    (data / "captions_coco_format.json").write_text(json.dumps(coco))
    return data


# ---- OpenFlamingo's evaluator ----------------------------------------------------------------------------------


def import_openflamingo_evaluate():
    """`open_flamingo/eval/evaluate.py` imports its siblings as top-level modules, among them OK-VQA's
    post-processing, which needs nltk and its WordNet data: unused for captioning, it is left out."""
    import open_flamingo

    sys.path.insert(0, str(Path(open_flamingo.__file__).parent / "eval"))
    ok_vqa = sys.modules.setdefault("ok_vqa_utils", types.ModuleType("ok_vqa_utils"))
    ok_vqa.postprocess_ok_vqa_generation = lambda text: text
    import evaluate as of_evaluate  # noqa: E402  (open_flamingo/eval/evaluate.py)

    return of_evaluate


def openflamingo_eval_model(model, image_processor, tokenizer, base):
    class EvalModel(base):
        """After open_flamingo/eval/models/open_flamingo.py (not in the wheel), on the CPU, in float32. `use_cache`
        (not in the original) lets the agreement check run beam search without OpenFlamingo's KV cache."""

        def __init__(self):
            self.model, self.image_processor, self.tokenizer = model, image_processor, tokenizer
            self.tokenizer.padding_side = "left"
            self.device = "cpu"
            self.use_cache = True

        def _prepare_images(self, batch):
            images_per_example = max(len(x) for x in batch)
            first = self.image_processor(batch[0][0])
            vision_x = torch.zeros((len(batch), images_per_example, 1, *first.shape))
            for i, example in enumerate(batch):
                for j, image in enumerate(example):
                    vision_x[i, j, 0] = self.image_processor(image)
            return vision_x

        def get_outputs(
            self, batch_text, batch_images, min_generation_length, max_generation_length, num_beams, length_penalty
        ):
            encodings = self.tokenizer(
                batch_text, padding="longest", truncation=True, return_tensors="pt", max_length=2000
            )
            with torch.inference_mode():
                outputs = self.model.generate(
                    self._prepare_images(batch_images),
                    encodings["input_ids"],
                    attention_mask=encodings["attention_mask"],
                    min_new_tokens=min_generation_length,
                    max_new_tokens=max_generation_length,
                    num_beams=num_beams,
                    length_penalty=length_penalty,
                    pad_token_id=self.tokenizer.pad_token_id,
                    use_cache=self.use_cache,
                )
            outputs = outputs[:, len(encodings["input_ids"][0]) :]
            return self.tokenizer.batch_decode(outputs, skip_special_tokens=True)

        def get_caption_prompt(self, caption=None) -> str:
            return f"<image>Output:{caption if caption is not None else ''}{'<|endofchunk|>' if caption is not None else ''}"

    return EvalModel()


def run_openflamingo(of_evaluate, eval_model, data: Path, shots: int, args) -> tuple[float, float]:
    from flamingo.eval.metrics import cider

    def cider_only(result_path, annotations_path):
        references = {}
        for annotation in json.loads(Path(annotations_path).read_text())["annotations"]:
            references.setdefault(annotation["image_id"], []).append(annotation["caption"])
        predictions = {r["image_id"]: r["caption"] for r in json.loads(Path(result_path).read_text())}
        return {"CIDEr": cider(predictions, {k: references[k] for k in predictions}) / 100}

    of_evaluate.compute_cider = cider_only
    start = time.perf_counter()
    score = of_evaluate.evaluate_captioning(
        _openflamingo_namespace(data, args.items, args.batch_size),
        eval_model,
        seed=42,
        num_beams=args.num_beams,
        num_shots=shots,
        dataset_name="coco",
    )
    return time.perf_counter() - start, score


def _openflamingo_namespace(data: Path, items: int, batch_size: int) -> argparse.Namespace:
    return argparse.Namespace(
        model="open_flamingo",
        coco_train_image_dir_path=str(data / "images"),
        coco_val_image_dir_path=str(data / "images"),
        coco_karpathy_json_path=str(data / "dataset_toy_captions.json"),
        coco_annotations_json_path=str(data / "captions_coco_format.json"),
        num_samples=items,
        batch_size=batch_size,
        rices=False,
        query_set_size=64,
        rank=0,
        world_size=1,
    )


class _SameDemos:
    """flamingo-eval's demonstration selector that hands every test item the pool items OpenFlamingo drew for it."""

    def __init__(self, pool, demo_ids_by_image: dict[str, list]):
        self.positions = {example.id: position for position, example in enumerate(pool)}
        self.demo_ids_by_image = demo_ids_by_image

    def select(self, queries, count, seed):
        return [[self.positions[i] for i in self.demo_ids_by_image[item.image.name]] for _, item in queries]


def openflamingo_captions(of_evaluate, eval_model, data: Path, shots: int, items: int, batch_size: int, num_beams: int):
    """Per test image file name, what OpenFlamingo's `evaluate_captioning` did: `(prompt, demo image ids, caption
    after its post-processing)`. Its scorer is not run."""
    records: dict[str, tuple[str, list, str]] = {}
    draws: list[list[list[dict]]] = []
    sample = of_evaluate.utils.sample_batch_demos_from_query_set
    get_outputs = eval_model.get_outputs

    def recording_sample(*args):
        draws.append(sample(*args))
        return draws[-1]

    def recording_outputs(batch_text, batch_images, **kwargs):
        outputs = get_outputs(batch_text=batch_text, batch_images=batch_images, **kwargs)
        for text, images, output, demos in zip(batch_text, batch_images, outputs, draws[-1], strict=True):
            caption = of_evaluate.postprocess_captioning_generation(output).replace('"', "")
            records[Path(images[-1].filename).name] = (text, [demo["image_id"] for demo in demos], caption)
        return outputs

    of_evaluate.utils.sample_batch_demos_from_query_set = recording_sample
    eval_model.get_outputs = recording_outputs
    of_evaluate.compute_cider = lambda result_path, annotations_path: {"CIDEr": 0.0}
    try:
        of_evaluate.evaluate_captioning(
            _openflamingo_namespace(data, items, batch_size), eval_model, num_beams=num_beams, num_shots=shots
        )
    finally:
        of_evaluate.utils.sample_batch_demos_from_query_set = sample
        del eval_model.get_outputs
    return records


def agreement(
    of_evaluate, eval_model, model, processor, data: Path, shots: int, items: int, batch_size: int, num_beams: int
):
    """`(items, identical prompts, identical predictions)` of OpenFlamingo's evaluator and flamingo-eval on the same
    test items and demonstrations (OpenFlamingo's draws)."""
    from flamingo.eval import runner

    theirs = openflamingo_captions(of_evaluate, eval_model, data, shots, items, batch_size, num_beams)
    task = toy_captions_task(data)
    prompts: dict[str, str] = {}
    build_prompt = runner.build_prompt

    def recording_build_prompt(*args, **kwargs):
        prompt = build_prompt(*args, **kwargs)
        prompts[prompt.item.image.name] = prompt.text
        return prompt

    runner.build_prompt = recording_build_prompt
    try:
        demos = _SameDemos(task.train, {name: demos for name, (_, demos, _) in theirs.items()})
        results = evaluate_captions(model, processor, task, shots, items, batch_size, num_beams, demos)
    finally:
        runner.build_prompt = build_prompt
    ours = {task.test[r["index"]].image.name: r["prediction"] for r in results.trials[0].predictions}
    same_prompts = sum(prompts[name] == text for name, (text, _, _) in theirs.items())
    # flamingo-eval strips the caption's surrounding spaces, which CIDEr's tokenizer drops anyway
    same_predictions = sum(ours[name] == caption.strip() for name, (_, _, caption) in theirs.items())
    return len(theirs), same_prompts, same_predictions


def toy_captions_task(data: Path):
    from flamingo.eval import load_task

    task = load_task(data / "toy_captions.json")
    task.max_new_tokens = 20  # OpenFlamingo's captioning length
    return task


def evaluate_captions(model, processor, task, shots: int, items: int, batch_size: int, num_beams: int, demos="random"):
    from flamingo.eval import evaluate

    return evaluate(
        model,
        processor,
        task,
        shots=[shots],
        trials=1,
        batch_size=batch_size,
        num_beams=num_beams,
        limit=items,
        demos=demos,
        progress=False,
    )


def run_ours(model, processor, data: Path, shots: int, args) -> tuple[float, float]:
    task = toy_captions_task(data)
    start = time.perf_counter()
    results = evaluate_captions(model, processor, task, shots, args.items, args.batch_size, args.num_beams)
    return time.perf_counter() - start, results.trials[0].score


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    work = args.out or Path(tempfile.mkdtemp(prefix="benchmark-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    (theirs, image_processor, tokenizer), (model, processor) = build_models(work)
    data = build_data(work, args.items)
    of_evaluate = import_openflamingo_evaluate()
    if not torch.distributed.is_initialized():  # OpenFlamingo's loop shards with a DistributedSampler and gathers
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    eval_model = openflamingo_eval_model(theirs, image_processor, tokenizer, of_evaluate.BaseEvalModel)
    rows = []
    for shots in args.shots:
        of_seconds, of_score = run_openflamingo(of_evaluate, eval_model, data, shots, args)
        our_seconds, our_score = run_ours(model, processor, data, shots, args)
        rows.append((shots, args.items / of_seconds, args.items / our_seconds, of_score * 100, our_score))
    print(
        f"captioning, {args.items} items, batch {args.batch_size}, {args.num_beams} beams, threads {torch.get_num_threads()}"
    )
    print("| shots | OpenFlamingo 2.0.1 items/s | flamingo-eval items/s | speed-up | CIDEr (OF / ours) |")
    print("|---|---|---|---|---|")
    for shots, of_rate, our_rate, of_score, our_score in rows:
        print(
            f"| {shots} | {of_rate:.2f} | {our_rate:.2f} | {our_rate / of_rate:.2f}x | {of_score:.1f} / {our_score:.1f} |"
        )
    print("\nsame demonstrations (OpenFlamingo's draws) on both sides: identical prompts / predictions")
    for shots in args.shots:
        for beams, use_cache in ((1, True), (args.num_beams, False)):
            eval_model.use_cache = use_cache
            count, prompts, predictions = agreement(
                of_evaluate, eval_model, model, processor, data, shots, args.items, args.batch_size, beams
            )
            note = "" if use_cache else ", OpenFlamingo without its KV cache"
            print(f"{shots}-shot, {beams} beam(s){note}: prompts {prompts}/{count}, predictions {predictions}/{count}")
    eval_model.use_cache = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
