"""Drops the three log lines that every process printed when diffusers imports torchao, none of them a problem.

diffusers imports torchao at its own import whenever torchao is installed (diffusers/quantizers/torchao registers
torchao's tensor classes for `torch.load`), so our lazy `import torchao` in quantization.py cannot keep it out of a
process. That import logs:

- torchao: "Failed to load .../_C_mxfp8...so" and ".../_C_cutlass_90a.abi3.so": the PyPI wheel of torchao 0.18 is
  its CUDA build, and these kernels (MX fp8 for Blackwell, CUTLASS for sm_90a) link libc10_cuda.so, which a CPU
  build of torch does not have. We use neither (int8 weight-only runs on torch ops, fp8 on torch._scaled_mm).
  Dropped only under a CPU build of torch: on a CUDA build the same failure is a broken install and stays loud.
- diffusers: "Unable to import `torchao` Tensor objects": diffusers 0.42 lists torchao classes that torchao 0.18
  moved (torchao.dtypes.NF4Tensor, torchao.dtypes.uintx) as safe globals for `torch.load(weights_only=True)` of
  pickled torchao checkpoints. We never load those: weights come from safetensors and are quantised after loading.
- torch.utils._pytree: "<enum 'KernelPreference'> is an Enum subclass ...": torchao 0.18 registers its enums as
  pytree constants, which torch 2.13 deprecates. Dropped for torchao's enums only.

The import itself costs ~0.3 s of a process start on a CPU (`python -X importtime`), paid inside diffusers' import.
"""

from __future__ import annotations

import logging
import sys


def _cpu_torch() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.version.cuda is None


def _not_torchao_kernel_on_cpu_torch(record: logging.LogRecord) -> bool:
    return not (record.getMessage().startswith("Failed to load ") and _cpu_torch())


def _not_diffusers_torchao_safe_globals(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Unable to import `torchao` Tensor objects")


def _not_torchao_enum_constant(record: logging.LogRecord) -> bool:
    subject = record.args[0] if isinstance(record.args, tuple) and record.args else None
    deprecated = "is an Enum subclass and is now natively supported" in str(record.msg)
    return not (deprecated and getattr(subject, "__module__", "").startswith("torchao"))


def quiet_torchao_import() -> None:
    """Installs the filters on the loggers that log the lines above (before anything imports diffusers)."""
    for name, keep in (
        ("torchao", _not_torchao_kernel_on_cpu_torch),
        ("diffusers.quantizers.torchao.torchao_quantizer", _not_diffusers_torchao_safe_globals),
        ("torch.utils._pytree", _not_torchao_enum_constant),
    ):
        logger = logging.getLogger(name)
        if keep not in logger.filters:
            logger.addFilter(keep)
