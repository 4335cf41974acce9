"""The eBPF socket load balancer: a service VIP reaches its backends, chosen at connect time.

`ServiceLB` loads the programs of lb.bpf.c onto a cgroup v2 group and owns their maps;
`PolicyDatapath` loads policy.bpf.c onto pod veths (tc) and writes its maps (`PolicyMaps`, with
the constants of `policy_model`);
`build_object` compiles that source (clang); `mount_bpffs`, `ensure_cgroup2` and `cgroup_for`
prepare the file systems it needs.
"""

from .build import build_object
from .errors import BpfAttachError, BpfBuildError, BpfError, BpfLoadError, BpfMapError, BpfMapFull, BpfUnavailable
from .lb import PROGRAMS, ServiceLB, pin_dir_for, read_pinned
from .model import Backend, Frontend, ServiceEntry, ServiceKey
from .policy import PolicyDatapath, remove_pins as remove_policy_pins
from . import policy_model
from .policy_model import Interval, PolicyMaps, RuleEntry, RuleKey
from .system import BPFFS, CGROUP2, PIN_ROOT, cgroup_for, ensure_cgroup2, mount_bpffs, remove_cgroup

__all__ = [
    "Interval",
    "PolicyDatapath",
    "remove_policy_pins",
    "PolicyMaps",
    "RuleEntry",
    "RuleKey",
    "policy_model",
    "BPFFS",
    "CGROUP2",
    "PIN_ROOT",
    "PROGRAMS",
    "Backend",
    "BpfAttachError",
    "BpfBuildError",
    "BpfError",
    "BpfLoadError",
    "BpfMapError",
    "BpfMapFull",
    "BpfUnavailable",
    "Frontend",
    "ServiceEntry",
    "ServiceKey",
    "ServiceLB",
    "build_object",
    "cgroup_for",
    "ensure_cgroup2",
    "mount_bpffs",
    "pin_dir_for",
    "read_pinned",
    "remove_cgroup",
]
