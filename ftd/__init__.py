"""ftd: fault tolerance for groups of QEMU/KVM virtual machines (COLO, group failover)."""

__version__ = "0.1.0"
