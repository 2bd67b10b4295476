"""ctypes bindings for the kernel facilities the sandbox uses: unshare (namespaces), prctl,
mount and mount_setattr, Landlock's three syscalls, capset, and libseccomp.

Why ctypes and not a library: the PyPI `landlock` package (1.0.0.dev5, alpha, one maintainer)
covers file-system rules only, up to ABI 5 -- no network rules (ABI 4) and no signal/socket scopes
(ABI 6) -- and `pyseccomp` (0.1.2, 2021) is an unmaintained ctypes wrapper.  Landlock is three
syscalls with fixed numbers on every architecture, so they are called directly here; seccomp
filters are built by the maintained C library libseccomp (libseccomp.so.2, which apt itself
depends on), loaded with ctypes, so the filter is correct for the machine's architecture.
`os.unshare` only exists from Python 3.12, hence libc's unshare through ctypes too."""

from __future__ import annotations

import ctypes
import errno
import functools
import os


CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWCGROUP = 0x02000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
MOUNT_ATTR_RDONLY, AT_RECURSIVE, AT_FDCWD = 0x1, 0x8000, -100
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
PR_SET_CHILD_SUBREAPER, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 36, 47, 4
# Syscalls added after 5.1 have one number on every architecture.
SYS_MOUNT_SETATTR, SYS_LANDLOCK_CREATE_RULESET = 442, 444
SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 445, 446
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
# Landlock file-system rights and the ABI that introduced each.
LANDLOCK_FS = {"execute": (1 << 0, 1), "write_file": (1 << 1, 1), "read_file": (1 << 2, 1),
               "read_dir": (1 << 3, 1), "remove_dir": (1 << 4, 1), "remove_file": (1 << 5, 1),
               "make_char": (1 << 6, 1), "make_dir": (1 << 7, 1), "make_reg": (1 << 8, 1),
               "make_sock": (1 << 9, 1), "make_fifo": (1 << 10, 1), "make_block": (1 << 11, 1),
               "make_sym": (1 << 12, 1), "refer": (1 << 13, 2), "truncate": (1 << 14, 3),
               "ioctl_dev": (1 << 15, 5)}
LANDLOCK_NET_BIND_TCP, LANDLOCK_NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET, LANDLOCK_SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ, SCMP_CMP_GT, SCMP_CMP_MASKED_EQ = 4, 6, 7
AF_INET, AF_INET6 = 2, 10


def scmp_act_errno(number: int) -> int:
  return 0x00050000 | (number & 0xFFFF)


class LandlockRulesetAttr(ctypes.Structure):
  _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
              ("scoped", ctypes.c_uint64)]


class LandlockPathBeneathAttr(ctypes.Structure):
  _pack_ = 1
  _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class MountAttr(ctypes.Structure):
  _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
              ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class CapHeader(ctypes.Structure):
  _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
  _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
              ("inheritable", ctypes.c_uint32)]


class ScmpArgCmp(ctypes.Structure):
  _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
              ("datum_b", ctypes.c_uint64)]


@functools.lru_cache(maxsize=None)
def libc():
  library = ctypes.CDLL(None, use_errno=True)
  library.syscall.restype = ctypes.c_long
  library.calloc.restype = ctypes.c_void_p
  library.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
  for name in ("read", "write"):
    getattr(library, name).restype = ctypes.c_ssize_t
    getattr(library, name).argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
  return library


def check(result: int, what: str) -> int:
  """Raises OSError naming `what` when a libc call returned -1."""
  if result == -1:
    number = ctypes.get_errno()
    raise OSError(number, f"{what}: {os.strerror(number)}")
  return result


def read_into_c_memory(fd: int, size: int) -> int:
  """Reads exactly `size` bytes from `fd` into memory allocated by libc (never freed) and returns
  its address: the bytes never become a Python object."""
  address = libc().calloc(1, size)
  if not address:
    raise OSError(errno.ENOMEM, f"calloc({size})")
  done = 0
  while done < size:
    count = check(libc().read(fd, address + done, size - done), f"read(fd {fd})")
    if count == 0:
      raise OSError(errno.EPIPE, f"fd {fd} closed after {done} of {size} bytes")
    done += count
  return address


def write_from_c_memory(fd: int, address: int, size: int):
  """Writes `size` bytes at `address` (read_into_c_memory) to `fd`."""
  done = 0
  while done < size:
    done += check(libc().write(fd, address + done, size - done), f"write(fd {fd})")


def unshare(flags: int, what: str):
  check(libc().unshare(ctypes.c_int(flags)), f"unshare({what})")


def prctl(option: int, arg: int, what: str):
  check(libc().prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({what})")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None):
  def encode(text):
    return None if text is None else text.encode()
  check(libc().mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags),
                       encode(data)), f"mount({fstype or source} on {target})")


def landlock_abi() -> int:
  """The kernel's Landlock ABI version; 0 where Landlock is absent or disabled."""
  version = libc().syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
  return max(int(version), 0)


@functools.lru_cache(maxsize=None)
def libseccomp():
  """libseccomp.so.2 with the prototypes used here; None where it is not installed."""
  try:
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
  except OSError:
    return None
  lib.seccomp_init.restype = ctypes.c_void_p
  lib.seccomp_init.argtypes = [ctypes.c_uint32]
  lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
  lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                         ctypes.c_uint, ctypes.POINTER(ScmpArgCmp)]
  lib.seccomp_load.argtypes = [ctypes.c_void_p]
  lib.seccomp_release.argtypes = [ctypes.c_void_p]
  return lib


def seccomp_supported() -> bool:
  with open("/proc/self/status", encoding="ascii") as f:
    return "Seccomp_filters:" in f.read() and libseccomp() is not None
