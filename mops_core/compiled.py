"""The decoder layers MoPs runs, and its loss, through torch.compile, and eager where that cannot run.

One function -- a decoder layer called the way MoPs calls it -- is compiled once per process and
serves every layer of every MoPsModel in it: dynamo takes a module's parameters as graph inputs,
so 30 layers of one shape are one graph, not 30. Inductor then fuses what eager PyTorch runs as
separate passes over the hidden states (RMSNorm, SiLU, residuals, casts) and, because attention is
written out under compile (`attention.py`), the per-key bias, the causal mask and the softmax.
The graph is compiled for any sequence length from the start (`dynamic=True`), rather than first
for whichever length comes first and again once a second one arrives: one compile fewer per
process, and every process runs the same kernels for a given batch whatever it saw before (as a
resumed run should). Training and evaluation, and batches of one and of more samples, are separate
graphs; inductor keeps compiled code on disk, so a later process on the same machine mostly loads it.

The loss -- cross-entropy of the labelled positions' logits, in float32 -- is compiled too: eager,
it writes the float32 log-probabilities over the vocabulary, and backward fills a zero gradient of
that size and reads both again; compiled, the cast, the log-sum-exp and the gradient are two
passes over the head's own logits. Those passes grow with the answer's length, and with long
answers they weigh as much as the attention of several layers.

Inductor needs a C++ compiler on CPU (triton on CUDA). Where compiling fails the process runs eager
from then on, and the log says why; `TORCH_COMPILE_DISABLE=1` (PyTorch's own switch; the tests set it) also means eager.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def decoder_layer(layer, hidden: torch.Tensor, attention: dict, rotary, positions: torch.Tensor) -> torch.Tensor:
    """One of the base's decoder layers (transformers' own), as MoPs calls it: the unit that is compiled."""
    return layer(hidden, **attention, position_embeddings=rotary, position_ids=positions)


def labelled_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) cross-entropy of N labelled positions' logits (N, V), in float32 whatever the head's dtype."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


_compiled: dict[Callable, Callable] = {}  # eager function -> its compiled version, made on first use
_unavailable: str | None = None  # why this process runs eager, once compiling failed
_first_pass_reported = False


def unavailable_reason() -> str | None:
    """Why the layers and the loss run eager in this process although compiling was asked for; None if they compile."""
    if torch._dynamo.config.disable:
        return "TORCH_COMPILE_DISABLE is set"
    return _unavailable


def active(compile: bool) -> bool:
    """Whether what is asked to `compile` will run compiled in this process (as far as is known yet)."""
    return compile and unavailable_reason() is None


def _compiled_version(fn: Callable) -> Callable:
    if fn not in _compiled:
        # Inductor imports torch.utils.mkldnn, which uses PyTorch's own deprecated `torch.jit.script_method`;
        # Flower shows every DeprecationWarning once per process, so each simulated client printed it.
        warnings.filterwarnings("ignore", message="`torch.jit.script_method` is deprecated", category=DeprecationWarning)
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def _give_up(error: Exception) -> None:
    global _unavailable
    _unavailable = str(error).strip().splitlines()[0]
    log.warning("torch.compile cannot run here (%s): the decoder layers and the loss run eager", _unavailable)


def run(through: Callable[[Callable], torch.Tensor], compile: bool) -> torch.Tensor:
    """`through(layer_fn)`: the layers run with `layer_fn` as each layer's call, compiled when `compile`
    and compiling works here, else `decoder_layer` itself."""
    global _first_pass_reported
    if not active(compile):
        return through(decoder_layer)
    started = time.perf_counter()
    try:
        out = through(_compiled_version(decoder_layer))
    except torch._dynamo.exc.BackendCompilerFailed as error:
        _give_up(error)
        return through(decoder_layer)
    if not _first_pass_reported:
        _first_pass_reported = True
        log.info("decoder layers compiled (torch.compile, once per process): the first pass took %.1f s",
                 time.perf_counter() - started)
    return out


def loss(logits: torch.Tensor, labels: torch.Tensor, compile: bool) -> torch.Tensor:
    """`labelled_nll`, compiled when `compile` and compiling works here."""
    if active(compile):
        try:
            return _compiled_version(labelled_nll)(logits, labels)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            _give_up(error)
    return labelled_nll(logits, labels)
