#!/usr/bin/env python
"""Peak resident memory of `FlamingoModel.from_pretrained` against the size of the checkpoint it loads.

Builds a checkpoint of a few GB from a scaled config (saved as sharded safetensors in --workdir, reused when
present), then loads it in fresh processes and reads the process's resident memory before the load and its
high-water mark after (Linux /proc), and samples its anonymous memory during the load (safetensors are
memory-mapped: file pages count as resident only once touched, and the kernel can drop them, so the anonymous
peak is what a load really costs; after the load every weight is touched once to count the mapped ones). The
ratio to the loaded weights' bytes shows whether weights are materialised more than once: 1.0 is one copy.

    python scripts/benchmark_loading.py [--workdir /tmp/flamingo-loading] [--hidden 2048 --layers 16]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

LOAD = """
import json, sys, threading, time, torch
from flamingo import FlamingoModel
def kib(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1])
anon_peak, loading = [kib('RssAnon:')], True
def sample():
    while loading:
        anon_peak[0] = max(anon_peak[0], kib('RssAnon:'))
        time.sleep(0.005)
before_anon, before_rss = kib('RssAnon:'), kib('VmRSS:')
sampler = threading.Thread(target=sample); sampler.start()
model = FlamingoModel.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
loading = False; sampler.join()
touched = sum(float(p.float().sum()) for p in model.parameters())
print(json.dumps({'before_anon': before_anon, 'anon_peak': anon_peak[0], 'before_rss': before_rss, 'rss_touched': kib('VmRSS:')}))
"""


def build_checkpoint(folder: Path, hidden: int, layers: int) -> int:
    import torch

    from flamingo import FlamingoConfig, FlamingoModel

    if not (folder / "config.json").exists():
        config = FlamingoConfig(
            vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4, image_size=224, patch_size=14),
            text_config=dict(model_type="llama", hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                             num_attention_heads=hidden // 128, vocab_size=32003),
            cross_attn_every_n_layers=4,
        )
        with torch.device("cpu"):
            FlamingoModel(config).save_pretrained(folder, max_shard_size="1GB")
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/flamingo-loading"))
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    folder = args.workdir / f"h{args.hidden}-l{args.layers}"
    checkpoint_bytes = build_checkpoint(folder, args.hidden, args.layers)
    print(f"checkpoint: {folder} {checkpoint_bytes / 2**30:.2f} GiB fp32 in {len(list(folder.glob('*.safetensors')))} shards")
    print(f"{'load dtype':<10}{'round':>6}{'weights GiB':>13}{'anon peak / weights':>21}{'RSS after touching all / weights':>34}")
    for dtype, weight_bytes in (("float32", checkpoint_bytes), ("bfloat16", checkpoint_bytes / 2)):
        for round_index in range(args.rounds):
            result = subprocess.run([sys.executable, "-c", LOAD, str(folder), dtype], capture_output=True, text=True, check=True)
            memory = {k: v * 1024 for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
            anon = (memory["anon_peak"] - memory["before_anon"]) / weight_bytes
            touched = (memory["rss_touched"] - memory["before_rss"]) / weight_bytes
            print(f"{dtype:<10}{round_index:>6}{weight_bytes / 2**30:>13.2f}{anon:>21.2f}{touched:>34.2f}")


if __name__ == "__main__":
    main()
