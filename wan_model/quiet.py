"""The one list of third-party notices wantune's commands hide, each with the reason.

A command's output should be its own lines, progress bars and reports: a notice that asks nothing
of the user (and often reads like a failure) is filtered where it comes from, by its library's
logger or warning category and its exact text, so that any other message of the same library
still shows. `--verbose` or `run.log_level=verbose` installs none of them. Importing wan_model as
a library changes nothing; only the commands call `quiet_third_party`.
"""
from __future__ import annotations

import logging
import re
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg).lstrip()
        return not any(text.startswith(s) for s in self.starts)


# (logger name, message starts, why it asks nothing of the user)
LOGGED = [
    # DeepSpeed probes for an accelerator when accelerate imports it; on a machine without a GPU
    # it says so as a WARNING, though a CPU run is exactly what was asked for.
    ("DeepSpeed", ("Setting accelerator to CPU",)),
    # bitsandbytes tries an optional Hub kernel for CPU 4-bit matmuls on CPUs with AVX512-BF16
    # and, without the `kernels` package, warns at import; wantune never runs 4-bit matmuls (its
    # 8-bit optimizers do not use them) and falls back to the built-in kernel anyway.
    ("bitsandbytes.backends.cpu.ops", ("Failed to load CPU gemm_4bit_forward from kernels-community",)),
    # torch.compile notices a selective-checkpoint context_fn and reminds that the region must have
    # no in-place ops: wan_model's blocks have none (tests/test_gpu_fastpath.py checks the compiled,
    # selectively checkpointed step against the plain one), so the reminder is for developers.
    ("torch._higher_order_ops.wrap", ("Detected that context_fn is passed to torch.utils.checkpoint",)),
]


# (warning category, module that warns (a regex), message start, why it asks nothing of the user)
WARNED = [
    # CuTe DSL, FlashAttention 4's compiler, notes each time it compiles one of FlashAttention 4's
    # kernels (a few per process) that an argument of FlashAttention 4's own kernel class is
    # passed as a plain Python object; the kernels compile and are exact
    # (tests/test_gpu_fastpath.py -k fa4), the note is for FlashAttention 4's developers.
    (UserWarning, r"cutlass\.base_dsl\.dsl", "Argument aux_data (position"),
    # Routing SDPA's flash ops to FlashAttention 4 (attention backend fa4, or auto on Hopper)
    # registers kernels over torch's own for them, which is the point; torch says so once per
    # process, in several lines that read like an error.
    (UserWarning, r"torch\.library", "Warning only once for all operators"),
]
_installed_warning_filters: list = []


def quiet_third_party(verbose: bool = False) -> None:
    """Hide the notices listed above, or with `verbose` show them again. Call before the
    libraries load (some notices come at import)."""
    for name, starts in LOGGED:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, _DropMessages)]:
            logger.removeFilter(f)
        if not verbose:
            logger.addFilter(_DropMessages(*starts))
    for entry in _installed_warning_filters:
        if entry in warnings.filters:
            warnings.filters.remove(entry)
    _installed_warning_filters.clear()
    if not verbose:
        for category, module, start in WARNED:
            warnings.filterwarnings("ignore", message=re.escape(start), category=category, module=module)
            _installed_warning_filters.append(warnings.filters[0])
    getattr(warnings, "_filters_mutated", lambda: None)()  # a removed filter stops applying
