"""Device access rules: OCI linux.resources.devices, as v1 devices.allow/deny lines and as
the eBPF program (BPF_PROG_TYPE_CGROUP_DEVICE) that enforces them on cgroup v2.

Every container's rules start from "deny all" and end with the basic nodes (runc's
AllowedDevices minus its wildcard mknod rules), so a config without device rules
still gets /dev/null and friends and nothing else.
"""

import os
import struct
from dataclasses import dataclass

from runtime.errors import FailedPrecondition


@dataclass(slots=True)
class DeviceRule:
    """One linux.resources.devices rule; runtime/spec.py validates config.json's into these."""

    allow: bool
    type: str = "a"  # "a" (all: resets the policy), "b" or "c"
    major: int | None = None  # None: any
    minor: int | None = None  # None: any
    access: str = "rwm"  # some of "rwm"

    def v1_line(self) -> str:
        """The line devices.allow / devices.deny takes ("a" resets, like the kernel reads it)."""
        if self.type == "a":
            return "a"
        major = "*" if self.major is None else self.major
        minor = "*" if self.minor is None else self.minor
        return f"{self.type} {major}:{minor} {self.access}"


DENY_ALL = DeviceRule(False, "a", None, None, "rwm")
DEFAULT_ALLOWED = (
    DeviceRule(True, "c", 1, 3, "rwm"),  # null
    DeviceRule(True, "c", 1, 5, "rwm"),  # zero
    DeviceRule(True, "c", 1, 7, "rwm"),  # full
    DeviceRule(True, "c", 1, 8, "rwm"),  # random
    DeviceRule(True, "c", 1, 9, "rwm"),  # urandom
    DeviceRule(True, "c", 5, 0, "rwm"),  # tty
    DeviceRule(True, "c", 5, 2, "rwm"),  # ptmx
    DeviceRule(True, "c", 136, None, "rwm"),  # pts/*
)


def container_rules(rules: list[DeviceRule] | None) -> list[DeviceRule]:
    """Deny all, the config's (validated) rules in order, then the basic nodes."""
    return [DENY_ALL, *(rules or ()), *DEFAULT_ALLOWED]


# --- cgroup v2: the eBPF program ------------------------------------------------------------

# linux/bpf.h
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_PROG_QUERY = 16
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2
_DEV_TYPE = {"b": 1, "c": 2}  # BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR
_ACCESS_BIT = {"m": 1, "r": 2, "w": 4}  # BPF_DEVCG_ACC_MKNOD, _READ, _WRITE

# Opcodes used (class | op | source).
_LDX_W = 0x61  # dst = *(u32 *)(src + off)
_AND32_K = 0x54
_RSH32_K = 0x74
_MOV32_X = 0xBC
_MOV64_K = 0xB7
_JEQ_K = 0x15
_JNE_K = 0x55
_EXIT = 0x95


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def policy(rules: list[DeviceRule]) -> tuple[bool, list[DeviceRule]]:
    """(allow by default?, the exceptions after the last "a" rule, in order)."""
    default_allow, exceptions = True, []  # a new cgroup allows everything
    for rule in rules:
        if rule.type == "a":
            default_allow, exceptions = rule.allow, []
        else:
            exceptions.append(rule)
    return default_allow, exceptions


def _access_mask(access: str) -> int:
    return sum(_ACCESS_BIT[c] for c in set(access))


def program(rules: list[DeviceRule]) -> bytes:
    """The instructions of a device program: the last matching rule decides.

    An allow rule matches a request whose access bits it covers entirely; a deny rule
    matches any request it overlaps. Registers: r2 type, r3 access, r4 major, r5 minor
    (from struct bpf_cgroup_dev_ctx), r1 scratch; r0 is the verdict (1 allow).
    """
    default_allow, exceptions = policy(rules)
    code = [
        _insn(_LDX_W, dst=2, src=1, off=0),
        _insn(_AND32_K, dst=2, imm=0xFFFF),
        _insn(_LDX_W, dst=3, src=1, off=0),
        _insn(_RSH32_K, dst=3, imm=16),
        _insn(_LDX_W, dst=4, src=1, off=4),
        _insn(_LDX_W, dst=5, src=1, off=8),
    ]
    for rule in reversed(exceptions):
        # (opcode, dst, imm) of each test that skips to the next rule when it holds
        skips: list[tuple[int, int, int] | bytes] = [(_JNE_K, 2, _DEV_TYPE[rule.type])]
        mask = _access_mask(rule.access)
        if rule.allow and mask != 7:
            skips += [_insn(_MOV32_X, dst=1, src=3), _insn(_AND32_K, dst=1, imm=~mask & 7)]
            skips.append((_JNE_K, 1, 0))  # asks for a bit the rule does not grant
        elif not rule.allow:
            skips += [_insn(_MOV32_X, dst=1, src=3), _insn(_AND32_K, dst=1, imm=mask)]
            skips.append((_JEQ_K, 1, 0))  # asks for none of the bits the rule denies
        if rule.major is not None:
            skips.append((_JNE_K, 4, rule.major))
        if rule.minor is not None:
            skips.append((_JNE_K, 5, rule.minor))
        block_length = len(skips) + 2
        for position, step in enumerate(skips):
            if isinstance(step, bytes):
                code.append(step)
            else:
                opcode, register, imm = step
                code.append(_insn(opcode, dst=register, off=block_length - position - 1, imm=imm))
        code += [_insn(_MOV64_K, dst=0, imm=int(rule.allow)), _insn(_EXIT)]
    code += [_insn(_MOV64_K, dst=0, imm=int(default_allow)), _insn(_EXIT)]
    return b"".join(code)


def _load(instructions: bytes) -> int:
    import ctypes

    from runtime import linux

    insns = ctypes.create_string_buffer(instructions, len(instructions))
    license_text = ctypes.create_string_buffer(b"Apache")
    attr = bytearray(128)
    struct.pack_into(
        "<IIQQ",
        attr,
        0,
        BPF_PROG_TYPE_CGROUP_DEVICE,
        len(instructions) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license_text),
    )
    attr[48:60] = b"zviz_devices"
    try:
        return linux.bpf(BPF_PROG_LOAD, attr, "device program")
    except OSError as err:
        if err.errno not in (1, 13, 22):  # EPERM, EACCES, EINVAL: ask the verifier why
            raise
        log = ctypes.create_string_buffer(65536)
        struct.pack_into("<IIQ", attr, 24, 1, len(log), ctypes.addressof(log))
        try:
            return linux.bpf(BPF_PROG_LOAD, attr, "device program")
        except OSError as again:
            verifier = log.value.decode(errors="replace").strip()[-500:]
            raise OSError(again.errno, f"{again.strerror} {verifier}".strip()) from None


def _attached_ids(cgroup_fd: int) -> list[int]:
    import ctypes

    from runtime import linux

    ids = (ctypes.c_uint32 * 64)()
    attr = bytearray(64)
    struct.pack_into("<IIII", attr, 0, cgroup_fd, BPF_CGROUP_DEVICE, 0, 0)
    struct.pack_into("<QI", attr, 16, ctypes.addressof(ids), len(ids))
    linux.bpf(BPF_PROG_QUERY, attr, "query device programs")
    (count,) = struct.unpack_from("<I", attr, 24)
    return list(ids[:count])


def attached_program_count(cgroup_dir: str) -> int:
    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return len(_attached_ids(fd))
    finally:
        os.close(fd)


def enforce(cgroup_dir: str, rules: list[DeviceRule]) -> None:
    """Attaches the rules' program to a v2 cgroup, replacing any zviz attached before.

    The new program is attached before the old ones are detached: in between both
    must allow a device, so the policy is never looser than either.
    """
    from runtime import linux

    try:
        prog_fd = _load(program(rules))
    except OSError as err:
        raise FailedPrecondition(
            f"cgroup {cgroup_dir}: cannot load the device program: {err}"
        ) from err
    cgroup_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        previous = _attached_ids(cgroup_fd)
        attr = bytearray(32)
        struct.pack_into("<IIII", attr, 0, cgroup_fd, prog_fd, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI)
        linux.bpf(BPF_PROG_ATTACH, attr, cgroup_dir)
        for prog_id in previous:
            id_attr = bytearray(16)
            struct.pack_into("<I", id_attr, 0, prog_id)
            old_fd = linux.bpf(BPF_PROG_GET_FD_BY_ID, id_attr, f"program {prog_id}")
            try:
                detach = bytearray(32)
                struct.pack_into("<IIII", detach, 0, cgroup_fd, old_fd, BPF_CGROUP_DEVICE, 0)
                linux.bpf(BPF_PROG_DETACH, detach, cgroup_dir)
            finally:
                os.close(old_fd)
    except OSError as err:
        raise FailedPrecondition(
            f"cgroup {cgroup_dir}: cannot attach the device program: {err}"
        ) from err
    finally:
        os.close(cgroup_fd)
        # The attachment holds its own reference to the program.
        os.close(prog_fd)
