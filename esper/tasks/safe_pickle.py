"""A pickle reader that builds only built-in containers and NumPy arrays.

A pickle may name any importable callable, so an untrusted file could run code while
loading. This reader resolves a short allow-list of names and refuses every other one
before anything is called.
"""

import io
import pickle

import numpy as np


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a callable outside the allow-list."""


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1");
    # any other codec name is not something a data file needs.
    if encoding not in ("latin1", "latin-1"):
        raise ForbiddenGlobal(f"the pickle asks for codec {encoding!r}")
    return text.encode("latin1")


# NumPy moved numpy.core to numpy._core in 2.0 and files name either path; take the
# reconstructors from an array itself rather than importing a path that may warn or be gone.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]

_BUILTIN_CONTAINERS = (set, frozenset, bytes, bytearray)

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
    # Python 2 pickles (the real CIFAR-10 files) say __builtin__ where Python 3 says builtins.
    **{(module, kind.__name__): kind for module in ("builtins", "__builtin__") for kind in _BUILTIN_CONTAINERS},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"it refers to {module}.{name}, which a data file may not use") from None


def loads(raw: bytes, encoding: str = "bytes"):
    """Unpickle ``raw``; ``encoding`` decodes Python 2 strings (``bytes`` keeps them as bytes)."""
    return _RestrictedUnpickler(io.BytesIO(raw), encoding=encoding).load()
