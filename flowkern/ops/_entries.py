"""The public functions' usual calls in C: flowkern._fastcall's entries
(csrc/fastcall/entries.cpp; docs/build.md "Public calls in C").

Each public function on the native backends first passes its arguments, in
signature order, to its entry. The entry makes the same flowkern:: op call
the Python would make, when every argument is of the usual kind, and returns
the result; otherwise it returns None and the Python runs. It reads the rule
book's names and codes from here, once.

`ENTRIES` is the configured module, or None where flowkern._fastcall does not
serve this torch (or flowkern._C is not built): the Python then takes every
call. Under torch.compile the Python runs too (Dynamo traces it, not the C
call): `compiling` is torch.compiler.is_compiling, which Dynamo folds.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad

from .. import backend as _backend
from .._rules import FORMS, PRED_CODE, REDUCTION_CODE, TABLE_KIND
from .._validate import _PRECHECKED
from ..schedules import _NATIVE_BY_NAME
from ._registry import HUGE_OUTPUT_BYTES

compiling = torch.compiler.is_compiling


def _configure():
    fast = _backend.fastcall()
    if fast is None or not _backend.cpu_built():
        return None
    fast.configure({
        "backend_var": _backend._current,
        "prechecked_var": _PRECHECKED,
        "env_data": _backend._ENV_DATA,
        "env_key": _backend._ENV_KEY,
        "fwad_dict": vars(_fwad),
        "pred_codes": PRED_CODE,
        "form_codes": FORMS,
        "reduction_codes": REDUCTION_CODE,
        "schedules": _NATIVE_BY_NAME,
        "table_kind": TABLE_KIND,
        "auto_cpu_native": _backend._AUTO_CPU in _backend.NATIVE_BACKENDS,
        "auto_cuda_native": _backend._AUTO_CUDA in _backend.NATIVE_BACKENDS,
        "cuda_native": _backend.cuda_built(),
        "huge_bytes": HUGE_OUTPUT_BYTES,
    })
    return fast


ENTRIES = _configure()
