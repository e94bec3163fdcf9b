"""Syscall names <-> numbers for the native architecture, from libseccomp's tables.

Plain ctypes over libseccomp.so (no pyseccomp import): the profile checker and the
broker need names, and both sit on paths where import time counts.
"""

import ctypes
import functools

_lib = None


def _libseccomp():
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libseccomp.so.2")
        except OSError:
            from ctypes.util import find_library  # ~6 ms: only when the soname differs

            lib = ctypes.CDLL(find_library("seccomp"))
        lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
        lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
        lib.seccomp_syscall_resolve_num_arch.argtypes = (ctypes.c_uint32, ctypes.c_int)
        lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p
        lib.seccomp_version.restype = ctypes.c_void_p
        _lib = lib
    return _lib


@functools.cache
def number(name: str) -> int:
    """The native number of `name`; negative for a name this architecture lacks; -1 unknown."""
    return _libseccomp().seccomp_syscall_resolve_name(name.encode())


def known(name: str) -> bool:
    return number(name) != -1


def exists_here(name: str) -> bool:
    """True if the native architecture has this syscall (libseccomp knows names of all arches)."""
    return number(name) >= 0


@functools.cache
def name(nr: int) -> str:
    ptr = _libseccomp().seccomp_syscall_resolve_num_arch(0, nr)
    if not ptr:
        return f"syscall_{nr}"
    text = ctypes.string_at(ptr).decode()
    ctypes.CDLL(None).free(ctypes.c_void_p(ptr))
    return text


@functools.cache
def libseccomp_version() -> str:
    class _Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]

    lib = _libseccomp()
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    v = lib.seccomp_version().contents
    return f"{v.major}.{v.minor}.{v.micro}"
