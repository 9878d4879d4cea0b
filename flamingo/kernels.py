"""Linear layers of a decoding step on CPU: the same products, split better between threads.

A decoding step multiplies a few rows, one per sequence in the batch, by every weight matrix of the model. With
more than one thread, PyTorch's CPU `F.linear(x, W)` for a few rows of `x` (MKL's `x @ Wᵀ`) is slow, as if MKL
split the work between threads along the rows of x; the same product computed as `(W @ xᵀ)ᵀ` runs up to 4 times
faster. On this project's 2-core CPU (AMD EPYC, MKL, 2 threads), a decoding step of the scaled-9B model took 53
instead of 118 ms with 4 rows and 107 instead of 141 with 16 (`python scripts/profile_serve.py --threads 2
--batches 1 4 16`; each product alone with `--products`; docs/serving.md). With 16 to 128 rows the results were bitwise those of `F.linear` on
every shape measured; with 2 to 8 they differ by float32 rounding (about 3e-6 in the logits). One row is left alone
(the two forms gave the same results and times), and so is one thread, where the lone products range from 0.6 to
2.4 times either way. Not measured on other CPUs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MAX_ROWS = 128  # measured faster (2 threads) from 2 to 128 rows; beyond, a product is no longer "a few rows"


def _transposable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() >= 2 else 1
    return (x.device.type == weight.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and weight.layout == torch.strided and weight.dim() == 2 and 2 <= rows <= MAX_ROWS)


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed as `(weight @ xᵀ)ᵀ` (+ bias): (..., in) -> (..., out)."""
    columns = x.reshape(-1, x.shape[-1]).t()  # (in, rows)
    output = torch.mm(weight, columns) if bias is None else torch.addmm(bias[:, None], weight, columns)
    return output.t().contiguous().view(*x.shape[:-1], weight.shape[0])


class FewRowsLinear(TorchFunctionMode):
    """Within this mode, `F.linear` on 2 to `MAX_ROWS` float32 rows on CPU runs as `few_rows_linear`; everything else
    runs as usual. The mode sees every torch call made under it (about 4 ms per decoding step of the scaled-9B
    model, whatever the rows), so enter it through `decoding_linears`, which does only where it pays."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and _transposable(*args[:2]):
            return few_rows_linear(*args[:2], args[2] if len(args) > 2 else kwargs.get("bias"))
        return func(*args, **kwargs)


def decoding_linears(rows: int) -> contextlib.AbstractContextManager:
    """The context for a decoding step of `rows` sequences: `FewRowsLinear` for 2 to `MAX_ROWS` rows when torch runs
    more than one thread in this thread, nothing otherwise."""
    if 2 <= rows <= MAX_ROWS and torch.get_num_threads() > 1:
        return FewRowsLinear()
    return contextlib.nullcontext()
