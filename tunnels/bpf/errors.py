"""Errors of the eBPF service load balancer: building, loading, attaching, map operations."""

from __future__ import annotations

from ..errors import KernelUnsupported, TunnelError


class BpfError(TunnelError):
    """A libbpf or bpf() operation failed; `errno` is the kernel's (or libbpf's) error number."""


class BpfUnavailable(BpfError, KernelUnsupported):
    """This machine cannot build or run the programs (no clang, no libbpf, no BPF syscall, not root)."""

    hint = "run scripts/setup.sh as root (it installs clang, llvm, libbpf-dev and bpftool)"


class BpfBuildError(BpfError):
    """clang refused lb.bpf.c."""


class BpfLoadError(BpfError):
    """The object could not be opened or loaded (verifier, or pinned maps of another layout)."""


class BpfAttachError(BpfError):
    """A program could not be attached to the cgroup, pinned, or swapped into its link."""


class BpfMapError(BpfError):
    """A map lookup, update or delete failed."""


class BpfMapFull(BpfMapError):
    """A map has no room left (E2BIG/ENOSPC/ENOMEM from the kernel)."""
